//! Exactly-once rows: a reading is keyed by (`device_id`, `ts`); a key seen within the
//! window is a duplicate (a QoS 1 redelivery after a lost PUBACK, a device that resends
//! its buffer) and is counted, not stored. The first reading with a key wins: a later one
//! with the same key is dropped even if its values differ.
//!
//! Each decoder keeps the keys of its own devices (a device is always on one decoder),
//! by device: the timestamps it sent within the window, in arrival order, and the newest
//! of them. A reading newer than everything its device sent is new without a search
//! (what a device sending in order always does); an older one is looked for among its
//! device's timestamps, newest first (a redelivery is of something recent). A device's
//! timestamps older than the window are dropped when it sends again, and a device silent
//! for a whole window is dropped by a pass over all devices every `window` / 16.
//!
//! So a reading costs one lookup of its device (a table of devices, not of readings) and
//! an append to that device's list; a key takes 16 bytes, a device ~80 more: ~20 million
//! keys, 10 minutes of the reference load, take ~0.4 GiB over the decoders.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::LazyLock;

/// A device id's hash and a timestamp.
pub(crate) type Key = (u64, i64);

/// Seeded once per process: keys are never stored (after a restart they are taken again
/// from the stored rows), so the hash only has to agree within one process, and a device
/// cannot pick an id whose hash collides with another's.
static DEVICE_HASH: LazyLock<foldhash::quality::RandomState> = LazyLock::new(Default::default);

/// The key of a reading.
pub(crate) fn key(device_id: &str, ts_ns: i64) -> Key {
    (DEVICE_HASH.hash_one(device_id), ts_ns)
}

/// What one device sent within the window.
struct Seen {
    /// The newest timestamp in `sent` (not lower: it may stay after older ones go).
    newest_ts: i64,
    /// The latest arrival: the device is dropped a window after it.
    last_arrival: i64,
    /// The arrival of the front of `sent` (`i64::MAX` when empty): whether anything is
    /// to be forgotten is known without reading the list.
    oldest_arrival: i64,
    /// (timestamp, arrival), in arrival order.
    sent: VecDeque<(i64, i64)>,
    /// The timestamps of `sent` as a set, made the first time an older reading has to be
    /// looked for among more than [`SCAN`] of them: a device sending its readings
    /// backwards costs a lookup each, not a scan each.
    /// Boxed: a pointer in every device's entry instead of a set's 40 bytes, which few
    /// devices need.
    #[allow(clippy::box_collection)]
    index: Option<Box<HashSet<i64, foldhash::fast::RandomState>>>,
}

/// Timestamps searched one by one; beyond, through the device's index.
const SCAN: usize = 32;

impl Default for Seen {
    /// A device that sent nothing yet.
    fn default() -> Seen {
        Seen {
            newest_ts: i64::MIN,
            last_arrival: i64::MIN,
            oldest_arrival: i64::MAX,
            sent: VecDeque::new(),
            index: None,
        }
    }
}

impl Seen {
    fn seen(&mut self, ts: i64) -> bool {
        if self.sent.len() <= SCAN && self.index.is_none() {
            return self.sent.iter().rev().any(|&(t, _)| t == ts);
        }
        let sent = &self.sent;
        self.index
            .get_or_insert_with(|| Box::new(sent.iter().map(|&(t, _)| t).collect()))
            .contains(&ts)
    }
}

pub(crate) struct Dedup {
    window_ns: i64,
    /// Arrival time at which the next pass drops silent devices.
    next_sweep: i64,
    devices: HashMap<u64, Seen, foldhash::fast::RandomState>,
}

impl Dedup {
    /// `window_ns == 0`: nothing is a duplicate.
    pub(crate) fn new(window_ns: i64) -> Dedup {
        Dedup {
            window_ns,
            next_sweep: i64::MIN,
            devices: HashMap::default(),
        }
    }

    /// Remembers `key`, seen at `arrived_ns`; `false` if it was already remembered.
    pub(crate) fn first(&mut self, (device, ts): Key, arrived_ns: i64) -> bool {
        if self.window_ns == 0 {
            return true;
        }
        if arrived_ns >= self.next_sweep {
            self.sweep(arrived_ns);
        }
        let window = self.window_ns;
        let seen = self.devices.entry(device).or_default();
        if seen.oldest_arrival.saturating_add(window) <= arrived_ns {
            while let Some(&(t, at)) = seen.sent.front() {
                if at.saturating_add(window) > arrived_ns {
                    break;
                }
                seen.sent.pop_front();
                if let Some(index) = &mut seen.index {
                    index.remove(&t);
                }
            }
            seen.oldest_arrival = seen.sent.front().map_or(i64::MAX, |&(_, at)| at);
        }
        if seen.sent.is_empty() {
            seen.newest_ts = i64::MIN;
            seen.index = None;
        } else if ts <= seen.newest_ts && seen.seen(ts) {
            return false;
        }
        seen.sent.push_back((ts, arrived_ns));
        seen.oldest_arrival = seen.oldest_arrival.min(arrived_ns);
        if let Some(index) = &mut seen.index {
            index.insert(ts);
        }
        seen.newest_ts = seen.newest_ts.max(ts);
        seen.last_arrival = seen.last_arrival.max(arrived_ns);
        true
    }

    /// Keys remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.devices.values().map(|s| s.sent.len()).sum()
    }

    /// Drops the devices that sent nothing for a window, and the spare room of lists
    /// that shrank.
    fn sweep(&mut self, now_ns: i64) {
        let window = self.window_ns;
        self.devices.retain(|_, seen| {
            if seen.last_arrival.saturating_add(window) <= now_ns {
                return false;
            }
            if seen.sent.capacity() > 4 * seen.sent.len().max(4) {
                seen.sent.shrink_to(2 * seen.sent.len());
            }
            true
        });
        if self.devices.capacity() > 4 * self.devices.len().max(1024) {
            self.devices.shrink_to(2 * self.devices.len());
        }
        self.next_sweep = now_ns.saturating_add((window / 16).max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000_000;

    #[test]
    fn a_key_is_a_duplicate_within_the_window_and_new_after_it() {
        let mut d = Dedup::new(10 * MIN);
        let k = key("device-1", 5);
        assert!(d.first(k, 0));
        assert!(!d.first(k, MIN), "one minute later: a duplicate");
        assert!(!d.first(k, 10 * MIN - 1), "still within the window");
        assert!(d.first(key("device-2", 5), 0), "another device");
        assert!(d.first(key("device-1", 6), 0), "another timestamp");
        assert!(d.first(k, 10 * MIN), "forgotten a window after it arrived");
    }

    #[test]
    fn an_older_reading_is_looked_for_and_a_newer_one_is_new() {
        let mut d = Dedup::new(10 * MIN);
        for ts in [10, 20, 30] {
            assert!(d.first(key("d", ts), ts));
        }
        assert!(
            !d.first(key("d", 20), 31),
            "a redelivery of an older reading"
        );
        assert!(d.first(key("d", 15), 32), "an older reading never seen");
        assert!(!d.first(key("d", 15), 33), "and now seen");
        assert!(d.first(key("d", 40), 34));
        assert!(!d.first(key("d", 40), 35), "the newest, again");
    }

    #[test]
    fn a_device_sending_backwards_is_looked_up_not_scanned() {
        let mut d = Dedup::new(10 * MIN);
        let n = 10 * SCAN as i64;
        for ts in (0..n).rev() {
            assert!(d.first(key("d", ts), n - ts));
        }
        assert!(d.devices.values().all(|s| s.index.is_some()));
        for ts in 0..n {
            assert!(!d.first(key("d", ts), n + 1), "{ts} seen");
        }
        // The index follows what is forgotten.
        assert!(
            d.first(key("d", n - 1), 10 * MIN + 1),
            "arrived at 1, forgotten"
        );
        assert!(
            !d.first(key("d", n - 2), 10 * MIN + 1),
            "arrived at 2, kept"
        );
        assert!(d.first(key("d", 0), 20 * MIN + n + 1), "all forgotten");
        assert!(d.devices.values().all(|s| s.index.is_none()));
    }

    #[test]
    fn old_keys_and_silent_devices_are_forgotten_so_memory_stays_bounded() {
        let mut d = Dedup::new(4 * MIN);
        for i in 0..1000 {
            // One key a second for 1000 s.
            assert!(d.first(key("d", i), i * 1_000_000_000));
        }
        // 4 minutes, the key just taken included.
        assert_eq!(d.len(), 4 * 60, "keys kept for a 4-minute window");
        // Devices that sent once long ago are dropped by the pass over all devices.
        for i in 0..100 {
            assert!(d.first(key(&format!("once-{i}"), 0), 1000 * 1_000_000_000));
        }
        assert_eq!(d.devices.len(), 101);
        assert!(d.first(key("d", 2000), 2000 * 1_000_000_000));
        assert_eq!(d.devices.len(), 1, "only the device that kept sending");
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn a_key_arriving_out_of_order_is_kept_at_least_a_window() {
        let mut d = Dedup::new(10 * MIN);
        assert!(d.first(key("d", 1), 5 * MIN));
        // Arrived earlier (another connection's clock read first), taken later.
        assert!(d.first(key("d", 2), 5 * MIN - 1));
        assert!(!d.first(key("d", 2), 15 * MIN - 2), "within its window");
        assert!(
            !d.first(key("d", 2), 15 * MIN - 1),
            "kept behind the key before it"
        );
        assert!(
            d.first(key("d", 2), 15 * MIN),
            "forgotten with the key before it"
        );
    }

    /// Against a model: a key seen less than a window ago is always a duplicate, one
    /// seen a window ago or more never is (arrivals in order).
    #[test]
    fn agrees_with_a_model_of_the_window() {
        const WINDOW: i64 = 16_000;
        let mut d = Dedup::new(WINDOW);
        let mut seen = std::collections::HashMap::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut now = 0;
        for _ in 0..200_000 {
            now += (next() % 3) as i64;
            let device = format!("d{}", next() % 7);
            let ts = (next() % 300) as i64;
            let k = key(&device, ts);
            let first = d.first(k, now);
            match seen.get(&k) {
                Some(at) if now - at < WINDOW => assert!(!first, "{k:?} at {now}, seen {at}"),
                _ => assert!(first, "{k:?} at {now}, seen {:?}", seen.get(&k)),
            }
            if first {
                seen.insert(k, now);
            }
        }
    }

    #[test]
    fn a_zero_window_keeps_nothing() {
        let mut d = Dedup::new(0);
        assert!(d.first(key("d", 1), 0));
        assert!(d.first(key("d", 1), 0));
        assert_eq!(d.len(), 0);
    }
}
