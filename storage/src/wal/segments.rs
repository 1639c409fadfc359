//! The log's segment files, `<dir>/<id, 20 digits>.wal`, and their recovery at start:
//! every segment is scanned in order and its records handed to the caller (replay);
//! a torn tail is cut off (logged); a damaged range in the middle is copied into
//! `<dir>/corrupt/` and the segment rewritten without it (counted, never skipped
//! silently); a segment that cannot be read at all is moved into `corrupt/` whole.
//! Rewrites go through storage's one publish routine (temporary file, fsync, rename,
//! directory fsync).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::parquet_files::{TMP_PREFIX, publish};
use crate::wal::record::{Found, Record, Scan, framed_len};

const SUFFIX: &str = ".wal";
pub const CORRUPT_DIR: &str = "corrupt";

/// What recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub segments: usize,
    pub records: u64,
    /// (segment id, bytes cut off its end).
    pub torn_tails: Vec<(u64, u64)>,
    /// (segment id, damaged byte range), each copied into `corrupt/`.
    pub corrupt: Vec<(u64, std::ops::Range<usize>)>,
    /// Segments moved into `corrupt/` whole because they could not be read.
    pub unreadable: Vec<u64>,
    /// The id the next segment gets.
    pub next_id: u64,
}

fn segment_name(id: u64) -> String {
    format!("{id:020}{SUFFIX}")
}

/// The path of segment `id` in `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(segment_name(id))
}

/// The segments in `dir`, oldest first (leftover temporary files are removed).
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_PREFIX) {
            fs::remove_file(entry.path())?;
        } else if let Some(id) = name.strip_suffix(SUFFIX).and_then(|n| n.parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Creates segment `id` (empty, its directory entry fsynced) for appending.
pub fn create(dir: &Path, id: u64) -> io::Result<File> {
    let path = segment_path(dir, id);
    let file = fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Recovers every segment of `dir` (created if missing) from segment `from` on, handing
/// each intact record to `replay` in log order with its segment id and the segment's
/// bytes, which the record's slices are of (`Bytes::slice_ref` keeps a part without a
/// copy). Segments before `from` are covered by a checkpoint: they are deleted unread.
pub fn recover(
    dir: &Path,
    from: u64,
    mut replay: impl FnMut(u64, Record<'_>, &Bytes),
) -> io::Result<Recovered> {
    fs::create_dir_all(dir)?;
    let mut recovered = Recovered::default();
    let mut ids = list(dir)?;
    for id in ids.iter().filter(|&&id| id < from) {
        fs::remove_file(segment_path(dir, *id))?;
    }
    ids.retain(|&id| id >= from);
    let last = ids.last().copied();
    // A new segment never gets an id a checkpoint already covers.
    recovered.next_id = last.map_or(1, |id| id + 1).max(from);
    for id in ids {
        recovered.segments += 1;
        let path = segment_path(dir, id);
        let data = match fs::read(&path) {
            Ok(data) => Bytes::from(data),
            Err(e) => {
                tracing::error!(segment = %path.display(), error = %e, "WAL segment unreadable: moved into corrupt/");
                set_aside_whole(dir, id)?;
                recovered.unreadable.push(id);
                continue;
            }
        };
        let mut good: Vec<std::ops::Range<usize>> = Vec::new();
        let mut torn = None;
        let mut damaged = Vec::new();
        for found in Scan::new(&data) {
            match found {
                Found::Record { offset, record } => {
                    recovered.records += 1;
                    let end = offset + framed_len(&record);
                    match good.last_mut() {
                        Some(last) if last.end == offset => last.end = end,
                        _ => good.push(offset..end),
                    }
                    replay(id, record, &data);
                }
                // Only the segment being written when the process died can end in a cut
                // write; a bad end of an older (fully synced) one is damage.
                Found::TornTail { from } if Some(id) == last => torn = Some(from),
                Found::TornTail { from } => damaged.push(from..data.len()),
                Found::Corrupt { from, to } => damaged.push(from..to),
            }
        }
        for range in &damaged {
            let name = format!("{id:020}-{}-{}.bin", range.start, range.end);
            let corrupt = dir.join(CORRUPT_DIR);
            fs::create_dir_all(&corrupt)?;
            let staged = [(
                corrupt.join(format!("{TMP_PREFIX}{name}")),
                corrupt.join(&name),
            )];
            publish(&staged, |_, tmp| write_synced(tmp, &[&data[range.clone()]]))?;
            tracing::error!(segment = %path.display(), from = range.start, to = range.end, "WAL segment damaged: the range is in corrupt/, the records around it are replayed");
            recovered.corrupt.push((id, range.clone()));
        }
        if let Some(from) = torn {
            tracing::warn!(segment = %path.display(), at = from, bytes = data.len() - from, "WAL torn tail (a write cut by a crash) cut off");
            recovered.torn_tails.push((id, (data.len() - from) as u64));
        }
        if !damaged.is_empty() || torn.is_some() {
            // The segment keeps exactly its intact records.
            let name = segment_name(id);
            let staged = [(dir.join(format!("{TMP_PREFIX}{name}")), path.clone())];
            let parts: Vec<&[u8]> = good.iter().map(|r| &data[r.clone()]).collect();
            publish(&staged, |_, tmp| write_synced(tmp, &parts))?;
        }
    }
    Ok(recovered)
}

fn write_synced(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let mut file = File::create(path)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()
}

fn set_aside_whole(dir: &Path, id: u64) -> io::Result<()> {
    let corrupt = dir.join(CORRUPT_DIR);
    fs::create_dir_all(&corrupt)?;
    fs::rename(segment_path(dir, id), corrupt.join(segment_name(id)))?;
    File::open(&corrupt)?.sync_all()?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::encode;

    fn write_segment(dir: &Path, id: u64, from: i64, n: i64) -> Vec<usize> {
        let mut data = Vec::new();
        let mut offsets = Vec::new();
        for i in from..from + n {
            offsets.push(data.len());
            let topic = format!("devices/d{i}/telemetry");
            encode(
                &Record {
                    received_at_ns: i,
                    topic: topic.as_bytes(),
                    payload: b"{\"x\":1}",
                    denied: false,
                    reading: false,
                },
                &mut data,
            )
            .unwrap();
        }
        offsets.push(data.len());
        let mut file = create(dir, id).unwrap();
        file.write_all(&data).unwrap();
        offsets
    }

    fn replayed(dir: &Path) -> (Vec<(u64, i64)>, Recovered) {
        let mut seen = Vec::new();
        let recovered = recover(dir, 0, |id, r, _| seen.push((id, r.received_at_ns))).unwrap();
        (seen, recovered)
    }

    #[test]
    fn segments_replay_in_order_and_a_torn_tail_is_cut_once() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, 0, 3);
        let offsets = write_segment(dir.path(), 2, 3, 3);
        // A crash cut the last record of segment 2 after 5 of its bytes.
        let path = segment_path(dir.path(), 2);
        let cut = offsets[2] + 5;
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        let (seen, recovered) = replayed(dir.path());
        assert_eq!(seen, [(1, 0), (1, 1), (1, 2), (2, 3), (2, 4)]);
        assert_eq!(recovered.torn_tails, [(2, 5)]);
        assert_eq!(recovered.next_id, 3);
        assert_eq!(fs::metadata(&path).unwrap().len(), offsets[2] as u64);
        // Nothing is cut or reported a second time.
        let (again, recovered) = replayed(dir.path());
        assert_eq!(again, seen);
        assert!(recovered.torn_tails.is_empty());
    }

    #[test]
    fn a_damaged_range_is_set_aside_and_the_records_around_it_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let offsets = write_segment(dir.path(), 7, 0, 5);
        let path = segment_path(dir.path(), 7);
        let mut data = fs::read(&path).unwrap();
        data[offsets[2] + 12] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let (seen, recovered) = replayed(dir.path());
        assert_eq!(seen, [(7, 0), (7, 1), (7, 3), (7, 4)]);
        assert_eq!(recovered.corrupt, [(7, offsets[2]..offsets[3])]);
        let aside = dir
            .path()
            .join(CORRUPT_DIR)
            .join(format!("{:020}-{}-{}.bin", 7, offsets[2], offsets[3]));
        assert_eq!(fs::read(aside).unwrap(), data[offsets[2]..offsets[3]]);
        let (again, recovered) = replayed(dir.path());
        assert_eq!(
            again, seen,
            "the rewritten segment holds the intact records"
        );
        assert!(recovered.corrupt.is_empty());
    }

    #[test]
    fn a_bad_end_of_an_older_segment_is_damage_set_aside_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let offsets = write_segment(dir.path(), 1, 0, 3);
        write_segment(dir.path(), 2, 3, 1);
        let path = segment_path(dir.path(), 1);
        let mut data = fs::read(&path).unwrap();
        data[offsets[2] + 12] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let (seen, recovered) = replayed(dir.path());
        assert_eq!(seen, [(1, 0), (1, 1), (2, 3)]);
        assert!(recovered.torn_tails.is_empty());
        assert_eq!(recovered.corrupt, [(1, offsets[2]..offsets[3])]);
        let aside = dir
            .path()
            .join(CORRUPT_DIR)
            .join(format!("{:020}-{}-{}.bin", 1, offsets[2], offsets[3]));
        assert_eq!(fs::read(aside).unwrap(), data[offsets[2]..]);
    }

    #[test]
    fn an_unreadable_segment_is_moved_aside_whole_and_the_others_replayed() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, 0, 2);
        // A directory where a segment should be: reading it fails.
        fs::create_dir(segment_path(dir.path(), 2)).unwrap();
        write_segment(dir.path(), 3, 2, 2);
        let (seen, recovered) = replayed(dir.path());
        assert_eq!(seen, [(1, 0), (1, 1), (3, 2), (3, 3)]);
        assert_eq!(recovered.unreadable, [2]);
        assert!(dir.path().join(CORRUPT_DIR).join(segment_name(2)).exists());
        assert_eq!(list(dir.path()).unwrap(), [1, 3]);
    }

    #[test]
    fn segments_a_checkpoint_covers_are_deleted_unread_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, 0, 2);
        write_segment(dir.path(), 2, 2, 2);
        let mut seen = Vec::new();
        let recovered =
            recover(dir.path(), 2, |id, r, _| seen.push((id, r.received_at_ns))).unwrap();
        assert_eq!(seen, [(2, 2), (2, 3)]);
        assert_eq!(list(dir.path()).unwrap(), [2]);
        assert_eq!(recovered.next_id, 3);
        fs::remove_file(segment_path(dir.path(), 2)).unwrap();
        let recovered = recover(dir.path(), 9, |_, _, _| panic!("nothing to replay")).unwrap();
        assert_eq!(recovered.next_id, 9, "not an id the checkpoint covers");
    }
}
