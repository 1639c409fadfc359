//! The dead-letter writer: one thread that takes every notification that could not be
//! delivered and appends them to `alert_dead_letters` in batches, so that a webhook
//! outage costs one append per batch rather than one per notification, and nobody who
//! makes a dead letter waits for storage.

use std::sync::{Arc, LazyLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::{RecordBatch, StringArray, TimestampNanosecondArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use sluice_aggregator::TableSink;

use crate::DeliveryMetrics;

/// The table of notifications that could not be delivered.
pub const DEAD_LETTER_TABLE: &str = "alert_dead_letters";

/// Dead letters waiting for the writer; beyond, they are counted as lost
/// (`outcome="lost"`) and logged.
const QUEUE: usize = 100_000;
/// A batch is appended at this many rows…
const BATCH_ROWS: usize = 4096;
/// …or once its first row has waited this long.
const BATCH_AGE: Duration = Duration::from_millis(200);

static DEAD_LETTER_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("ts", ts, false),
        Field::new("channel", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("attempts", DataType::UInt32, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("payload", DataType::Utf8, false),
    ]))
});

/// Schema of `alert_dead_letters`.
pub fn dead_letter_schema() -> SchemaRef {
    DEAD_LETTER_SCHEMA.clone()
}

/// The table notify writes, and how its files are laid out.
pub fn tables() -> Vec<sluice_ingest::TableLayout> {
    vec![sluice_ingest::TableLayout {
        name: DEAD_LETTER_TABLE,
        schema: dead_letter_schema(),
        time_column: "ts",
        sort_columns: &["ts"],
        bloom_filter_columns: &[],
    }]
}

/// One row of `alert_dead_letters`.
pub(crate) struct Letter {
    pub(crate) ts: i64,
    pub(crate) channel: Arc<str>,
    pub(crate) rule: Arc<str>,
    pub(crate) device: Box<str>,
    pub(crate) state: &'static str,
    pub(crate) attempts: u32,
    pub(crate) error: String,
    pub(crate) payload: Arc<str>,
}

enum Msg {
    Letter(Letter),
    /// Store what is held and end.
    Close,
}

pub(crate) struct DeadLetters {
    tx: Sender<Msg>,
    metrics: DeliveryMetrics,
}

impl DeadLetters {
    pub(crate) fn start(
        sink: Arc<dyn TableSink>,
        metrics: DeliveryMetrics,
    ) -> std::io::Result<(DeadLetters, JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let writer_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("alerts-dead-letters".into())
            .spawn(move || write(rx, sink.as_ref(), &writer_metrics))?;
        Ok((DeadLetters { tx, metrics }, thread))
    }

    /// Queues a dead letter; never waits.
    pub(crate) fn send(&self, letter: Letter) {
        match self.tx.try_send(Msg::Letter(letter)) {
            Ok(())
            | Err(TrySendError::Full(Msg::Close) | TrySendError::Disconnected(Msg::Close)) => {}
            Err(
                TrySendError::Full(Msg::Letter(letter))
                | TrySendError::Disconnected(Msg::Letter(letter)),
            ) => {
                self.metrics.outcome(&letter.channel, "lost");
                tracing::error!(channel = %letter.channel, rule = %letter.rule, device = %letter.device, "alert notification not delivered and not kept: {QUEUE} dead letters are waiting for storage");
            }
        }
    }

    /// Ends the writer once it has stored what was queued before; waits for room.
    pub(crate) fn close(&self) {
        let _ = self.tx.send(Msg::Close);
    }
}

/// The writer thread: until every sender is gone.
fn write(rx: Receiver<Msg>, sink: &dyn TableSink, metrics: &DeliveryMetrics) {
    let mut letters = Vec::new();
    let mut closed = false;
    while !closed {
        let first = match rx.recv() {
            Ok(Msg::Letter(letter)) => letter,
            Ok(Msg::Close) | Err(_) => return,
        };
        let due = Instant::now() + BATCH_AGE;
        letters.push(first);
        while letters.len() < BATCH_ROWS {
            match rx.recv_deadline(due) {
                Ok(Msg::Letter(letter)) => letters.push(letter),
                Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
        let rows = letters.len();
        let stored = batch(&letters)
            .map_err(|e| format!("cannot build the rows (a bug): {e}"))
            .and_then(|b| sink.append(DEAD_LETTER_TABLE, b).map_err(|e| e.to_string()));
        if let Err(error) = stored {
            for letter in &letters {
                metrics.outcome(&letter.channel, "lost");
            }
            tracing::error!(rows, error, "dead letters not stored");
        }
        letters.clear();
    }
}

fn batch(letters: &[Letter]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let strings = |f: fn(&Letter) -> &str| StringArray::from_iter_values(letters.iter().map(f));
    RecordBatch::try_new(
        DEAD_LETTER_SCHEMA.clone(),
        vec![
            Arc::new(
                TimestampNanosecondArray::from_iter_values(letters.iter().map(|l| l.ts))
                    .with_timezone("UTC"),
            ),
            Arc::new(strings(|l| &l.channel)),
            Arc::new(strings(|l| &l.rule)),
            Arc::new(strings(|l| &l.device)),
            Arc::new(strings(|l| l.state)),
            Arc::new(UInt32Array::from_iter_values(
                letters.iter().map(|l| l.attempts),
            )),
            Arc::new(strings(|l| &l.error)),
            Arc::new(strings(|l| &l.payload)),
        ],
    )
}
