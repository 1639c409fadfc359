//! Exactly-once rows: a reading is keyed by (`device_id`, `ts`); a key seen within the
//! window is a duplicate (a QoS 1 redelivery after a lost PUBACK, a device that resends
//! its buffer) and is counted, not stored. The first reading with a key wins: a later one
//! with the same key is dropped even if its values differ.
//!
//! Each decoder keeps the keys of its own devices (a device is always on one decoder),
//! in generations a quarter of the window long, by arrival time (`received_at`): a key
//! is remembered at least `window` and at most 1¼ `window` after its reading arrived.
//! A key is 16 bytes (a 64-bit hash of the device id and the timestamp): ~20 million
//! keys, 10 minutes at the reference load, take ~0.5 GiB over the decoders.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

/// A device id's hash and a timestamp.
pub(crate) type Key = (u64, i64);

/// The key of a reading. Keys are never stored: after a restart they are taken again
/// from the stored rows, so the hash only has to agree within one process.
pub(crate) fn key(device_id: &str, ts_ns: i64) -> Key {
    (
        BuildHasherDefault::<DefaultHasher>::default().hash_one(device_id),
        ts_ns,
    )
}

pub(crate) struct Dedup {
    window_ns: i64,
    generation_ns: i64,
    /// (start of the generation by arrival time, its keys), oldest first.
    generations: VecDeque<(i64, HashSet<Key>)>,
}

impl Dedup {
    /// `window_ns == 0`: nothing is a duplicate.
    pub(crate) fn new(window_ns: i64) -> Dedup {
        Dedup {
            window_ns,
            generation_ns: (window_ns / 4).max(1),
            generations: VecDeque::new(),
        }
    }

    /// Remembers `key`, seen at `arrived_ns`; `false` if it was already remembered.
    pub(crate) fn first(&mut self, key: Key, arrived_ns: i64) -> bool {
        if self.window_ns == 0 {
            return true;
        }
        self.forget(arrived_ns);
        if self.generations.iter().any(|(_, keys)| keys.contains(&key)) {
            return false;
        }
        self.current(arrived_ns).insert(key);
        true
    }

    /// Keys remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.generations.iter().map(|(_, k)| k.len()).sum()
    }

    /// Forgets the generations whose last possible key is a window old at `now_ns`.
    fn forget(&mut self, now_ns: i64) {
        while let Some((start, _)) = self.generations.front()
            && start + self.generation_ns + self.window_ns <= now_ns
        {
            self.generations.pop_front();
        }
    }

    /// The generation keys arriving at `arrived_ns` go to.
    fn current(&mut self, arrived_ns: i64) -> &mut HashSet<Key> {
        let newest = self.generations.back().map(|(start, _)| *start);
        if newest.is_none_or(|start| arrived_ns >= start + self.generation_ns) {
            self.generations.push_back((arrived_ns, HashSet::new()));
        }
        match self.generations.back_mut() {
            Some((_, keys)) => keys,
            None => unreachable!("a generation was just pushed"),
        }
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
        // Keys are remembered at most 1¼ windows.
        assert!(d.first(k, 13 * MIN), "forgotten");
    }

    #[test]
    fn old_generations_are_forgotten_so_memory_stays_bounded() {
        let mut d = Dedup::new(4 * MIN);
        for i in 0..1000 {
            // One key a second for 1000 s.
            assert!(d.first(key("d", i), i * 1_000_000_000));
        }
        assert!(
            d.len() <= 5 * 60 + 1,
            "{} keys kept for a 4-minute window",
            d.len()
        );
        assert!(
            d.len() >= 4 * 60,
            "{} keys kept for a 4-minute window",
            d.len()
        );
    }

    #[test]
    fn a_zero_window_keeps_nothing() {
        let mut d = Dedup::new(0);
        assert!(d.first(key("d", 1), 0));
        assert!(d.first(key("d", 1), 0));
        assert_eq!(d.len(), 0);
    }
}
