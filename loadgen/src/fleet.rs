//! The simulated devices: fixed traits drawn from the seed, a little state each, and the
//! seed-schema JSON they publish.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

const FIRMWARE_COHORTS: [(&str, u32); 4] = [
    ("1.4.2", 15),
    ("2.0.1", 30),
    ("2.1.0", 50),
    ("2.2.0-beta", 5),
];

/// What never changes for a device.
#[derive(Debug, Clone, PartialEq)]
struct Traits {
    base_temperature: f64,
    base_humidity: f64,
    base_signal: f64,
    drain_per_reading: f64,
    lat: f64,
    lng: f64,
    firmware: &'static str,
    /// Uniform in [0, 1): the device is anomalous when this is below the anomaly rate.
    anomaly_draw: f64,
}

/// What changes from reading to reading.
#[derive(Debug, Clone, Copy)]
struct State {
    temperature_walk: f32,
    battery: f32,
}

/// A set of devices with consecutive indices, simulated by one connection.
pub struct Fleet {
    anomaly_rate: f64,
    indices: Vec<u64>,
    /// Drawn once per device (a reading would otherwise seed a generator again).
    traits: Vec<Traits>,
    states: Vec<State>,
    rng: ChaCha8Rng,
}

/// The device id of device `index`: `device-000042`.
pub fn device_id(index: u64) -> String {
    format!("device-{index:06}")
}

fn traits(seed: u64, index: u64) -> Traits {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut pick = rng.random_range(0..100);
    let firmware = FIRMWARE_COHORTS
        .iter()
        .find(|(_, weight)| {
            let hit = pick < *weight;
            pick = pick.saturating_sub(*weight);
            hit
        })
        .map(|(version, _)| *version)
        .unwrap_or(FIRMWARE_COHORTS[0].0);
    Traits {
        base_temperature: rng.random_range(15.0..30.0),
        base_humidity: rng.random_range(30.0..70.0),
        base_signal: rng.random_range(-100.0..-50.0),
        drain_per_reading: rng.random_range(0.005..0.05),
        lat: rng.random_range(-60.0..70.0),
        lng: rng.random_range(-180.0..180.0),
        firmware,
        anomaly_draw: rng.random_range(0.0..1.0),
    }
}

#[derive(Serialize)]
struct Message<'a> {
    #[serde(rename = "deviceId")]
    device_id: &'a str,
    timestamp: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    payload: Payload,
    metadata: Metadata<'a>,
}

#[derive(Serialize)]
struct Payload {
    temperature: f64,
    humidity: f64,
    battery: f64,
    #[serde(rename = "signalStrength")]
    signal_strength: f64,
}

#[derive(Serialize)]
struct Metadata<'a> {
    #[serde(rename = "firmwareVersion")]
    firmware_version: &'a str,
    location: Location,
}

#[derive(Serialize)]
struct Location {
    lat: f64,
    lng: f64,
}

/// One generated reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device_index: u64,
    pub temperature: f64,
    pub humidity: f64,
    pub battery: f64,
    pub signal_strength: f64,
    /// The device's fixed metadata, carried along so the payload need not derive it again.
    pub firmware_version: &'static str,
    pub lat: f64,
    pub lng: f64,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl Fleet {
    /// The devices `indices`, simulated from `seed`.
    pub fn new(seed: u64, indices: Vec<u64>) -> Fleet {
        let states = indices
            .iter()
            .map(|&i| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed.rotate_left(17) ^ i);
                State {
                    temperature_walk: 0.0,
                    battery: rng.random_range(20.0..100.0),
                }
            })
            .collect();
        Fleet {
            anomaly_rate: 0.0,
            rng: ChaCha8Rng::seed_from_u64(seed ^ indices.first().copied().unwrap_or(0)),
            traits: indices.iter().map(|&i| traits(seed, i)).collect(),
            indices,
            states,
        }
    }

    /// Makes about this fraction of the devices anomalous: every 10 minutes they run hot
    /// (82–90 °C) for 3 minutes, crossing typical alert thresholds and coming back.
    pub fn with_anomaly_rate(mut self, rate: f64) -> Fleet {
        self.anomaly_rate = rate;
        self
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The next reading of the `slot`-th device of this fleet, at `unix_seconds`.
    pub fn next_reading(&mut self, slot: usize, unix_seconds: f64) -> Reading {
        let index = self.indices[slot];
        let traits = &self.traits[slot];
        let state = &mut self.states[slot];
        state.temperature_walk =
            (state.temperature_walk + self.rng.random_range(-0.2f32..0.2)).clamp(-4.0, 4.0);
        state.battery -= traits.drain_per_reading as f32;
        if state.battery < 5.0 {
            state.battery = 100.0; // recharged
        }
        let day_phase = (unix_seconds % 86_400.0) / 86_400.0 * std::f64::consts::TAU;
        let overheating = traits.anomaly_draw < self.anomaly_rate
            && (unix_seconds + index as f64 * 37.0) % 600.0 < 180.0;
        let temperature = if overheating {
            self.rng.random_range(82.0..90.0)
        } else {
            traits.base_temperature + 5.0 * day_phase.sin() + f64::from(state.temperature_walk)
        };
        Reading {
            device_index: index,
            temperature: round2(temperature),
            humidity: round2(traits.base_humidity + self.rng.random_range(-2.0..2.0)),
            battery: f64::from(state.battery.round()),
            signal_strength: (traits.base_signal + self.rng.random_range(-3.0..3.0)).round(),
            firmware_version: traits.firmware,
            lat: round2(traits.lat * 1000.0) / 1000.0,
            lng: round2(traits.lng * 1000.0) / 1000.0,
        }
    }

    /// The seed-schema JSON of `reading` taken at `timestamp` (RFC 3339).
    pub fn payload(&self, reading: &Reading, device_id: &str, timestamp: &str) -> Vec<u8> {
        let message = Message {
            device_id,
            timestamp,
            kind: "telemetry",
            payload: Payload {
                temperature: reading.temperature,
                humidity: reading.humidity,
                battery: reading.battery,
                signal_strength: reading.signal_strength,
            },
            metadata: Metadata {
                firmware_version: reading.firmware_version,
                location: Location {
                    lat: reading.lat,
                    lng: reading.lng,
                },
            },
        };
        serde_json::to_vec(&message).expect("a message of numbers and strings serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings(seed: u64) -> Vec<Reading> {
        let mut fleet = Fleet::new(seed, vec![0, 1, 2]);
        (0..300)
            .map(|i| fleet.next_reading(i % 3, 1_705_314_600.0 + i as f64))
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_data() {
        assert_eq!(readings(7), readings(7));
        assert_ne!(readings(7), readings(8));
    }

    #[test]
    fn values_stay_in_physical_bounds() {
        let mut fleet = Fleet::new(1, (0..100).collect());
        for i in 0..20_000 {
            let r = fleet.next_reading(i % 100, 1_705_314_600.0 + i as f64);
            assert!((5.0..=40.0).contains(&r.temperature), "{r:?}");
            assert!((25.0..=75.0).contains(&r.humidity), "{r:?}");
            assert!((4.0..=100.0).contains(&r.battery), "{r:?}");
            assert!((-104.0..=-46.0).contains(&r.signal_strength), "{r:?}");
        }
    }

    #[test]
    fn payloads_follow_the_seed_schema() {
        let mut fleet = Fleet::new(3, vec![42]);
        let reading = fleet.next_reading(0, 0.0);
        let payload = fleet.payload(&reading, &device_id(42), "2024-01-15T10:30:00.000Z");
        let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(json["deviceId"], "device-000042");
        assert_eq!(json["type"], "telemetry");
        assert_eq!(json["timestamp"], "2024-01-15T10:30:00.000Z");
        assert_eq!(json["payload"]["temperature"], reading.temperature);
        assert!(json["payload"]["signalStrength"].is_number());
        assert!(json["metadata"]["firmwareVersion"].is_string());
        assert!(json["metadata"]["location"]["lat"].is_number());
    }

    #[test]
    fn anomalous_devices_run_hot_for_3_of_every_10_minutes() {
        let indices: Vec<u64> = (0..200).collect();
        let mut normal = Fleet::new(9, indices.clone());
        assert!((0..6000).all(|s| normal.next_reading(s % 200, s as f64).temperature < 40.0));
        let mut fleet = Fleet::new(9, indices).with_anomaly_rate(0.1);
        let hot: std::collections::HashMap<u64, usize> = (0..600 * 200)
            .map(|i| fleet.next_reading(i % 200, (i / 200) as f64))
            .filter(|r| r.temperature > 80.0)
            .fold(Default::default(), |mut m, r| {
                *m.entry(r.device_index).or_default() += 1;
                m
            });
        // About 10 % of 200 devices (±3σ).
        assert!(
            (8..=35).contains(&hot.len()),
            "{} anomalous devices",
            hot.len()
        );
        assert!(hot.values().all(|&n| n == 180), "3 minutes in every 10");
    }

    #[test]
    fn firmware_comes_in_a_few_cohorts() {
        let versions: std::collections::BTreeSet<_> =
            (0..1000).map(|i| traits(5, i).firmware).collect();
        assert_eq!(versions.len(), FIRMWARE_COHORTS.len());
    }
}
