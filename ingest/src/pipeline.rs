//! The batching stage: messages are decoded where they are handed over, then decoder
//! threads, each with its own bounded crossbeam queue, turn them into sealed Arrow batches
//! for a [`BatchSink`].
//!
//! - **Per-device order.** A message goes to the decoder its device id hashes to, so the
//!   readings of one device are deduplicated, batched and handed on in the order they were
//!   sent, whatever the number of decoders.
//! - **Back-pressure.** The queues hold at most `queue_messages` messages in all, counted
//!   by a semaphore: [`IngestHandle::send`] waits (asynchronously) for room, and room
//!   comes back as decoders finish with messages, after their batches were taken by
//!   the sink. A slow sink therefore slows the senders; nothing is dropped.
//! - **Durability.** With a [`Journal`] (the write-ahead log), every message is
//!   appended to it, decoded (an [`Entry`]: see `journal.rs`), in the same step that
//!   queues it, and [`IngestHandle::send`] returns what resolves once it is durable.
//!   [`IngestHandle::cut`] puts a checkpoint between two messages: everything journaled
//!   before it is sealed and handed to the sink before anything after it.
//! - **Exactly once.** A reading whose (`device_id`, `ts`) was seen within
//!   `dedup_window` is a duplicate: counted, never stored or aggregated (`dedup.rs`).

use std::hash::BuildHasher;
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arrow::array::AsArray;
use arrow::datatypes::TimestampNanosecondType;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use futures::future::BoxFuture;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::Semaphore;

use crate::batch::{Batcher, RejectsBuilder, SealPolicy, SealReason, TelemetryBuilder};
use crate::decode::{DecodeLimits, RejectReason};
use crate::dedup::{Dedup, Key, key};
use crate::journal::{Entry, decode_reading};

/// Index of `ts` in the telemetry schema.
const TS_COLUMN: usize = 1;
/// Index of `received_at` in the telemetry schema.
const RECEIVED_AT_COLUMN: usize = 2;

/// How long a decoder lets messages gather after it wakes up for one: at tens of
/// thousands of messages a second from thousands of connections, a decoder wakes a few
/// hundred times a second instead of once per message. It delays visibility by at
/// most this (acknowledgements not at all: they are sent when a message is queued).
const LINGER: Duration = Duration::from_millis(2);

/// One message as it came off the broker.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    /// When sluice read the message, ns since the epoch (UTC).
    pub received_at_ns: i64,
    /// Its client was not allowed to publish it: a reject (`not_authorized`), whatever
    /// it holds.
    pub denied: bool,
}

/// A sink did not store a batch. Its rows are counted where it was refused
/// (`sluice_ingest_refused_rows_total`, `sluice_aggregator_refused_rows_total`), by
/// `reason`, and logged: never dropped silently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// A short label for metrics (`schema`, `unknown_table`, `internal`, …).
    pub reason: &'static str,
    pub message: String,
}

/// Where sealed batches go. Implementations may block to apply back-pressure; an `Err`
/// says the batch was not stored.
pub trait BatchSink: Send + Sync + 'static {
    fn append_telemetry(&self, batch: RecordBatch) -> Result<(), Refused>;
    fn append_rejects(&self, batch: RecordBatch) -> Result<(), Refused>;
}

/// Resolves once the messages it was returned for are durable (`Err`: they cannot be,
/// and must not be acknowledged).
pub type Logged = BoxFuture<'static, Result<(), String>>;

/// Where messages are logged, decoded, before they are queued: the write-ahead log.
pub trait Journal: Send + Sync + 'static {
    /// Appends `entries` in order; never waits.
    fn append(&self, entries: &[Entry]) -> Logged;
    /// Starts a new segment after everything appended so far; resolves to its id.
    fn rotate(&self) -> BoxFuture<'static, Result<u64, String>>;
}

/// A reading already stored, whose key a decoder must remember (taken from the rows
/// at start, so that a redelivery after a restart is still a duplicate).
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    pub device_id: &'a str,
    pub ts_ns: i64,
    pub received_at_ns: i64,
}

/// What goes through a decoder's queue.
enum Item {
    /// `replayed`: read back from the journal at start (see
    /// [`IngestHandle::replay_blocking`]).
    Entries { entries: Vec<Entry>, replayed: bool },
    /// Seal what is open, hand it on, then meet the other decoders at a checkpoint.
    Cut(Arc<Rendezvous>),
    /// Keys of stored readings, and when each arrived.
    Stored(Vec<(Key, i64)>),
}

/// Where the decoders meet for a checkpoint: each arrives once it handed on everything
/// before the cut and waits until the checkpoint has taken its cut (or given up).
#[derive(Default)]
struct Rendezvous {
    state: Mutex<Meeting>,
    changed: Condvar,
}

#[derive(Default)]
struct Meeting {
    arrived: usize,
    released: bool,
    abandoned: bool,
}

impl Rendezvous {
    fn lock(&self) -> std::sync::MutexGuard<'_, Meeting> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A decoder arrives and waits to be released.
    fn arrive(&self) {
        let mut m = self.lock();
        if m.abandoned {
            return;
        }
        m.arrived += 1;
        self.changed.notify_all();
        while !m.released && !m.abandoned {
            m = self.changed.wait(m).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits for `n` decoders; `false` (and they are let go) if they are not all there
    /// within `timeout`.
    fn gather(&self, n: usize, timeout: Duration) -> bool {
        let m = self.lock();
        let (m, _) = self
            .changed
            .wait_timeout_while(m, timeout, |m| m.arrived < n)
            .unwrap_or_else(|p| p.into_inner());
        if m.arrived < n {
            drop(m);
            self.abandon();
            return false;
        }
        true
    }

    fn release(&self) {
        self.lock().released = true;
        self.changed.notify_all();
    }

    /// Lets go whoever arrived; later arrivals do not wait.
    fn abandon(&self) {
        self.lock().abandoned = true;
        self.changed.notify_all();
    }
}

/// Settings of the batching stage.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Decoding threads; each builds its own batches.
    pub workers: usize,
    /// Messages queued in front of the decoders, in all; senders wait beyond.
    pub queue_messages: usize,
    pub seal: SealPolicy,
    pub limits: DecodeLimits,
    /// How much of a rejected payload is kept in `rejects.payload`.
    pub reject_payload_bytes: usize,
    /// A reading whose (`device_id`, `ts`) arrived within this long before is a
    /// duplicate (zero: no deduplication).
    pub dedup_window: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 2,
            queue_messages: 131_072,
            seal: SealPolicy::default(),
            limits: DecodeLimits::default(),
            reject_payload_bytes: 1024,
            dedup_window: Duration::from_secs(600),
        }
    }
}

/// The pipeline stopped taking messages.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the ingest pipeline is closed")]
pub struct Closed;

/// The decoder of a device id (the same on every run: only the spread matters).
fn decoder_of(device: &[u8], decoders: usize) -> usize {
    if decoders == 1 {
        return 0;
    }
    let hash = foldhash::fast::FixedState::with_seed(0x736c_7569_6365).hash_one(device);
    (hash % decoders as u64) as usize
}

struct Queues {
    /// `None` once the pipeline is finishing: the workers drain what is queued and stop.
    senders: RwLock<Option<Vec<Sender<Item>>>>,
    room: Semaphore,
    capacity: usize,
    journal: OnceLock<Arc<dyn Journal>>,
    limits: DecodeLimits,
}

/// Feeds the decoders; cheap to clone.
#[derive(Clone)]
pub struct IngestHandle {
    queues: Arc<Queues>,
}

impl IngestHandle {
    /// Decodes messages and queues them, in order; waits while the queues are full.
    /// Cancel-safe: if the future is dropped before it completes, none of the messages
    /// was queued. With a journal, the result resolves once they are durable.
    pub async fn send(&self, messages: Vec<Message>) -> Result<Logged, Closed> {
        self.send_entries(Entry::all_of(messages, &self.queues.limits))
            .await
    }

    /// Decodes one message as [`send`](Self::send) does (a replay of a journal that kept
    /// it as it came).
    pub fn entry(&self, message: Message) -> Entry {
        Entry::of(message, &self.queues.limits)
    }

    /// Queues decoded messages, as [`send`](Self::send).
    pub async fn send_entries(&self, entries: Vec<Entry>) -> Result<Logged, Closed> {
        self.queue(entries, false).await
    }

    async fn queue(&self, mut entries: Vec<Entry>, replayed: bool) -> Result<Logged, Closed> {
        let mut logged = Vec::new();
        while !entries.is_empty() {
            // A larger batch than the whole queue goes in parts.
            let rest = if entries.len() > self.queues.capacity {
                entries.split_off(self.queues.capacity)
            } else {
                Vec::new()
            };
            let permits = self
                .queues
                .room
                .acquire_many(entries.len() as u32)
                .await
                .map_err(|_| Closed)?;
            permits.forget();
            logged.extend(self.push(entries, replayed)?);
            entries = rest;
        }
        Ok(Box::pin(async move {
            for part in logged {
                part.await?;
            }
            Ok(())
        }))
    }

    /// [`send`](Self::send) from a thread that may block, waiting until durable.
    pub fn send_blocking(&self, messages: Vec<Message>) -> Result<Result<(), String>, Closed> {
        futures::executor::block_on(async { Ok(self.send(messages).await?.await) })
    }

    /// Queues entries read back from the journal at start (its replay), as
    /// [`send_entries`](Self::send_entries), from a thread that may block. Their rows are
    /// counted and stored as any, but their lags are not observed: each was when it first
    /// became queryable, before the restart, and its lag now would be the outage's
    /// length, not the pipeline's.
    pub fn replay_blocking(&self, entries: Vec<Entry>) -> Result<Result<(), String>, Closed> {
        futures::executor::block_on(async { Ok(self.queue(entries, true).await?.await) })
    }

    /// From now on every message sent is appended to `journal` first (messages sent
    /// before, the replay of the journal itself, are not). Set once.
    pub fn set_journal(&self, journal: Arc<dyn Journal>) {
        if self.queues.journal.set(journal).is_err() {
            tracing::error!("the ingest journal is set once; the first one stays");
        }
    }

    /// Makes the decoders remember readings already stored (see [`Stored`]).
    pub fn remember<'a>(&self, stored: impl IntoIterator<Item = Stored<'a>>) -> Result<(), Closed> {
        let senders = self
            .queues
            .senders
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let Some(senders) = senders.as_ref() else {
            return Err(Closed);
        };
        let mut parts: Vec<Vec<(Key, i64)>> = vec![Vec::new(); senders.len()];
        for s in stored {
            parts[decoder_of(s.device_id.as_bytes(), senders.len())]
                .push((key(s.device_id, s.ts_ns), s.received_at_ns));
        }
        for (sender, part) in senders.iter().zip(parts) {
            if !part.is_empty() {
                sender.send(Item::Stored(part)).map_err(|_| Closed)?;
            }
        }
        Ok(())
    }

    /// Seals every open batch and hands it to the sink; returns once every decoder has
    /// (what was sent before is then queryable: the end of a replay).
    pub fn seal(&self, timeout: Duration) -> Result<(), String> {
        let meeting = Arc::new(Rendezvous::default());
        let decoders = {
            let senders = self
                .queues
                .senders
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let Some(senders) = senders.as_ref() else {
                return Err("the ingest pipeline is closed".into());
            };
            for sender in senders {
                sender
                    .send(Item::Cut(meeting.clone()))
                    .map_err(|_| "the ingest pipeline is closed".to_string())?;
            }
            senders.len()
        };
        let all = meeting.gather(decoders, timeout);
        meeting.release();
        if all {
            Ok(())
        } else {
            Err(format!(
                "the decoders did not seal their batches within {timeout:?}"
            ))
        }
    }

    /// A checkpoint: starts a new journal segment and brings the decoders to it (each
    /// seals and hands on every message journaled before it), then calls `at_cut` with
    /// the new segment's id while they wait, and lets them go. Returns what `at_cut`
    /// returned. Gives up (`Err`, the decoders go on) if they are not all there within
    /// `timeout` (a sink that waits for a flush would otherwise wait for this checkpoint).
    pub fn cut<T>(&self, timeout: Duration, at_cut: impl FnOnce(u64) -> T) -> Result<T, String> {
        let meeting = Arc::new(Rendezvous::default());
        let (rotated, decoders) = {
            let senders = self
                .queues
                .senders
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let Some(senders) = senders.as_ref() else {
                return Err("the ingest pipeline is closed".into());
            };
            let Some(journal) = self.queues.journal.get() else {
                return Err("no journal to checkpoint".into());
            };
            let rotated = journal.rotate();
            for sender in senders {
                // Never waits under the lock: a queue this full has a stuck decoder.
                if sender.try_send(Item::Cut(meeting.clone())).is_err() {
                    meeting.abandon();
                    return Err("a decoder's queue is full: no checkpoint now".into());
                }
            }
            (rotated, senders.len())
        };
        let id = match futures::executor::block_on(rotated) {
            Ok(id) => id,
            Err(e) => {
                meeting.abandon();
                return Err(e);
            }
        };
        if !meeting.gather(decoders, timeout) {
            return Err(format!(
                "the decoders did not reach the checkpoint within {timeout:?} (the sink is waiting)"
            ));
        }
        let at = at_cut(id);
        meeting.release();
        Ok(at)
    }

    /// Messages queued now.
    pub fn queued(&self) -> usize {
        self.queues.capacity - self.queues.room.available_permits()
    }

    /// Journals and queues messages in one step: a checkpoint (which takes the write
    /// lock) comes wholly before or wholly after both.
    fn push(&self, entries: Vec<Entry>, replayed: bool) -> Result<Option<Logged>, Closed> {
        let senders = self
            .queues
            .senders
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let Some(senders) = senders.as_ref() else {
            self.queues.room.add_permits(entries.len());
            return Err(Closed);
        };
        let logged = self.queues.journal.get().map(|j| j.append(&entries));
        // Room was taken for every message, so no queue can be full.
        if senders.len() == 1 {
            senders[0]
                .send(Item::Entries { entries, replayed })
                .map_err(|_| Closed)?;
            return Ok(logged);
        }
        let mut parts: Vec<Vec<Entry>> = vec![Vec::new(); senders.len()];
        for entry in entries {
            parts[decoder_of(entry.route(), senders.len())].push(entry);
        }
        for (sender, part) in senders.iter().zip(parts) {
            if !part.is_empty() {
                sender
                    .send(Item::Entries {
                        entries: part,
                        replayed,
                    })
                    .map_err(|_| Closed)?;
            }
        }
        Ok(logged)
    }
}

/// Counters of the batching stage.
#[derive(Clone)]
pub struct IngestMetrics {
    pub messages: IntCounter,
    queued: IntGauge,
    queue_capacity: IntGauge,
    pub rows: IntCounter,
    rejects: IntCounterVec,
    pub duplicates: IntCounter,
    refused: IntCounterVec,
    batches: IntCounterVec,
    batch_rows: Histogram,
    ingest_lag: Histogram,
    queryable_lag: Histogram,
}

impl IngestMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let messages = IntCounter::new(
            "sluice_ingest_messages_total",
            "Messages taken from the broker by the decoders",
        )?;
        let rows = IntCounter::new(
            "sluice_ingest_rows_total",
            "Readings accepted into telemetry batches",
        )?;
        let rejects = IntCounterVec::new(
            Opts::new("sluice_ingest_rejects_total", "Messages refused, by reason"),
            &["reason"],
        )?;
        let duplicates = IntCounter::new(
            "sluice_ingest_duplicates_total",
            "Readings not stored because one with the same device_id and ts arrived within ingest.dedup_window",
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "sluice_ingest_refused_rows_total",
                "Rows of sealed batches the sink did not store, by table and reason (logged as errors)",
            ),
            &["table", "reason"],
        )?;
        let batches = IntCounterVec::new(
            Opts::new(
                "sluice_ingest_batches_total",
                "Batches sealed, by table and by why they were sealed",
            ),
            &["table", "reason"],
        )?;
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new("sluice_ingest_batch_rows", "Rows per sealed batch")
                .buckets(prometheus::exponential_buckets(1.0, 4.0, 10)?),
        )?;
        let queued = IntGauge::new(
            "sluice_ingest_queue_messages",
            "Messages waiting for a decoder",
        )?;
        let queue_capacity = IntGauge::new(
            "sluice_ingest_queue_capacity_messages",
            "Messages the decoders' queues hold before senders wait (ingest.queue_messages)",
        )?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(queue_capacity.clone()))?;
        registry.register(Box::new(rows.clone()))?;
        registry.register(Box::new(rejects.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(batches.clone()))?;
        // Lags from event time (the message's timestamp), 1 ms to ~16 min.
        let lag = |name: &str, help: &str| {
            Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .buckets(prometheus::exponential_buckets(0.001, 1.25, 50)?),
            )
        };
        // To the moment the row is queryable: for a device with a good clock, publish →
        // queryable.
        let queryable_lag = lag(
            "sluice_ingest_queryable_lag_seconds",
            "Time from a reading's event time to when it became queryable",
        )?;
        // To the moment sluice decoded the reading (`received_at − ts`): how late readings
        // reach sluice (device buffering, network, the broker's queue).
        let ingest_lag = lag(
            "sluice_ingest_lag_seconds",
            "Time from a reading's event time to when sluice decoded it (received_at - ts)",
        )?;
        registry.register(Box::new(batch_rows.clone()))?;
        registry.register(Box::new(ingest_lag.clone()))?;
        registry.register(Box::new(queryable_lag.clone()))?;
        // Every reason is present from the start, so a rate over it is never "no data".
        for reason in RejectReason::ALL {
            rejects.with_label_values(&[reason.as_str()]);
        }
        for table in ["telemetry", "rejects"] {
            for reason in SealReason::ALL {
                batches.with_label_values(&[table, reason.as_str()]);
            }
        }
        Ok(IngestMetrics {
            messages,
            queued,
            queue_capacity,
            rows,
            rejects,
            duplicates,
            refused,
            batches,
            batch_rows,
            ingest_lag,
            queryable_lag,
        })
    }

    /// Messages refused so far, all reasons.
    pub fn rejects_total(&self) -> u64 {
        RejectReason::ALL
            .iter()
            .map(|r| self.rejects.with_label_values(&[r.as_str()]).get())
            .sum()
    }

    /// Rows the sink refused so far, all tables and reasons.
    pub fn refused_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.refused
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    fn refused(&self, table: &str, rows: usize, refused: &Refused) {
        tracing::error!(table, rows, reason = refused.reason, error = %refused, "a sealed batch was not stored: its rows are counted in sluice_ingest_refused_rows_total");
        self.refused
            .with_label_values(&[table, refused.reason])
            .inc_by(rows as u64);
    }

    fn sealed(&self, table: &str, reason: SealReason, batch: &RecordBatch) {
        self.batches
            .with_label_values(&[table, reason.as_str()])
            .inc();
        self.batch_rows.observe(batch.num_rows() as f64);
    }
}

/// The running batching stage.
pub struct Pipeline {
    queues: Arc<Queues>,
    workers: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Starts `config.workers` decoding threads.
    pub fn start(
        config: PipelineConfig,
        sink: Arc<dyn BatchSink>,
        metrics: IngestMetrics,
    ) -> std::io::Result<Pipeline> {
        let capacity = config.queue_messages.clamp(1, Semaphore::MAX_PERMITS);
        let decoders = config.workers.max(1);
        // Room for every message plus checkpoints and remembered keys beside them.
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..decoders)
            .map(|_| crossbeam_channel::bounded(capacity + 64))
            .unzip();
        let queues = Arc::new(Queues {
            senders: RwLock::new(Some(senders)),
            room: Semaphore::new(capacity),
            capacity,
            journal: OnceLock::new(),
            limits: config.limits,
        });
        metrics.queue_capacity.set(capacity as i64);
        let workers = receivers
            .into_iter()
            .enumerate()
            .map(|(i, rx)| {
                let worker =
                    Worker::new(&config, rx, queues.clone(), sink.clone(), metrics.clone());
                std::thread::Builder::new()
                    .name(format!("ingest-{i}"))
                    .spawn(move || worker.run())
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Pipeline { queues, workers })
    }

    /// A handle to feed the decoders.
    pub fn handle(&self) -> IngestHandle {
        IngestHandle {
            queues: self.queues.clone(),
        }
    }

    /// Stops taking messages, waits until every queued message is decoded and every
    /// open batch is sealed and handed to the sink.
    pub fn finish(self) {
        self.queues.room.close();
        // Waits for a send in progress to finish its push.
        drop(
            self.queues
                .senders
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        for worker in self.workers {
            if worker.join().is_err() {
                tracing::error!("an ingest worker panicked");
            }
        }
    }
}

struct Worker {
    rx: Receiver<Item>,
    dedup: Dedup,
    queues: Arc<Queues>,
    sink: Arc<dyn BatchSink>,
    metrics: IngestMetrics,
    telemetry: Batcher<TelemetryBuilder>,
    /// The open telemetry batch holds replayed rows (their lags are not observed).
    replayed: bool,
    rejects: Batcher<RejectsBuilder>,
}

impl Worker {
    fn new(
        config: &PipelineConfig,
        rx: Receiver<Item>,
        queues: Arc<Queues>,
        sink: Arc<dyn BatchSink>,
        metrics: IngestMetrics,
    ) -> Self {
        Worker {
            rx,
            dedup: Dedup::new(config.dedup_window.as_nanos() as i64),
            queues,
            sink,
            metrics,
            telemetry: Batcher::new(TelemetryBuilder::default(), config.seal),
            replayed: false,
            rejects: Batcher::new(
                RejectsBuilder::new(config.reject_payload_bytes),
                config.seal,
            ),
        }
    }

    fn run(mut self) {
        loop {
            let deadline = match (self.telemetry.deadline(), self.rejects.deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let received = match deadline {
                Some(deadline) => self.rx.recv_deadline(deadline),
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(item) => {
                    self.take(item);
                    // While messages keep coming, take them every LINGER without
                    // blocking on the queue (senders then never need to wake this
                    // thread); block again once a round finds nothing.
                    loop {
                        std::thread::sleep(LINGER);
                        let mut took = false;
                        while let Ok(item) = self.rx.try_recv() {
                            self.take(item);
                            took = true;
                        }
                        self.seal_aged(Instant::now());
                        if !took {
                            break;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.seal_aged(Instant::now());
        }
        if let Some(batch) = self.telemetry.drain() {
            self.emit_telemetry(batch, SealReason::Drain);
        }
        if let Some(batch) = self.rejects.drain() {
            self.emit_rejects(batch, SealReason::Drain);
        }
    }

    /// Seals the open batches that have waited `batch_age`.
    fn seal_aged(&mut self, now: Instant) {
        if let Some(batch) = self.telemetry.poll(now) {
            self.emit_telemetry(batch, SealReason::Age);
        }
        if let Some(batch) = self.rejects.poll(now) {
            self.emit_rejects(batch, SealReason::Age);
        }
    }

    /// Takes a chunk (deduplicated, batched), then gives its room in the queue back; or
    /// meets a checkpoint.
    fn take(&mut self, item: Item) {
        let (chunk, replayed) = match item {
            Item::Entries { entries, replayed } => (entries, replayed),
            Item::Cut(meeting) => {
                if let Some(batch) = self.telemetry.drain() {
                    self.emit_telemetry(batch, SealReason::Checkpoint);
                }
                if let Some(batch) = self.rejects.drain() {
                    self.emit_rejects(batch, SealReason::Checkpoint);
                }
                return meeting.arrive();
            }
            Item::Stored(stored) => {
                for (key, arrived_ns) in stored {
                    self.dedup.first(key, arrived_ns);
                }
                return;
            }
        };
        self.process(&chunk, replayed);
        self.queues.room.add_permits(chunk.len());
        self.metrics
            .queued
            .set((self.queues.capacity - self.queues.room.available_permits()) as i64);
    }

    fn process(&mut self, chunk: &[Entry], replayed: bool) {
        let now = Instant::now();
        self.metrics.messages.inc_by(chunk.len() as u64);
        // Counted once per chunk: a shared counter bumped per message bounces its cache
        // line between the workers.
        let mut rows = 0;
        let mut duplicates = 0;
        for entry in chunk {
            match entry {
                Entry::Reading {
                    received_at_ns,
                    encoded,
                } => {
                    let reading = match decode_reading(encoded) {
                        Ok(reading) => reading,
                        Err(e) => {
                            // Only a bug gets here: the bytes were encoded by this
                            // process, or read back from the WAL past its CRC check.
                            tracing::error!(error = %e, "a decoded reading cannot be read back: counted in sluice_ingest_refused_rows_total{{reason=\"undecodable\"}}");
                            self.metrics
                                .refused
                                .with_label_values(&["telemetry", "undecodable"])
                                .inc();
                            continue;
                        }
                    };
                    if !self
                        .dedup
                        .first(key(&reading.device_id, reading.ts_ns), *received_at_ns)
                    {
                        tracing::debug!(device = %reading.device_id, ts = reading.ts_ns, "duplicate reading not stored");
                        duplicates += 1;
                        continue;
                    }
                    self.telemetry.builder().append(&reading, *received_at_ns);
                    self.replayed |= replayed;
                    rows += 1;
                    if let Some(batch) = self.telemetry.appended(now) {
                        self.emit_telemetry(batch, SealReason::Rows);
                    }
                }
                Entry::Reject { message, rejection } => {
                    tracing::debug!(reason = %rejection.reason, detail = %rejection.detail, "message rejected");
                    self.metrics
                        .rejects
                        .with_label_values(&[rejection.reason.as_str()])
                        .inc();
                    self.rejects.builder().append(
                        &message.topic,
                        &message.payload,
                        message.received_at_ns,
                        rejection,
                    );
                    if let Some(batch) = self.rejects.appended(now) {
                        self.emit_rejects(batch, SealReason::Rows);
                    }
                }
            }
        }
        self.metrics.rows.inc_by(rows);
        self.metrics.duplicates.inc_by(duplicates);
    }

    fn emit_telemetry(&mut self, batch: RecordBatch, reason: SealReason) {
        self.metrics.sealed("telemetry", reason, &batch);
        let replayed = std::mem::take(&mut self.replayed);
        let column = |i| {
            batch
                .column(i)
                .as_primitive::<TimestampNanosecondType>()
                .clone()
        };
        let (ts, received_at) = (column(TS_COLUMN), column(RECEIVED_AT_COLUMN));
        let rows = batch.num_rows();
        if let Err(refused) = self.sink.append_telemetry(batch) {
            return self.metrics.refused("telemetry", rows, &refused);
        }
        if replayed {
            return;
        }
        let now_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        let seconds = |from: i64, to: i64| to.saturating_sub(from).max(0) as f64 / 1e9;
        let ingest = self.metrics.ingest_lag.local();
        let queryable = self.metrics.queryable_lag.local();
        for (event_ns, received_ns) in ts.values().iter().zip(received_at.values()) {
            ingest.observe(seconds(*event_ns, *received_ns));
            queryable.observe(seconds(*event_ns, now_ns));
        }
        ingest.flush();
        queryable.flush();
    }

    fn emit_rejects(&self, batch: RecordBatch, reason: SealReason) {
        self.metrics.sealed("rejects", reason, &batch);
        let rows = batch.num_rows();
        if let Err(refused) = self.sink.append_rejects(batch) {
            self.metrics.refused("rejects", rows, &refused);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Default)]
    struct Collect {
        telemetry: Mutex<Vec<RecordBatch>>,
        rejects: Mutex<Vec<RecordBatch>>,
    }

    impl BatchSink for Collect {
        fn append_telemetry(&self, batch: RecordBatch) -> Result<(), Refused> {
            self.telemetry.lock().unwrap().push(batch);
            Ok(())
        }
        fn append_rejects(&self, batch: RecordBatch) -> Result<(), Refused> {
            self.rejects.lock().unwrap().push(batch);
            Ok(())
        }
    }

    /// Stores rejects, refuses every telemetry batch.
    #[derive(Default)]
    struct RefusesTelemetry(Collect);

    impl BatchSink for RefusesTelemetry {
        fn append_telemetry(&self, _: RecordBatch) -> Result<(), Refused> {
            Err(Refused {
                reason: "schema",
                message: "table telemetry: column 3 is Utf8, not Float64".into(),
            })
        }
        fn append_rejects(&self, batch: RecordBatch) -> Result<(), Refused> {
            self.0.append_rejects(batch)
        }
    }

    #[test]
    fn a_batch_the_sink_refuses_is_counted_by_table_and_reason() {
        let sink = Arc::new(RefusesTelemetry::default());
        let registry = Registry::new();
        let metrics = IngestMetrics::new(&registry).unwrap();
        let pipeline =
            Pipeline::start(PipelineConfig::default(), sink.clone(), metrics.clone()).unwrap();
        let mut chunk: Vec<Message> = (0..10).map(|i| message(i, i)).collect();
        chunk.push(Message {
            payload: Bytes::from_static(b"{oops"),
            ..message(99, 0)
        });
        pipeline.handle().send_blocking(chunk).unwrap().unwrap();
        pipeline.finish();
        assert_eq!(rows(&sink.0.rejects), 1);
        assert_eq!(metrics.refused_total(), 10);
        let refused = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "sluice_ingest_refused_rows_total")
            .expect("registered");
        let labels: Vec<(String, String, f64)> = refused
            .get_metric()
            .iter()
            .map(|m| {
                let l = m.get_label();
                (
                    l[1].value().to_owned(),
                    l[0].value().to_owned(),
                    m.get_counter().get_value(),
                )
            })
            .collect();
        assert_eq!(labels, [("telemetry".into(), "schema".into(), 10.0)]);
        // The accounting identity: every message is a stored row, a reject or refused.
        assert_eq!(
            metrics.messages.get(),
            metrics.rows.get() + metrics.rejects_total()
        );
        assert_eq!(metrics.rows.get(), metrics.refused_total());
    }

    /// A pipeline of the default configuration into a [`Collect`], with its metrics.
    fn collecting() -> (Arc<Collect>, IngestMetrics, Pipeline) {
        let sink = Arc::new(Collect::default());
        let metrics = IngestMetrics::new(&Registry::new()).unwrap();
        let pipeline =
            Pipeline::start(PipelineConfig::default(), sink.clone(), metrics.clone()).unwrap();
        (sink, metrics, pipeline)
    }

    fn rows(batches: &Mutex<Vec<RecordBatch>>) -> usize {
        batches.lock().unwrap().iter().map(|b| b.num_rows()).sum()
    }

    fn message(device: usize, i: usize) -> Message {
        let payload = format!(
            r#"{{"deviceId":"d{device}","timestamp":"2024-01-15T10:30:{:02}Z","type":"telemetry","payload":{{"temperature":{i}}}}}"#,
            i % 60
        );
        Message {
            topic: Bytes::from(format!("devices/d{device}/telemetry")),
            payload: Bytes::from(payload),
            // 2024-01-15T10:31:00Z, just after the readings' event time.
            received_at_ns: 1_705_314_660_000_000_000,
            denied: false,
        }
    }

    #[test]
    fn lags_are_measured_from_event_time_to_decoding_and_to_visibility() {
        let (sink, metrics, pipeline) = collecting();
        // Event times 10:30:10, :20 and :30, all received at 10:31:00.
        let chunk = [10, 20, 30].map(|second| message(1, second)).to_vec();
        pipeline.handle().send_blocking(chunk).unwrap().unwrap();
        pipeline.finish();
        assert_eq!(rows(&sink.telemetry), 3);
        let ingest = &metrics.ingest_lag;
        assert_eq!(ingest.get_sample_count(), 3);
        assert!((ingest.get_sample_sum() - (50.0 + 40.0 + 30.0)).abs() < 1e-6);
        // Visible now, years after 2024.
        let queryable = &metrics.queryable_lag;
        assert_eq!(queryable.get_sample_count(), 3);
        assert!(queryable.get_sample_sum() > 3.0 * 365.0 * 86_400.0);
    }

    #[test]
    fn replayed_rows_are_stored_without_observing_their_lags_again() {
        let (sink, metrics, pipeline) = collecting();
        let handle = pipeline.handle();
        // A replay: two readings and a reject (a reject alone must not mark the next
        // batch as replayed), sealed as the end of a replay does.
        let mut replayed: Vec<Entry> = [10, 20].map(|s| handle.entry(message(1, s))).into();
        replayed.push(handle.entry(Message {
            payload: Bytes::from_static(b"{oops"),
            ..message(2, 0)
        }));
        handle.replay_blocking(replayed).unwrap().unwrap();
        handle.seal(Duration::from_secs(10)).unwrap();
        let rejected: Vec<Entry> = vec![handle.entry(Message {
            payload: Bytes::from_static(b"{oops"),
            ..message(3, 0)
        })];
        handle.replay_blocking(rejected).unwrap().unwrap();
        handle.seal(Duration::from_secs(10)).unwrap();
        assert_eq!(rows(&sink.telemetry), 2);
        assert_eq!(metrics.rows.get(), 2);
        assert_eq!(metrics.ingest_lag.get_sample_count(), 0);
        assert_eq!(metrics.queryable_lag.get_sample_count(), 0);
        // Live readings after it are observed.
        let live = [30, 40, 50].map(|second| message(4, second)).to_vec();
        handle.send_blocking(live).unwrap().unwrap();
        pipeline.finish();
        assert_eq!(rows(&sink.telemetry), 5);
        assert_eq!(metrics.ingest_lag.get_sample_count(), 3);
        assert_eq!(metrics.queryable_lag.get_sample_count(), 3);
    }

    #[test]
    fn every_message_ends_as_a_row_or_a_reject() {
        let sink = Arc::new(Collect::default());
        let registry = Registry::new();
        let metrics = IngestMetrics::new(&registry).unwrap();
        let config = PipelineConfig {
            workers: 3,
            queue_messages: 400,
            seal: SealPolicy {
                max_rows: 100,
                max_age: Duration::from_secs(3600),
            },
            ..PipelineConfig::default()
        };
        let pipeline = Pipeline::start(config, sink.clone(), metrics.clone()).unwrap();
        let tx = pipeline.handle();
        let mut bad = 0;
        for c in 0..50 {
            let chunk: Vec<Message> = (0..97)
                .map(|i| {
                    if (c * 97 + i) % 13 == 0 {
                        bad += 1;
                        Message {
                            payload: Bytes::from_static(b"{oops"),
                            ..message(c * 97 + i, i)
                        }
                    } else {
                        message(c * 97 + i, i)
                    }
                })
                .collect();
            tx.send_blocking(chunk).unwrap().unwrap();
        }
        drop(tx);
        pipeline.finish();
        assert_eq!(rows(&sink.rejects), bad);
        assert_eq!(rows(&sink.telemetry), 50 * 97 - bad);
        assert_eq!(metrics.messages.get(), 50 * 97);
        assert_eq!(metrics.rejects_total(), bad as u64);
        assert!(
            sink.telemetry
                .lock()
                .unwrap()
                .iter()
                .all(|b| b.num_rows() <= 100)
        );
    }

    /// A sink that records each device's readings in the order they were handed on.
    #[derive(Default)]
    struct Order {
        seen: Mutex<std::collections::HashMap<String, Vec<i64>>>,
    }

    impl BatchSink for Order {
        fn append_telemetry(&self, batch: RecordBatch) -> Result<(), Refused> {
            let devices = batch.column(0).as_string::<i32>();
            let ts = batch
                .column(TS_COLUMN)
                .as_primitive::<TimestampNanosecondType>();
            let mut seen = self.seen.lock().unwrap();
            for (device, ts) in devices.iter().zip(ts.values()) {
                seen.entry(device.unwrap().to_owned())
                    .or_default()
                    .push(*ts);
            }
            Ok(())
        }
        fn append_rejects(&self, _: RecordBatch) -> Result<(), Refused> {
            Ok(())
        }
    }

    #[test]
    fn each_device_is_handed_on_in_the_order_it_was_sent_at_any_number_of_decoders() {
        for workers in [1, 2, 3, 8] {
            let sink = Arc::new(Order::default());
            let config = PipelineConfig {
                workers,
                // Small, so that senders wait and batches are sealed often.
                queue_messages: 64,
                seal: SealPolicy {
                    max_rows: 7,
                    max_age: Duration::from_secs(3600),
                },
                ..PipelineConfig::default()
            };
            let pipeline = Pipeline::start(
                config,
                sink.clone(),
                IngestMetrics::new(&Registry::new()).unwrap(),
            )
            .unwrap();
            let handle = pipeline.handle();
            // Chunks interleave 20 devices, 60 readings each, in rising event time.
            for round in 0..60 {
                let chunk = (0..20).map(|device| message(device, round)).collect();
                handle.send_blocking(chunk).unwrap().unwrap();
            }
            pipeline.finish();
            let seen = sink.seen.lock().unwrap();
            assert_eq!(seen.len(), 20, "{workers} decoders");
            for (device, ts) in seen.iter() {
                assert_eq!(ts.len(), 60, "{device}, {workers} decoders");
                assert!(
                    ts.windows(2).all(|w| w[0] <= w[1]),
                    "{device} out of order with {workers} decoders"
                );
            }
        }
    }

    #[test]
    fn a_sender_waits_for_room_and_a_dropped_send_queues_nothing() {
        struct Slow(Mutex<usize>, std::sync::Condvar);
        impl BatchSink for Slow {
            fn append_telemetry(&self, batch: RecordBatch) -> Result<(), Refused> {
                let mut rows = self.0.lock().unwrap();
                *rows += batch.num_rows();
                self.1.notify_all();
                Ok(())
            }
            fn append_rejects(&self, _: RecordBatch) -> Result<(), Refused> {
                Ok(())
            }
        }
        let sink = Arc::new(Slow(Mutex::new(0), std::sync::Condvar::new()));
        let config = PipelineConfig {
            workers: 1,
            queue_messages: 10,
            seal: SealPolicy {
                max_rows: 1,
                max_age: Duration::from_secs(3600),
            },
            ..PipelineConfig::default()
        };
        let pipeline = Pipeline::start(
            config,
            sink.clone(),
            IngestMetrics::new(&Registry::new()).unwrap(),
        )
        .unwrap();
        let handle = pipeline.handle();
        // More than the queue holds: goes in parts, waiting for room each time.
        handle
            .send_blocking((0..25).map(|i| message(1, i)).collect())
            .unwrap()
            .unwrap();
        // A send whose future is dropped before it completes queues nothing.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let hog = rt.block_on(handle.queues.room.acquire_many(10)).unwrap();
        let dropped = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(50), handle.send(vec![message(2, 0)])).await
        });
        assert!(dropped.is_err(), "the send should have waited");
        drop(hog);
        pipeline.finish();
        assert_eq!(*sink.0.lock().unwrap(), 25);
        assert!(
            handle.send_blocking(vec![message(3, 0)]).is_err(),
            "a finished pipeline takes nothing"
        );
    }

    /// A journal in memory: what was appended, in order, and when it answers.
    #[derive(Default)]
    struct Memory {
        appended: Mutex<Vec<(i64, String)>>,
        rotations: Mutex<Vec<usize>>,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl Journal for Memory {
        fn append(&self, entries: &[Entry]) -> Logged {
            let mut appended = self.appended.lock().unwrap();
            for e in entries {
                appended.push((
                    e.received_at_ns(),
                    String::from_utf8_lossy(e.route()).into(),
                ));
            }
            let refuse = self.refuse.load(std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                if refuse {
                    Err("No space left on device".into())
                } else {
                    Ok(())
                }
            })
        }
        fn rotate(&self) -> BoxFuture<'static, Result<u64, String>> {
            let at = self.appended.lock().unwrap().len();
            let mut rotations = self.rotations.lock().unwrap();
            rotations.push(at);
            let id = rotations.len() as u64 + 1;
            Box::pin(async move { Ok(id) })
        }
    }

    fn numbered(device: usize, n: usize) -> Message {
        Message {
            received_at_ns: 1_705_314_660_000_000_000 + n as i64,
            ..message(device, n)
        }
    }

    #[test]
    fn a_redelivered_reading_is_counted_and_not_stored_and_the_first_wins() {
        let (sink, metrics, pipeline) = collecting();
        let handle = pipeline.handle();
        handle
            .send_blocking(vec![message(1, 5), message(2, 5)])
            .unwrap()
            .unwrap();
        // The same key again (a redelivery), and the same key with another value.
        let other_value = Message {
            payload: Bytes::from(
                r#"{"deviceId":"d1","timestamp":"2024-01-15T10:30:05Z","type":"telemetry","payload":{"temperature":99}}"#,
            ),
            ..message(1, 5)
        };
        handle
            .send_blocking(vec![message(1, 5), other_value])
            .unwrap()
            .unwrap();
        // Remembered from storage (as at a start): a duplicate too.
        handle
            .remember([Stored {
                device_id: "d3",
                ts_ns: 1_705_314_605_000_000_000,
                received_at_ns: 1_705_314_660_000_000_000,
            }])
            .unwrap();
        handle
            .send_blocking(vec![message(3, 5), message(3, 6)])
            .unwrap()
            .unwrap();
        pipeline.finish();
        assert_eq!(metrics.duplicates.get(), 3);
        assert_eq!(rows(&sink.telemetry), 3, "d1@5, d2@5, d3@6");
        let temperatures: Vec<(String, f64)> = sink
            .telemetry
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| {
                let devices = b.column(0).as_string::<i32>().clone();
                let t = b
                    .column(b.schema().index_of("temperature").unwrap())
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .clone();
                (0..b.num_rows()).map(move |i| (devices.value(i).to_owned(), t.value(i)))
            })
            .filter(|(d, _)| d == "d1")
            .collect();
        assert_eq!(
            temperatures,
            [("d1".to_owned(), 5.0)],
            "the first one stays"
        );
        // The accounting identity, duplicates included.
        assert_eq!(
            metrics.messages.get(),
            metrics.rows.get() + metrics.rejects_total() + metrics.duplicates.get()
        );
    }

    #[test]
    fn every_message_is_journaled_before_it_is_queued_and_a_refusal_reaches_the_sender() {
        let sink = Arc::new(Collect::default());
        let journal = Arc::new(Memory::default());
        let pipeline = Pipeline::start(
            PipelineConfig::default(),
            sink.clone(),
            IngestMetrics::new(&Registry::new()).unwrap(),
        )
        .unwrap();
        let handle = pipeline.handle();
        handle.send_blocking(vec![numbered(1, 0)]).unwrap().unwrap();
        assert!(
            journal.appended.lock().unwrap().is_empty(),
            "before the journal: not logged (replay)"
        );
        handle.set_journal(journal.clone());
        handle
            .send_blocking((1..6).map(|n| numbered(n % 2, n)).collect())
            .unwrap()
            .unwrap();
        journal
            .refuse
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let refused = handle.send_blocking(vec![numbered(1, 6)]).unwrap();
        assert_eq!(refused, Err("No space left on device".to_string()));
        pipeline.finish();
        let logged: Vec<i64> = journal
            .appended
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| at - 1_705_314_660_000_000_000)
            .collect();
        assert_eq!(logged, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_cut_hands_on_everything_journaled_before_it_and_nothing_after() {
        /// Counts rows as they reach the sink.
        #[derive(Default)]
        struct Count(std::sync::atomic::AtomicUsize);
        impl BatchSink for Count {
            fn append_telemetry(&self, batch: RecordBatch) -> Result<(), Refused> {
                self.0
                    .fetch_add(batch.num_rows(), std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
            fn append_rejects(&self, _: RecordBatch) -> Result<(), Refused> {
                Ok(())
            }
        }
        let sink = Arc::new(Count::default());
        let journal = Arc::new(Memory::default());
        let config = PipelineConfig {
            workers: 3,
            // Batches stay open: only the cut seals them.
            seal: SealPolicy {
                max_rows: 1_000_000,
                max_age: Duration::from_secs(3600),
            },
            ..PipelineConfig::default()
        };
        let pipeline = Pipeline::start(
            config,
            sink.clone(),
            IngestMetrics::new(&Registry::new()).unwrap(),
        )
        .unwrap();
        let handle = pipeline.handle();
        handle.set_journal(journal.clone());
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let handle = handle.clone();
                std::thread::spawn(move || {
                    // One reading per device: no key repeats (the helper's timestamps do).
                    for n in 0..3000 {
                        let _ = handle.send_blocking(vec![numbered(t * 10_000 + n, n)]);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(5));
        let (at_cut, id) = handle
            .cut(Duration::from_secs(5), |id| {
                (sink.0.load(std::sync::atomic::Ordering::SeqCst), id)
            })
            .unwrap();
        for s in senders {
            s.join().unwrap();
        }
        let journaled_before = journal.rotations.lock().unwrap()[0];
        assert_eq!(id, 2);
        assert_eq!(
            at_cut, journaled_before,
            "the sink had exactly what was journaled before the rotation"
        );
        pipeline.finish();
        assert_eq!(sink.0.load(std::sync::atomic::Ordering::SeqCst), 12_000);
    }

    #[test]
    fn a_cut_gives_up_when_a_decoder_cannot_get_there_and_the_decoders_go_on() {
        struct Stuck(Mutex<bool>, std::sync::Condvar);
        impl BatchSink for Stuck {
            fn append_telemetry(&self, _: RecordBatch) -> Result<(), Refused> {
                let mut open = self.0.lock().unwrap();
                while !*open {
                    open = self.1.wait(open).unwrap();
                }
                Ok(())
            }
            fn append_rejects(&self, _: RecordBatch) -> Result<(), Refused> {
                Ok(())
            }
        }
        let sink = Arc::new(Stuck(Mutex::new(false), std::sync::Condvar::new()));
        let config = PipelineConfig {
            workers: 2,
            seal: SealPolicy {
                max_rows: 1,
                max_age: Duration::from_secs(3600),
            },
            ..PipelineConfig::default()
        };
        let pipeline = Pipeline::start(
            config,
            sink.clone(),
            IngestMetrics::new(&Registry::new()).unwrap(),
        )
        .unwrap();
        let handle = pipeline.handle();
        handle.set_journal(Arc::new(Memory::default()));
        // One decoder is stuck in the sink (as when storage waits for a flush).
        drop(handle.send_blocking(vec![numbered(1, 0)]).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        let cut = handle.cut(Duration::from_millis(200), |_| ());
        assert!(
            matches!(&cut, Err(e) if e.contains("did not reach")),
            "{cut:?}"
        );
        *sink.0.lock().unwrap() = true;
        sink.1.notify_all();
        // Nobody waits for the abandoned cut: everything goes through.
        drop(
            handle
                .send_blocking((1..20).map(|n| numbered(n, n)).collect())
                .unwrap(),
        );
        pipeline.finish();
    }

    #[test]
    fn the_ts_column_index_matches_the_schema() {
        let schema = crate::telemetry_schema();
        assert_eq!(schema.index_of("ts").unwrap(), TS_COLUMN);
        assert_eq!(schema.index_of("received_at").unwrap(), RECEIVED_AT_COLUMN);
    }

    #[test]
    fn an_idle_worker_seals_its_open_batch_by_age() {
        let sink = Arc::new(Collect::default());
        let registry = Registry::new();
        let config = PipelineConfig {
            workers: 1,
            seal: SealPolicy {
                max_rows: 1000,
                max_age: Duration::from_millis(20),
            },
            ..PipelineConfig::default()
        };
        let pipeline =
            Pipeline::start(config, sink.clone(), IngestMetrics::new(&registry).unwrap()).unwrap();
        pipeline
            .handle()
            .send_blocking(vec![message(1, 1)])
            .unwrap()
            .unwrap();
        let waited = Instant::now();
        while rows(&sink.telemetry) == 0 {
            assert!(waited.elapsed() < Duration::from_secs(10), "never sealed");
            std::thread::sleep(Duration::from_millis(5));
        }
        pipeline.finish();
        assert_eq!(rows(&sink.telemetry), 1);
    }
}
