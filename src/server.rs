//! Wires broker → WAL → ingest → storage and the HTTP endpoints, and shuts them down in
//! an order that loses nothing: close the MQTT connections (everything acknowledged is
//! in the WAL and the decoders' queues by then), seal every batch, save the open windows,
//! flush every row to Parquet and commit a last checkpoint (the WAL is then empty).
//! At start, before any client connects, the WAL is replayed (see `durable.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use arrow::array::RecordBatch;
use prometheus::Registry;
use sluice_aggregator::{Aggregator, AggregatorMetrics, StoreThenAggregate, TableSink};
use sluice_broker::{
    AccessControl, AllowAll, Authenticator, BoxFuture, Broker, Durable, Inbound, MqttMeters,
    NotTaken,
};
use sluice_ingest::{
    IngestHandle, IngestMetrics, IntoTables, Message, Pipeline, Refused, TELEMETRY_TOPIC_FILTER,
};
use sluice_notify::{DeliveryMetrics, Notifier};
use sluice_storage::{Flusher, Storage, StorageMetrics, TableSpec};

use crate::config::Config;
use crate::durable::{self, Checkpointer, Log};
use crate::http;

/// How long closing the MQTT connections may take at a stop.
const MQTT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the configuration again (file and environment), for a reload.
pub(crate) type LoadConfig = Arc<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// The tables sluice stores: each stage declares its own and how their files are laid out.
pub(crate) fn table_specs() -> Vec<TableSpec> {
    let layouts = sluice_ingest::tables()
        .into_iter()
        .chain(sluice_aggregator::tables())
        .chain(sluice_notify::tables());
    layouts
        .map(|t| TableSpec {
            name: t.name.into(),
            schema: t.schema,
            time_column: t.time_column.into(),
            sort_columns: t.sort_columns.iter().map(|c| c.to_string()).collect(),
            bloom_filter_columns: t
                .bloom_filter_columns
                .iter()
                .map(|c| c.to_string())
                .collect(),
        })
        .collect()
}

/// The storage's hot store as the stages' table sink (storage knows no stage's types).
struct HotStore(Storage);

impl TableSink for HotStore {
    fn append(&self, table: &str, batch: RecordBatch) -> Result<(), Refused> {
        self.0.append(table, batch).map_err(|e| Refused {
            reason: e.reason(),
            message: e.to_string(),
        })
    }
}

/// MQTT alert notifications, published into the broker's router in-process.
struct RouterPublish(sluice_broker::Publisher);

impl sluice_notify::Publish for RouterPublish {
    fn publish(
        &self,
        topic: String,
        payload: Arc<str>,
    ) -> sluice_notify::BoxFuture<Result<(), String>> {
        let publisher = self.0.clone();
        Box::pin(async move {
            publisher
                .publish(&topic, payload.as_bytes(), 1, false)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Every message a client publishes goes to the decoders, in the order its connection
/// received it (one that is not telemetry becomes a reject). sluice's own alert
/// notifications never come this way: they are published into the router in-process.
struct ToPipeline {
    handle: IngestHandle,
}

impl sluice_broker::Pipeline for ToPipeline {
    /// Done once the decoders have the messages; what it gives is done, if any is to be
    /// acknowledged (QoS 1 or 2), once they are durable in the WAL.
    fn deliver(&self, messages: Vec<Inbound>) -> BoxFuture<Result<Durable, NotTaken>> {
        let acked = messages.iter().any(|m| m.qos > 0);
        let batch: Vec<Message> = messages
            .into_iter()
            .map(|m| Message {
                topic: m.topic,
                payload: m.payload,
                received_at_ns: m.received_at_ns,
                denied: m.denied,
            })
            .collect();
        let handle = self.handle.clone();
        Box::pin(async move {
            let logged = handle.send(batch).await.map_err(|_| NotTaken::Closed)?;
            if !acked {
                return Ok(sluice_broker::durable_now());
            }
            Ok(Box::pin(async move { logged.await.map_err(NotTaken::NotStored) }) as Durable)
        })
    }
}

/// Where a running server listens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Addrs {
    pub mqtt: SocketAddr,
    pub mqtt_tls: Option<SocketAddr>,
    pub mqtt_ws: Option<SocketAddr>,
    pub http: SocketAddr,
    pub pg: SocketAddr,
}

/// A running server.
pub(crate) struct Server {
    pub addrs: Addrs,
    pub storage: Storage,
    /// The broker's counters (messages received, handed on, skipped for subscribers).
    pub mqtt: MqttMeters,
    broker: Broker,
    pipeline: Pipeline,
    alerting: Arc<Alerting>,
    flusher: Flusher,
    wal: sluice_storage::wal::Wal,
    checkpointer: Arc<Checkpointer>,
    http: http::HttpServer,
    pg: crate::pg::PgServer,
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
    /// `runtime` serves HTTP (queries run on storage's own runtime).
    /// `load` reads the configuration again for a reload (SIGHUP, `POST /reload`).
    pub(crate) fn start(
        config: &Config,
        runtime: &tokio::runtime::Handle,
        load: LoadConfig,
    ) -> anyhow::Result<Server> {
        let registry = Registry::new();
        let (storage, flusher) = Storage::open(
            config.storage(),
            table_specs(),
            StorageMetrics::new(&registry).context("registering storage metrics")?,
        )
        .with_context(|| format!("opening the data directory {}", config.data_dir.display()))?;

        // The listeners are bound first: alert notifications are published into the
        // broker's router, and connections wait in the listen backlog until the pipeline
        // is there.
        let bound = Broker::bind(&config.broker(TELEMETRY_TOPIC_FILTER))
            .context("starting the MQTT broker")?;
        let notifier = Arc::new(
            Notifier::start(
                Some(Arc::new(RouterPublish(bound.publisher()))),
                config.webhooks()?,
                Arc::new(HotStore(storage.clone())),
                DeliveryMetrics::new(&registry).context("registering delivery metrics")?,
            )
            .context("starting alert delivery")?,
        );
        let mut aggregator_config = config.aggregator()?;
        aggregator_config.state = Some(durable::restore_from(&config.data_dir)?);
        let aggregator = Arc::new(
            Aggregator::start(
                aggregator_config,
                Arc::new(HotStore(storage.clone())),
                AggregatorMetrics::new(&registry).context("registering aggregator metrics")?,
                Some(notifier.clone() as Arc<dyn sluice_aggregator::AlertOutput>),
            )
            .context("starting the aggregator")?,
        );
        let access = config.access()?;
        if let Some(access) = &access {
            tracing::info!("MQTT access control: {}", access.describe());
        }
        let alerting = Arc::new(Alerting {
            aggregator: aggregator.clone(),
            notifier,
            access: access.clone(),
            load,
            current: std::sync::Mutex::new(config.clone()),
        });
        let ingest_metrics = IngestMetrics::new(&registry).context("registering ingest metrics")?;
        let pipeline = Pipeline::start(
            config.pipeline(),
            Arc::new(StoreThenAggregate {
                store: IntoTables(HotStore(storage.clone())),
                aggregator: aggregator.clone(),
            }),
            ingest_metrics,
        )
        .context("starting the ingest workers")?;

        // Before any client connects: the keys of recent readings (redeliveries after a
        // restart are still duplicates), then what the WAL holds past the checkpoint,
        // flushed with the first checkpoint after it (not while it runs).
        let replaying = storage.hold_flushes();
        let handle = pipeline.handle();
        let remembering = std::time::Instant::now();
        let remembered = durable::remember_stored(&storage, &handle, config.ingest.dedup_window)?;
        let remember_ms = remembering.elapsed().as_millis() as u64;
        let (wal, replayed) = durable::open_and_replay(
            &config.data_dir,
            config.wal.wal_config(),
            sluice_storage::wal::WalMetrics::new(&registry).context("registering WAL metrics")?,
            &handle,
        )?;
        let r = &replayed.recovered;
        tracing::info!(
            records = r.records,
            segments = r.segments,
            checkpoint = replayed.checkpoint,
            took_ms = replayed.took.as_millis() as u64,
            torn_tails = r.torn_tails.len(),
            corrupt_ranges = r.corrupt.len(),
            unreadable_segments = r.unreadable.len(),
            remembered_keys = remembered,
            remember_ms,
            "write-ahead log replayed"
        );
        handle.set_journal(Arc::new(Log(wal.clone())));
        let checkpointer = Arc::new(Checkpointer {
            data_dir: config.data_dir.clone(),
            storage: storage.clone(),
            wal: wal.clone(),
            ingest: handle.clone(),
            aggregator,
            last: std::sync::Mutex::new(None),
        });
        storage.set_checkpoints(checkpointer.clone());
        drop(replaying);
        // From here on, ingestion first.
        storage.lower_query_priority();

        let broker = bound
            .start(
                Arc::new(ToPipeline { handle }),
                access.map_or_else(
                    || Arc::new(AllowAll) as Arc<dyn Authenticator>,
                    |a| a as Arc<dyn Authenticator>,
                ),
            )
            .context("starting the MQTT broker")?;
        broker.meters().register(&registry)?;

        let ready = Arc::new(AtomicBool::new(false));
        let reload = {
            let alerting = alerting.clone();
            Arc::new(move || alerting.reload()) as http::Reload
        };
        let http = http::HttpServer::start(
            runtime,
            config.http.addr,
            http::AppState {
                storage: storage.clone(),
                registry,
                ready: ready.clone(),
                wal: Some(wal.clone()),
                reload: reload.clone(),
                token: config.http.token()?.map(Arc::from),
                protect_metrics: config.http.protect_metrics,
            },
        )
        .with_context(|| format!("starting the HTTP server on {}", config.http.addr))?;
        spawn_sighup_reload(runtime, reload)?;
        // The PostgreSQL endpoint plans and runs its clients' queries where it serves
        // them: on storage's query runtime, not beside /ready and /metrics.
        let pg = crate::pg::PgServer::start(
            storage.query_runtime(),
            config.pg.addr,
            &storage,
            config.pg.password.clone(),
            config.pg.password_auth,
        )
        .with_context(|| format!("starting the PostgreSQL endpoint on {}", config.pg.addr))?;
        ready.store(true, Ordering::SeqCst);

        let broker_addrs = broker.addrs();
        Ok(Server {
            addrs: Addrs {
                mqtt: broker_addrs.mqtt,
                mqtt_tls: broker_addrs.tls,
                mqtt_ws: broker_addrs.ws,
                http: http.addr(),
                pg: pg.addr(),
            },
            storage,
            mqtt: broker.meters().clone(),
            broker,
            pipeline,
            alerting,
            flusher,
            wal,
            checkpointer,
            http,
            pg,
            ready,
        })
    }

    /// Closes the MQTT connections, stores every message the broker acknowledged,
    /// writes every row to Parquet, then stops HTTP. Blocks.
    pub(crate) fn shutdown(mut self) -> anyhow::Result<ShutdownReport> {
        self.ready.store(false, Ordering::SeqCst);
        tracing::info!("shutting down: closing MQTT connections");
        self.broker.shutdown(MQTT_CLOSE_TIMEOUT);
        tracing::info!("MQTT connections closed; sealing open batches");
        // No checkpoint on the interval from here: the last one is below.
        self.flusher.stop();
        self.pipeline.finish();
        tracing::info!("writing closed windows and alerts, saving open windows and alert state");
        let state = self.checkpointer.last();
        if let Err(e) = &state {
            tracing::error!(error = %e, "no last checkpoint: open windows are closed now, the WAL is kept and replayed at the next start");
        }
        self.alerting.aggregator.finish_into(
            state
                .ok()
                .map(|s| Arc::new(s) as Arc<dyn sluice_aggregator::StateStore>),
        );
        // Queued notifications get a short grace; what cannot go out is a dead letter
        // (the MQTT listeners are closed by now, so late ones are).
        self.alerting.notifier.shutdown();
        let report = self.flusher.shutdown().context(
            "final flush to Parquet failed; the rows above are kept in the WAL and replayed at the next start",
        )?;
        self.wal.close();
        self.http.stop();
        self.pg.stop();
        tracing::info!(rows = report.rows, files = report.files, "final flush done");
        Ok(ShutdownReport {
            flushed_rows: report.rows,
            flushed_files: report.files,
        })
    }
}

/// What a reload can change: the alert rules and the webhooks.
struct Alerting {
    aggregator: Arc<Aggregator>,
    notifier: Arc<Notifier>,
    /// `[mqtt.auth]`'s files, read again with the rules.
    access: Option<Arc<AccessControl>>,
    load: LoadConfig,
    current: std::sync::Mutex<Config>,
}

impl Alerting {
    /// Reads the configuration again and applies its `[[alert]]` and `[[webhook]]` sets,
    /// and the password and ACL files of `[mqtt.auth]`. An invalid configuration or
    /// file is refused as a whole and the running rules stay.
    fn reload(&self) -> anyhow::Result<String> {
        let new = (self.load)().context("reload refused, the running rules stay")?;
        let rules = new.rules()?;
        let webhooks = new.webhooks()?;
        let mut access_summary = String::new();
        if let Some(access) = &self.access {
            access
                .reload()
                .context("reload refused, the running rules stay")?;
            access_summary = format!("; MQTT access: {}", access.describe());
        }
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let others_changed = Config {
            alerts: current.alerts.clone(),
            webhooks: current.webhooks.clone(),
            ..new.clone()
        } != *current;
        if others_changed {
            tracing::warn!(
                "reload: settings other than [[alert]] and [[webhook]] changed; they take effect at the next start"
            );
        }
        let summary = format!(
            "{} alert rules and {} webhooks in effect{access_summary}",
            rules.len(),
            webhooks.len()
        );
        self.notifier.set_webhooks(webhooks);
        self.aggregator.set_rules(rules);
        *current = new;
        tracing::info!("reloaded: {summary}");
        Ok(summary)
    }
}

/// Reloads on SIGHUP; a refused reload is logged and changes nothing.
fn spawn_sighup_reload(
    runtime: &tokio::runtime::Handle,
    reload: http::Reload,
) -> std::io::Result<()> {
    let mut hup = {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?
    };
    runtime.spawn(async move {
        while hup.recv().await.is_some() {
            let reload = reload.clone();
            match tokio::task::spawn_blocking(move || reload()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!("SIGHUP: {e:#}"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: the reload panicked"),
            }
        }
    });
    Ok(())
}
