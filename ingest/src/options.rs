//! `[ingest]`: the batching stage's settings as users write them, owned here beside
//! their defaults; the binary composes them and gets a [`PipelineConfig`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{DecodeLimits, PipelineConfig, SealPolicy};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngestOptions {
    /// Decoding threads.
    pub workers: usize,
    /// Messages queued in front of the decoders; MQTT connections stop reading beyond.
    pub queue_messages: usize,
    /// A batch is sealed (made queryable) at this many rows…
    pub batch_rows: usize,
    /// …or when its oldest row has waited this long.
    #[serde(with = "humantime_serde")]
    pub batch_age: Duration,
    /// Larger payloads are rejected as `too_large`.
    pub max_message_bytes: usize,
    /// How much of a rejected payload is kept in `rejects.payload`.
    pub reject_payload_bytes: usize,
    /// Readings timestamped further ahead of their arrival are rejected
    /// (`invalid_timestamp`).
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// A reading whose (`device_id`, `ts`) arrived within this long before is a
    /// duplicate: counted, not stored (`0s`: no deduplication).
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
}

impl Default for IngestOptions {
    fn default() -> Self {
        let pipeline = PipelineConfig::default();
        IngestOptions {
            workers: pipeline.workers,
            queue_messages: pipeline.queue_messages,
            batch_rows: pipeline.seal.max_rows,
            batch_age: pipeline.seal.max_age,
            max_message_bytes: pipeline.limits.max_payload_bytes,
            reject_payload_bytes: pipeline.reject_payload_bytes,
            max_clock_skew: pipeline.limits.max_clock_skew,
            dedup_window: pipeline.dedup_window,
        }
    }
}

impl IngestOptions {
    /// The first setting out of range, as `key: why` (relative to `[ingest]`).
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("workers", self.workers),
            ("queue_messages", self.queue_messages),
            ("batch_rows", self.batch_rows),
            ("max_message_bytes", self.max_message_bytes),
        ] {
            if value == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if self.batch_age.is_zero() {
            return Err("batch_age must be more than 0".into());
        }
        Ok(())
    }

    pub fn pipeline_config(&self) -> PipelineConfig {
        PipelineConfig {
            workers: self.workers,
            queue_messages: self.queue_messages,
            seal: SealPolicy {
                max_rows: self.batch_rows,
                max_age: self.batch_age,
            },
            limits: DecodeLimits {
                max_payload_bytes: self.max_message_bytes,
                max_clock_skew: self.max_clock_skew,
            },
            reject_payload_bytes: self.reject_payload_bytes,
            dedup_window: self.dedup_window,
        }
    }
}
