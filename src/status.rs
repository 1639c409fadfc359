//! The one-line status of a running server: what came in, what is stored, what MQTT
//! subscribers missed.

use std::time::Instant;

use sluice_storage::Storage;

use sluice_broker::MqttMeters;

use sluice_ingest::{REJECTS_TABLE as REJECTS, TELEMETRY_TABLE as TELEMETRY};

/// Counters at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    at: Instant,
    pub received: u64,
    pub rows: u64,
    pub rejects: u64,
    pub skipped: u64,
    pub hot_rows: usize,
    pub cold_rows: u64,
}

impl Sample {
    pub(crate) fn take(storage: &Storage, mqtt: &MqttMeters) -> Sample {
        let telemetry = storage.stats(TELEMETRY).unwrap_or_default();
        let rejects = storage.stats(REJECTS).unwrap_or_default();
        Sample {
            at: Instant::now(),
            received: mqtt.pipeline_messages(),
            rows: telemetry.hot_rows as u64 + telemetry.cold_rows,
            rejects: rejects.hot_rows as u64 + rejects.cold_rows,
            skipped: mqtt.skipped(),
            hot_rows: telemetry.hot_rows,
            cold_rows: telemetry.cold_rows,
        }
    }

    /// Messages per second received between `earlier` and this sample.
    pub(crate) fn rate_since(&self, earlier: &Sample) -> f64 {
        let seconds = self.at.duration_since(earlier.at).as_secs_f64();
        (self.received - earlier.received) as f64 / seconds.max(1e-9)
    }

    pub(crate) fn line(&self, earlier: &Sample) -> String {
        format!(
            "in {:>7} msgs/s | stored {} rows (hot {}, cold {}) | rejects {} | subscriber skips {}",
            group(self.rate_since(earlier).round() as u64),
            group(self.rows),
            group(self.hot_rows as u64),
            group(self.cold_rows),
            group(self.rejects),
            group(self.skipped),
        )
    }
}

/// 1234567 → "1,234,567".
pub(crate) fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_are_grouped() {
        assert_eq!(super::group(0), "0");
        assert_eq!(super::group(999), "999");
        assert_eq!(super::group(1000), "1,000");
        assert_eq!(super::group(1234567), "1,234,567");
    }
}
