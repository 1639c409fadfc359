//! Wires broker → ingest → storage and the HTTP endpoints, and shuts them down in an
//! order that loses nothing: stop accepting, drain the broker, seal every batch,
//! flush every row to Parquet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use arrow::array::RecordBatch;
use prometheus::{IntGauge, Registry};
use sluice_aggregator::{
    Aggregator, AggregatorMetrics, LATE_TABLE, MINUTE_TABLE, ROLLUP_TABLE, TableSink,
};
use sluice_broker::{Broker, Delivery, Drain, Received, Subscription, SubscriptionCounters};
use sluice_ingest::{BatchSink, IngestMetrics, Message, Pipeline};
use sluice_storage::{Flusher, Storage, StorageMetrics, TableSpec};

use crate::config::Config;
use crate::http;

/// The MQTT filter of the in-process subscription: every topic, so that a publish on a
/// topic other than `devices/{id}/telemetry` is kept as an `invalid_topic` reject
/// rather than disconnecting its client or vanishing.
const SUBSCRIPTION_FILTER: &str = "#";

pub(crate) const TELEMETRY: &str = "telemetry";
pub(crate) const REJECTS: &str = "rejects";

/// The tables sluice stores, and how their files are laid out.
pub(crate) fn table_specs() -> Vec<TableSpec> {
    vec![
        TableSpec {
            name: TELEMETRY.into(),
            schema: sluice_ingest::telemetry_schema(),
            time_column: "ts".into(),
            sort_columns: vec!["device_id".into(), "ts".into()],
            bloom_filter_columns: vec!["device_id".into()],
        },
        TableSpec {
            name: REJECTS.into(),
            schema: sluice_ingest::rejects_schema(),
            time_column: "received_at".into(),
            sort_columns: vec!["received_at".into()],
            bloom_filter_columns: vec![],
        },
        window_table(MINUTE_TABLE),
        window_table(ROLLUP_TABLE),
        TableSpec {
            name: LATE_TABLE.into(),
            schema: sluice_aggregator::late_schema(),
            time_column: "ts".into(),
            sort_columns: vec!["device_id".into(), "ts".into()],
            bloom_filter_columns: vec![],
        },
    ]
}

fn window_table(name: &str) -> TableSpec {
    TableSpec {
        name: name.into(),
        schema: sluice_aggregator::window_schema(),
        time_column: "window_start".into(),
        sort_columns: vec!["device_id".into(), "window_start".into()],
        bloom_filter_columns: vec!["device_id".into()],
    }
}

/// Appends sealed batches to the storage's hot store.
struct HotStore(Storage);

impl TableSink for HotStore {
    fn append(&self, table: &str, batch: RecordBatch) {
        if let Err(e) = self.0.append(table, batch) {
            // Only a schema mismatch can fail here, which would be a bug in sluice.
            tracing::error!(table, error = %e, "cannot store a batch");
        }
    }
}

/// Decoded batches go to the hot store; telemetry also to the aggregator.
struct StorageSink {
    hot: HotStore,
    aggregator: Option<Arc<Aggregator>>,
}

impl BatchSink for StorageSink {
    fn append_telemetry(&self, batch: RecordBatch) {
        match &self.aggregator {
            Some(aggregator) => {
                self.hot.append(TELEMETRY, batch.clone());
                aggregator.observe(batch);
            }
            None => self.hot.append(TELEMETRY, batch),
        }
    }
    fn append_rejects(&self, batch: RecordBatch) {
        self.hot.append(REJECTS, batch);
    }
}

/// Where a running server listens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Addrs {
    pub mqtt: SocketAddr,
    pub mqtt5: Option<SocketAddr>,
    pub http: SocketAddr,
}

/// A running server.
pub(crate) struct Server {
    pub addrs: Addrs,
    pub storage: Storage,
    /// What was read from the broker, and what it dropped.
    pub received: SubscriptionCounters,
    broker: Broker,
    drain: Drain,
    consumer: JoinHandle<()>,
    pipeline: Pipeline,
    aggregator: Option<Arc<Aggregator>>,
    flusher: Flusher,
    http: http::HttpServer,
    ready: Arc<AtomicBool>,
}

/// How a shutdown went.
#[derive(Debug)]
pub(crate) struct ShutdownReport {
    pub flushed_rows: u64,
    pub flushed_files: usize,
}

impl Server {
    /// Starts everything; returns once the broker accepts connections, the subscription
    /// exists and `/ready` answers 200. Must be called outside async code (it blocks);
    /// `runtime` serves HTTP and queries.
    pub(crate) fn start(
        config: &Config,
        runtime: &tokio::runtime::Handle,
    ) -> anyhow::Result<Server> {
        let registry = Registry::new();
        let (storage, flusher) = Storage::open(
            config.storage(),
            table_specs(),
            StorageMetrics::new(&registry).context("registering storage metrics")?,
        )
        .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;
        let aggregator = match config.windows.enabled {
            true => Some(Arc::new(
                Aggregator::start(
                    config.aggregator(),
                    Arc::new(HotStore(storage.clone())),
                    AggregatorMetrics::new(&registry).context("registering aggregator metrics")?,
                )
                .context("starting the aggregator")?,
            )),
            false => None,
        };
        let ingest_metrics = IngestMetrics::new(&registry).context("registering ingest metrics")?;
        let pipeline = Pipeline::start(
            config.pipeline(),
            Arc::new(StorageSink {
                hot: HotStore(storage.clone()),
                aggregator: aggregator.clone(),
            }),
            ingest_metrics,
        )
        .context("starting the ingest workers")?;

        let (broker, subscription, drain) = Broker::start(&config.broker(), SUBSCRIPTION_FILTER)
            .context("starting the MQTT broker")?;
        let received = subscription.counters();
        received.register(&registry)?;
        let queue_depth = IntGauge::new(
            "sluice_ingest_queue_chunks",
            "Chunks of messages waiting for a decoder",
        )?;
        registry.register(Box::new(queue_depth.clone()))?;
        let consumer = spawn_consumer(subscription, pipeline.sender(), queue_depth)?;

        let ready = Arc::new(AtomicBool::new(false));
        let http = http::HttpServer::start(
            runtime,
            config.http.addr,
            http::AppState {
                storage: storage.clone(),
                registry,
                ready: ready.clone(),
            },
        )
        .with_context(|| format!("starting the HTTP server on {}", config.http.addr))?;
        ready.store(true, Ordering::SeqCst);

        let broker_addrs = broker.addrs();
        Ok(Server {
            addrs: Addrs {
                mqtt: broker_addrs.mqtt,
                mqtt5: broker_addrs.mqtt5,
                http: http.addr(),
            },
            storage,
            received,
            broker,
            drain,
            consumer,
            pipeline,
            aggregator,
            flusher,
            http,
            ready,
        })
    }

    /// Stops accepting MQTT connections, stores every message the broker acknowledged,
    /// writes every row to Parquet, then stops HTTP. Blocks.
    pub(crate) fn shutdown(mut self) -> anyhow::Result<ShutdownReport> {
        self.ready.store(false, Ordering::SeqCst);
        tracing::info!("shutting down: closing MQTT listeners");
        self.broker.stop_listeners();
        self.drain.start().context("starting the broker drain")?;
        if self.consumer.join().is_err() {
            anyhow::bail!("the MQTT consumer thread panicked");
        }
        tracing::info!("broker drained; sealing open batches");
        self.pipeline.finish();
        if let Some(aggregator) = &self.aggregator {
            tracing::info!("writing closed windows, saving open ones");
            aggregator.finish();
        }
        let report = self
            .flusher
            .shutdown()
            .context("final flush to Parquet failed; the rows above are lost")?;
        self.http.stop();
        tracing::info!(rows = report.rows, files = report.files, "final flush done");
        Ok(ShutdownReport {
            flushed_rows: report.rows,
            flushed_files: report.files,
        })
    }
}

/// Reads the subscription and feeds the decoders in chunks, until the drain marker.
fn spawn_consumer(
    mut subscription: Subscription,
    tx: crossbeam_channel::Sender<Vec<Message>>,
    queue_depth: IntGauge,
) -> std::io::Result<JoinHandle<()>> {
    // A chunk goes to the decoders when it is full or its first message has waited
    // LINGER: at the reference load ~170 messages a hand-off instead of a few, so this
    // thread and the decoders wake a few hundred times a second, not thousands. LINGER
    // adds at most 5 ms to publish→queryable, against the 200 ms a batch may wait.
    const CHUNK: usize = 4096;
    const LINGER: Duration = Duration::from_millis(5);
    std::thread::Builder::new()
        .name("mqtt-consumer".into())
        .spawn(move || {
            let mut deliveries: Vec<Delivery> = Vec::with_capacity(CHUNK);
            loop {
                let deadline = Instant::now() + Duration::from_millis(100);
                let outcome = subscription.recv_batch(&mut deliveries, CHUNK, deadline, LINGER);
                if !deliveries.is_empty() {
                    let received_at_ns = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as i64)
                        .unwrap_or_default();
                    let chunk: Vec<Message> = deliveries
                        .drain(..)
                        .map(|d| Message {
                            topic: d.topic,
                            payload: d.payload,
                            received_at_ns,
                        })
                        .collect();
                    // Blocks when the decoders are behind: back-pressure into the
                    // broker's buffer, where any loss is counted.
                    if tx.send(chunk).is_err() {
                        tracing::error!("ingest workers are gone; stopping the consumer");
                        return;
                    }
                    queue_depth.set(tx.len() as i64);
                }
                match outcome {
                    Ok(Received::Open) => {}
                    Ok(Received::Drained) => return,
                    Err(e) => {
                        tracing::error!(error = %e, "the broker's router stopped");
                        return;
                    }
                }
            }
        })
}
