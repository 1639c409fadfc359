//! State kept across a restart by the stages that hold it in memory (the aggregator's
//! open windows and alert state): named sets of Arrow IPC files under one directory.
//!
//! A set goes through storage's one publish routine (as Parquet files do): written to
//! temporary names and fsynced, renamed into place in the order given, then the directory
//! fsynced; the caller names last the file whose presence says the set is complete. Taking a set back
//! reads every file; the caller removes the set once it used it, or moves it aside
//! (`*.unreadable`) when it could not.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;

use crate::paced::Paced;
use crate::parquet_files::{TMP_PREFIX, publish};

const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// The directory holding every set (`<data_dir>/state`).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    /// The sets a stop saved before checkpoints existed: `<data_dir>/state`.
    pub fn legacy(data_dir: &Path) -> Self {
        StateDir::new(data_dir.join("state"))
    }

    /// The sets of checkpoint `id`: `<data_dir>/state/checkpoint-<id>`.
    pub fn of_checkpoint(data_dir: &Path, id: u64) -> Self {
        StateDir::new(
            data_dir
                .join("state")
                .join(format!("{CHECKPOINT_PREFIX}{id:020}")),
        )
    }

    /// Whether anything was saved here.
    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    /// Removes every set (what a checkpoint that never committed left).
    pub fn clear(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes the sets of every checkpoint but `keep` (failures are logged: the next
    /// commit tries again).
    pub fn prune_checkpoints(data_dir: &Path, keep: u64) {
        let keep = StateDir::of_checkpoint(data_dir, keep).root;
        let Ok(entries) = fs::read_dir(data_dir.join("state")) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(CHECKPOINT_PREFIX)
                && path != keep
                && let Err(e) = fs::remove_dir_all(&path)
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an old checkpoint's state");
            }
        }
    }

    fn dir(&self, set: &str) -> PathBuf {
        self.root.join(set)
    }

    /// Publishes `files` as the set `set`, in order, through storage's one publish
    /// routine: either every file is in place or none (a crash in between leaves a
    /// prefix of the set, without its marker, which is never taken back). Temporary files
    /// a crash left are removed first.
    ///
    /// Each file is its name, schema and batches, written as the iterator makes them (a
    /// set for a million devices need never be whole in memory).
    pub fn save(&self, set: &str, mut files: Vec<StateFile<'_>>) -> io::Result<()> {
        let dir = self.dir(set);
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
        let staged: Vec<(PathBuf, PathBuf)> = files
            .iter()
            .map(|(name, ..)| (dir.join(format!("{TMP_PREFIX}{name}")), dir.join(name)))
            .collect();
        publish(&staged, |i, tmp| {
            let (_, schema, batches) = &mut files[i];
            write_ipc(tmp, schema, batches)
        })
    }

    /// The batches of every file of `set`, in the order of `names`; `None` if the first
    /// of `names` (the marker) is absent; an error if a file cannot be read.
    pub fn load(&self, set: &str, names: &[&str]) -> Result<Option<Vec<Vec<RecordBatch>>>, String> {
        let dir = self.dir(set);
        if names
            .first()
            .is_none_or(|marker| !dir.join(marker).exists())
        {
            return Ok(None);
        }
        names
            .iter()
            .map(|name| read_ipc(&dir.join(name)).map_err(|e| format!("{name}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Removes the files of `set` once taken back, or, with `aside`, renames them to
    /// `<name>.unreadable` for a look. Failures are logged: the set is then taken back
    /// again at the next start, which a caller must tolerate.
    pub fn remove(&self, set: &str, names: &[&str], aside: bool) {
        let dir = self.dir(set);
        for name in names {
            let path = dir.join(name);
            let done = if aside {
                fs::rename(&path, dir.join(format!("{name}.unreadable")))
            } else {
                fs::remove_file(&path)
            };
            match done {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot remove a state file")
                }
            }
        }
        if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the state directory");
        }
    }
}

/// One file of a state set: name, schema, and its batches as they are made.
pub type StateFile<'a> = (
    &'a str,
    SchemaRef,
    Box<dyn Iterator<Item = RecordBatch> + 'a>,
);

fn write_ipc(
    path: &Path,
    schema: &SchemaRef,
    batches: &mut dyn Iterator<Item = RecordBatch>,
) -> io::Result<()> {
    let paced = Paced::new(File::create(path)?, Some(BYTES_PER_SECOND));
    let mut writer = FileWriter::try_new(paced, schema).map_err(io::Error::other)?;
    for batch in batches {
        writer.write(&batch).map_err(io::Error::other)?;
    }
    writer.finish().map_err(io::Error::other)?;
    let paced = writer.into_inner().map_err(io::Error::other)?;
    paced.into_inner().sync_all()
}

/// How fast a state file is written at most: a set (~220 MB for a million devices,
/// saved at every checkpoint, on its own thread) takes ~3.5 s and leaves the disk idle
/// between its steps.
const BYTES_PER_SECOND: usize = 64 << 20;

fn read_ipc(path: &Path) -> Result<Vec<RecordBatch>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = FileReader::try_new(file, None).map_err(|e| e.to_string())?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap()
    }

    /// Files of the batches listed.
    fn files<'a>(files: &[(&'a str, Vec<RecordBatch>)]) -> Vec<StateFile<'a>> {
        files
            .iter()
            .map(|(name, batches)| {
                let schema = batch(&[]).schema();
                let batches: Box<dyn Iterator<Item = RecordBatch>> =
                    Box::new(batches.clone().into_iter());
                (*name, schema, batches)
            })
            .collect()
    }

    #[test]
    fn a_set_comes_back_in_order_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert_eq!(state.load("w", &["m", "a"]), Ok(None));
        state
            .save(
                "w",
                files(&[
                    ("a", vec![batch(&[1, 2]), batch(&[4])]),
                    ("m", vec![batch(&[3])]),
                ]),
            )
            .unwrap();
        let names: Vec<_> = fs::read_dir(dir.path().join("w"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(TMP_PREFIX)),
            "{names:?}"
        );
        let back = state.load("w", &["m", "a"]).unwrap().unwrap();
        assert_eq!(
            back,
            vec![vec![batch(&[3])], vec![batch(&[1, 2]), batch(&[4])]],
            "each file's batches, as written"
        );
        state.remove("w", &["m", "a"], false);
        assert_eq!(state.load("w", &["m", "a"]), Ok(None));
    }

    #[test]
    fn a_set_without_its_marker_is_not_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state.save("w", files(&[("a", vec![batch(&[1])])])).unwrap();
        assert_eq!(state.load("w", &["m", "a"]), Ok(None));
    }

    #[test]
    fn an_unreadable_file_is_an_error_and_can_be_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        fs::create_dir_all(dir.path().join("w")).unwrap();
        fs::write(dir.path().join("w/m"), b"not arrow").unwrap();
        let error = state.load("w", &["m"]).unwrap_err();
        assert!(error.starts_with("m: "), "{error}");
        state.remove("w", &["m"], true);
        assert!(!dir.path().join("w/m").exists());
        assert!(dir.path().join("w/m.unreadable").exists());
    }

    #[test]
    fn a_failed_save_leaves_nothing_of_the_set() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        // A directory where the second file should go: its rename fails, after the
        // first one's.
        fs::create_dir_all(dir.path().join("w/a/x")).unwrap();
        assert!(
            state
                .save(
                    "w",
                    files(&[("b", vec![batch(&[2])]), ("a", vec![batch(&[1])])])
                )
                .is_err()
        );
        let names: Vec<_> = fs::read_dir(dir.path().join("w"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["a"]);
    }
}
