//! The decoder fuzzed: valid messages of the device contract, mutated (bytes flipped,
//! set, inserted — JSON's own characters among them —, deleted, cut, repeated) in topic
//! and payload, plus random bytes. Every case ends in a reading or a rejection with a
//! reason, never a panic; a reading holds only what the contract allows (the topic's
//! device id, finite numbers).
//!
//! `cargo test -p sluice-ingest --test fuzz` runs 500,000 cases;
//! `SLUICE_FUZZ_CASES=10000000 cargo test --release -p sluice-ingest --test fuzz -- --nocapture`
//! runs more (`SLUICE_FUZZ_SEED` picks another sequence).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_ingest::{DecodeLimits, RejectReason, decode};

const MESSAGES: [&str; 4] = [
    r#"{"deviceId":"device-123456","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"temperature":23.5,"humidity":45.2,"battery":87,"signalStrength":-65},"metadata":{"firmwareVersion":"2.1.0","location":{"lat":37.7749,"lng":-122.4194}}}"#,
    r#"{"deviceId":"device-123456","timestamp":"2024-01-15T12:30:00.123456789+02:00","type":"telemetry","payload":{"co2":415,"temperature":-1e2}}"#,
    r#"{"type":"telemetry","payload":{},"deviceId":"device-123456","timestamp":"2024-01-15T10:30:00Z","metadata":{}}"#,
    r#"{"deviceId":"device-123456","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"temperature":1.7976931348623157e308,"x":[1],"y":{"z":2}},"metadata":{"location":{"lat":"n"}}}"#,
];
const TOPIC: &str = "devices/device-123456/telemetry";
/// Bytes that change JSON's structure, and a few that break UTF-8.
const SPECIAL: &[u8] = b"\"{}[],:\\0123456789eE+-.ntfu \xff\xc3\x80";

fn mutate(rng: &mut ChaCha8Rng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.random_range(0..=3) {
        let at = rng.random_range(0..=bytes.len());
        match rng.random_range(0..6) {
            0 if at < bytes.len() => bytes[at] = SPECIAL[rng.random_range(0..SPECIAL.len())],
            1 if at < bytes.len() => bytes[at] ^= 1 << rng.random_range(0..8),
            2 => bytes.insert(at, SPECIAL[rng.random_range(0..SPECIAL.len())]),
            3 => {
                let end = (at + rng.random_range(1..12)).min(bytes.len());
                bytes.drain(at..end);
            }
            4 => bytes.truncate(at),
            _ => {
                let end = (at + rng.random_range(1..24)).min(bytes.len());
                let chunk = bytes[at..end].to_vec();
                let to = rng.random_range(0..=bytes.len());
                bytes.splice(to..to, chunk);
            }
        }
    }
}

#[test]
fn mutated_messages_end_in_a_reading_or_a_rejection() {
    let cases: u64 = std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let seed: u64 = std::env::var("SLUICE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let limits = DecodeLimits::default();
    let mut readings = 0u64;
    let mut reasons = std::collections::BTreeMap::<&str, u64>::new();
    let started = std::time::Instant::now();
    for _ in 0..cases {
        let mut topic = TOPIC.as_bytes().to_vec();
        let mut payload = if rng.random_ratio(1, 20) {
            (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
        } else {
            MESSAGES[rng.random_range(0..MESSAGES.len())]
                .as_bytes()
                .to_vec()
        };
        mutate(&mut rng, &mut payload);
        if rng.random_ratio(1, 10) {
            mutate(&mut rng, &mut topic);
        }
        match decode(&topic, &payload, &limits) {
            Ok(reading) => {
                readings += 1;
                let id = std::str::from_utf8(&topic)
                    .ok()
                    .and_then(|t| t.strip_prefix("devices/"))
                    .and_then(|t| t.strip_suffix("/telemetry"))
                    .expect("a reading comes from a telemetry topic");
                assert_eq!(reading.device_id, id);
                let numbers = [reading.temperature, reading.humidity, reading.battery]
                    .into_iter()
                    .chain([reading.signal_strength, reading.lat, reading.lng])
                    .flatten()
                    .chain(reading.extra.iter().map(|(_, v)| *v));
                for v in numbers {
                    assert!(
                        v.is_finite(),
                        "{v} in {:?}",
                        String::from_utf8_lossy(&payload)
                    );
                }
            }
            Err(rejection) => {
                assert_ne!(rejection.reason, RejectReason::NotAuthorized);
                assert!(!rejection.detail.is_empty());
                *reasons.entry(rejection.reason.as_str()).or_default() += 1;
            }
        }
    }
    println!(
        "{cases} cases (seed {seed}) in {:.1} s: {readings} readings, rejections {reasons:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        readings > cases / 10 && reasons.len() >= 6,
        "{readings} {reasons:?}"
    );
}
