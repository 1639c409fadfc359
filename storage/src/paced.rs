//! Writing a large file without making the WAL wait: the file is synced every
//! [`SYNC_EVERY`] bytes, so the disk never has more than a step of it queued, and a
//! PUBACK's fdatasync on the same disk waits for at most one step instead of the
//! whole file (a checkpoint writes ~50 MB of Parquet and ~220 MB of state at a million
//! devices; synced at the end, the WAL's syncs queued behind them for hundreds of ms).

use std::fs::File;
use std::io;
use std::time::{Duration, Instant};

/// Bytes written before they are synced.
const SYNC_EVERY: usize = 2 << 20;

/// A file written in synced steps of [`SYNC_EVERY`] bytes, at most `bytes_per_second`
/// if set (the disk is then left idle between steps).
pub(crate) struct Paced {
    file: File,
    unsynced: usize,
    bytes_per_second: Option<usize>,
    /// When the current step began.
    step: Instant,
}

impl Paced {
    pub(crate) fn new(file: File, bytes_per_second: Option<usize>) -> Paced {
        Paced {
            file,
            unsynced: 0,
            bytes_per_second,
            step: Instant::now(),
        }
    }

    /// The file, for its final `sync_all`.
    pub(crate) fn into_inner(self) -> File {
        self.file
    }
}

impl io::Write for Paced {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = SYNC_EVERY - self.unsynced;
        let n = io::Write::write(&mut self.file, &buf[..buf.len().min(room)])?;
        self.unsynced += n;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
            if let Some(rate) = self.bytes_per_second {
                let step = Duration::from_secs_f64(SYNC_EVERY as f64 / rate as f64);
                if let Some(rest) = step.checked_sub(self.step.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            self.step = Instant::now();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn a_file_written_in_steps_holds_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..SYNC_EVERY * 2 + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut paced = Paced::new(File::create(&path).unwrap(), None);
        // Pieces that straddle the steps.
        for piece in data.chunks(SYNC_EVERY / 3 + 7) {
            paced.write_all(piece).unwrap();
        }
        paced.into_inner().sync_all().unwrap();
        let mut back = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }
}
