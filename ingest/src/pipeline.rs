//! The batching stage: decoder threads, each with its own bounded crossbeam queue, turn
//! raw messages into sealed Arrow batches for a [`BatchSink`].
//!
//! - **Per-device order.** A message goes to the decoder its topic hashes to, so the
//!   readings of one device are decoded, batched and handed on in the order they were
//!   sent, whatever the number of decoders.
//! - **Back-pressure.** The queues hold at most `queue_messages` messages in all, counted
//!   by a semaphore: [`IngestHandle::send`] waits (asynchronously) for room, and room
//!   comes back as decoders finish with messages, after their batches were taken by
//!   the sink. A slow sink therefore slows the senders; nothing is dropped.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arrow::array::AsArray;
use arrow::datatypes::TimestampNanosecondType;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::Semaphore;

use crate::batch::{Batcher, RejectsBuilder, SealPolicy, SealReason, TelemetryBuilder};
use crate::decode::{DecodeLimits, RejectReason, Rejection, decode};

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
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 2,
            queue_messages: 131_072,
            seal: SealPolicy::default(),
            limits: DecodeLimits::default(),
            reject_payload_bytes: 1024,
        }
    }
}

/// The pipeline stopped taking messages.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the ingest pipeline is closed")]
pub struct Closed;

/// The decoder a topic goes to.
fn decoder_for(topic: &[u8], decoders: usize) -> usize {
    if decoders == 1 {
        return 0;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    topic.hash(&mut hasher);
    (hasher.finish() % decoders as u64) as usize
}

struct Queues {
    /// `None` once the pipeline is finishing: the workers drain what is queued and stop.
    senders: RwLock<Option<Vec<Sender<Vec<Message>>>>>,
    room: Semaphore,
    capacity: usize,
}

/// Feeds the decoders; cheap to clone.
#[derive(Clone)]
pub struct IngestHandle {
    queues: Arc<Queues>,
}

impl IngestHandle {
    /// Queues messages, in order; waits while the queues are full. Cancel-safe: if the
    /// future is dropped before it completes, none of the messages was queued.
    pub async fn send(&self, messages: Vec<Message>) -> Result<(), Closed> {
        let mut messages = messages;
        while !messages.is_empty() {
            // A larger batch than the whole queue goes in parts.
            let rest = if messages.len() > self.queues.capacity {
                messages.split_off(self.queues.capacity)
            } else {
                Vec::new()
            };
            let permits = self
                .queues
                .room
                .acquire_many(messages.len() as u32)
                .await
                .map_err(|_| Closed)?;
            permits.forget();
            self.push(messages)?;
            messages = rest;
        }
        Ok(())
    }

    /// [`send`](Self::send) from a thread that may block.
    pub fn send_blocking(&self, messages: Vec<Message>) -> Result<(), Closed> {
        futures::executor::block_on(self.send(messages))
    }

    /// Messages queued now.
    pub fn queued(&self) -> usize {
        self.queues.capacity - self.queues.room.available_permits()
    }

    fn push(&self, messages: Vec<Message>) -> Result<(), Closed> {
        let senders = self
            .queues
            .senders
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let Some(senders) = senders.as_ref() else {
            self.queues.room.add_permits(messages.len());
            return Err(Closed);
        };
        // Room was taken for every message, so no queue can be full.
        if senders.len() == 1 {
            return senders[0].send(messages).map_err(|_| Closed);
        }
        let mut parts: Vec<Vec<Message>> = vec![Vec::new(); senders.len()];
        for message in messages {
            parts[decoder_for(&message.topic, senders.len())].push(message);
        }
        for (sender, part) in senders.iter().zip(parts) {
            if !part.is_empty() {
                sender.send(part).map_err(|_| Closed)?;
            }
        }
        Ok(())
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
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..decoders)
            .map(|_| crossbeam_channel::bounded(capacity))
            .unzip();
        let queues = Arc::new(Queues {
            senders: RwLock::new(Some(senders)),
            room: Semaphore::new(capacity),
            capacity,
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
    rx: Receiver<Vec<Message>>,
    queues: Arc<Queues>,
    sink: Arc<dyn BatchSink>,
    metrics: IngestMetrics,
    limits: DecodeLimits,
    telemetry: Batcher<TelemetryBuilder>,
    rejects: Batcher<RejectsBuilder>,
}

impl Worker {
    fn new(
        config: &PipelineConfig,
        rx: Receiver<Vec<Message>>,
        queues: Arc<Queues>,
        sink: Arc<dyn BatchSink>,
        metrics: IngestMetrics,
    ) -> Self {
        Worker {
            rx,
            queues,
            sink,
            metrics,
            limits: config.limits,
            telemetry: Batcher::new(TelemetryBuilder::default(), config.seal),
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
                Ok(chunk) => {
                    self.take(chunk);
                    // While messages keep coming, take them every LINGER without
                    // blocking on the queue (senders then never need to wake this
                    // thread); block again once a round finds nothing.
                    loop {
                        std::thread::sleep(LINGER);
                        let mut took = false;
                        while let Ok(chunk) = self.rx.try_recv() {
                            self.take(chunk);
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

    /// Decodes a chunk, then gives its room in the queue back.
    fn take(&mut self, chunk: Vec<Message>) {
        self.process(&chunk);
        self.queues.room.add_permits(chunk.len());
        self.metrics
            .queued
            .set((self.queues.capacity - self.queues.room.available_permits()) as i64);
    }

    fn process(&mut self, chunk: &[Message]) {
        let now = Instant::now();
        self.metrics.messages.inc_by(chunk.len() as u64);
        // Counted once per chunk: a shared counter bumped per message bounces its cache
        // line between the workers.
        let mut rows = 0;
        for message in chunk {
            let decoded = decode(&message.topic, &message.payload, &self.limits).and_then(|r| {
                Rejection::check_clock_skew(&r, message.received_at_ns, &self.limits).map(|()| r)
            });
            match decoded {
                Ok(reading) => {
                    self.telemetry
                        .builder()
                        .append(&reading, message.received_at_ns);
                    rows += 1;
                    if let Some(batch) = self.telemetry.appended(now) {
                        self.emit_telemetry(batch, SealReason::Rows);
                    }
                }
                Err(rejection) => {
                    tracing::debug!(reason = %rejection.reason, detail = %rejection.detail, "message rejected");
                    self.metrics
                        .rejects
                        .with_label_values(&[rejection.reason.as_str()])
                        .inc();
                    self.rejects.builder().append(
                        &message.topic,
                        &message.payload,
                        message.received_at_ns,
                        &rejection,
                    );
                    if let Some(batch) = self.rejects.appended(now) {
                        self.emit_rejects(batch, SealReason::Rows);
                    }
                }
            }
        }
        self.metrics.rows.inc_by(rows);
    }

    fn emit_telemetry(&self, batch: RecordBatch, reason: SealReason) {
        self.metrics.sealed("telemetry", reason, &batch);
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
        pipeline.handle().send_blocking(chunk).unwrap();
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
        }
    }

    #[test]
    fn lags_are_measured_from_event_time_to_decoding_and_to_visibility() {
        let sink = Arc::new(Collect::default());
        let metrics = IngestMetrics::new(&Registry::new()).unwrap();
        let pipeline =
            Pipeline::start(PipelineConfig::default(), sink.clone(), metrics.clone()).unwrap();
        // Event times 10:30:10, :20 and :30, all received at 10:31:00.
        let chunk = [10, 20, 30].map(|second| message(1, second)).to_vec();
        pipeline.handle().send_blocking(chunk).unwrap();
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
                            ..message(i, i)
                        }
                    } else {
                        message(i, i)
                    }
                })
                .collect();
            tx.send_blocking(chunk).unwrap();
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
                handle.send_blocking(chunk).unwrap();
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
