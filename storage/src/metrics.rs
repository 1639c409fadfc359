//! Prometheus metrics of the storage layer.

use std::time::Duration;

use prometheus::{
    Counter, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::table::{FlushReport, TableStats};

/// Outcomes of a SQL query (the `outcome` label of `sluice_query_total`).
pub(crate) mod outcome {
    pub(crate) const OK: &str = "ok";
    /// The caller's: bad SQL, a refused statement.
    pub(crate) const USER_ERROR: &str = "user_error";
    /// sluice's.
    pub(crate) const ERROR: &str = "error";
    pub(crate) const ALL: [&str; 3] = [OK, USER_ERROR, ERROR];
}

/// Counters and gauges of the hot store, the Parquet writer and the query engine.
#[derive(Clone)]
pub struct StorageMetrics {
    hot_rows: IntGaugeVec,
    hot_bytes: IntGaugeVec,
    hot_capacity: IntGauge,
    cold_rows: IntGaugeVec,
    files: IntGaugeVec,
    rows_written: IntCounterVec,
    files_written: IntCounterVec,
    bytes_written: IntCounterVec,
    flush_errors: IntCounterVec,
    flush_seconds: HistogramVec,
    backpressure_seconds: Counter,
    queries: IntCounterVec,
    query_seconds: Histogram,
}

impl StorageMetrics {
    /// Metrics registered in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::unregistered();
        registry.register(Box::new(metrics.hot_rows.clone()))?;
        registry.register(Box::new(metrics.hot_bytes.clone()))?;
        registry.register(Box::new(metrics.hot_capacity.clone()))?;
        registry.register(Box::new(metrics.cold_rows.clone()))?;
        registry.register(Box::new(metrics.files.clone()))?;
        registry.register(Box::new(metrics.rows_written.clone()))?;
        registry.register(Box::new(metrics.files_written.clone()))?;
        registry.register(Box::new(metrics.bytes_written.clone()))?;
        registry.register(Box::new(metrics.flush_errors.clone()))?;
        registry.register(Box::new(metrics.flush_seconds.clone()))?;
        registry.register(Box::new(metrics.backpressure_seconds.clone()))?;
        for name in outcome::ALL {
            metrics.queries.with_label_values(&[name]);
        }
        registry.register(Box::new(metrics.queries.clone()))?;
        registry.register(Box::new(metrics.query_seconds.clone()))?;
        Ok(metrics)
    }

    /// Metrics that are kept but exported nowhere.
    pub fn unregistered() -> Self {
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["table"]).expect("valid metric")
        };
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["table"]).expect("valid metric")
        };
        StorageMetrics {
            hot_rows: gauge(
                "sluice_storage_hot_rows",
                "Rows in memory, not yet in Parquet",
            ),
            hot_bytes: gauge(
                "sluice_storage_hot_bytes",
                "Memory of the rows in memory (Arrow buffers), by table",
            ),
            hot_capacity: IntGauge::new(
                "sluice_storage_hot_capacity_rows",
                "Rows a table holds in memory before appends wait for a flush (storage.max_hot_rows)",
            )
            .expect("valid metric"),
            cold_rows: gauge(
                "sluice_storage_cold_rows",
                "Rows in published Parquet files",
            ),
            files: gauge("sluice_storage_files", "Published Parquet files"),
            rows_written: counter(
                "sluice_storage_rows_written_total",
                "Rows written to Parquet",
            ),
            files_written: counter(
                "sluice_storage_files_written_total",
                "Parquet files written",
            ),
            bytes_written: counter(
                "sluice_storage_bytes_written_total",
                "Parquet bytes written",
            ),
            flush_errors: counter(
                "sluice_storage_flush_errors_total",
                "Flushes that failed (rows stay in memory)",
            ),
            flush_seconds: HistogramVec::new(
                HistogramOpts::new("sluice_storage_flush_seconds", "Time to flush a table")
                    .buckets(
                        prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
                    ),
                &["table"],
            )
            .expect("valid metric"),
            backpressure_seconds: Counter::new(
                "sluice_storage_backpressure_seconds_total",
                "Time appends waited for the hot store to drain",
            )
            .expect("valid metric"),
            queries: IntCounterVec::new(
                Opts::new("sluice_query_total", "SQL queries by outcome"),
                &["outcome"],
            )
            .expect("valid metric"),
            query_seconds: Histogram::with_opts(
                HistogramOpts::new("sluice_query_seconds", "SQL query duration").buckets(
                    prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
                ),
            )
            .expect("valid metric"),
        }
    }

    /// Creates the table's counters at zero, so that "no failure yet" is a 0 in
    /// Prometheus and not a missing series.
    pub(crate) fn add_table(&self, table: &str) {
        for counter in [
            &self.flush_errors,
            &self.rows_written,
            &self.files_written,
            &self.bytes_written,
        ] {
            counter.with_label_values(&[table]);
        }
    }

    pub(crate) fn set_table(&self, table: &str, stats: &TableStats) {
        self.hot_rows
            .with_label_values(&[table])
            .set(stats.hot_rows as i64);
        self.hot_bytes
            .with_label_values(&[table])
            .set(stats.hot_bytes as i64);
        self.cold_rows
            .with_label_values(&[table])
            .set(stats.cold_rows as i64);
        self.files
            .with_label_values(&[table])
            .set(stats.files as i64);
    }

    pub(crate) fn flushed(&self, table: &str, report: &FlushReport, took: Duration) {
        self.rows_written
            .with_label_values(&[table])
            .inc_by(report.rows);
        self.files_written
            .with_label_values(&[table])
            .inc_by(report.files as u64);
        self.bytes_written
            .with_label_values(&[table])
            .inc_by(report.bytes);
        if report.rows > 0 {
            self.flush_seconds
                .with_label_values(&[table])
                .observe(took.as_secs_f64());
        }
    }

    pub(crate) fn set_hot_capacity(&self, rows: usize) {
        self.hot_capacity.set(rows as i64);
    }

    pub(crate) fn flush_failed(&self, table: &str) {
        self.flush_errors.with_label_values(&[table]).inc();
    }

    pub(crate) fn backpressure(&self, waited: Duration) {
        self.backpressure_seconds.inc_by(waited.as_secs_f64());
    }

    pub(crate) fn queried(&self, outcome: &str, took: Duration) {
        self.queries.with_label_values(&[outcome]).inc();
        self.query_seconds.observe(took.as_secs_f64());
    }
}
