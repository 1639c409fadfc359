//! The aggregator thread: sealed `telemetry` batches in; window, late and alert rows out,
//! and alert transitions to an [`AlertOutput`].

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arrow::record_batch::RecordBatch;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use sluice_ingest::{BatchSink, Refused, TableSink};

use crate::WindowAcc;
use crate::alert::{AlertEvent, AlertSink, Alerts, Rule};
use crate::rows::{
    ClosedWindow, LateReading, TelemetryColumns, alerts_batch, late_batch, window_batch,
};
use crate::window::{WindowConfig, WindowSink, Windows};

/// Table names the aggregator writes.
pub const MINUTE_TABLE: &str = "telemetry_1m";
pub const ROLLUP_TABLE: &str = "telemetry_1h";
pub const LATE_TABLE: &str = "telemetry_late";
pub const ALERTS_TABLE: &str = "alerts";

/// Where alert transitions go as they happen (besides the `alerts` table).
///
/// Called on the aggregator thread for every transition: an implementation must not
/// block (queue the event and return).
pub trait AlertOutput: Send + Sync {
    fn emit(&self, event: &AlertEvent);
}

/// Settings of the aggregator stage.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// `None`: no window tables (alerts only).
    pub windows: Option<WindowConfig>,
    pub rules: Vec<Rule>,
    /// Where open windows and alert state are saved at a stop and taken back at the next
    /// start; `None` closes windows at the stop instead (partial windows) and forgets
    /// alert state.
    pub state: Option<Arc<dyn crate::StateStore>>,
    /// Closed windows are written in batches of up to this many rows…
    pub batch_rows: usize,
    /// …or when the oldest has waited this long.
    pub batch_age: Duration,
    /// Telemetry batches queued in front of the aggregator (ingestion waits beyond).
    /// They cost little memory: the hot store holds the same batches (shared, not
    /// copied) until they are flushed. Deep enough that the replay at start goes on
    /// decoding while the aggregator takes a million devices' state back (~1 s).
    pub queue_batches: usize,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            windows: Some(WindowConfig::default()),
            rules: Vec::new(),
            state: None,
            batch_rows: 8192,
            batch_age: Duration::from_secs(1),
            queue_batches: 256,
        }
    }
}

/// Prometheus figures of the aggregator.
#[derive(Clone)]
pub struct AggregatorMetrics {
    readings: IntCounter,
    late: IntCounter,
    closed: IntCounterVec,
    buffered: IntGauge,
    devices: IntGauge,
    queue_depth: IntGauge,
    queue_capacity: IntGauge,
    transitions: IntCounterVec,
    active: IntGaugeVec,
    refused: IntCounterVec,
}

impl AggregatorMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = AggregatorMetrics {
            readings: IntCounter::new(
                "sluice_aggregator_readings_total",
                "Readings counted into windows",
            )?,
            late: IntCounter::new(
                "sluice_aggregator_late_readings_total",
                "Readings that arrived after their window closed (kept in telemetry and telemetry_late)",
            )?,
            closed: IntCounterVec::new(
                Opts::new(
                    "sluice_aggregator_windows_closed_total",
                    "Windows closed, by table",
                ),
                &["table"],
            )?,
            buffered: IntGauge::new(
                "sluice_aggregator_buffered_readings",
                "Readings held for windows not closed yet",
            )?,
            devices: IntGauge::new("sluice_aggregator_devices", "Devices with window state")?,
            queue_depth: IntGauge::new(
                "sluice_aggregator_queue_depth",
                "Telemetry batches waiting for the aggregator",
            )?,
            queue_capacity: IntGauge::new(
                "sluice_aggregator_queue_capacity",
                "Telemetry batches the aggregator's queue holds before ingestion waits",
            )?,
            transitions: IntCounterVec::new(
                Opts::new(
                    "sluice_alert_transitions_total",
                    "Alert transitions notified, by rule and state (firing, resolved)",
                ),
                &["rule", "state"],
            )?,
            active: IntGaugeVec::new(
                Opts::new(
                    "sluice_alerts",
                    "Devices per rule and state (pending, firing), updated every few seconds",
                ),
                &["rule", "state"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "sluice_aggregator_refused_rows_total",
                    "Rows of window, late and alert batches storage did not store, by table and reason (logged as errors)",
                ),
                &["table", "reason"],
            )?,
        };
        registry.register(Box::new(metrics.refused.clone()))?;
        registry.register(Box::new(metrics.transitions.clone()))?;
        registry.register(Box::new(metrics.queue_capacity.clone()))?;
        registry.register(Box::new(metrics.active.clone()))?;
        registry.register(Box::new(metrics.readings.clone()))?;
        registry.register(Box::new(metrics.late.clone()))?;
        for table in [MINUTE_TABLE, ROLLUP_TABLE] {
            metrics.closed.with_label_values(&[table]);
        }
        registry.register(Box::new(metrics.closed.clone()))?;
        registry.register(Box::new(metrics.buffered.clone()))?;
        registry.register(Box::new(metrics.devices.clone()))?;
        registry.register(Box::new(metrics.queue_depth.clone()))?;
        Ok(metrics)
    }
}

enum Input {
    Batch(RecordBatch),
    Rules(Vec<Rule>),
    /// Write what is pending, take a snapshot of the state, say so, wait to go on; the
    /// snapshot is saved into the store meanwhile, on a thread of its own.
    Checkpoint {
        store: Arc<dyn crate::StateStore>,
        snapshot: Sender<()>,
        saved: Sender<Result<(), String>>,
        resume: Receiver<()>,
    },
    /// Stop, saving the state into the store given (else `config.state`).
    Finish(Option<Arc<dyn crate::StateStore>>),
}

/// The aggregator at a checkpoint: its rows up to the checkpoint are written and a
/// snapshot of its state taken; it waits until this is dropped (so the caller can take the
/// cut of its tables).
pub struct Paused {
    _resume: Sender<()>,
}

/// A checkpoint the aggregator has queued.
pub struct Checkpointing {
    snapshot: Receiver<()>,
    saving: Saving,
    paused: Paused,
}

/// The snapshot of a checkpoint being saved, while the aggregator goes on.
pub struct Saving {
    answer: Receiver<Result<(), String>>,
}

impl Checkpointing {
    /// Waits until the aggregator wrote its rows, took its snapshot and paused. Saving the
    /// snapshot (serializing, writing, syncing: seconds for a million devices) does not
    /// hold the aggregator up, and so holds up no reading.
    pub fn paused(self, timeout: Duration) -> Result<(Paused, Saving), String> {
        match self.snapshot.recv_timeout(timeout) {
            Ok(()) => Ok((self.paused, self.saving)),
            Err(_) => Err(format!(
                "the aggregator did not reach the checkpoint within {timeout:?}"
            )),
        }
    }
}

impl Saving {
    /// Waits until the snapshot is saved.
    pub fn saved(self, timeout: Duration) -> Result<(), String> {
        match self.answer.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("the aggregator could not save its state: {e}")),
            Err(_) => Err(format!(
                "the aggregator did not save its state within {timeout:?}"
            )),
        }
    }
}

/// The running stage; shared by whoever feeds it and whoever stops it.
pub struct Aggregator {
    tx: Sender<Input>,
    thread: Mutex<Option<JoinHandle<()>>>,
    queue_depth: IntGauge,
}

impl Aggregator {
    /// Starts the thread; alert transitions go to `output` (besides the `alerts` table).
    pub fn start(
        mut config: AggregatorConfig,
        sink: Arc<dyn TableSink>,
        metrics: AggregatorMetrics,
        output: Option<Arc<dyn AlertOutput>>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(config.queue_batches.max(1));
        let queue_depth = metrics.queue_depth.clone();
        metrics
            .queue_capacity
            .set(config.queue_batches.max(1) as i64);
        let windows = config.windows.map(Windows::new);
        let alerts = Alerts::new(std::mem::take(&mut config.rules));
        let restore = config.state.clone();
        let mut stage = Stage {
            windows,
            alerts,
            output,
            pending: Pending::default(),
            config,
            sink,
            metrics,
        };
        let thread = std::thread::Builder::new()
            .name("aggregator".into())
            .spawn(move || {
                // On this thread, before the first batch: a million devices' state takes
                // seconds to read, while the start goes on (the WAL's replay queues here).
                if let Some(store) = restore {
                    if let Some(windows) = &mut stage.windows {
                        windows.restore(crate::state::take(store.as_ref()), wall_ns());
                    }
                    stage
                        .alerts
                        .restore(crate::state::take_alerts(store.as_ref()), wall_ns());
                }
                stage.run(rx)
            })?;
        Ok(Aggregator {
            tx,
            thread: Mutex::new(Some(thread)),
            queue_depth,
        })
    }

    /// Hands a sealed `telemetry` batch to the aggregator; waits while its queue is full.
    /// `Err` once the aggregator thread is gone (it panicked: the server stops on that).
    pub fn observe(&self, batch: RecordBatch) -> Result<(), Refused> {
        self.tx.send(Input::Batch(batch)).map_err(|_| Refused {
            reason: "aggregator_stopped",
            message: "the aggregator thread is gone".into(),
        })?;
        self.queue_depth.set(self.tx.len() as i64);
        Ok(())
    }

    /// Replaces the alert rules (a reload), in order with the batches queued before.
    pub fn set_rules(&self, rules: Vec<Rule>) {
        if self.tx.send(Input::Rules(rules)).is_err() {
            tracing::error!("the aggregator thread is gone; rules not replaced");
        }
    }

    /// A checkpoint, queued behind every batch observed so far: once those are processed,
    /// the aggregator writes the rows pending, takes a snapshot of open windows and alert
    /// state and pauses (see [`Checkpointing::paused`]); the snapshot is saved into `store`
    /// meanwhile (see [`Saving::saved`]). `Err` if it cannot be queued within `timeout`.
    pub fn checkpoint(
        &self,
        store: Arc<dyn crate::StateStore>,
        timeout: Duration,
    ) -> Result<Checkpointing, String> {
        let (saved, answer) = crossbeam_channel::bounded(1);
        let (snapshot, snapshotted) = crossbeam_channel::bounded(1);
        let (resume, resumed) = crossbeam_channel::bounded(0);
        let input = Input::Checkpoint {
            store,
            snapshot,
            saved,
            resume: resumed,
        };
        self.tx.send_timeout(input, timeout).map_err(|_| {
            format!("the aggregator did not take the checkpoint within {timeout:?}")
        })?;
        Ok(Checkpointing {
            snapshot: snapshotted,
            saving: Saving { answer },
            paused: Paused { _resume: resume },
        })
    }

    /// Processes everything queued, writes the rows and saves open windows and alert
    /// state into `store` (else the configured one; with neither, closes every open
    /// window: partial windows), then returns. Call once no more batches come.
    pub fn finish_into(&self, store: Option<Arc<dyn crate::StateStore>>) {
        let _ = self.tx.send(Input::Finish(store));
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("the aggregator thread panicked");
        }
    }

    /// Processes everything queued, closes every open window (a stop ends them) and writes
    /// the rows, then returns.
    /// Call once no more batches come.
    pub fn finish(&self) {
        let _ = self.tx.send(Input::Finish(None));
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("the aggregator thread panicked");
        }
    }
}

/// Stores every batch through `store`, and hands each telemetry batch that was stored
/// to the aggregator: windows count exactly the rows SQL sees.
pub struct StoreThenAggregate<S> {
    pub store: S,
    pub aggregator: Arc<Aggregator>,
}

impl<S: BatchSink> BatchSink for StoreThenAggregate<S> {
    fn append_telemetry(&self, batch: RecordBatch) -> Result<(), Refused> {
        self.store.append_telemetry(batch.clone())?;
        // The rows are stored. A gone aggregator panicked, and a panic on the
        // `aggregator` thread stops the server (the binary's `fatal`), so its windows
        // are not left behind silently.
        let _ = self.aggregator.observe(batch);
        Ok(())
    }
    fn append_rejects(&self, batch: RecordBatch) -> Result<(), Refused> {
        self.store.append_rejects(batch)
    }
}

#[derive(Default)]
struct Pending {
    minute: Vec<ClosedWindow>,
    rollup: Vec<ClosedWindow>,
    late: Vec<LateReading>,
    alerts: Vec<AlertEvent>,
    /// `alerts[..notified]` have gone to the output.
    notified: usize,
    oldest: Option<Instant>,
}

impl Pending {
    fn rows(&self) -> usize {
        self.minute.len() + self.rollup.len() + self.late.len() + self.alerts.len()
    }
}

impl AlertSink for Pending {
    fn alert(&mut self, event: AlertEvent) {
        self.oldest.get_or_insert_with(Instant::now);
        self.alerts.push(event);
    }
}

impl WindowSink for Pending {
    fn window(&mut self, rollup: bool, device: &str, end: i64, acc: &WindowAcc) {
        self.oldest.get_or_insert_with(Instant::now);
        let closed = ClosedWindow {
            device: device.into(),
            end,
            acc: acc.clone(),
        };
        if rollup {
            self.rollup.push(closed);
        } else {
            self.minute.push(closed);
        }
    }

    fn late(&mut self, device: &str, ts: i64, received_at: i64) {
        self.oldest.get_or_insert_with(Instant::now);
        self.late.push(LateReading {
            device: device.into(),
            ts,
            received_at,
        });
    }
}

/// Open windows and alert state as a checkpoint found them.
struct Snapshot {
    alerts: crate::alert::SavedAlerts,
    /// The devices, and the windows' sizes.
    windows: Option<(Vec<crate::window::SavedDevice>, WindowConfig)>,
}

impl Snapshot {
    fn save(&self, store: &dyn crate::StateStore) -> std::io::Result<()> {
        crate::state::save_alerts(store, &self.alerts)?;
        if let Some((devices, config)) = &self.windows {
            crate::state::save(store, devices, config)?;
        }
        Ok(())
    }
}

struct Stage {
    windows: Option<Windows>,
    alerts: Alerts,
    output: Option<Arc<dyn AlertOutput>>,
    pending: Pending,
    config: AggregatorConfig,
    sink: Arc<dyn TableSink>,
    metrics: AggregatorMetrics,
}

/// How often pending rows are checked for writing.
const POLL: Duration = Duration::from_secs(1);
/// How often every device is checked for windows the server clock closes (idle devices):
/// a pass over all devices, ~20 ms for a million.
const TICK: Duration = Duration::from_secs(5);

/// The server clock, ns since the epoch.
fn wall_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

impl Stage {
    fn run(mut self, rx: Receiver<Input>) {
        let mut ticked = Instant::now();
        let mut finish_into = None;
        loop {
            match rx.recv_timeout(POLL) {
                Ok(Input::Batch(batch)) => self.process(&batch, wall_ns()),
                Ok(Input::Rules(rules)) => {
                    self.alerts.set_rules(rules, wall_ns(), &mut self.pending);
                    self.metrics.active.reset();
                    ticked = Instant::now() - TICK;
                }
                Ok(Input::Checkpoint {
                    store,
                    snapshot,
                    saved,
                    resume,
                }) => {
                    self.write();
                    let taken = self.snapshot();
                    let save = move || {
                        let _ = saved.send(taken.save(store.as_ref()).map_err(|e| e.to_string()));
                    };
                    if let Err(e) = std::thread::Builder::new()
                        .name("aggregator-state".into())
                        .spawn(save)
                    {
                        tracing::error!(error = %e, "no thread to save the aggregator's state: this checkpoint goes without it");
                    }
                    let _ = snapshot.send(());
                    // Dropped by the caller once it took the cut of the tables.
                    let _ = resume.recv();
                    continue;
                }
                Ok(Input::Finish(store)) => {
                    finish_into = store;
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if ticked.elapsed() >= TICK {
                let now = wall_ns();
                if let Some(windows) = &mut self.windows {
                    windows.tick(now, &mut self.pending);
                    self.metrics.buffered.set(windows.buffered() as i64);
                    self.metrics.devices.set(windows.devices() as i64);
                }
                self.alerts.tick(now, &mut self.pending);
                for (rule, (pending, firing)) in
                    self.alerts.rules().iter().zip(self.alerts.counts())
                {
                    self.metrics
                        .active
                        .with_label_values(&[&rule.name, "pending"])
                        .set(pending as i64);
                    self.metrics
                        .active
                        .with_label_values(&[&rule.name, "firing"])
                        .set(firing as i64);
                }
                ticked = Instant::now();
            }
            self.notify();
            let due = self
                .pending
                .oldest
                .is_some_and(|t| t.elapsed() >= self.config.batch_age);
            if due || self.pending.rows() >= self.config.batch_rows {
                self.write();
            }
        }
        self.notify();
        self.write();
        let store = finish_into.or_else(|| self.config.state.clone());
        if let Some(store) = &store {
            match crate::state::save_alerts(store.as_ref(), &self.alerts.save()) {
                Ok(()) => tracing::info!("alert state saved"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot save alert state: pending and firing alerts start afresh at the next start")
                }
            }
        }
        let (Some(windows), Some(config)) = (&mut self.windows, &self.config.windows) else {
            return;
        };
        let saved = store
            .as_ref()
            .map(|store| crate::state::save(store.as_ref(), &windows.save(), config));
        match saved {
            Some(Ok(())) => tracing::info!(devices = windows.devices(), "open windows saved"),
            Some(Err(e)) => {
                tracing::error!(error = %e, "cannot save open windows: closing them now (partial windows)");
                windows.close_all(&mut self.pending);
                self.write();
            }
            None => {
                windows.close_all(&mut self.pending);
                self.write();
            }
        }
    }

    /// A copy of open windows and alert state (a checkpoint; nothing is closed).
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            alerts: self.alerts.save(),
            windows: self
                .windows
                .as_ref()
                .zip(self.config.windows)
                .map(|(w, config)| (w.save(), config)),
        }
    }

    /// Hands new transitions to the output (at once, not with the table rows).
    fn notify(&mut self) {
        let fresh = &self.pending.alerts[self.pending.notified..];
        for event in fresh {
            self.metrics
                .transitions
                .with_label_values(&[&event.rule, event.state.as_str()])
                .inc();
            if let Some(output) = &self.output {
                output.emit(event);
            }
        }
        self.pending.notified = self.pending.alerts.len();
    }

    fn process(&mut self, batch: &RecordBatch, now: i64) {
        let columns = TelemetryColumns::new(batch);
        let mut extras = Vec::new();
        let mut late = 0;
        for row in 0..batch.num_rows() {
            let observation = columns.observation(row, &mut extras);
            if let Some(windows) = &mut self.windows
                && !windows.observe(&observation, now, &mut self.pending)
            {
                late += 1;
            }
            self.alerts.observe(&observation, &mut self.pending);
        }
        self.metrics.readings.inc_by(batch.num_rows() as u64 - late);
        self.metrics.late.inc_by(late);
    }

    fn write(&mut self) {
        self.notify();
        let pending = std::mem::take(&mut self.pending);
        for (table, rows) in [
            (MINUTE_TABLE, &pending.minute),
            (ROLLUP_TABLE, &pending.rollup),
        ] {
            if !rows.is_empty() {
                self.metrics
                    .closed
                    .with_label_values(&[table])
                    .inc_by(rows.len() as u64);
                self.append(table, window_batch(rows));
            }
        }
        if !pending.late.is_empty() {
            self.append(LATE_TABLE, late_batch(&pending.late));
        }
        if !pending.alerts.is_empty() {
            self.append(ALERTS_TABLE, alerts_batch(&pending.alerts));
        }
    }

    fn append(&self, table: &str, batch: RecordBatch) {
        let rows = batch.num_rows();
        if let Err(refused) = self.sink.append(table, batch) {
            tracing::error!(table, rows, reason = refused.reason, error = %refused, "rows not stored: counted in sluice_aggregator_refused_rows_total");
            self.metrics
                .refused
                .with_label_values(&[table, refused.reason])
                .inc_by(rows as u64);
        }
    }
}
