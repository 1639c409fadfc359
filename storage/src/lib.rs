//! Hot store, Parquet files and the DataFusion catalog over both.
//!
//! `storage` owns every byte sluice writes to disk and the query engine. Sealed batches
//! come in through [`Storage::append`] and are queryable at once; a flusher moves them to
//! Parquet files; SQL reads hot and cold rows of a table as one table
//! (see `table.rs` for the invariant that makes that exact).

mod guards;
mod limits;
mod metrics;
mod options;
mod paced;
mod parquet_files;
mod provider;
mod read_only;
mod state;
mod table;
pub mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use crossbeam_channel::Sender;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionContext;
use datafusion::prelude::{DataFrame, SessionConfig};
use futures::StreamExt;

pub use limits::{Admission, LimitExceeded, QueryLimits, Ticket, default_max_memory};
pub use metrics::StorageMetrics;
pub use options::{QueryOptions, StorageOptions, WalOptions, WalSync};
pub use parquet_files::WriteOptions;
pub use read_only::{READ_ONLY, Sessions, refusal, refusal_df};
pub use state::{StateDir, StateFile};
pub use table::{FlushReport, TableSpec, TableStats};

use crate::table::Table;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read Parquet file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("flushing table {table} to Parquet failed (its rows stay in memory): {source}")]
    Flush {
        table: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("table {table}: {what}")]
    Schema { table: String, what: String },
    #[error("unknown table {0}")]
    UnknownTable(String),
    #[error("{0}")]
    Query(#[from] DataFusionError),
    #[error("{0}")]
    Limit(#[from] LimitExceeded),
    #[error("internal error, this is a bug: {0}")]
    Internal(String),
}

impl StorageError {
    /// A short label for metrics of refused appends.
    pub fn reason(&self) -> &'static str {
        match self {
            StorageError::DataDir { .. } => "data_dir",
            StorageError::ReadFile { .. } => "read_file",
            StorageError::Flush { .. } => "flush",
            StorageError::Schema { .. } => "schema",
            StorageError::UnknownTable(_) => "unknown_table",
            StorageError::Query(_) => "query",
            StorageError::Limit(_) => "limit",
            StorageError::Internal(_) => "internal",
        }
    }

    fn internal(what: String) -> Self {
        StorageError::Internal(what)
    }

    /// True when the query itself is at fault (bad SQL, unknown column, forbidden
    /// statement), as opposed to a failure while running it.
    pub fn is_user_error(&self) -> bool {
        match self {
            StorageError::Query(e) => matches!(
                e.find_root(),
                DataFusionError::SQL(..)
                    | DataFusionError::Plan(_)
                    | DataFusionError::SchemaError(..)
                    | DataFusionError::NotImplemented(_)
            ),
            StorageError::UnknownTable(_) => true,
            _ => false,
        }
    }

    /// The query went over one of `[query]`'s limits: memory (DataFusion's pool or a
    /// function's result), time, or result size. Not a fault of sluice's.
    pub fn is_limit(&self) -> bool {
        match self {
            StorageError::Query(e) => {
                matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
            }
            StorageError::Limit(limit) => !matches!(limit, LimitExceeded::Busy(_)),
            _ => false,
        }
    }

    /// No place for the query came free in time: the server is busy, try again.
    pub fn is_busy(&self) -> bool {
        matches!(self, StorageError::Limit(LimitExceeded::Busy(_)))
    }
}

/// Settings of the storage layer.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// Hot rows are written to Parquet at least this often.
    pub flush_interval: Duration,
    /// A table with this many hot rows is flushed without waiting for the interval…
    pub flush_rows: usize,
    /// …and every table is flushed when the hot store as a whole holds this many bytes
    /// (wide tables such as the window tables reach it before `flush_rows`).
    pub flush_bytes: usize,
    /// Appends wait (back-pressure) while a table holds this many hot rows, e.g. when
    /// flushes fail because the disk is full.
    pub max_hot_rows: usize,
    pub write: WriteOptions,
    /// What one query may take.
    pub query: QueryLimits,
}

impl StorageConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StorageConfig {
            data_dir: data_dir.into(),
            flush_interval: Duration::from_secs(60),
            flush_rows: 1_000_000,
            flush_bytes: 256 << 20,
            max_hot_rows: 4_000_000,
            write: WriteOptions::default(),
            query: QueryLimits::unlimited(),
        }
    }
}

/// Batches of [`Storage::sql_each`] made ahead of the caller (DataFusion's are 8,192
/// rows by default).
const STREAM_AHEAD: usize = 4;

/// The result of a query.
#[derive(Debug, Clone)]
pub struct QueryOutput {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl QueryOutput {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// The tables, their data and the SQL engine over them. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    config: StorageConfig,
    tables: Vec<Arc<Table>>,
    ctx: SessionContext,
    metrics: StorageMetrics,
    flush_wanted: Option<Sender<()>>,
    queries: QueryRuntime,
    /// Places for queries of the SQL endpoints (`[query]`'s limits).
    admission: Admission,
    /// Set once the write-ahead log is in use: flushes are then checkpoints (see
    /// [`Storage::flush`]).
    checkpoints: std::sync::Mutex<Option<Arc<dyn Checkpoints>>>,
    /// One flush (checkpoint) at a time: the flusher's and `/flush`'s. Holds when the
    /// last checkpoint was taken.
    flushing: std::sync::Mutex<Instant>,
    /// Set by [`Storage::hold_flushes`].
    held: AtomicBool,
}

/// While it lives, the hot store fills further before a flush (see
/// [`Storage::hold_flushes`]); dropping it asks for a flush.
#[must_use = "flushes are held only while the guard lives"]
pub struct FlushHold(Storage);

impl Drop for FlushHold {
    fn drop(&mut self) {
        self.0.inner.held.store(false, Ordering::Relaxed);
        self.0.want_flush();
    }
}

/// The runtime SQL runs on (`sluice-query` threads), apart from the one serving
/// `/ready`, `/metrics` and ingestion, so that a heavy query delays none of them
/// (InfluxDB 3 keeps a dedicated executor for the same reason). One thread fewer than
/// the machine has cores (at least one), each at a lower OS priority ([`QUERY_NICE`])
/// once [`Storage::lower_query_priority`] was called: queries running flat out leave
/// ingestion a core, and yield the CPU to it when it is short (BENCHMARKS.md, "Hostile
/// queries beside the reference load").
struct QueryRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    threads: Arc<QueryThreads>,
}

/// The query runtime's threads, and whether they run below ingestion yet.
#[derive(Default)]
struct QueryThreads {
    ids: std::sync::Mutex<Vec<rustix::thread::Pid>>,
    lowered: AtomicBool,
}

impl QueryThreads {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<rustix::thread::Pid>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On each new thread of the runtime.
    fn started(&self) {
        let me = rustix::thread::gettid();
        let mut ids = self.lock();
        ids.push(me);
        if self.lowered.load(Ordering::SeqCst) {
            lower_query_thread_priority(me);
        }
    }

    /// On each thread of the runtime as it ends.
    fn stopped(&self) {
        let me = rustix::thread::gettid();
        self.lock().retain(|&id| id != me);
    }

    /// Every thread, now and from now on, at [`QUERY_NICE`].
    fn lower(&self) {
        let ids = self.lock();
        if !self.lowered.swap(true, Ordering::SeqCst) {
            for &id in ids.iter() {
                lower_query_thread_priority(id);
            }
        }
    }
}

/// The nice value of the query threads (ingestion's threads keep 0): when both want the
/// CPU, the scheduler gives ingestion about nine parts in ten; an idle machine runs
/// queries at full speed.
const QUERY_NICE: i32 = 10;

/// Lowers the priority of the query thread `id` to [`QUERY_NICE`] (Linux: nice is per
/// thread). Refused (a seccomp profile, say), queries run at ingestion's priority:
/// logged once.
fn lower_query_thread_priority(id: rustix::thread::Pid) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(e) = rustix::process::setpriority_process(Some(id), QUERY_NICE) {
        WARNED.call_once(|| {
            tracing::warn!(error = %e, "cannot lower the query threads' priority");
        });
    }
}

impl QueryRuntime {
    fn start() -> Result<QueryRuntime, StorageError> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let workers = cores.saturating_sub(1).max(1);
        let threads = Arc::new(QueryThreads::default());
        let (starts, stops) = (threads.clone(), threads.clone());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("sluice-query")
            .on_thread_start(move || starts.started())
            .on_thread_stop(move || stops.stopped())
            .enable_all()
            .build()
            .map(|runtime| QueryRuntime {
                runtime: Some(runtime),
                threads,
            })
            .map_err(|e| StorageError::internal(format!("cannot start the query runtime: {e}")))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        match &self.runtime {
            Some(runtime) => runtime.handle(),
            None => unreachable!("taken only on drop"),
        }
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        // The last handle to storage may go away inside async code, where a blocking
        // shutdown would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Storage {
    /// Opens (creating if needed) the data directory for writing.
    pub fn open(
        config: StorageConfig,
        specs: Vec<TableSpec>,
        metrics: StorageMetrics,
    ) -> Result<(Storage, Flusher), StorageError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let storage = Self::build(config, specs, metrics, true, Some(tx))?;
        let flusher = Flusher::spawn(storage.clone(), rx)?;
        Ok((storage, flusher))
    }

    /// Opens the Parquet files of a data directory for queries only (no flushes, nothing
    /// written; safe beside a running server).
    pub fn open_read_only(data_dir: &Path, specs: Vec<TableSpec>) -> Result<Storage, StorageError> {
        Self::build(
            StorageConfig::new(data_dir),
            specs,
            StorageMetrics::unregistered(),
            false,
            None,
        )
    }

    fn build(
        config: StorageConfig,
        specs: Vec<TableSpec>,
        metrics: StorageMetrics,
        writable: bool,
        flush_wanted: Option<Sender<()>>,
    ) -> Result<Storage, StorageError> {
        let committed =
            wal::committed(&config.data_dir).map_err(|source| StorageError::DataDir {
                path: wal::dir(&config.data_dir),
                source,
            })?;
        let tables = specs
            .into_iter()
            .map(|spec| Table::open(&config.data_dir, spec, writable, committed).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let session = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("sluice", "public");
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_config(session)
            .with_runtime_env(query_runtime_env(
                &config.query,
                writable.then(|| spill_dir(&config.data_dir)),
            )?)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(limits::Interruptible))
            .build();
        let ctx = SessionContext::new_with_state(state);
        guards::register(&ctx, config.query.max_value_bytes());
        metrics.set_hot_capacity(config.max_hot_rows);
        for table in &tables {
            ctx.register_table(
                table.spec.name.as_str(),
                Arc::new(provider::SnapshotTable::new(table.clone())),
            )?;
            let stats = table.stats();
            metrics.add_table(&table.spec.name);
            metrics.set_table(&table.spec.name, &stats);
        }
        let admission = Admission::new(config.query.clone());
        Ok(Storage {
            inner: Arc::new(Inner {
                config,
                tables,
                ctx,
                metrics,
                flush_wanted,
                queries: QueryRuntime::start()?,
                admission,
                checkpoints: std::sync::Mutex::new(None),
                flushing: std::sync::Mutex::new(Instant::now()),
                held: AtomicBool::new(false),
            }),
        })
    }

    fn table(&self, name: &str) -> Result<&Arc<Table>, StorageError> {
        self.inner
            .tables
            .iter()
            .find(|t| t.spec.name == name)
            .ok_or_else(|| StorageError::UnknownTable(name.to_owned()))
    }

    /// Makes a sealed batch queryable. Blocks while the table is over `max_hot_rows`.
    pub fn append(&self, table: &str, batch: RecordBatch) -> Result<(), StorageError> {
        let table = self.table(table)?;
        let config = &self.inner.config;
        let mut waited_since: Option<Instant> = None;
        let mut warned_at = Instant::now();
        while table.snapshot().hot_rows() >= config.max_hot_rows {
            self.want_flush();
            let since = *waited_since.get_or_insert_with(Instant::now);
            if warned_at.elapsed() >= Duration::from_secs(5) {
                warned_at = Instant::now();
                tracing::warn!(
                    table = %table.spec.name,
                    waited_s = since.elapsed().as_secs(),
                    "hot store full (flushes are not keeping up or failing): ingestion is waiting"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(since) = waited_since {
            self.inner.metrics.backpressure(since.elapsed());
        }
        let hot_rows = table.append(batch)?;
        self.inner
            .metrics
            .set_table(&table.spec.name, &table.stats());
        let (flush_rows, flush_bytes) = if self.inner.held.load(Ordering::Relaxed) {
            (
                config.flush_rows.max(config.max_hot_rows / 4 * 3),
                config.flush_bytes.saturating_mul(2),
            )
        } else {
            (config.flush_rows, config.flush_bytes)
        };
        if hot_rows >= flush_rows || self.hot_bytes() >= flush_bytes {
            self.want_flush();
        }
        Ok(())
    }

    /// Until the guard is dropped, a table is flushed at three quarters of `max_hot_rows`
    /// (not `flush_rows`) and the hot store at twice `flush_bytes`. For the replay at
    /// start: a minute of the reference load replays in a few seconds, and a flush
    /// meanwhile would take a core from it; its rows are flushed after it, into files of
    /// the first checkpoint that follows.
    pub fn hold_flushes(&self) -> FlushHold {
        self.inner.held.store(true, Ordering::Relaxed);
        FlushHold(self.clone())
    }

    /// Memory held by the hot batches of every table.
    fn hot_bytes(&self) -> usize {
        self.inner.tables.iter().map(|t| t.stats().hot_bytes).sum()
    }

    fn want_flush(&self) {
        if let Some(tx) = &self.inner.flush_wanted {
            let _ = tx.try_send(());
        }
    }

    /// The cut of each table now (see [`Cut`]).
    pub fn cut_tables(&self, tables: &[&str]) -> Result<Vec<(String, u64)>, StorageError> {
        tables
            .iter()
            .map(|name| Ok((name.to_string(), self.table(name)?.cut())))
            .collect()
    }

    /// From now on flushes are checkpoints through `checkpoints` (see [`Storage::flush`]).
    pub fn set_checkpoints(&self, checkpoints: Arc<dyn Checkpoints>) {
        *self
            .inner
            .checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(checkpoints);
    }

    /// Writes the hot rows to Parquet: every one, or with checkpoints, those before a
    /// cut (then commits it). Tables are flushed independently: one failing does not
    /// stop the others; the first error is returned.
    pub fn flush(&self) -> Result<FlushReport, StorageError> {
        self.flush_when(true)
    }

    /// A flush of the flusher's: a checkpoint only once `flush_interval` has passed since
    /// the last one. The flushes that make room in between (`flush_rows`, `flush_bytes`:
    /// every few seconds at a high rate) write every hot row into files kept only once a
    /// later checkpoint commits, as when a cut cannot be had, so that a checkpoint's cost
    /// (the aggregator's state of every device) is paid once an interval, not once a
    /// flush; the WAL keeps the segments since the last checkpoint meanwhile.
    fn flush_when(&self, checkpoint: bool) -> Result<FlushReport, StorageError> {
        let mut last_checkpoint = self
            .inner
            .flushing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let checkpoints = self
            .inner
            .checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(checkpoints) = checkpoints else {
            return self.flush_cut(None);
        };
        // A tenth of the interval early: the flusher's timer and the size triggers drift.
        let interval = self.inner.config.flush_interval;
        if !checkpoint && last_checkpoint.elapsed() + interval / 10 < interval {
            let cut = Cut {
                checkpoint: checkpoints.next(),
                tables: Vec::new(),
            };
            return self.flush_cut(Some(&cut));
        }
        *last_checkpoint = Instant::now();
        let cut = match checkpoints.cut() {
            Ok(cut) => cut,
            Err(e) => {
                // The hot store must still be emptied (ingestion may be waiting for
                // room): a flush of everything, named so that it is kept only once a
                // later checkpoint commits (see `wal`).
                tracing::warn!(error = %e, "checkpoint: no cut; flushing without committing");
                let cut = Cut {
                    checkpoint: checkpoints.next(),
                    tables: Vec::new(),
                };
                return self.flush_cut(Some(&cut));
            }
        };
        let report = self.flush_cut(Some(&cut))?;
        checkpoints.commit(&cut).map_err(|e| {
            StorageError::internal(format!(
                "checkpoint {} flushed but not committed (a later one will be): {e}",
                cut.checkpoint
            ))
        })?;
        tracing::debug!(
            checkpoint = cut.checkpoint,
            rows = report.rows,
            "checkpoint committed"
        );
        Ok(report)
    }

    /// Writes the hot rows `cut` covers (every row: `None`) to Parquet, files named
    /// with its checkpoint.
    fn flush_cut(&self, cut: Option<&Cut>) -> Result<FlushReport, StorageError> {
        let mut total = FlushReport::default();
        let mut first_error = None;
        for table in &self.inner.tables {
            let started = Instant::now();
            let up_to = cut.and_then(|c| {
                c.tables
                    .iter()
                    .find(|(name, _)| *name == table.spec.name)
                    .map(|(_, seq)| *seq)
            });
            let checkpoint = cut.map(|c| c.checkpoint);
            match table.flush(&self.inner.config.write, up_to, checkpoint) {
                Ok(report) => {
                    self.inner
                        .metrics
                        .flushed(&table.spec.name, &report, started.elapsed());
                    if report.rows > 0 {
                        tracing::debug!(table = %table.spec.name, rows = report.rows, files = report.files, bytes = report.bytes, "flushed");
                    }
                    total.rows += report.rows;
                    total.files += report.files;
                    total.bytes += report.bytes;
                }
                Err(e) => {
                    self.inner.metrics.flush_failed(&table.spec.name);
                    tracing::error!(table = %table.spec.name, error = %e, "flush failed");
                    first_error.get_or_insert(e);
                }
            }
            self.inner
                .metrics
                .set_table(&table.spec.name, &table.stats());
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Row and file counts of a table.
    pub fn stats(&self, table: &str) -> Result<TableStats, StorageError> {
        Ok(self.table(table)?.stats())
    }

    /// Runs one read-only SQL statement over hot and cold data, on the query runtime
    /// (callable from any runtime or none: see [`Storage::query_runtime`]).
    pub async fn sql(&self, sql: &str) -> Result<QueryOutput, StorageError> {
        let started = Instant::now();
        let (storage, text) = (self.clone(), sql.to_owned());
        // A caller that goes away (an HTTP client hanging up) takes its query with it.
        struct AbortOnDrop(tokio::task::JoinHandle<Result<QueryOutput, StorageError>>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let mut task = AbortOnDrop(
            self.query_runtime()
                .spawn(async move { storage.run_sql(&text).await }),
        );
        let result = (&mut task.0)
            .await
            .unwrap_or_else(|e| Err(StorageError::internal(format!("the query failed: {e}"))));
        self.count_query(&result, started);
        result
    }

    /// Counts a query in the metrics, by how it ended.
    fn count_query<T>(&self, result: &Result<T, StorageError>, started: Instant) {
        self.inner.metrics.queried(
            match result {
                Ok(_) => metrics::outcome::OK,
                Err(e) if e.is_user_error() => metrics::outcome::USER_ERROR,
                Err(_) => metrics::outcome::ERROR,
            },
            started.elapsed(),
        );
    }

    /// The runtime queries run on; the PostgreSQL endpoint serves its clients there.
    pub fn query_runtime(&self) -> &tokio::runtime::Handle {
        self.inner.queries.handle()
    }

    /// From now on queries run below ingestion ([`QUERY_NICE`]). A server calls it once
    /// its start is done: the start's own query (the keys of recent readings, which the
    /// replay waits for) has the machine to itself, nothing is ingested yet.
    pub fn lower_query_priority(&self) {
        self.inner.queries.threads.lower();
    }

    /// Within `[query]`'s limits: a place among the running queries, its time (the wait
    /// for the place, planning and running), its result's size; its operators' memory
    /// is the session's pool.
    async fn run_sql(&self, sql: &str) -> Result<QueryOutput, StorageError> {
        let ticket = Arc::new(self.inner.admission.admit().await?);
        let frame = ticket
            .within(self.plan_sql(sql), StorageError::Limit)
            .await?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let stream = ticket
            .within(
                async { frame.execute_stream().await.map_err(StorageError::from) },
                StorageError::Limit,
            )
            .await?;
        let batches = ticket
            .clone()
            .guard(
                stream.map(|b| b.map_err(StorageError::from)),
                RecordBatch::get_array_memory_size,
                StorageError::Limit,
            )
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(QueryOutput { schema, batches })
    }

    /// Places for queries: the PostgreSQL endpoint takes one per statement.
    pub fn admission(&self) -> &Admission {
        &self.inner.admission
    }

    async fn plan_sql(&self, sql: &str) -> Result<DataFrame, StorageError> {
        let state = self.inner.ctx.state();
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(sql, &dialect)?;
        // The one read-only rule, before anything is planned; no session here.
        if let Some(why) = refusal_df(&statement, Sessions::Shared) {
            return Err(DataFusionError::Plan(why).into());
        }
        let plan = state.statement_to_plan(statement).await?;
        Ok(self.inner.ctx.execute_logical_plan(plan).await?)
    }

    /// Runs one read-only SQL statement and hands its batches to `each` as the query
    /// makes them, on the calling thread, with at most a few batches made and not yet
    /// taken: a result of tens of millions of rows is never held whole (the
    /// start's dedup keys). Blocks: call it from outside an async runtime. Returns the
    /// rows handed on; stops at the first error, the query's or `each`'s.
    pub fn sql_each(
        &self,
        sql: &str,
        mut each: impl FnMut(&RecordBatch) -> Result<(), String>,
    ) -> Result<usize, StorageError> {
        let started = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::channel(STREAM_AHEAD);
        let (storage, text) = (self.clone(), sql.to_owned());
        let query = self.query_runtime().spawn(async move {
            let run = async {
                let mut stream = storage.plan_sql(&text).await?.execute_stream().await?;
                while let Some(batch) = stream.next().await {
                    if tx.send(Ok(batch?)).await.is_err() {
                        break; // `each` failed: the caller stopped reading
                    }
                }
                Ok::<_, StorageError>(())
            };
            if let Err(e) = run.await {
                let _ = tx.send(Err(e)).await;
            }
        });
        let mut rows = 0;
        let outcome = loop {
            match rx.blocking_recv() {
                None => break Ok(rows),
                Some(Err(e)) => break Err(e),
                Some(Ok(batch)) => {
                    rows += batch.num_rows();
                    if let Err(why) = each(&batch) {
                        break Err(StorageError::internal(why));
                    }
                }
            }
        };
        drop(rx);
        let outcome = match outcome {
            // Ended by the query itself: a panic in it is an error, not an empty result.
            Ok(rows) => futures::executor::block_on(query)
                .map(|()| rows)
                .map_err(|e| StorageError::internal(format!("the query failed: {e}"))),
            Err(e) => {
                query.abort();
                Err(e)
            }
        };
        self.count_query(&outcome, started);
        outcome
    }

    /// The DataFusion context (for front ends that plan queries themselves).
    pub fn session(&self) -> &SessionContext {
        &self.inner.ctx
    }
}

/// Where queries spill: `<data_dir>/spill`, emptied at start (what a crash left).
fn spill_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("spill")
}

/// The query engine's runtime: `limits`' memory pool (fair among the operators that can
/// spill; the largest consumers named when it is exhausted) and spill files in `spill`
/// (the OS temp directory for read-only use), at most `limits.max_spill_bytes`.
fn query_runtime_env(
    limits: &QueryLimits,
    spill: Option<PathBuf>,
) -> Result<Arc<datafusion::execution::runtime_env::RuntimeEnv>, StorageError> {
    use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
    use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    let mode = match spill {
        Some(dir) => {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|source| StorageError::DataDir {
                    path: dir.clone(),
                    source,
                })?;
            }
            std::fs::create_dir_all(&dir).map_err(|source| StorageError::DataDir {
                path: dir.clone(),
                source,
            })?;
            DiskManagerMode::Directories(vec![dir])
        }
        None => DiskManagerMode::OsTmpDirectory,
    };
    let pool = TrackConsumersPool::new(
        FairSpillPool::new(limits.max_memory_bytes),
        std::num::NonZeroUsize::new(3).expect("3 is not 0"),
    );
    Ok(RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(pool))
        .with_disk_manager_builder(
            DiskManagerBuilder::default()
                .with_mode(mode)
                .with_max_temp_directory_size(limits.max_spill_bytes),
        )
        .build_arc()?)
}

/// What one flush covers: the write-ahead log before segment `checkpoint`, and of each
/// table listed the hot batches before its cut (tables not listed: all their rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub checkpoint: u64,
    pub tables: Vec<(String, u64)>,
}

/// Brings the writers of the tables to a [`Cut`] before a flush, and commits it after.
/// The binary implements it over the pipeline stages and the WAL; without one, a flush
/// writes every hot row and records nothing.
pub trait Checkpoints: Send + Sync + 'static {
    /// Starts a new WAL segment and brings every writer to the point where the hot store
    /// holds exactly what the segments before it hold.
    fn cut(&self) -> Result<Cut, String>;
    /// The flush of `cut` is on disk.
    fn commit(&self, cut: &Cut) -> Result<(), String>;
    /// The checkpoint a flush without a cut names its files with: one past the segment
    /// being written now. Such files are kept once a checkpoint at least as late
    /// commits, removed at start otherwise (their rows are then replayed).
    fn next(&self) -> u64;
}

/// The background thread that flushes on an interval and when a table fills.
///
/// It runs at ingestion's priority, unlike the query threads: ingestion waits for it
/// when the hot store is full, and a checkpoint's flush for the aggregator's state save.
/// Tried (2026-12-07): the encoding and the state save at nice 10 raised PUBACK p99 at
/// 175,000–250,000 msgs/s from 23–223 ms to 265–884 ms, and the front door's max went
/// under 250,000 (BENCHMARKS.md, "Sixth pass").
pub struct Flusher {
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
    storage: Storage,
}

impl Flusher {
    fn spawn(
        storage: Storage,
        wanted: crossbeam_channel::Receiver<()>,
    ) -> Result<Flusher, StorageError> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let interval = storage.inner.config.flush_interval;
        let worker = storage.clone();
        let thread = std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || {
                loop {
                    crossbeam_channel::select! {
                        recv(stopped) -> _ => break,
                        recv(wanted) -> _ => {}
                        default(interval) => {}
                    }
                    // Errors are logged and counted by `flush`; the rows stay hot and the
                    // next round tries again.
                    let _ = worker.flush_when(false);
                }
            })
            .map_err(|e| StorageError::internal(format!("cannot start the flusher: {e}")))?;
        Ok(Flusher {
            stop,
            thread: Some(thread),
            storage,
        })
    }

    /// Stops the thread (no more flushes on the interval); the last one is
    /// [`shutdown`](Self::shutdown)'s.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.send(());
            let _ = thread.join();
        }
    }

    /// Stops the thread and writes every remaining hot row to Parquet (a last
    /// checkpoint, when there are checkpoints).
    pub fn shutdown(mut self) -> Result<FlushReport, StorageError> {
        self.stop();
        self.storage.flush()
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.try_send(());
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_run_below_ingestion_priority_once_lowered() {
        let here = rustix::process::getpriority_process(None).unwrap();
        let runtime = QueryRuntime::start().unwrap();
        let nice_on = |blocking: bool| {
            let (tx, rx) = std::sync::mpsc::channel();
            let nice = move || {
                let me = rustix::thread::gettid();
                let _ = tx.send(rustix::process::getpriority_process(Some(me)));
            };
            if blocking {
                runtime.handle().spawn_blocking(nice);
            } else {
                runtime.handle().spawn(async move { nice() });
            }
            rx.recv_timeout(std::time::Duration::from_secs(10))
                .unwrap()
                .unwrap()
        };
        // At start (the keys of recent readings are read before anything is ingested).
        assert_eq!(nice_on(false), here, "nice of a query thread at start");
        runtime.threads.lower();
        // An unprivileged process may raise its nice value, never lower it: from an
        // already niced shell, the threads keep the higher one.
        assert_eq!(nice_on(false), QUERY_NICE.max(here), "a worker, lowered");
        assert_eq!(
            nice_on(true),
            QUERY_NICE.max(here),
            "a thread started after, lowered"
        );
        // The calling thread (ingestion's side) is untouched.
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), here);
    }
}
