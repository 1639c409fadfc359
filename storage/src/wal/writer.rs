//! The group-commit writer: appends from many connections go to one thread, which writes
//! them in order and `fdatasync`s every `interval` or `bytes`, whichever comes first,
//! then tells each append's waiter whether its record is durable. A waiter is an async
//! one-shot: thousands of connections wait at once without a thread each.
//!
//! A failed write or sync fails every append of its group (their records are cut off the
//! file again, back to the last durable length), and the writer goes on with the next
//! appends: a full disk withholds acknowledgements until space comes back.

use std::io;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

/// Where a segment's bytes go: the file, or a test's stand-in.
pub trait SegmentFile: Send + 'static {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes (after a failed write or sync).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

impl SegmentFile for std::fs::File {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        io::Write::write_all(self, bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)?;
        io::Seek::seek(self, io::SeekFrom::Start(len))?;
        Ok(())
    }
}

/// When the writer syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPolicy {
    /// At most this long after the first append not yet synced…
    pub interval: Duration,
    /// …or as soon as this many bytes wait.
    pub bytes: usize,
}

/// Why an append is not durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("the write-ahead log could not store the record: {0}")]
    Io(String),
    #[error("the write-ahead log is closed")]
    Closed,
}

/// Resolves once the append is durable (`Ok`) or cannot be (`Err`).
pub struct Durable(oneshot::Receiver<Result<(), AppendError>>);

impl Durable {
    /// The answer if it has come.
    pub fn try_get(&mut self) -> Option<Result<(), AppendError>> {
        match self.0.try_recv() {
            Ok(answer) => Some(answer),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(AppendError::Closed)),
        }
    }
}

impl std::future::Future for Durable {
    type Output = Result<(), AppendError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(AppendError::Closed)))
    }
}

struct Append {
    bytes: Vec<u8>,
    done: oneshot::Sender<Result<(), AppendError>>,
}

/// What the thread does next, given what waits and the time (a pure state machine, so
/// the timing is tested without sleeping).
#[derive(Debug)]
pub struct Group {
    policy: SyncPolicy,
    bytes: usize,
    since: Option<Instant>,
}

impl Group {
    pub fn new(policy: SyncPolicy) -> Group {
        Group {
            policy,
            bytes: 0,
            since: None,
        }
    }

    /// An append of `bytes` arrived at `now`.
    pub fn add(&mut self, bytes: usize, now: Instant) {
        self.bytes += bytes;
        self.since.get_or_insert(now);
    }

    /// When the group must be synced (`None`: nothing waits).
    pub fn due(&self) -> Option<Instant> {
        let since = self.since?;
        if self.bytes >= self.policy.bytes {
            return Some(since);
        }
        Some(since + self.policy.interval)
    }

    fn reset(&mut self) {
        self.bytes = 0;
        self.since = None;
    }
}

/// The handle appends go through.
pub struct GroupCommit {
    tx: Option<Sender<Append>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the writer thread on `file`, whose first `len` bytes are already durable.
    pub fn start(file: impl SegmentFile, len: u64, policy: SyncPolicy) -> io::Result<GroupCommit> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || run(file, len, policy, rx))?;
        Ok(GroupCommit {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues framed records; never waits. The returned future says when they are
    /// durable. Appends are written in the order this is called.
    pub fn append(&self, bytes: Vec<u8>) -> Durable {
        let (done, answer) = oneshot::channel();
        let durable = Durable(answer);
        let append = Append { bytes, done };
        match &self.tx {
            Some(tx) => {
                if let Err(e) = tx.send(append) {
                    let _ = e.into_inner().done.send(Err(AppendError::Closed));
                }
            }
            None => {
                let _ = append.done.send(Err(AppendError::Closed));
            }
        }
        durable
    }

    /// Syncs what is queued, answers every waiter and stops the thread.
    pub fn close(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the WAL writer panicked");
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.close();
    }
}

fn run(mut file: impl SegmentFile, mut len: u64, policy: SyncPolicy, rx: Receiver<Append>) {
    let mut group = Group::new(policy);
    let mut waiting: Vec<oneshot::Sender<Result<(), AppendError>>> = Vec::new();
    let mut written = len;
    let mut failed: Option<String> = None;
    // A failed group that could not be cut off the file: what follows it would not be
    // where the log thinks, so every later append fails until a restart recovers the
    // segment.
    let mut broken: Option<String> = None;
    let mut open = true;
    while open || !waiting.is_empty() {
        let next = match group.due() {
            None if open => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            None => Err(RecvTimeoutError::Disconnected),
            Some(due) if open => rx.recv_deadline(due),
            Some(_) => Err(RecvTimeoutError::Timeout),
        };
        match next {
            Ok(append) => {
                group.add(append.bytes.len(), Instant::now());
                if let Some(why) = &broken {
                    failed.get_or_insert_with(|| why.clone());
                } else if failed.is_none()
                    && let Err(e) = file.write_all(&append.bytes)
                {
                    failed = Some(e.to_string());
                }
                written += append.bytes.len() as u64;
                waiting.push(append.done);
                if group.due().is_some_and(|due| due > Instant::now()) {
                    continue;
                }
            }
            Err(RecvTimeoutError::Disconnected) => open = false,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if waiting.is_empty() {
            continue;
        }
        if failed.is_none()
            && broken.is_none()
            && let Err(e) = file.sync_data()
        {
            failed = Some(e.to_string());
        }
        let outcome = match failed.take() {
            None => {
                len = written;
                Ok(())
            }
            Some(error) => {
                // What the group wrote is not durable: cut it off, so the next group
                // follows the last durable record.
                if broken.is_none()
                    && let Err(e) = file.truncate(len)
                {
                    tracing::error!(error = %e, "cannot cut a failed WAL group off its segment: the log refuses appends until a restart");
                    broken = Some(format!(
                        "{error}; then the failed records could not be cut off: {e}"
                    ));
                }
                written = len;
                tracing::error!(
                    error,
                    records = waiting.len(),
                    "WAL append failed: acknowledgements withheld"
                );
                Err(AppendError::Io(error))
            }
        };
        for done in waiting.drain(..) {
            let _ = done.send(outcome.clone());
        }
        group.reset();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::wal::record::{Found, Record, Scan, encode};

    /// A file in memory that counts syncs and fails when told to.
    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<State>>);

    #[derive(Default)]
    struct State {
        bytes: Vec<u8>,
        synced: usize,
        syncs: usize,
        fail_writes: bool,
        fail_truncate: bool,
    }

    impl SegmentFile for Memory {
        fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
            let mut s = self.0.lock().unwrap();
            if s.fail_writes {
                // A full disk takes part of a write, then refuses.
                let half = bytes.len() / 2;
                s.bytes.extend_from_slice(&bytes[..half]);
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "No space left on device",
                ));
            }
            s.bytes.extend_from_slice(bytes);
            Ok(())
        }
        fn sync_data(&mut self) -> io::Result<()> {
            let mut s = self.0.lock().unwrap();
            s.syncs += 1;
            s.synced = s.bytes.len();
            Ok(())
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            let mut s = self.0.lock().unwrap();
            if s.fail_truncate {
                return Err(io::Error::other("Input/output error"));
            }
            s.bytes.truncate(len as usize);
            Ok(())
        }
    }

    fn framed(i: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let topic = format!("devices/d{i}/telemetry");
        let record = Record {
            received_at_ns: i as i64,
            topic: topic.as_bytes(),
            payload: b"{}",
        };
        encode(&record, &mut out).unwrap();
        out
    }

    /// A writer on `file`, empty so far.
    fn start(file: &Memory, interval: Duration, bytes: usize) -> GroupCommit {
        let policy = SyncPolicy { interval, bytes };
        GroupCommit::start(file.clone(), 0, policy).unwrap()
    }

    fn block<T>(f: impl std::future::Future<Output = T>) -> T {
        futures::executor::block_on(f)
    }

    #[test]
    fn a_group_is_due_at_its_interval_or_at_once_when_it_is_big_enough() {
        let t0 = Instant::now();
        let mut g = Group::new(SyncPolicy {
            interval: Duration::from_millis(5),
            bytes: 1000,
        });
        assert_eq!(g.due(), None);
        g.add(100, t0);
        g.add(100, t0 + Duration::from_millis(3));
        assert_eq!(
            g.due(),
            Some(t0 + Duration::from_millis(5)),
            "from the first"
        );
        g.add(800, t0 + Duration::from_millis(4));
        assert_eq!(g.due(), Some(t0), "1000 bytes wait: now");
        g.reset();
        assert_eq!(g.due(), None);
    }

    #[test]
    fn a_waiter_is_answered_only_once_its_record_is_synced() {
        let file = Memory::default();
        let wal = start(&file, Duration::from_millis(300), usize::MAX);
        let mut first = wal.append(framed(0));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(first.try_get(), None, "not synced yet: no answer");
        assert_eq!(file.0.lock().unwrap().syncs, 0);
        let second = wal.append(framed(1));
        assert_eq!(block(second), Ok(()));
        assert_eq!(first.try_get(), Some(Ok(())));
        let s = file.0.lock().unwrap();
        assert_eq!(s.syncs, 1, "one sync for the group");
        assert_eq!(s.synced, s.bytes.len());
    }

    #[test]
    fn many_writers_are_written_whole_and_in_the_order_they_appended() {
        let file = Memory::default();
        let wal = Arc::new(start(&file, Duration::from_millis(1), 4096));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let wal = wal.clone();
                std::thread::spawn(move || {
                    let waits: Vec<Durable> =
                        (0..500).map(|i| wal.append(framed(t * 1000 + i))).collect();
                    for w in waits {
                        assert_eq!(block(w), Ok(()));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = file.0.lock().unwrap();
        let mut per_writer: Vec<Vec<i64>> = vec![Vec::new(); 8];
        for found in Scan::new(&s.bytes) {
            let Found::Record { record, .. } = found else {
                panic!("{found:?}")
            };
            per_writer[record.received_at_ns as usize / 1000].push(record.received_at_ns);
        }
        for (t, seen) in per_writer.iter().enumerate() {
            let expected: Vec<i64> = (0..500).map(|i| (t * 1000 + i) as i64).collect();
            assert_eq!(*seen, expected, "writer {t}");
        }
        assert!(
            s.syncs < 4000,
            "grouped: {} syncs for 4000 appends",
            s.syncs
        );
    }

    #[test]
    fn a_failed_write_fails_its_group_leaves_no_partial_record_and_the_log_goes_on() {
        let file = Memory::default();
        let mut wal = start(&file, Duration::ZERO, 1);
        assert_eq!(block(wal.append(framed(0))), Ok(()));
        file.0.lock().unwrap().fail_writes = true;
        let refused = block(wal.append(framed(1)));
        assert!(
            matches!(&refused, Err(AppendError::Io(e)) if e.contains("No space left")),
            "{refused:?}"
        );
        // Space comes back.
        file.0.lock().unwrap().fail_writes = false;
        assert_eq!(block(wal.append(framed(2))), Ok(()));
        wal.close();
        assert_eq!(block(wal.append(framed(3))), Err(AppendError::Closed));
        let s = file.0.lock().unwrap();
        let found: Vec<_> = Scan::new(&s.bytes).collect();
        let kept: Vec<i64> = found
            .iter()
            .map(|f| match f {
                Found::Record { record, .. } => record.received_at_ns,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kept,
            [0, 2],
            "the failed record is not in the file, whole or in part"
        );
    }

    #[test]
    fn a_failed_group_that_cannot_be_cut_off_fails_every_later_append() {
        let file = Memory::default();
        let wal = start(&file, Duration::ZERO, 1);
        assert_eq!(block(wal.append(framed(0))), Ok(()));
        {
            let mut s = file.0.lock().unwrap();
            s.fail_writes = true;
            s.fail_truncate = true;
        }
        assert!(block(wal.append(framed(1))).is_err());
        file.0.lock().unwrap().fail_writes = false;
        let later = block(wal.append(framed(2)));
        assert!(
            matches!(&later, Err(AppendError::Io(e)) if e.contains("could not be cut off")),
            "{later:?}"
        );
    }
}
