//! Exactly-once rows: a reading is keyed by (`device_id`, `ts`); a key seen within the
//! window is a duplicate (a QoS 1 redelivery after a lost PUBACK, a device that resends
//! its buffer) and is counted, not stored. The first reading with a key wins: a later one
//! with the same key is dropped even if its values differ.
//!
//! Each decoder keeps the keys of its own devices (a device is always on one decoder):
//! one set, probed once per reading, and the same keys in arrival order (`received_at`),
//! in blocks of a few thousand; a block is forgotten (its keys removed from the set) once
//! its newest key is a window old. A key is thus remembered at least `window` after its
//! reading arrived, and at most a block's span (`window` / 16) longer.
//!
//! A key is 16 bytes (a 64-bit hash of the device id and the timestamp), held twice (set
//! and block): ~20 million keys, 10 minutes at the reference load, take ~0.9 GiB over
//! the decoders. The set is split in shards so that growing one (a rehash of every key
//! it holds, the decoder waits) stays short.

use std::collections::{HashSet, VecDeque};
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

/// Keys per block.
const BLOCK: usize = 4096;
/// Shards of the set (a power of two).
const SHARDS: usize = 64;

type Set = HashSet<Key, foldhash::fast::RandomState>;

struct Block {
    /// Arrival of the block's first key: the block takes keys until `BLOCK` or until one
    /// arrives `span_ns` after it.
    start_ns: i64,
    /// The newest arrival in the block: it is forgotten a window after.
    newest_ns: i64,
    keys: Vec<Key>,
}

pub(crate) struct Dedup {
    window_ns: i64,
    span_ns: i64,
    shards: Box<[Set]>,
    /// Oldest first.
    blocks: VecDeque<Block>,
    /// A forgotten block's buffer, for the next block.
    spare: Option<Vec<Key>>,
}

impl Dedup {
    /// `window_ns == 0`: nothing is a duplicate.
    pub(crate) fn new(window_ns: i64) -> Dedup {
        let hasher = foldhash::fast::RandomState::default();
        Dedup {
            window_ns,
            span_ns: (window_ns / 16).max(1),
            shards: (0..SHARDS)
                .map(|_| Set::with_hasher(hasher.clone()))
                .collect(),
            blocks: VecDeque::new(),
            spare: None,
        }
    }

    /// Remembers `key`, seen at `arrived_ns`; `false` if it was already remembered.
    pub(crate) fn first(&mut self, key: Key, arrived_ns: i64) -> bool {
        if self.window_ns == 0 {
            return true;
        }
        self.forget(arrived_ns);
        if !self.shards[shard(&key)].insert(key) {
            return false;
        }
        self.block(arrived_ns).keys.push(key);
        true
    }

    /// Keys remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Forgets the blocks whose newest key is a window old at `now_ns`.
    fn forget(&mut self, now_ns: i64) {
        while self
            .blocks
            .front()
            .is_some_and(|b| b.newest_ns.saturating_add(self.window_ns) <= now_ns)
        {
            let Some(mut block) = self.blocks.pop_front() else {
                break;
            };
            for key in &block.keys {
                self.shards[shard(key)].remove(key);
            }
            block.keys.clear();
            self.spare = Some(block.keys);
        }
    }

    /// The block a key arriving at `arrived_ns` goes to.
    fn block(&mut self, arrived_ns: i64) -> &mut Block {
        let full = self.blocks.back().is_none_or(|b| {
            b.keys.len() >= BLOCK || arrived_ns > b.start_ns.saturating_add(self.span_ns)
        });
        if full {
            let keys = self
                .spare
                .take()
                .unwrap_or_else(|| Vec::with_capacity(BLOCK));
            self.blocks.push_back(Block {
                start_ns: arrived_ns,
                newest_ns: arrived_ns,
                keys,
            });
        }
        match self.blocks.back_mut() {
            Some(block) => {
                block.newest_ns = block.newest_ns.max(arrived_ns);
                block
            }
            None => unreachable!("a block was just pushed"),
        }
    }
}

fn shard(key: &Key) -> usize {
    // The device hash's top bits: uniform, and not the bits the set's own hash of the
    // whole key spreads its buckets by.
    (key.0 >> (64 - SHARDS.trailing_zeros())) as usize
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
        // Keys are remembered at most a block's span (window / 16) past the window.
        assert!(d.first(k, 10 * MIN + MIN), "forgotten");
    }

    #[test]
    fn old_blocks_are_forgotten_so_memory_stays_bounded() {
        let mut d = Dedup::new(4 * MIN);
        for i in 0..1000 {
            // One key a second for 1000 s.
            assert!(d.first(key("d", i), i * 1_000_000_000));
        }
        // 4 minutes, plus at most a block's span (15 s).
        assert!(
            (4 * 60..=4 * 60 + 15 + 1).contains(&d.len()),
            "{} keys kept for a 4-minute window",
            d.len()
        );
    }

    #[test]
    fn a_burst_fills_blocks_by_count_and_is_forgotten_whole() {
        let mut d = Dedup::new(MIN);
        let n = 3 * BLOCK as i64 + 7;
        for ts in 0..n {
            assert!(d.first(key("d", ts), 0));
        }
        assert_eq!(d.blocks.len(), 4);
        assert!(!d.first(key("d", n - 1), MIN - 1));
        assert!(d.first(key("d", 0), MIN), "a window later");
        assert_eq!(d.len(), 1, "only the key just seen");
    }

    #[test]
    fn a_key_arriving_out_of_order_is_kept_a_window_after_the_newest_in_its_block() {
        let mut d = Dedup::new(10 * MIN);
        assert!(d.first(key("d", 1), 5 * MIN));
        // Arrived earlier (another connection's clock read first), taken later.
        assert!(d.first(key("d", 2), 5 * MIN - 1));
        assert!(!d.first(key("d", 2), 15 * MIN - 2), "within its window");
        assert!(!d.first(key("d", 2), 15 * MIN - 1), "kept with its block");
        assert!(d.first(key("d", 2), 15 * MIN), "forgotten with its block");
    }

    /// Against a model: a key seen less than a window ago is always a duplicate, one
    /// seen more than a window and a span ago never is.
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
                Some(at) if now - at > WINDOW + WINDOW / 16 => {
                    assert!(first, "{k:?} at {now}, seen {at}")
                }
                None => assert!(first, "{k:?} at {now}, never seen"),
                Some(_) => {}
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
