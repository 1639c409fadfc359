//! Open-loop scheduling: message `j` of a connection is due at a fixed time, whatever
//! happened to earlier messages, so a slow broker shows up as latency rather than as a
//! lower send rate (no coordinated omission).

use std::time::Duration;

/// How devices are spread over connections and when each connection sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Devices simulated by this connection.
    pub devices: u64,
    /// Messages per second from this connection.
    pub rate: f64,
    /// Start offset, so connections interleave and the aggregate rate is smooth.
    pub offset: Duration,
}

impl Schedule {
    /// The schedule of connection `c` of `connections`, for `devices` devices sending
    /// `rate` messages per second in all. Connection `c` simulates devices
    /// `c, c + connections, c + 2 * connections, ...`.
    pub fn for_connection(c: u64, connections: u64, devices: u64, rate: f64) -> Schedule {
        let own = devices / connections + u64::from(c < devices % connections);
        Schedule {
            devices: own,
            rate: rate * own as f64 / devices as f64,
            offset: Duration::from_secs_f64(c as f64 / rate),
        }
    }

    /// The global index of this connection's `slot`-th device.
    pub fn device_index(c: u64, connections: u64, slot: u64) -> u64 {
        c + slot * connections
    }

    /// When message `j` is due, from the start of the run.
    pub fn due(&self, j: u64) -> Duration {
        self.offset + Duration::from_secs_f64(j as f64 / self.rate)
    }

    /// Which of this connection's devices sends message `j` (round robin, so each
    /// device reports every `devices / rate` seconds).
    pub fn slot(&self, j: u64) -> u64 {
        j % self.devices
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every message due before `window`, as (due, global device index).
    fn messages(
        devices: u64,
        connections: u64,
        rate: f64,
        window: Duration,
    ) -> Vec<(Duration, u64)> {
        let mut out = Vec::new();
        for c in 0..connections {
            let s = Schedule::for_connection(c, connections, devices, rate);
            let mut j = 0;
            while s.due(j) < window {
                out.push((s.due(j), Schedule::device_index(c, connections, s.slot(j))));
                j += 1;
            }
        }
        out.sort_by_key(|m| m.0);
        out
    }

    #[test]
    fn every_device_sends_exactly_once_per_interval() {
        // 1,000 devices at 100 msgs/s: each device every 10 s. Over 60 s, 6 each.
        let all = messages(1000, 7, 100.0, Duration::from_secs(60));
        assert_eq!(all.len(), 6000);
        let mut per_device: HashMap<u64, usize> = HashMap::new();
        for (_, d) in &all {
            *per_device.entry(*d).or_default() += 1;
        }
        assert_eq!(per_device.len(), 1000);
        assert!(per_device.values().all(|&n| n == 6), "{per_device:?}");
    }

    #[test]
    fn the_aggregate_rate_is_smooth() {
        let all = messages(10_000, 16, 1000.0, Duration::from_secs(10));
        // Count per 100 ms bucket: each must hold 100 messages, give or take one
        // connection's rounding.
        let mut buckets = [0usize; 100];
        for (due, _) in &all {
            buckets[(due.as_millis() / 100) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (98..=102).contains(&n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn devices_are_split_evenly_and_completely() {
        let total: u64 = (0..7)
            .map(|c| Schedule::for_connection(c, 7, 1000, 10.0).devices)
            .sum();
        assert_eq!(total, 1000);
        let counts: Vec<u64> = (0..7)
            .map(|c| Schedule::for_connection(c, 7, 1000, 10.0).devices)
            .collect();
        assert!(counts.iter().all(|&n| n == 142 || n == 143));
    }
}
