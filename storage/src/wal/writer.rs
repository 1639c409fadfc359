//! The group-commit writer: appends from many connections go to one thread, which
//! gathers them in order and writes (one system call) and `fdatasync`s each group,
//! `interval` after the last sync or once it holds `bytes`, whichever comes first, then
//! tells each append's waiter whether its record is durable. A waiter is an async
//! one-shot: thousands of connections wait at once without a thread each.
//!
//! A failed write or sync fails every append of its group (their records are cut off the
//! file again, back to the last durable length), and the writer goes on with the next
//! appends: a full disk withholds acknowledgements until space comes back.
//!
//! An append does not wake the writer while a group is open: the writer sleeps until the
//! group is due and then takes every append queued meanwhile. Only the first append to a
//! quiet log, and the one that makes a group big enough, wake it (under load that is one
//! wake-up a group instead of one an append, and no spinning in a channel's receive).
//!
//! The writer moves to a new segment once the current one holds `segment_bytes`, and
//! when asked ([`GroupCommit::rotate`], a checkpoint): every append queued before the
//! request is in an older segment, every later one in the new segment or after.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
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

/// Makes the next segment: the directory, or a test's stand-in.
pub trait SegmentDir: Send + 'static {
    fn create(&mut self, id: u64) -> io::Result<Box<dyn SegmentFile>>;
}

/// The segment being written when the writer starts.
pub struct Current {
    pub id: u64,
    pub file: Box<dyn SegmentFile>,
    /// Bytes already durable in it.
    pub len: u64,
}

/// When the writer syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPolicy {
    /// Syncs are at least this far apart: a record waits at most this long for its group
    /// (one arriving at a quiet log is synced at once)…
    pub interval: Duration,
    /// …or as soon as this many bytes wait.
    pub bytes: usize,
    /// A segment this big is closed and the next one started.
    pub segment_bytes: u64,
    /// `false`: never fdatasync (`wal.sync = "off"`): a record is "durable" once written
    /// to the operating system, which keeps it through a crash of sluice but not of the
    /// machine.
    pub fsync: bool,
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

enum Op {
    Append {
        bytes: Vec<u8>,
        done: oneshot::Sender<Result<(), AppendError>>,
    },
    /// Close the current segment; answer the id of the next one.
    Rotate(oneshot::Sender<io::Result<u64>>),
}

/// How often a failing log tries the disk while nothing is appended.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What the thread does next, given what waits and the time (a pure state machine, so
/// the timing is tested without sleeping).
#[derive(Debug)]
pub struct Group {
    policy: SyncPolicy,
    bytes: usize,
    since: Option<Instant>,
    /// When the last group was synced: syncs are at least `interval` apart.
    synced: Option<Instant>,
}

impl Group {
    pub fn new(policy: SyncPolicy) -> Group {
        Group {
            policy,
            bytes: 0,
            since: None,
            synced: None,
        }
    }

    /// An append of `bytes` arrived at `now`.
    pub fn add(&mut self, bytes: usize, now: Instant) {
        self.bytes += bytes;
        self.since.get_or_insert(now);
    }

    /// When the group must be synced (`None`: nothing waits): at once when it is big
    /// enough, else `interval` after the last sync, or at once if that is longer ago
    /// (a record arriving at a quiet log waits for its own sync only).
    pub fn due(&self) -> Option<Instant> {
        let since = self.since?;
        if self.bytes >= self.policy.bytes {
            return Some(since);
        }
        Some(match self.synced {
            Some(synced) => (synced + self.policy.interval).max(since),
            None => since,
        })
    }

    /// The group was synced at `now`.
    fn synced(&mut self, now: Instant) {
        self.bytes = 0;
        self.since = None;
        self.synced = Some(now);
    }
}

/// The handle appends go through.
pub struct GroupCommit {
    tx: Option<Sender<Op>>,
    thread: Option<JoinHandle<()>>,
    wake: Arc<Wake>,
    /// `SyncPolicy::bytes`: an append that brings the unsynced bytes to it wakes the
    /// writer.
    group_bytes: usize,
    healthy: Arc<AtomicBool>,
    current: Arc<AtomicU64>,
}

/// When an append wakes the writer thread.
struct Wake {
    /// Set by the writer before it sleeps with nothing to sync: the next append wakes it.
    idle: AtomicBool,
    /// Bytes appended and not yet synced (or failed).
    unsynced: AtomicUsize,
    /// The writer's thread, once started.
    thread: std::sync::OnceLock<Thread>,
}

impl Wake {
    fn unpark(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

impl GroupCommit {
    /// Starts the writer thread on `current`; later segments are made in `dir`.
    pub fn start(
        dir: impl SegmentDir,
        current: Current,
        policy: SyncPolicy,
    ) -> io::Result<GroupCommit> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let healthy = Arc::new(AtomicBool::new(true));
        let wake = Arc::new(Wake {
            idle: AtomicBool::new(false),
            unsynced: AtomicUsize::new(0),
            thread: std::sync::OnceLock::new(),
        });
        let current_id = Arc::new(AtomicU64::new(current.id));
        let writer = Writer {
            current: current_id.clone(),
            dir: Box::new(dir),
            id: current.id,
            file: current.file,
            len: current.len,
            written: current.len,
            policy,
            group: Group::new(policy),
            buffer: Vec::new(),
            waiting: Vec::new(),
            failed: None,
            broken: None,
            healthy: healthy.clone(),
            wake: wake.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(rx))?;
        let _ = wake.thread.set(thread.thread().clone());
        Ok(GroupCommit {
            tx: Some(tx),
            thread: Some(thread),
            wake,
            group_bytes: policy.bytes,
            healthy,
            current: current_id,
        })
    }

    /// Queues framed records; never waits. The returned future says when they are
    /// durable. Appends are written in the order this is called.
    pub fn append(&self, bytes: Vec<u8>) -> Durable {
        let (done, answer) = oneshot::channel();
        let durable = Durable(answer);
        let len = bytes.len();
        let op = Op::Append { bytes, done };
        match &self.tx {
            Some(tx) => {
                // Counted before it is sent, so that the writer, which takes it off once
                // the record is synced, never sees it taken off first.
                let before = self.wake.unsynced.fetch_add(len, Ordering::SeqCst);
                if let Err(e) = tx.send(op)
                    && let Op::Append { done, .. } = e.into_inner()
                {
                    self.wake.unsynced.fetch_sub(len, Ordering::SeqCst);
                    let _ = done.send(Err(AppendError::Closed));
                    return durable;
                }
                let big_enough =
                    before < self.group_bytes && before.saturating_add(len) >= self.group_bytes;
                if self.wake.idle.swap(false, Ordering::SeqCst) || big_enough {
                    self.wake.unpark();
                }
            }
            None => {
                if let Op::Append { done, .. } = op {
                    let _ = done.send(Err(AppendError::Closed));
                }
            }
        }
        durable
    }

    /// Asks for a new segment after everything appended so far; the answer (its id) comes
    /// once the older segments are synced. Never waits itself.
    pub fn rotate(&self) -> oneshot::Receiver<io::Result<u64>> {
        let (reply, answer) = oneshot::channel();
        if let Some(tx) = &self.tx {
            match tx.send(Op::Rotate(reply)) {
                Ok(()) => self.wake.unpark(),
                Err(e) => {
                    if let Op::Rotate(reply) = e.into_inner() {
                        let _ = reply.send(Err(io::Error::other("the write-ahead log is closed")));
                    }
                }
            }
        }
        answer
    }

    /// The segment being written now (an append queued now lands in it or a later one).
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// The flag behind [`healthy`](Self::healthy).
    pub fn health(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }

    /// False while the last group failed (a full disk, an I/O error): appends are being
    /// refused. True again once a group is stored.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Syncs what is queued, answers every waiter and stops the thread.
    pub fn close(&mut self) {
        self.tx = None;
        self.wake.unpark();
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

struct Writer {
    /// The group's records, written with one call when it is synced (one system call a
    /// group, not one an append).
    buffer: Vec<u8>,
    current: Arc<AtomicU64>,
    dir: Box<dyn SegmentDir>,
    id: u64,
    file: Box<dyn SegmentFile>,
    /// Durable length of the current segment.
    len: u64,
    /// Written length (durable or not yet) of the current segment.
    written: u64,
    policy: SyncPolicy,
    group: Group,
    waiting: Vec<oneshot::Sender<Result<(), AppendError>>>,
    failed: Option<String>,
    /// A failed group that could not be cut off the file: what follows it would not be
    /// where the log thinks, so every later append fails until a restart recovers the
    /// segment.
    broken: Option<String>,
    healthy: Arc<AtomicBool>,
    wake: Arc<Wake>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Op>) {
        let mut open = true;
        loop {
            // Everything queued, in order.
            while open {
                match rx.try_recv() {
                    Ok(Op::Append { bytes, done }) => self.write(&bytes, done),
                    Ok(Op::Rotate(reply)) => {
                        self.sync();
                        let _ = reply.send(self.next_segment());
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            let now = Instant::now();
            match self.group.due() {
                Some(due) if due <= now || !open => {
                    self.sync();
                    if self.written >= self.policy.segment_bytes
                        && let Err(e) = self.next_segment()
                    {
                        tracing::error!(error = %e, segment = self.id, "cannot start the next WAL segment: the current one grows on");
                    }
                }
                // Appends meanwhile do not wake the writer, unless they make the group
                // big enough.
                Some(due) => std::thread::park_timeout(due - now),
                None if !open => return,
                None => {
                    // Nothing waits: the next append wakes the writer. Idle is set before
                    // the queue is looked at once more, so an append either is seen here
                    // or sees idle and wakes it.
                    self.wake.idle.store(true, Ordering::SeqCst);
                    if !rx.is_empty() {
                        self.wake.idle.store(false, Ordering::SeqCst);
                        continue;
                    }
                    if self.healthy.load(Ordering::Relaxed) {
                        std::thread::park();
                        self.wake.idle.store(false, Ordering::SeqCst);
                    } else {
                        // Failing with nothing to do: try the disk now and then, so that
                        // the log (and `/ready`) recovers when space comes back even if no
                        // client sends.
                        std::thread::park_timeout(PROBE_EVERY);
                        self.wake.idle.store(false, Ordering::SeqCst);
                        if rx.is_empty() && now.elapsed() >= PROBE_EVERY {
                            self.probe();
                        }
                    }
                }
            }
        }
    }

    fn write(&mut self, bytes: &[u8], done: oneshot::Sender<Result<(), AppendError>>) {
        self.group.add(bytes.len(), Instant::now());
        if let Some(why) = &self.broken {
            self.failed.get_or_insert_with(|| why.clone());
        } else if self.failed.is_none() {
            self.buffer.extend_from_slice(bytes);
        }
        self.written += bytes.len() as u64;
        self.waiting.push(done);
    }

    /// Writes and syncs the group and answers its waiters.
    fn sync(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        if self.failed.is_none()
            && !self.buffer.is_empty()
            && let Err(e) = self.file.write_all(&self.buffer)
        {
            self.failed = Some(e.to_string());
        }
        self.buffer.clear();
        if self.buffer.capacity() > 4 * self.policy.bytes.min(16 << 20) {
            // A burst made it big: give the memory back.
            self.buffer = Vec::new();
        }
        if self.policy.fsync
            && self.failed.is_none()
            && self.broken.is_none()
            && let Err(e) = self.file.sync_data()
        {
            self.failed = Some(e.to_string());
        }
        let outcome = match self.failed.take() {
            None => {
                self.len = self.written;
                self.healthy.store(true, Ordering::Relaxed);
                Ok(())
            }
            Some(error) => {
                // What the group wrote is not durable: cut it off, so the next group
                // follows the last durable record.
                if self.broken.is_none()
                    && let Err(e) = self.file.truncate(self.len)
                {
                    tracing::error!(error = %e, "cannot cut a failed WAL group off its segment: the log refuses appends until a restart");
                    self.broken = Some(format!(
                        "{error}; then the failed records could not be cut off: {e}"
                    ));
                }
                self.written = self.len;
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(
                    error,
                    records = self.waiting.len(),
                    "WAL append failed: acknowledgements withheld"
                );
                Err(AppendError::Io(error))
            }
        };
        for done in self.waiting.drain(..) {
            let _ = done.send(outcome.clone());
        }
        self.wake
            .unsynced
            .fetch_sub(self.group.bytes, Ordering::SeqCst);
        self.group.synced(Instant::now());
    }

    /// Writes and syncs a block past the end, then cuts it off again: healthy if that
    /// worked. (A crash in between leaves a tail that recovery cuts off.)
    fn probe(&mut self) {
        if self.broken.is_some() {
            return;
        }
        let block = [0u8; 4096];
        let tried = self
            .file
            .write_all(&block)
            .and_then(|()| self.file.sync_data());
        let cut = self.file.truncate(self.len);
        match (tried, cut) {
            (Ok(()), Ok(())) => {
                tracing::info!("the write-ahead log can store appends again");
                self.healthy.store(true, Ordering::Relaxed);
            }
            (_, Err(e)) => {
                tracing::error!(error = %e, "cannot cut the WAL probe off its segment: the log refuses appends until a restart");
                self.broken = Some(format!("the disk probe could not be cut off: {e}"));
            }
            (Err(_), Ok(())) => {}
        }
    }

    /// Starts the next segment (the current one is synced: nothing waits).
    fn next_segment(&mut self) -> io::Result<u64> {
        if let Some(why) = &self.broken {
            return Err(io::Error::other(why.clone()));
        }
        let id = self.id + 1;
        let file = self.dir.create(id)?;
        self.id = id;
        self.current.store(id, Ordering::SeqCst);
        self.file = file;
        self.len = 0;
        self.written = 0;
        Ok(id)
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
            denied: false,
            reading: false,
        };
        encode(&record, &mut out).unwrap();
        out
    }

    /// Segments in memory: the first is the test's `file`, later ones are kept here.
    #[derive(Clone, Default)]
    struct Dir(Arc<Mutex<Vec<(u64, Memory)>>>);

    impl SegmentDir for Dir {
        fn create(&mut self, id: u64) -> io::Result<Box<dyn SegmentFile>> {
            let file = Memory::default();
            self.0.lock().unwrap().push((id, file.clone()));
            Ok(Box::new(file))
        }
    }

    fn policy(interval: Duration, bytes: usize) -> SyncPolicy {
        SyncPolicy {
            interval,
            bytes,
            segment_bytes: u64::MAX,
            fsync: true,
        }
    }

    /// A writer on `file` (segment 1), empty so far.
    fn start(file: &Memory, interval: Duration, bytes: usize) -> GroupCommit {
        start_in(Dir::default(), file, policy(interval, bytes))
    }

    fn start_in(dir: Dir, file: &Memory, policy: SyncPolicy) -> GroupCommit {
        let current = Current {
            id: 1,
            file: Box::new(file.clone()),
            len: 0,
        };
        GroupCommit::start(dir, current, policy).unwrap()
    }

    fn records(file: &Memory) -> Vec<i64> {
        Scan::new(&file.0.lock().unwrap().bytes)
            .map(|f| match f {
                Found::Record { record, .. } => record.received_at_ns,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_rotation_puts_every_earlier_append_before_it_and_every_later_one_after() {
        let (dir, first) = (Dir::default(), Memory::default());
        let wal = start_in(
            dir.clone(),
            &first,
            policy(Duration::from_millis(50), usize::MAX),
        );
        let before: Vec<Durable> = (0..3).map(|i| wal.append(framed(i))).collect();
        let rotated = wal.rotate();
        let after: Vec<Durable> = (3..5).map(|i| wal.append(framed(i))).collect();
        assert_eq!(block(rotated).unwrap().unwrap(), 2, "the new segment's id");
        for w in before.into_iter().chain(after) {
            assert_eq!(block(w), Ok(()));
        }
        assert_eq!(records(&first), [0, 1, 2]);
        let made = dir.0.lock().unwrap().clone();
        assert_eq!(made.len(), 1);
        assert_eq!((made[0].0, records(&made[0].1)), (2, vec![3, 4]));
        let s = first.0.lock().unwrap();
        assert_eq!(
            s.synced,
            s.bytes.len(),
            "the old segment was synced before the rotation"
        );
    }

    #[test]
    fn a_full_segment_is_closed_and_the_next_one_started() {
        let (dir, first) = (Dir::default(), Memory::default());
        let size = framed(0).len() as u64;
        let mut p = policy(Duration::ZERO, 1);
        p.segment_bytes = 2 * size;
        let wal = start_in(dir.clone(), &first, p);
        for i in 0..5 {
            assert_eq!(block(wal.append(framed(i))), Ok(()));
        }
        assert_eq!(records(&first), [0, 1]);
        let made = dir.0.lock().unwrap().clone();
        let ids: Vec<(u64, Vec<i64>)> = made.iter().map(|(id, f)| (*id, records(f))).collect();
        assert_eq!(ids, [(2, vec![2, 3]), (3, vec![4])]);
    }

    #[test]
    fn the_writer_is_unhealthy_while_appends_fail_and_healthy_again_after() {
        let file = Memory::default();
        let wal = start(&file, Duration::ZERO, 1);
        assert!(wal.healthy());
        file.0.lock().unwrap().fail_writes = true;
        assert!(block(wal.append(framed(0))).is_err());
        assert!(!wal.healthy());
        file.0.lock().unwrap().fail_writes = false;
        assert_eq!(block(wal.append(framed(1))), Ok(()));
        assert!(wal.healthy());
    }

    #[test]
    fn a_failing_log_finds_out_by_itself_that_space_came_back() {
        let file = Memory::default();
        let wal = start(&file, Duration::ZERO, 1);
        assert_eq!(block(wal.append(framed(0))), Ok(()));
        file.0.lock().unwrap().fail_writes = true;
        assert!(block(wal.append(framed(1))).is_err());
        assert!(!wal.healthy());
        std::thread::sleep(PROBE_EVERY * 2);
        assert!(!wal.healthy(), "still full");
        file.0.lock().unwrap().fail_writes = false;
        let deadline = Instant::now() + PROBE_EVERY * 5;
        while !wal.healthy() {
            assert!(Instant::now() < deadline, "no probe found the space");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(records(&file), [0], "the probe left nothing in the segment");
    }

    fn block<T>(f: impl std::future::Future<Output = T>) -> T {
        futures::executor::block_on(f)
    }

    #[test]
    fn a_group_is_due_an_interval_after_the_last_sync_or_at_once_when_big_enough() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut g = Group::new(policy(ms(5), 1000));
        assert_eq!(g.due(), None);
        g.add(100, t0);
        assert_eq!(g.due(), Some(t0), "a quiet log syncs at once");
        g.synced(t0 + ms(1));
        assert_eq!(g.due(), None);
        g.add(100, t0 + ms(2));
        g.add(100, t0 + ms(3));
        assert_eq!(g.due(), Some(t0 + ms(6)), "an interval after the last sync");
        g.add(800, t0 + ms(4));
        assert_eq!(g.due(), Some(t0 + ms(2)), "1000 bytes wait: now");
        g.synced(t0 + ms(4));
        g.add(100, t0 + ms(20));
        assert_eq!(g.due(), Some(t0 + ms(20)), "the last sync is long ago: now");
    }

    #[test]
    fn a_waiter_is_answered_only_once_its_record_is_synced() {
        let file = Memory::default();
        let wal = start(&file, Duration::from_millis(300), usize::MAX);
        // The first record of a quiet log is synced at once; the next ones wait for the
        // interval from that sync.
        assert_eq!(block(wal.append(framed(0))), Ok(()));
        let mut first = wal.append(framed(1));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(first.try_get(), None, "not synced yet: no answer");
        assert_eq!(file.0.lock().unwrap().syncs, 1);
        let second = wal.append(framed(2));
        assert_eq!(block(second), Ok(()));
        assert_eq!(first.try_get(), Some(Ok(())));
        let s = file.0.lock().unwrap();
        assert_eq!(s.syncs, 2, "one sync for the group");
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
