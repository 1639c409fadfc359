//! Open windows saved at a stop and taken back at the next start, so a restart neither
//! writes a window twice (a partial row before, another after) nor loses one.
//!
//! The state is Arrow batches, kept by a [`StateStore`] (storage, in the binary: the
//! aggregator writes no file itself). Windows are the set `windows`: `devices` (device,
//! latest event time, watermark), `samples` (the readings of open windows of devices that
//! send slowly, in the `telemetry` schema), `open` (the accumulators of open windows of
//! devices that send fast) and `rollups` (rollups being built), both in the window
//! tables' schema, `devices` saved last (a set saved before `open` existed has none);
//! alerts are the set `alerts`: `last_seen`, then `alerts`. A set is removed once taken
//! back, so state is never taken back twice; a set that cannot be read
//! is moved aside with an error in the log, and the windows or alerts start afresh.

use std::sync::{Arc, LazyLock};

use std::borrow::Cow;

use arrow::array::{AsArray, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use sluice_ingest::{Reading, RowBuilder, TelemetryBuilder};

use crate::WindowAcc;
use crate::alert::{Active, SavedAlert, SavedAlerts};
use crate::rows::{ClosedWindow, TelemetryColumns, window_batch, windows_from_batch};
use crate::window::{Sample, SavedDevice, WindowConfig, nanos};

const DEVICES: &str = "devices.arrow";
const SAMPLES: &str = "samples.arrow";
const ROLLUPS: &str = "rollups.arrow";
const OPEN: &str = "open.arrow";

static DEVICES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("max_event", DataType::Int64, false),
        Field::new("watermark", DataType::Int64, false),
    ]))
});

/// One file of a state set: its name, its schema and its batches, made as they are
/// written.
pub type StateFile<'a> = (
    &'a str,
    SchemaRef,
    Box<dyn Iterator<Item = RecordBatch> + 'a>,
);

/// Where state is kept across a restart: named sets of named Arrow batches.
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Saves `files` as the set `set`, each whole or not at all, in order (the last one
    /// marks the set complete).
    fn save(&self, set: &str, files: Vec<StateFile<'_>>) -> std::io::Result<()>;
    /// The batches of each of `names` (in that order); `None` if the set was not saved
    /// (its marker, the first of `names`, is absent); an error if it cannot be read.
    fn load(&self, set: &str, names: &[&str]) -> Result<Option<Vec<Vec<RecordBatch>>>, String>;
    /// Forgets the set once taken back; `aside`: keeps it apart for a look.
    fn remove(&self, set: &str, names: &[&str], aside: bool);
}

const WINDOWS_SET: &str = "windows";
const ALERTS_SET: &str = "alerts";

/// Devices per batch of a saved state file: a million devices' state is built and
/// written a slice at a time, never whole beside the snapshot it comes from.
const SAVE_CHUNK: usize = 65_536;

/// Devices a state file's row is looked for after the one of the row before, before a
/// lookup in an index of every device.
const LOOK_AHEAD: usize = 64;

/// Writes the state of windows of `config`'s sizes.
pub(crate) fn save(
    store: &dyn StateStore,
    saved: &[SavedDevice],
    config: &WindowConfig,
) -> std::io::Result<()> {
    let (size, rollup) = (nanos(config.size), nanos(config.rollup));
    let chunks = move || saved.chunks(SAVE_CHUNK);
    // `devices` last: its presence says the others are complete.
    store.save(
        WINDOWS_SET,
        vec![
            (
                SAMPLES,
                sluice_ingest::telemetry_schema(),
                Box::new(chunks().map(samples_batch)),
            ),
            (
                ROLLUPS,
                crate::window_schema(),
                Box::new(
                    chunks()
                        .map(move |chunk| windows_batch(chunk, rollup, |d| d.rollup.as_slice())),
                ),
            ),
            (
                OPEN,
                crate::window_schema(),
                Box::new(chunks().map(move |chunk| windows_batch(chunk, size, |d| &d.open))),
            ),
            (
                DEVICES,
                DEVICES_SCHEMA.clone(),
                Box::new(chunks().map(devices_batch)),
            ),
        ],
    )
}

/// The windows `of` each device of `saved` gives, each `length` ns long, as rows of the
/// window tables.
fn windows_batch(
    saved: &[SavedDevice],
    length: i64,
    of: impl Fn(&SavedDevice) -> &[WindowAcc],
) -> RecordBatch {
    let rows: Vec<ClosedWindow> = saved
        .iter()
        .flat_map(|d| {
            of(d).iter().map(|w| ClosedWindow {
                device: d.device.as_str().into(),
                end: w.start + length,
                acc: w.clone(),
            })
        })
        .collect();
    window_batch(&rows)
}

fn devices_batch(saved: &[SavedDevice]) -> RecordBatch {
    RecordBatch::try_new(
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
    .expect("columns follow the schema")
}

/// The buffered readings of `saved`, in the `telemetry` schema.
fn samples_batch(saved: &[SavedDevice]) -> RecordBatch {
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
    samples.finish()
}

/// Reads and deletes saved window state; empty if there is none or it is unreadable.
pub(crate) fn take(store: &dyn StateStore) -> Vec<SavedDevice> {
    let names = [DEVICES, SAMPLES, ROLLUPS];
    let loaded = take_set(store, WINDOWS_SET, &names, &[OPEN], "window", |files| {
        let devices: usize = files[0].iter().map(|b| b.num_rows()).sum();
        let mut saved = Vec::with_capacity(devices);
        for batch in &files[0] {
            if batch.schema() != *DEVICES_SCHEMA {
                return Err(format!("{DEVICES} has another schema than this version's"));
            }
            let names = batch.column(0).as_string::<i32>();
            let max_event = batch.column(1).as_primitive::<Int64Type>();
            let watermark = batch.column(2).as_primitive::<Int64Type>();
            for row in 0..batch.num_rows() {
                saved.push(SavedDevice {
                    device: names.value(row).into(),
                    max_event: max_event.value(row),
                    watermark: watermark.value(row),
                    samples: Vec::new(),
                    open: Vec::new(),
                    rollup: None,
                });
            }
        }
        // Samples and rollups were saved device by device, in the order of `DEVICES`: a
        // row's device is the one of the row before or a few after it (devices without
        // rows in the file are skipped). A set written in another order is looked up.
        let mut index: Option<std::collections::HashMap<&str, usize, _>> = None;
        let (mut last, mut in_file) = (0, "");
        let mut device_of =
            |saved: &[SavedDevice], name: &str, file: &'static str| -> Result<usize, String> {
                if file != in_file {
                    (last, in_file) = (0, file);
                }
                if let Some(i) = (last..saved.len())
                    .take(LOOK_AHEAD)
                    .find(|&i| saved[i].device.as_str() == name)
                {
                    last = i;
                    return Ok(i);
                }
                let index = index.get_or_insert_with(|| {
                    let mut index = std::collections::HashMap::with_capacity_and_hasher(
                        devices,
                        foldhash::fast::RandomState::default(),
                    );
                    let names = files[0].iter().flat_map(|b| b.column(0).as_string::<i32>());
                    index.extend(names.flatten().enumerate().map(|(i, name)| (name, i)));
                    index
                });
                let i = index
                    .get(name)
                    .copied()
                    .ok_or_else(|| format!("{file}: device {name} is not in {DEVICES}"))?;
                last = i;
                Ok(i)
            };
        for batch in &files[1] {
            if batch.schema() != sluice_ingest::telemetry_schema() {
                return Err(format!("{SAMPLES} has another schema than this version's"));
            }
            let columns = TelemetryColumns::new(batch);
            let mut extras = Vec::new();
            for row in 0..batch.num_rows() {
                let observation = columns.observation(row, &mut extras);
                let i = device_of(&saved, observation.device, SAMPLES)?;
                saved[i].samples.push(Sample::of(&observation));
            }
        }
        for (device, acc) in windows_of(&files[2], ROLLUPS)? {
            let i = device_of(&saved, &device, ROLLUPS)?;
            saved[i].rollup = Some(acc);
        }
        let open = files.get(3).map_or(&[][..], Vec::as_slice);
        for (device, acc) in windows_of(open, OPEN)? {
            let i = device_of(&saved, &device, OPEN)?;
            saved[i].open.push(acc);
        }
        Ok(saved)
    });
    if let Some(saved) = &loaded {
        tracing::info!(devices = saved.len(), "window state taken back");
    }
    loaded.unwrap_or_default()
}

/// The rows of the state file `file` (in the window tables' schema) as windows.
fn windows_of(
    batches: &[RecordBatch],
    file: &str,
) -> Result<impl Iterator<Item = (Box<str>, WindowAcc)>, String> {
    if batches.iter().any(|b| b.schema() != crate::window_schema()) {
        return Err(format!("{file} has another schema than this version's"));
    }
    Ok(batches.iter().flat_map(windows_from_batch))
}

/// Loads the set `set` (the files `names`, then those of `optional` that were saved:
/// none where a file was not) and turns it into state with `load`, then removes it; a set
/// that cannot be read or used is moved aside, with an error in the log.
fn take_set<T>(
    store: &dyn StateStore,
    set: &str,
    names: &[&str],
    optional: &[&str],
    what: &str,
    load: impl FnOnce(&[Vec<RecordBatch>]) -> Result<T, String>,
) -> Option<T> {
    let loaded = match store.load(set, names) {
        Ok(None) => return None,
        Ok(Some(mut files)) => optional
            .iter()
            .try_for_each(|name| {
                let file = store.load(set, &[name])?;
                files.push(file.into_iter().flatten().flatten().collect());
                Ok(())
            })
            .and_then(|()| load(&files)),
        Err(e) => Err(e),
    };
    let all: Vec<&str> = names.iter().chain(optional).copied().collect();
    match loaded {
        Ok(state) => {
            store.remove(set, &all, false);
            Some(state)
        }
        Err(e) => {
            tracing::error!(set, error = %e, "{what} state unreadable: moved aside, starting afresh");
            store.remove(set, &all, true);
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
pub(crate) fn save_alerts(store: &dyn StateStore, saved: &SavedAlerts) -> std::io::Result<()> {
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
    let file = |name, batch: RecordBatch| -> StateFile<'_> {
        (name, batch.schema(), Box::new(std::iter::once(batch)))
    };
    store.save(
        ALERTS_SET,
        vec![file(LAST_SEEN, last_seen), file(ALERTS, alerts)],
    )
}

/// Reads and deletes saved alert state; empty if there is none or it is unreadable.
pub(crate) fn take_alerts(store: &dyn StateStore) -> SavedAlerts {
    take_set(
        store,
        ALERTS_SET,
        &[ALERTS, LAST_SEEN],
        &[],
        "alert",
        |files| {
            let mut saved = SavedAlerts::default();
            for batch in &files[0] {
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
            for batch in &files[1] {
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
        },
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// Sets in memory; `unreadable` makes every load fail.
    #[derive(Debug, Default)]
    struct Memory {
        files: Mutex<HashMap<(String, String), Vec<RecordBatch>>>,
        aside: Mutex<Vec<String>>,
        unreadable: bool,
    }

    impl StateStore for Memory {
        fn save(&self, set: &str, files: Vec<StateFile<'_>>) -> std::io::Result<()> {
            let mut held = self.files.lock().unwrap();
            for (name, _, batches) in files {
                held.insert((set.into(), name.into()), batches.collect());
            }
            Ok(())
        }
        fn load(&self, set: &str, names: &[&str]) -> Result<Option<Vec<Vec<RecordBatch>>>, String> {
            let held = self.files.lock().unwrap();
            if !held.contains_key(&(set.into(), names[0].into())) {
                return Ok(None);
            }
            if self.unreadable {
                return Err(format!("{}: not arrow", names[0]));
            }
            Ok(Some(
                names
                    .iter()
                    .map(|n| {
                        held.get(&(set.into(), (*n).into()))
                            .cloned()
                            .unwrap_or_default()
                    })
                    .collect(),
            ))
        }
        fn remove(&self, set: &str, names: &[&str], aside: bool) {
            let mut held = self.files.lock().unwrap();
            for name in names {
                if held.remove(&(set.into(), (*name).into())).is_some() && aside {
                    self.aside.lock().unwrap().push(format!("{set}/{name}"));
                }
            }
        }
    }

    #[test]
    fn saved_state_comes_back_once() {
        let store = Memory::default();
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
                open: vec![],
                rollup: Some(rollup.clone()),
            },
            SavedDevice {
                device: "b".into(),
                max_event: 7,
                watermark: 1,
                samples: vec![],
                open: vec![],
                rollup: None,
            },
            SavedDevice {
                device: "c".into(),
                max_event: 130 * SEC,
                watermark: 70 * SEC,
                samples: vec![],
                open: vec![open(60 * SEC, 21.5), open(120 * SEC, -3.0)],
                rollup: Some(rollup),
            },
        ];
        save(&store, &saved, &WindowConfig::default()).unwrap();
        let back = take(&store);
        // NaN != NaN: compare through the debug form.
        assert_eq!(format!("{back:?}"), format!("{saved:?}"));
        assert!(take(&store).is_empty(), "taken once");
        assert!(store.aside.lock().unwrap().is_empty());
    }

    const SEC: i64 = 1_000_000_000;

    /// An open minute window starting at `start` with one reading.
    fn open(start: i64, temperature: f64) -> WindowAcc {
        let mut acc = WindowAcc::new(start);
        acc.add_reading(
            start + SEC,
            [Some(temperature), None, Some(80.0), None],
            [("co2", 415.0)],
        );
        acc
    }

    #[test]
    fn state_larger_than_a_chunk_is_written_in_batches_and_comes_back_whole() {
        let store = Memory::default();
        let saved: Vec<SavedDevice> = (0..SAVE_CHUNK + 10)
            .map(|i| SavedDevice {
                device: format!("device-{i}").into(),
                max_event: i as i64,
                watermark: 0,
                samples: (i % 3 == 0)
                    .then_some(Sample {
                        ts: 90 * SEC,
                        known: [i as f64, f64::NAN, 3.0, f64::NAN],
                        extra: None,
                    })
                    .into_iter()
                    .collect(),
                open: if i % 3 == 1 {
                    vec![open(60 * SEC, i as f64)]
                } else {
                    vec![]
                },
                rollup: (i % 5 == 0).then(|| open(0, -(i as f64))),
            })
            .collect();
        save(&store, &saved, &WindowConfig::default()).unwrap();
        let batches = |name: &str| {
            store.files.lock().unwrap()[&(WINDOWS_SET.to_owned(), name.to_owned())].len()
        };
        for name in [DEVICES, SAMPLES, ROLLUPS, OPEN] {
            assert_eq!(batches(name), 2, "{name}");
        }
        let back = take(&store);
        assert_eq!(back.len(), saved.len());
        // NaN != NaN: compare through the debug form.
        assert_eq!(format!("{back:?}"), format!("{saved:?}"));
    }

    #[test]
    fn a_set_whose_rows_are_in_another_order_than_its_devices_comes_back_whole() {
        let store = Memory::default();
        let saved: Vec<SavedDevice> = (0..SAVE_CHUNK + 100)
            .map(|i| SavedDevice {
                device: format!("device-{i}").into(),
                max_event: i as i64,
                watermark: 0,
                samples: vec![Sample {
                    ts: i as i64,
                    known: [1.0, 2.0, 3.0, 4.0],
                    extra: None,
                }],
                open: vec![],
                rollup: (i % 2 == 0).then(|| open(0, i as f64)),
            })
            .collect();
        save(&store, &saved, &WindowConfig::default()).unwrap();
        // The devices' two batches swapped: every row of the other files is then far
        // from where its device is (beyond the look-ahead), found through the index.
        store
            .files
            .lock()
            .unwrap()
            .get_mut(&(WINDOWS_SET.to_owned(), DEVICES.to_owned()))
            .unwrap()
            .reverse();
        let mut back = take(&store);
        assert_eq!(back[0].device, format!("device-{SAVE_CHUNK}"));
        back.sort_by_key(|d| d.max_event);
        assert_eq!(back, saved);
        assert!(store.aside.lock().unwrap().is_empty());
    }

    #[test]
    fn a_set_saved_before_open_windows_were_kept_comes_back() {
        let store = Memory::default();
        let saved = vec![SavedDevice {
            device: "a".into(),
            max_event: 100,
            watermark: 40,
            samples: vec![Sample {
                ts: 90,
                known: [1.0, 2.0, 3.0, 4.0],
                extra: None,
            }],
            open: vec![],
            rollup: None,
        }];
        save(&store, &saved, &WindowConfig::default()).unwrap();
        // As the previous version wrote it: no `open.arrow`.
        store
            .files
            .lock()
            .unwrap()
            .remove(&(WINDOWS_SET.to_owned(), OPEN.to_owned()));
        assert_eq!(take(&store), saved);
        assert!(take(&store).is_empty(), "taken once");
        assert!(store.aside.lock().unwrap().is_empty());
    }

    #[test]
    fn unreadable_state_is_moved_aside() {
        let store = Memory {
            unreadable: true,
            ..Memory::default()
        };
        save(&store, &[], &WindowConfig::default()).unwrap();
        assert!(take(&store).is_empty());
        assert_eq!(
            *store.aside.lock().unwrap(),
            [
                "windows/devices.arrow",
                "windows/samples.arrow",
                "windows/rollups.arrow",
                "windows/open.arrow"
            ]
        );
        assert!(take(&store).is_empty(), "not taken back later");
    }

    #[test]
    fn state_of_another_schema_is_moved_aside() {
        let store = Memory::default();
        save_alerts(&store, &SavedAlerts::default()).unwrap();
        // Alert state where window state should be: readable, but not this version's.
        let alerts = store.files.lock().unwrap()[&("alerts".to_owned(), ALERTS.to_owned())].clone();
        let file = |name| -> StateFile<'_> {
            (
                name,
                alerts[0].schema(),
                Box::new(alerts.clone().into_iter()),
            )
        };
        store
            .save(
                WINDOWS_SET,
                vec![file(SAMPLES), file(ROLLUPS), file(DEVICES)],
            )
            .unwrap();
        assert!(take(&store).is_empty());
        assert_eq!(store.aside.lock().unwrap().len(), 3);
    }

    #[test]
    fn alert_state_comes_back_once() {
        let store = Memory::default();
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
        save_alerts(&store, &saved).unwrap();
        assert_eq!(take_alerts(&store), saved);
        assert_eq!(take_alerts(&store), SavedAlerts::default(), "taken once");
    }
}
