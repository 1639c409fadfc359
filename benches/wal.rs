//! The write-ahead log's group commit on this machine's disk, to choose `wal.sync_interval`
//! and `wal.sync_bytes` from measurements: first the raw cost of `fdatasync` after a
//! 64 KiB write, then the reference load's appends (33,333 records/s from 16 threads,
//! ~300-byte records) through `GroupCommit` at several intervals, with the time from
//! append to durable.
//!
//! `cargo bench --bench wal` (add `-- --secs N` for longer runs; default 10 s each).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sluice_storage::wal::record::{Record, encode};
use sluice_storage::wal::segments;
use sluice_storage::wal::writer::{Current, GroupCommit, SegmentDir, SegmentFile, SyncPolicy};

/// Later segments (none here: one segment holds a run) go beside the first.
struct Files(std::path::PathBuf);

impl SegmentDir for Files {
    fn create(&mut self, id: u64) -> std::io::Result<Box<dyn SegmentFile>> {
        Ok(Box::new(segments::create(&self.0, id)?))
    }
}

const THREADS: usize = 16;
const RATE: f64 = 33_333.0;

fn main() {
    let mut secs = 10u64;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--secs") {
        secs = args[i + 1].parse().expect("--secs N");
    }
    // Under target/, on the same filesystem as a data directory would be.
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tempfile::tempdir_in(base).expect("a temporary directory");
    raw_fdatasync(dir.path());
    for interval_ms in [1u64, 2, 5, 10] {
        group_commit(dir.path(), interval_ms, secs);
    }
}

fn raw_fdatasync(dir: &std::path::Path) {
    let mut file = segments::create(dir, 1_000_000).expect("a segment");
    let block = vec![7u8; 64 << 10];
    let mut h = Histogram::<u64>::new(3).expect("a histogram");
    for _ in 0..500 {
        Write::write_all(&mut file, &block).expect("write");
        let started = Instant::now();
        file.sync_data().expect("fdatasync");
        h.record(started.elapsed().as_micros() as u64)
            .expect("record");
    }
    println!(
        "fdatasync after a 64 KiB write (500 times): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.max() as f64 / 1e3
    );
}

fn group_commit(dir: &std::path::Path, interval_ms: u64, secs: u64) {
    let id = 2_000_000 + interval_ms;
    let file = segments::create(dir, id).expect("a segment");
    let policy = SyncPolicy {
        interval: Duration::from_millis(interval_ms),
        bytes: 256 << 10,
        segment_bytes: u64::MAX,
        fsync: true,
    };
    let current = Current {
        id,
        file: Box::new(file),
        len: 0,
    };
    let wal =
        Arc::new(GroupCommit::start(Files(dir.to_owned()), current, policy).expect("the writer"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let per_thread = RATE / THREADS as f64;
    let started = Instant::now();
    let tasks: Vec<_> = (0..THREADS)
        .map(|t| {
            let wal = wal.clone();
            runtime.spawn(async move {
                let mut h = Histogram::<u64>::new(3).expect("a histogram");
                let topic = format!("devices/device-{t:06}/telemetry");
                let payload = vec![b'x'; 250];
                let mut waits = Vec::new();
                let mut n = 0u64;
                while started.elapsed() < Duration::from_secs(secs) {
                    let due = started + Duration::from_secs_f64(n as f64 / per_thread);
                    tokio::time::sleep_until(due.into()).await;
                    let mut bytes = Vec::with_capacity(300);
                    let record = Record {
                        received_at_ns: n as i64,
                        topic: topic.as_bytes(),
                        payload: &payload,
                        denied: false,
                        reading: false,
                    };
                    encode(&record, &mut bytes).expect("fits");
                    let appended = Instant::now();
                    let durable = wal.append(bytes);
                    waits.push(tokio::spawn(async move {
                        durable.await.expect("durable");
                        appended.elapsed()
                    }));
                    n += 1;
                    if waits.len() >= 256 {
                        for w in waits.drain(..) {
                            let took = w.await.expect("a waiter");
                            h.record(took.as_micros() as u64).expect("record");
                        }
                    }
                }
                for w in waits {
                    let took = w.await.expect("a waiter");
                    h.record(took.as_micros() as u64).expect("record");
                }
                (n, h)
            })
        })
        .collect();
    let mut total = Histogram::<u64>::new(3).expect("a histogram");
    let mut appends = 0;
    for t in tasks {
        let (n, h) = runtime.block_on(t).expect("a task");
        appends += n;
        total.add(&h).expect("merge");
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(wal);
    println!(
        "group commit, interval {interval_ms} ms, bytes 256 KiB: {appends} appends in {elapsed:.1} s ({:.0}/s); append→durable p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        appends as f64 / elapsed,
        total.value_at_quantile(0.5) as f64 / 1e3,
        total.value_at_quantile(0.99) as f64 / 1e3,
        total.value_at_quantile(0.999) as f64 / 1e3,
        total.max() as f64 / 1e3
    );
}
