//! `[windows]`: the window tables' settings as users write them, owned here beside their
//! defaults; the binary composes them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::WindowConfig;

/// Per-device event-time windows (`telemetry_1m`, `telemetry_1h`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WindowsOptions {
    /// Compute the window tables (their cost at the reference load: BENCHMARKS.md).
    pub enabled: bool,
    /// Size of the windows of `telemetry_1m`.
    #[serde(with = "humantime_serde")]
    pub size: Duration,
    /// Size of the rollup windows of `telemetry_1h`, a multiple of `size`.
    #[serde(with = "humantime_serde")]
    pub rollup: Duration,
    /// Readings up to this far behind a device's latest event time still count.
    #[serde(with = "humantime_serde")]
    pub lateness: Duration,
    /// After this long without a reading, a device's windows close by the server clock.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for WindowsOptions {
    fn default() -> Self {
        let w = WindowConfig::default();
        WindowsOptions {
            enabled: true,
            size: w.size,
            rollup: w.rollup,
            lateness: w.lateness,
            idle_timeout: w.idle_timeout,
        }
    }
}

impl WindowsOptions {
    /// The windows to compute (`None`: disabled); fails on sizes that do not fit.
    pub fn window_config(&self) -> Result<Option<WindowConfig>, String> {
        if !self.enabled {
            return Ok(None);
        }
        let config = WindowConfig {
            size: self.size,
            rollup: self.rollup,
            lateness: self.lateness,
            idle_timeout: self.idle_timeout,
        };
        config.validate()?;
        Ok(Some(config))
    }
}
