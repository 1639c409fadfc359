//! The batching stage: worker threads take chunks of raw messages from a bounded
//! crossbeam queue, decode them, and hand sealed Arrow batches to a [`BatchSink`].
//!
//! Back-pressure is explicit: the queue is bounded, so a producer that outruns the
//! workers blocks in `send` rather than growing memory.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use arrow::array::AsArray;
use arrow::datatypes::TimestampNanosecondType;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::batch::{Batcher, RejectsBuilder, SealPolicy, SealReason, TelemetryBuilder};
use crate::decode::{DecodeLimits, RejectReason, Rejection, decode};

/// Index of `ts` in the telemetry schema.
const TS_COLUMN: usize = 1;
/// Index of `received_at` in the telemetry schema.
const RECEIVED_AT_COLUMN: usize = 2;

/// One message as it came off the broker.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    /// When sluice took the message from the broker, ns since the epoch (UTC).
    pub received_at_ns: i64,
}

/// Where sealed batches go. Implementations may block to apply back-pressure.
pub trait BatchSink: Send + Sync + 'static {
    fn append_telemetry(&self, batch: RecordBatch);
    fn append_rejects(&self, batch: RecordBatch);
}

/// Settings of the batching stage.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Decoding threads; each builds its own batches.
    pub workers: usize,
    /// Capacity of the queue in front of the workers, in chunks of messages.
    pub queue_chunks: usize,
    pub seal: SealPolicy,
    pub limits: DecodeLimits,
    /// How much of a rejected payload is kept in `rejects.payload`.
    pub reject_payload_bytes: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 2,
            queue_chunks: 1024,
            seal: SealPolicy::default(),
            limits: DecodeLimits::default(),
            reject_payload_bytes: 1024,
        }
    }
}

/// Counters of the batching stage.
#[derive(Clone)]
pub struct IngestMetrics {
    pub messages: IntCounter,
    pub rows: IntCounter,
    rejects: IntCounterVec,
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
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(rows.clone()))?;
        registry.register(Box::new(rejects.clone()))?;
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
            rows,
            rejects,
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

    fn sealed(&self, table: &str, reason: SealReason, batch: &RecordBatch) {
        self.batches
            .with_label_values(&[table, reason.as_str()])
            .inc();
        self.batch_rows.observe(batch.num_rows() as f64);
    }
}

/// The running batching stage.
pub struct Pipeline {
    tx: Sender<Vec<Message>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Starts `config.workers` decoding threads.
    pub fn start(
        config: PipelineConfig,
        sink: Arc<dyn BatchSink>,
        metrics: IngestMetrics,
    ) -> std::io::Result<Pipeline> {
        let (tx, rx) = crossbeam_channel::bounded(config.queue_chunks.max(1));
        let workers = (0..config.workers.max(1))
            .map(|i| {
                let worker = Worker::new(&config, rx.clone(), sink.clone(), metrics.clone());
                std::thread::Builder::new()
                    .name(format!("ingest-{i}"))
                    .spawn(move || worker.run())
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Pipeline { tx, workers })
    }

    /// A handle to feed the workers. Every clone must be dropped before [`Pipeline::finish`]
    /// can return.
    pub fn sender(&self) -> Sender<Vec<Message>> {
        self.tx.clone()
    }

    /// Chunks waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }

    /// Waits until every queued message is decoded and every open batch is sealed and
    /// handed to the sink.
    pub fn finish(self) {
        drop(self.tx);
        for worker in self.workers {
            if worker.join().is_err() {
                tracing::error!("an ingest worker panicked");
            }
        }
    }
}

struct Worker {
    rx: Receiver<Vec<Message>>,
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
        sink: Arc<dyn BatchSink>,
        metrics: IngestMetrics,
    ) -> Self {
        Worker {
            rx,
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
                Ok(chunk) => self.process(&chunk),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if let Some(batch) = self.telemetry.poll(now) {
                self.emit_telemetry(batch, SealReason::Age);
            }
            if let Some(batch) = self.rejects.poll(now) {
                self.emit_rejects(batch, SealReason::Age);
            }
        }
        if let Some(batch) = self.telemetry.drain() {
            self.emit_telemetry(batch, SealReason::Drain);
        }
        if let Some(batch) = self.rejects.drain() {
            self.emit_rejects(batch, SealReason::Drain);
        }
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
        self.sink.append_telemetry(batch);
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
        self.sink.append_rejects(batch);
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
        fn append_telemetry(&self, batch: RecordBatch) {
            self.telemetry.lock().unwrap().push(batch);
        }
        fn append_rejects(&self, batch: RecordBatch) {
            self.rejects.lock().unwrap().push(batch);
        }
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
        pipeline.sender().send(chunk).unwrap();
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
            queue_chunks: 4,
            seal: SealPolicy {
                max_rows: 100,
                max_age: Duration::from_secs(3600),
            },
            ..PipelineConfig::default()
        };
        let pipeline = Pipeline::start(config, sink.clone(), metrics.clone()).unwrap();
        let tx = pipeline.sender();
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
            tx.send(chunk).unwrap();
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
        pipeline.sender().send(vec![message(1, 1)]).unwrap();
        let waited = Instant::now();
        while rows(&sink.telemetry) == 0 {
            assert!(waited.elapsed() < Duration::from_secs(10), "never sealed");
            std::thread::sleep(Duration::from_millis(5));
        }
        pipeline.finish();
        assert_eq!(rows(&sink.telemetry), 1);
    }
}
