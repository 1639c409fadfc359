//! Open windows saved at a stop and taken back at the next start, so a restart neither
//! writes a window twice (a partial row before, another after) nor loses one.
//!
//! Three Arrow IPC files in the state directory: `devices.arrow` (device, latest event
//! time, watermark), `windows.arrow` and `rollups.arrow` (open windows in the window
//! tables' schema). Each is written to a temporary name, synced and renamed; they are
//! deleted once read, so state is never taken back twice. A file that cannot be read is
//! moved aside (`*.unreadable`) with an error in the log, and the windows start afresh.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::array::{AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;

use crate::rows::{ClosedWindow, window_batch, windows_from_batch};
use crate::window::SavedDevice;

const DEVICES: &str = "devices.arrow";
const WINDOWS: &str = "windows.arrow";
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

/// Writes the state; `size` and `rollup` (ns) give the windows' ends.
pub(crate) fn save(
    dir: &Path,
    saved: &[SavedDevice],
    size: i64,
    rollup: i64,
) -> std::io::Result<()> {
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
    let windows = |want_rollup: bool, length: i64| -> Vec<ClosedWindow> {
        saved
            .iter()
            .flat_map(|d| {
                d.windows
                    .iter()
                    .filter(move |(rollup, _)| *rollup == want_rollup)
                    .map(move |(_, w)| ClosedWindow {
                        device: d.device.clone(),
                        end: w.start + length,
                        acc: w.clone(),
                    })
            })
            .collect()
    };
    write(&dir.join(WINDOWS), &window_batch(&windows(false, size)))?;
    write(&dir.join(ROLLUPS), &window_batch(&windows(true, rollup)))?;
    // Last: its presence says the other two are complete.
    write(&dir.join(DEVICES), &devices)
}

/// Reads and deletes saved state; empty if there is none or it is unreadable.
pub(crate) fn take(dir: &Path) -> Vec<SavedDevice> {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    if !path(DEVICES).exists() {
        return Vec::new();
    }
    let loaded = (|| -> Result<Vec<SavedDevice>, String> {
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
                    windows: Vec::new(),
                });
            }
        }
        for (file, rollup) in [(WINDOWS, false), (ROLLUPS, true)] {
            for batch in read(&path(file))? {
                if batch.schema() != crate::window_schema() {
                    return Err(format!("{file} has another schema than this version's"));
                }
                for (device, acc) in windows_from_batch(&batch) {
                    let i = *index
                        .get(&*device)
                        .ok_or_else(|| format!("{file}: device {device} is not in {DEVICES}"))?;
                    saved[i].windows.push((rollup, acc));
                }
            }
        }
        Ok(saved)
    })();
    match loaded {
        Ok(saved) => {
            for name in [DEVICES, WINDOWS, ROLLUPS] {
                if let Err(e) = std::fs::remove_file(path(name)) {
                    tracing::error!(file = %path(name).display(), error = %e, "cannot remove window state");
                }
            }
            tracing::info!(devices = saved.len(), "window state taken back");
            saved
        }
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "window state unreadable: moved aside, windows start afresh");
            for name in [DEVICES, WINDOWS, ROLLUPS] {
                let _ = std::fs::rename(path(name), path(&format!("{name}.unreadable")));
            }
            Vec::new()
        }
    }
}
