//! Open windows saved at a stop and taken back at the next start, so a restart neither
//! writes a window twice (a partial row before, another after) nor loses one.
//!
//! Three Arrow IPC files in the state directory: `devices.arrow` (device, latest event
//! time, watermark), `samples.arrow` (the readings of open windows, in the `telemetry`
//! schema) and `rollups.arrow` (rollups being built, in the window tables' schema). Each
//! is written to a temporary name, synced and renamed, `devices.arrow` last; they are
//! deleted once read, so state is never taken back twice. Files that cannot be read are
//! moved aside (`*.unreadable`) with an error in the log, and the windows start afresh.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use std::borrow::Cow;

use arrow::array::{AsArray, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use sluice_ingest::{Reading, RowBuilder, TelemetryBuilder};

use crate::alert::{Active, SavedAlert, SavedAlerts};
use crate::rows::{ClosedWindow, TelemetryColumns, window_batch, windows_from_batch};
use crate::window::{Sample, SavedDevice};

const DEVICES: &str = "devices.arrow";
const SAMPLES: &str = "samples.arrow";
const ROLLUPS: &str = "rollups.arrow";

static DEVICES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("max_event", DataType::Int64, false),
        Field::new("watermark", DataType::Int64, false),
    ]))
});

fn write(path: &Path, batch: &RecordBatch) -> std::io::Result<()> {
    let tmp = path.with_extension("arrow.tmp");
    let file = File::create(&tmp)?;
    let mut writer = FileWriter::try_new(&file, &batch.schema()).map_err(std::io::Error::other)?;
    writer.write(batch).map_err(std::io::Error::other)?;
    writer.finish().map_err(std::io::Error::other)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn read(path: &Path) -> Result<Vec<RecordBatch>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = FileReader::try_new(file, None).map_err(|e| e.to_string())?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// Writes the state; `rollup` (ns) gives the rollups' ends.
pub(crate) fn save(dir: &Path, saved: &[SavedDevice], rollup: i64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let devices = RecordBatch::try_new(
        DEVICES_SCHEMA.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                saved.iter().map(|d| &*d.device),
            )),
            Arc::new(Int64Array::from_iter_values(
                saved.iter().map(|d| d.max_event),
            )),
            Arc::new(Int64Array::from_iter_values(
                saved.iter().map(|d| d.watermark),
            )),
        ],
    )
    .map_err(std::io::Error::other)?;
    let mut samples = TelemetryBuilder::default();
    for d in saved {
        for sample in &d.samples {
            let known = sample.known.map(|v| (!v.is_nan()).then_some(v));
            let extra = sample.extra.iter().flatten();
            samples.append(
                &Reading {
                    device_id: Cow::Borrowed(&d.device),
                    ts_ns: sample.ts,
                    temperature: known[0],
                    humidity: known[1],
                    battery: known[2],
                    signal_strength: known[3],
                    firmware_version: None,
                    lat: None,
                    lng: None,
                    extra: extra.map(|(n, v)| (Cow::Borrowed(&**n), *v)).collect(),
                },
                sample.ts,
            );
        }
    }
    let rollups: Vec<ClosedWindow> = saved
        .iter()
        .filter_map(|d| {
            d.rollup.as_ref().map(|r| ClosedWindow {
                device: d.device.clone(),
                end: r.start + rollup,
                acc: r.clone(),
            })
        })
        .collect();
    write(&dir.join(SAMPLES), &samples.finish())?;
    write(&dir.join(ROLLUPS), &window_batch(&rollups))?;
    // Last: its presence says the other two are complete.
    write(&dir.join(DEVICES), &devices)
}

/// Reads and deletes saved window state; empty if there is none or it is unreadable.
pub(crate) fn take(dir: &Path) -> Vec<SavedDevice> {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    let loaded = take_files(dir, &[DEVICES, SAMPLES, ROLLUPS], "window", || {
        let mut saved = Vec::new();
        let mut index = std::collections::HashMap::new();
        for batch in read(&path(DEVICES))? {
            let names = batch.column(0).as_string::<i32>();
            let max_event = batch.column(1).as_primitive::<Int64Type>();
            let watermark = batch.column(2).as_primitive::<Int64Type>();
            for row in 0..batch.num_rows() {
                index.insert(names.value(row).to_owned(), saved.len());
                saved.push(SavedDevice {
                    device: names.value(row).into(),
                    max_event: max_event.value(row),
                    watermark: watermark.value(row),
                    samples: Vec::new(),
                    rollup: None,
                });
            }
        }
        let device_of = |name: &str, file: &str| {
            index
                .get(name)
                .copied()
                .ok_or_else(|| format!("{file}: device {name} is not in {DEVICES}"))
        };
        for batch in read(&path(SAMPLES))? {
            if batch.schema() != sluice_ingest::telemetry_schema() {
                return Err(format!("{SAMPLES} has another schema than this version's"));
            }
            let columns = TelemetryColumns::new(&batch);
            let mut extras = Vec::new();
            for row in 0..batch.num_rows() {
                let observation = columns.observation(row, &mut extras);
                let i = device_of(observation.device, SAMPLES)?;
                saved[i].samples.push(Sample::of(&observation));
            }
        }
        for batch in read(&path(ROLLUPS))? {
            if batch.schema() != crate::window_schema() {
                return Err(format!("{ROLLUPS} has another schema than this version's"));
            }
            for (device, acc) in windows_from_batch(&batch) {
                let i = device_of(&device, ROLLUPS)?;
                saved[i].rollup = Some(acc);
            }
        }
        Ok(saved)
    });
    if let Some(saved) = &loaded {
        tracing::info!(devices = saved.len(), "window state taken back");
    }
    loaded.unwrap_or_default()
}

/// Reads saved state with `load` when its files exist (the first of `names` is written
/// last, so its presence says the set is complete), then deletes them; files that
/// cannot be read are moved aside (`*.unreadable`) with an error in the log.
fn take_files<T>(
    dir: &Path,
    names: &[&str],
    what: &str,
    load: impl FnOnce() -> Result<T, String>,
) -> Option<T> {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    if !path(names[0]).exists() {
        return None;
    }
    match load() {
        Ok(loaded) => {
            for name in names {
                if let Err(e) = std::fs::remove_file(path(name)) {
                    tracing::error!(file = %path(name).display(), error = %e, "cannot remove {what} state");
                }
            }
            Some(loaded)
        }
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "{what} state unreadable: moved aside, starting afresh");
            for name in names {
                let _ = std::fs::rename(path(name), path(&format!("{name}.unreadable")));
            }
            None
        }
    }
}

const ALERTS: &str = "alerts.arrow";
const LAST_SEEN: &str = "last_seen.arrow";

static ALERTS_STATE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("rule", DataType::Utf8, false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("firing", DataType::Boolean, false),
        Field::new("since", DataType::Int64, false),
        Field::new("last", DataType::Int64, false),
    ]))
});

static LAST_SEEN_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("last_seen", DataType::Int64, false),
    ]))
});

/// Writes alert state: `last_seen.arrow`, then `alerts.arrow`.
pub(crate) fn save_alerts(dir: &Path, saved: &SavedAlerts) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let last_seen = RecordBatch::try_new(
        LAST_SEEN_SCHEMA.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                saved.last_seen.iter().map(|(d, _)| &**d),
            )),
            Arc::new(Int64Array::from_iter_values(
                saved.last_seen.iter().map(|(_, t)| *t),
            )),
        ],
    )
    .map_err(std::io::Error::other)?;
    let active = &saved.active;
    let alerts = RecordBatch::try_new(
        ALERTS_STATE_SCHEMA.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                active.iter().map(|a| &*a.rule),
            )),
            Arc::new(StringArray::from_iter_values(
                active.iter().map(|a| &*a.device),
            )),
            Arc::new(BooleanArray::from_iter(
                active.iter().map(|a| Some(a.active.firing)),
            )),
            Arc::new(Int64Array::from_iter_values(
                active.iter().map(|a| a.active.since),
            )),
            Arc::new(Int64Array::from_iter_values(
                active.iter().map(|a| a.active.last),
            )),
        ],
    )
    .map_err(std::io::Error::other)?;
    write(&dir.join(LAST_SEEN), &last_seen)?;
    write(&dir.join(ALERTS), &alerts)
}

/// Reads and deletes saved alert state; empty if there is none or it is unreadable.
pub(crate) fn take_alerts(dir: &Path) -> SavedAlerts {
    take_files(dir, &[ALERTS, LAST_SEEN], "alert", || {
        let mut saved = SavedAlerts::default();
        for batch in read(&dir.join(ALERTS))? {
            if batch.schema() != *ALERTS_STATE_SCHEMA {
                return Err(format!("{ALERTS} has another schema than this version's"));
            }
            let rule = batch.column(0).as_string::<i32>();
            let device = batch.column(1).as_string::<i32>();
            let firing = batch.column(2).as_boolean();
            let since = batch.column(3).as_primitive::<Int64Type>();
            let last = batch.column(4).as_primitive::<Int64Type>();
            for row in 0..batch.num_rows() {
                saved.active.push(SavedAlert {
                    rule: rule.value(row).into(),
                    device: device.value(row).into(),
                    active: Active {
                        firing: firing.value(row),
                        since: since.value(row),
                        last: last.value(row),
                    },
                });
            }
        }
        for batch in read(&dir.join(LAST_SEEN))? {
            if batch.schema() != *LAST_SEEN_SCHEMA {
                return Err(format!(
                    "{LAST_SEEN} has another schema than this version's"
                ));
            }
            let device = batch.column(0).as_string::<i32>();
            let seen = batch.column(1).as_primitive::<Int64Type>();
            for row in 0..batch.num_rows() {
                saved
                    .last_seen
                    .push((device.value(row).into(), seen.value(row)));
            }
        }
        tracing::info!(active = saved.active.len(), "alert state taken back");
        Ok(saved)
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WindowAcc;

    #[test]
    fn saved_state_comes_back_once() {
        let dir = std::env::temp_dir().join(format!("sluice-state-{}", std::process::id()));
        let mut rollup = WindowAcc::new(0);
        rollup.readings = 2;
        rollup.known[0].add(1.5, 10);
        rollup.add_extra("co2", 400.0, 10);
        let saved = vec![
            SavedDevice {
                device: "a".into(),
                max_event: 100,
                watermark: 40,
                samples: vec![
                    Sample {
                        ts: 90,
                        known: [1.0, f64::NAN, 3.0, f64::NAN],
                        extra: Some(vec![("co2".into(), 410.0)].into()),
                    },
                    Sample {
                        ts: 95,
                        known: [f64::NAN; 4],
                        extra: None,
                    },
                ],
                rollup: Some(rollup),
            },
            SavedDevice {
                device: "b".into(),
                max_event: 7,
                watermark: 1,
                samples: vec![],
                rollup: None,
            },
        ];
        save(&dir, &saved, 3600).unwrap();
        let back = take(&dir);
        // NaN != NaN: compare through the debug form.
        assert_eq!(format!("{back:?}"), format!("{saved:?}"));
        assert!(take(&dir).is_empty(), "taken once");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unreadable_state_is_moved_aside() {
        let dir = std::env::temp_dir().join(format!("sluice-bad-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(DEVICES), b"not arrow").unwrap();
        assert!(take(&dir).is_empty());
        assert!(!dir.join(DEVICES).exists());
        assert!(dir.join("devices.arrow.unreadable").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn alert_state_comes_back_once() {
        let dir = std::env::temp_dir().join(format!("sluice-alert-state-{}", std::process::id()));
        let saved = SavedAlerts {
            active: vec![SavedAlert {
                rule: "overheat".into(),
                device: "a".into(),
                active: Active {
                    firing: true,
                    since: 5,
                    last: 9,
                },
            }],
            last_seen: vec![("a".into(), 9), ("b".into(), 3)],
        };
        save_alerts(&dir, &saved).unwrap();
        assert_eq!(take_alerts(&dir), saved);
        assert_eq!(take_alerts(&dir), SavedAlerts::default(), "taken once");
        std::fs::write(dir.join(ALERTS), b"garbage").unwrap();
        assert_eq!(take_alerts(&dir), SavedAlerts::default());
        assert!(dir.join("alerts.arrow.unreadable").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
