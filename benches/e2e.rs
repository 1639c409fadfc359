//! The end-to-end benchmark: the release `sluice` binary on a temporary data directory,
//! driven by the load generator over real MQTT on loopback, measured from outside.
//!
//! ```text
//! cargo bench --bench e2e -- reference [--devices N] [--rate R] [--secs S] [--connections K] [--hostile]
//!                                       [--windows | --no-windows] [--rules N] [--anomaly-rate F]
//!                                       [--subscribers N] [--wal-sync always|off]
//! cargo bench --bench e2e -- max       [--from R] [--step R] [--secs S]
//!                                       [--windows | --no-windows] [--rules N] [--anomaly-rate F]
//!                                       [--wal-sync always|off]
//! cargo bench --bench e2e -- mosquitto [--from R] [--step R] [--secs S]
//! cargo bench --bench e2e -- loadgen   [--from R] [--step R] [--secs S]
//! cargo bench --bench e2e -- idle      [--connections K]
//! cargo bench --bench e2e -- restart   [--devices N] [--rate R] [--secs S] [--connections K]
//! cargo bench --bench e2e -- replay    [--devices N] [--rate R] [--secs S] [--connections K]
//! ```
//!
//! What counts as stored is counted in SQL at the end (`lost = acked − stored`); CPU and
//! peak RSS come from `/proc/<pid>` of the sluice process; publish→queryable latency
//! comes from `sluice_ingest_queryable_lag_seconds` (the loadgen's timestamps are its
//! scheduled publish times). Every scenario stops by itself.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_loadgen::{LoadgenConfig, Progress, Report};

#[path = "../tests/common/mod.rs"]
mod common;

/// How long the stored count may stand still before what is missing counts as lost: a
/// checkpoint under overload holds the decoders for up to its cut timeout (5 s), during
/// which nothing new becomes visible.
const SETTLE_STALL: Duration = Duration::from_secs(30);

struct Args {
    scenario: String,
    devices: u64,
    rate: f64,
    secs: f64,
    connections: usize,
    from: f64,
    step: f64,
    /// `[windows] enabled` (default: sluice's own default).
    windows: Option<bool>,
    /// How many of [`RULES`] sluice runs.
    rules: usize,
    /// Share of devices the loadgen runs hot for a while (alerts fire and resolve).
    anomaly_rate: f64,
    /// MQTT clients subscribed to every device's telemetry while the reference runs.
    subscribers: usize,
    /// `[wal] sync` (default: sluice's own, `always`): `off` measures the front door
    /// without the fdatasync a PUBACK waits for.
    wal_sync: Option<String>,
    /// A client sends [`HOSTILE`] queries one after another over HTTP while the load
    /// runs: ingestion must keep its rate and PUBACK latency.
    hostile: bool,
}

/// Queries that took the node down before `[query]`'s limits (issue #15), each ending
/// in an error now: a value over the memory, two over the timeout, one over the result
/// cap.
const HOSTILE: [&str; 4] = [
    "SELECT length(repeat('x', 2000000000))",
    "SELECT count(*) FROM generate_series(1, 20000000000)",
    "SELECT count(*) FROM telemetry a, telemetry b WHERE a.temperature < b.temperature",
    "SELECT a.device_id, b.device_id FROM telemetry a, telemetry b",
];

/// Ten alert rules of the kinds an operator writes, for `--rules N`.
const RULES: [&str; 10] = [
    "name = \"overheat\"\nmetric = \"temperature\"\nabove = 80.0\nclear_below = 75.0\nfor = \"2m\"\nseverity = \"critical\"",
    "name = \"freezing\"\nmetric = \"temperature\"\nbelow = -10.0\nclear_above = -5.0",
    "name = \"humid\"\nmetric = \"humidity\"\nabove = 90.0\nclear_below = 85.0\nfor = \"1m\"",
    "name = \"dry\"\nmetric = \"humidity\"\nbelow = 10.0\nclear_above = 15.0",
    "name = \"low_battery\"\nmetric = \"battery\"\nbelow = 20.0\nclear_above = 25.0",
    "name = \"battery_critical\"\nmetric = \"battery\"\nbelow = 5.0\nseverity = \"critical\"",
    "name = \"weak_signal\"\nmetric = \"signal_strength\"\nbelow = -110.0\nclear_above = -105.0\nfor = \"5m\"",
    "name = \"warm\"\nmetric = \"temperature\"\nabove = 60.0\nfor = \"5m\"\nseverity = \"info\"",
    "name = \"co2\"\nmetric = \"extra.co2\"\nabove = 1000.0",
    "name = \"silent\"\nno_data_for = \"2m\"",
];

fn args() -> Args {
    let mut args = Args {
        scenario: "reference".into(),
        devices: 1_000_000,
        rate: 33_333.0,
        secs: 600.0,
        connections: 16,
        from: 50_000.0,
        step: 25_000.0,
        windows: None,
        rules: 0,
        anomaly_rate: 0.0,
        subscribers: 0,
        wal_sync: None,
        hostile: false,
    };
    let mut secs_given = false;
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(arg) = it.next() {
        secs_given |= arg == "--secs";
        let mut value = || -> f64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"))
        };
        match arg.as_str() {
            "--devices" => args.devices = value() as u64,
            "--rate" => args.rate = value(),
            "--secs" => args.secs = value(),
            "--connections" => args.connections = value() as usize,
            "--from" => args.from = value(),
            "--step" => args.step = value(),
            "--windows" => args.windows = Some(true),
            "--no-windows" => args.windows = Some(false),
            "--rules" => args.rules = (value() as usize).min(RULES.len()),
            "--anomaly-rate" => args.anomaly_rate = value(),
            "--subscribers" => args.subscribers = value() as usize,
            "--wal-sync" => args.wal_sync = it.next(),
            "--hostile" => args.hostile = true,
            name if !name.starts_with('-') => args.scenario = name.to_owned(),
            other => panic!("unknown option {other}"),
        }
    }
    if args.scenario == "replay" && !secs_given {
        // About what a crash between two checkpoints leaves at the reference rate.
        args.secs = 75.0;
    }
    args
}

fn main() {
    if std::env::var_os(SINK_ENV).is_some() {
        return discarding_sink();
    }
    let args = args();
    match args.scenario.as_str() {
        "reference" => reference(&args),
        "max" => max(&args),
        "mosquitto" => mosquitto(&args),
        "loadgen" => loadgen_alone(&args),
        "idle" => idle(&args),
        "restart" => restart(&args),
        "replay" => replay(&args),
        other => {
            panic!(
                "unknown scenario {other}: reference, max, mosquitto, loadgen, idle, restart or replay"
            )
        }
    }
}

/// The harness of the end-to-end tests: `sluice serve` on port 0 in a temporary
/// directory, with a few measurements added here.
struct Sluice {
    server: common::Sluice,
    mqtt: String,
    _dir: tempfile::TempDir,
}

impl Sluice {
    /// Started with room for `args.connections` MQTT connections, windows as asked and
    /// `args.rules` alert rules.
    fn start(args: &Args) -> Sluice {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), args, "");
        let server = common::Sluice::start(
            &dir.path().join("data"),
            &["--config", config.to_str().unwrap()],
        );
        Sluice {
            mqtt: server.mqtt.to_string(),
            server,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.server.pid()
    }

    fn count(&self) -> u64 {
        self.server.scalar("SELECT count(*) FROM telemetry") as u64
    }

    /// Waits until the stored count reaches `want` or stops moving for 5 s.
    /// The rows stored once `want` are, or once the count stopped moving for
    /// [`SETTLE_STALL`] (then the difference is lost).
    fn settle(&self, want: u64) -> u64 {
        let mut last = (self.count(), Instant::now());
        while last.0 < want && last.1.elapsed() < SETTLE_STALL {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.count();
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
        last.0
    }

    fn metrics(&self) -> Metrics {
        Metrics(self.server.get("/metrics").1)
    }

    /// SIGTERM (final flush), then the Parquet bytes written.
    fn stop(self) -> u64 {
        let data_dir = self.server.data_dir.clone();
        assert!(self.server.terminate().success());
        parquet_bytes(&data_dir.join("telemetry"))
    }
}

/// `sluice.toml` in `dir`: room for `args.connections` MQTT connections, windows as
/// asked, `args.rules` alert rules and the sections of `more`; everything else sluice's
/// defaults.
fn write_config(dir: &std::path::Path, args: &Args, more: &str) -> std::path::PathBuf {
    let config = dir.join("sluice.toml");
    let max_connections = (args.connections + 100).max(10_000);
    let mut text = format!("[mqtt]\nmax_connections = {max_connections}\n");
    if let Some(windows) = args.windows {
        text.push_str(&format!("[windows]\nenabled = {windows}\n"));
    }
    if let Some(sync) = &args.wal_sync {
        text.push_str(&format!("[wal]\nsync = {sync:?}\n"));
    }
    for rule in &RULES[..args.rules] {
        text.push_str(&format!("[[alert]]\n{rule}\n"));
    }
    text.push_str(more);
    std::fs::write(&config, text).unwrap();
    config
}

fn parquet_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                pending.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// A Prometheus text exposition.
struct Metrics(String);

impl Metrics {
    /// [`common::metric_value`], 0 when the series is not there.
    fn value(&self, name: &str) -> f64 {
        common::metric_value(&self.0, name).unwrap_or(0.0)
    }

    /// Cumulative bucket counts of a histogram, by upper bound.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        self.0
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.parse().ok()?))
            })
            .collect()
    }
}

/// The `q` quantile of the observations between two scrapes, interpolated in the bucket.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
            (*le, c - b)
        })
        .collect();
    let total = delta.last().map_or(0.0, |x| x.1);
    if total == 0.0 {
        return f64::NAN;
    }
    let target = q * total;
    let mut lower = (0.0, 0.0);
    for (le, c) in delta {
        if c >= target {
            if le.is_infinite() {
                return lower.0;
            }
            return lower.0 + (le - lower.0) * (target - lower.1) / (c - lower.1).max(1e-9);
        }
        lower = (le, c);
    }
    f64::NAN
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The machine's CPU time taken by the hypervisor for other guests (`steal` of
/// /proc/stat) since [`Steal::start`]: on a shared VM, a run with more than a few percent
/// measured a busier host, not sluice, and is not comparable with one without.
struct Steal([u64; 2]);

impl Steal {
    /// (steal, total) ticks of all CPUs so far.
    fn ticks() -> [u64; 2] {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
        // already in user and nice.
        [
            fields.get(7).copied().unwrap_or(0),
            fields.iter().take(8).sum(),
        ]
    }

    fn start() -> Steal {
        Steal(Steal::ticks())
    }

    /// Percent of the machine's CPU time stolen since the start.
    fn percent(&self) -> f64 {
        let [steal, total] = Steal::ticks();
        100.0 * (steal - self.0[0]) as f64 / (total - self.0[1]).max(1) as f64
    }
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix(" kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn run_loadgen(broker: &str, devices: u64, rate: f64, secs: f64, connections: usize) -> Report {
    run_loadgen_with(broker, devices, rate, secs, connections, 0.0)
}

fn run_loadgen_with(
    broker: &str,
    devices: u64,
    rate: f64,
    secs: f64,
    connections: usize,
    anomaly_rate: f64,
) -> Report {
    let mut config = loadgen_config(broker, devices, rate, connections);
    config.anomaly_rate = anomaly_rate;
    config.duration = Some(Duration::from_secs_f64(secs));
    run_until(config, Arc::new(AtomicBool::new(false)))
}

/// A QoS 1 fleet of `devices` at `rate` over `connections`.
fn loadgen_config(broker: &str, devices: u64, rate: f64, connections: usize) -> LoadgenConfig {
    let mut config = LoadgenConfig::new(broker);
    config.devices = devices;
    config.rate = rate;
    config.connections = connections;
    config.qos = 1;
    config
}

/// Runs the loadgen on a runtime of its own until its duration passes or `stop` is set.
fn run_until(config: LoadgenConfig, stop: Arc<AtomicBool>) -> Report {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(sluice_loadgen::run(
            config,
            Arc::new(Progress::default()),
            stop,
        ))
        .expect("loadgen runs")
}

const LAG: &str = "sluice_ingest_queryable_lag_seconds";

fn reference(args: &Args) {
    println!(
        "reference: {} devices, {} msgs/s, QoS 1, {} s, {} connections",
        args.devices, args.rate, args.secs, args.connections
    );
    let sluice = Sluice::start(args);
    let pid = sluice.pid();
    let before = sluice.metrics();
    let cpu0 = cpu_seconds(pid);
    let steal = Steal::start();
    let started = Instant::now();
    // RSS every 10 s, to see that memory stays flat.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !done.load(Ordering::SeqCst) {
                samples.push(status_kib(pid, "VmRSS:"));
                for _ in 0..100 {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            samples
        })
    };
    let watchers = (0..args.subscribers)
        .map(|i| watch_telemetry(&sluice.mqtt, i))
        .collect::<Vec<_>>();
    let hostile = args.hostile.then(|| {
        let (done, http) = (done.clone(), sluice.server.http.clone());
        std::thread::spawn(move || {
            // Longer than sluice's query timeout (30 s), which is what is measured.
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .unwrap();
            let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
            while !done.load(Ordering::SeqCst) {
                for sql in HOSTILE {
                    let status = client
                        .post(format!("{http}/query"))
                        .body(sql)
                        .send()
                        .map_or_else(|e| e.to_string(), |r| r.status().to_string());
                    *outcomes.entry(format!("{status} {sql}")).or_default() += 1;
                }
            }
            outcomes
        })
    });
    let report = run_loadgen_with(
        &sluice.mqtt,
        args.devices,
        args.rate,
        args.secs,
        args.connections,
        args.anomaly_rate,
    );
    let stored = sluice.settle(report.acked);
    std::thread::sleep(Duration::from_secs(
        usize::from(args.subscribers > 0) as u64 * 2,
    ));
    for (i, watched) in watchers.iter().enumerate() {
        println!(
            "subscriber {i} (QoS 0, devices/+/telemetry) received {} messages",
            watched.load(Ordering::SeqCst)
        );
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let stolen = steal.percent();
    done.store(true, Ordering::SeqCst);
    let rss = sampler.join().unwrap();
    if let Some(hostile) = hostile {
        for (outcome, n) in hostile.join().unwrap() {
            println!("hostile query: {n} × {outcome}");
        }
    }
    let after = sluice.metrics();
    let peak_rss = status_kib(pid, "VmHWM:");
    let skipped = after.value("sluice_broker_skipped_messages_total");
    let (b, a) = (before.buckets(LAG), after.buckets(LAG));
    let bytes = sluice.stop();

    println!("{report}");
    let lost = report.acked as i64 - stored as i64;
    println!("stored {stored} (SQL count)  lost {lost}  broker skips {skipped}");
    println!(
        "windows closed: telemetry_1m {:.0}, telemetry_1h {:.0}",
        after.value("sluice_aggregator_windows_closed_total{table=\"telemetry_1m\"}") + 0.0,
        after.value("sluice_aggregator_windows_closed_total{table=\"telemetry_1h\"}") + 0.0,
    );
    println!(
        "alert rules {}  transitions {:.0}  dead letters {:.0}",
        args.rules,
        after.value("sluice_alert_transitions_total") + 0.0,
        after.value("sluice_alert_deliveries_total{channel=\"mqtt\",outcome=\"dead_letter\"}")
            + 0.0,
    );
    println!(
        "stored rate {:.0} msgs/s  sluice CPU {:.2} cores ({cpu:.1} s / {wall:.1} s)  peak RSS {} MiB",
        stored as f64 / args.secs,
        cpu / wall,
        peak_rss / 1024
    );
    println!("host steal {stolen:.1} % of the machine's CPU time during the run");
    println!(
        "RSS every 10 s (MiB): {:?}",
        rss.iter().map(|k| k / 1024).collect::<Vec<_>>()
    );
    println!(
        "publish→queryable: p50 {:.0} ms  p99 {:.0} ms  p99.9 {:.0} ms",
        quantile(&b, &a, 0.5) * 1e3,
        quantile(&b, &a, 0.99) * 1e3,
        quantile(&b, &a, 0.999) * 1e3
    );
    println!(
        "Parquet: {:.1} bytes per reading",
        bytes as f64 / stored.max(1) as f64
    );
    assert_eq!(lost, 0, "every acknowledged message must be stored");
    assert_eq!(skipped, 0.0, "the broker must not skip messages");
}

/// An MQTT client (rumqttc, QoS 0) subscribed to every device's telemetry; counts what
/// it receives.
fn watch_telemetry(broker: &str, i: usize) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    let (host, port) = broker.rsplit_once(':').unwrap();
    let mut options =
        rumqttc::MqttOptions::new(format!("bench-watcher-{i}"), host, port.parse().unwrap());
    options.set_keep_alive(Duration::from_secs(60));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = rumqttc::Client::new(options, 1000);
    client
        .subscribe("devices/+/telemetry", rumqttc::QoS::AtMostOnce)
        .unwrap();
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _client = client;
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    subscribed
        .recv_timeout(Duration::from_secs(10))
        .expect("subscribed");
    count
}

/// One step of a stepped run.
struct Step {
    rate: f64,
    acked_rate: f64,
    delivered: u64,
    acked: u64,
    p99: f64,
}

impl Step {
    fn sustained(&self) -> bool {
        self.delivered == self.acked && self.acked_rate >= 0.97 * self.rate && self.p99 <= 1.0
    }
}

fn max(args: &Args) {
    println!(
        "max: QoS 1, {} connections, {} s per step from {} msgs/s, {} alert rules, anomaly rate {}",
        args.connections, args.secs, args.from, args.rules, args.anomaly_rate
    );
    let sluice = Sluice::start(args);
    let devices = 100_000;
    let mut best = 0.0;
    let mut rate = args.from;
    loop {
        let before = sluice.metrics();
        let count0 = sluice.count();
        let steal = Steal::start();
        let report = run_loadgen_with(
            &sluice.mqtt,
            devices,
            rate,
            args.secs,
            args.connections,
            args.anomaly_rate,
        );
        let stored = sluice.settle(count0 + report.acked) - count0;
        let after = sluice.metrics();
        let skipped = after.value("sluice_broker_skipped_messages_total")
            - before.value("sluice_broker_skipped_messages_total");
        let step = Step {
            rate,
            acked_rate: report.acked as f64 / args.secs,
            delivered: stored,
            acked: report.acked,
            p99: quantile(&before.buckets(LAG), &after.buckets(LAG), 0.99),
        };
        println!(
            "{:>8.0} msgs/s target: acked {:>8.0}/s  stored {} of {} acked  skipped {skipped}  queryable p99 {:.0} ms  PUBACK p99 {:.1} ms  steal {:.1} %  {}",
            rate,
            step.acked_rate,
            stored,
            report.acked,
            step.p99 * 1e3,
            report.latency.p99_us as f64 / 1e3,
            steal.percent(),
            if step.sustained() {
                "sustained"
            } else {
                "NOT sustained"
            }
        );
        assert_eq!(stored, report.acked, "acknowledged messages were lost");
        if !step.sustained() {
            break;
        }
        best = rate;
        rate += args.step;
    }
    let metrics = sluice.metrics();
    sluice.stop();
    println!(
        "alert transitions {:.0}, readings in windows {:.0}",
        metrics.value("sluice_alert_transitions_total") + 0.0,
        metrics.value("sluice_aggregator_readings_total") + 0.0
    );
    println!("highest sustained rate: {best:.0} msgs/s (end to end into SQL, zero loss)");
}

fn mosquitto(args: &Args) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n"),
    )
    .unwrap();
    let mut broker = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto is installed (apt-get install mosquitto)");
    std::thread::sleep(Duration::from_millis(500));
    let addr = format!("127.0.0.1:{port}");

    // One subscriber counting what mosquitto relays.
    let relayed = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    {
        let relayed = relayed.clone();
        runtime.spawn(async move {
            let mut options = rumqttc::MqttOptions::new("bench-subscriber", "127.0.0.1", port);
            options.set_keep_alive(Duration::from_secs(30));
            options.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
            client
                .subscribe("devices/+/telemetry", rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                        relayed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "mosquitto: QoS 1 publishers, one QoS 1 subscriber, {} s per step",
        args.secs
    );
    let mut rate = args.from;
    let mut best = 0.0;
    loop {
        let before = relayed.load(Ordering::Relaxed);
        let report = run_loadgen(&addr, 100_000, rate, args.secs, args.connections);
        let started = Instant::now();
        let mut got = relayed.load(Ordering::Relaxed) - before;
        while got < report.acked && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            got = relayed.load(Ordering::Relaxed) - before;
        }
        // The same rule as for sluice: everything relayed, and the p99 latency (here
        // publish→PUBACK, the closest measure a plain broker offers) within 1 s.
        let sustained = got == report.acked && report.latency.p99_us <= 1_000_000;
        println!(
            "{rate:>8.0} msgs/s target: acked {:>8.0}/s  relayed {got} of {}  PUBACK p99 {:.1} ms  {}",
            report.acked as f64 / args.secs,
            report.acked,
            report.latency.p99_us as f64 / 1e3,
            if sustained {
                "sustained"
            } else {
                "NOT sustained"
            }
        );
        if !sustained {
            break;
        }
        best = rate;
        rate += args.step;
    }
    let _ = broker.kill();
    let _ = broker.wait();
    println!("mosquitto highest sustained relay rate: {best:.0} msgs/s");
}

/// Memory per connection: sluice's resident memory with `--connections` idle MQTT
/// connections against none. Each connection sends CONNECT (3.1.1, keep alive 0) and
/// then nothing; then each publishes one QoS 1 reading, gets its PUBACK and goes idle
/// again (its buffers are given back).
fn idle(args: &Args) {
    use std::io::{Read, Write};
    let n = args.connections;
    println!("idle: {n} MQTT connections that connect and then say nothing");
    let sluice = Sluice::start(args);
    let pid = sluice.pid();
    let addr: std::net::SocketAddr = sluice.mqtt.parse().unwrap();
    // Let start-up allocations settle.
    std::thread::sleep(Duration::from_secs(3));
    let base = status_kib(pid, "VmRSS:");
    let connect = |i: usize| {
        let id = format!("idle-{i:06}");
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend_from_slice(&body);
        packet
    };
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let mut socket = std::net::TcpStream::connect(addr).unwrap();
        socket.write_all(&connect(i)).unwrap();
        sockets.push(socket);
    }
    for socket in &mut sockets {
        let mut connack = [0u8; 4];
        socket.read_exact(&mut connack).unwrap();
        assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    }
    let ramp = started.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let idle = status_kib(pid, "VmRSS:");
    let kernel_idle = tcp_memory_kib();
    for (i, socket) in sockets.iter_mut().enumerate() {
        let (topic, payload) =
            common::telemetry(&format!("idle-{i:06}"), "2024-01-15T10:30:00Z", 20.0, 80.0);
        let mut publish = vec![0x32];
        let mut len = 2 + topic.len() + 2 + payload.len();
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            publish.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        publish.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        publish.extend_from_slice(topic.as_bytes());
        publish.extend_from_slice(&[0x00, 0x01]);
        publish.extend_from_slice(&payload);
        socket.write_all(&publish).unwrap();
    }
    for socket in &mut sockets {
        let mut puback = [0u8; 4];
        socket.read_exact(&mut puback).unwrap();
        assert_eq!(puback, [0x40, 0x02, 0x00, 0x01]);
    }
    std::thread::sleep(Duration::from_secs(3));
    let after_traffic = status_kib(pid, "VmRSS:");
    let kernel_after = tcp_memory_kib();
    let stored = sluice.settle(n as u64);
    drop(sockets);
    std::thread::sleep(Duration::from_secs(3));
    let closed = status_kib(pid, "VmRSS:");
    let per = |kib: u64| (kib.saturating_sub(base)) as f64 / n as f64;
    println!(
        "connected {n} in {:.1} s; stored {stored} readings",
        ramp.as_secs_f64()
    );
    println!(
        "RSS: none {} MiB, {n} idle {} MiB ({:.1} KiB each), after one publish each {} MiB ({:.1} KiB each), all closed {} MiB",
        base / 1024,
        idle / 1024,
        per(idle),
        after_traffic / 1024,
        per(after_traffic),
        closed / 1024
    );
    println!(
        "kernel TCP memory (/proc/net/sockstat, both ends of {n} loopback connections): {} KiB idle, {} KiB after one publish each",
        kernel_idle, kernel_after
    );
    sluice.stop();
}

/// Recovery after a crash at the reference load: `sluice serve` on the defaults (a
/// checkpoint every `storage.flush_interval`), the loadgen at `--rate` for `--secs`, then
/// `kill -9` just before the next checkpoint would have committed (the most the WAL holds
/// past a checkpoint), and a restart on the same data directory: how long until it is
/// ready, how fast the WAL replayed, and that every acknowledged reading is there once.
fn restart(args: &Args) {
    println!(
        "restart: {} devices, {} msgs/s, QoS 1, {} connections, kill -9 after {} s, just before a checkpoint",
        args.devices, args.rate, args.connections, args.secs
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), args, "");
    let data = dir.path().join("data");
    let serve_args = ["--config", config.to_str().unwrap()];
    let sluice = common::Sluice::start(&data, &serve_args);
    let mqtt = sluice.mqtt.to_string();

    let steal = Steal::start();
    let stop = Arc::new(AtomicBool::new(false));
    let loadgen = {
        let stop = stop.clone();
        let mut config = loadgen_config(&mqtt, args.devices, args.rate, args.connections);
        // Until the kill: the run's length is the checkpoints', not the loadgen's.
        config.duration = None;
        std::thread::spawn(move || run_until(config, stop))
    };

    // Every commit of a checkpoint rewrites wal/checkpoint; its period is what the
    // defaults give at this load (flush_interval, or flush_bytes when it comes first).
    let checkpoint_file = data.join("wal/checkpoint");
    let read_checkpoint = || std::fs::read_to_string(&checkpoint_file).unwrap_or_default();
    let started = Instant::now();
    let mut seen = read_checkpoint();
    let mut commits: Vec<Instant> = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = read_checkpoint();
        if now != seen && !now.is_empty() {
            seen = now;
            commits.push(Instant::now());
        }
        if started.elapsed() < Duration::from_secs_f64(args.secs) || commits.len() < 2 {
            continue;
        }
        let period = commits[commits.len() - 1] - commits[commits.len() - 2];
        let since = commits[commits.len() - 1].elapsed();
        if since + Duration::from_millis(1500) >= period {
            break;
        }
    }
    let before_kill = sluice.get("/metrics").1;
    let period = commits[commits.len() - 1] - commits[commits.len() - 2];
    let since = commits[commits.len() - 1].elapsed();
    sluice.kill();
    let killed_at = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let report = loadgen.join().unwrap();
    let wal_bytes = parquet_bytes(&data.join("wal"));
    println!(
        "killed at {:.1} s, {:.1} s after checkpoint {} (checkpoints every {:.1} s); WAL on disk {:.0} MiB; host steal {:.1} % during the load",
        killed_at.as_secs_f64(),
        since.as_secs_f64(),
        seen.trim(),
        period.as_secs_f64(),
        wal_bytes as f64 / (1 << 20) as f64,
        steal.percent()
    );
    println!(
        "before the kill: {:.0} records written to the WAL, {:.0} rows written to Parquet",
        common::metric_value(&before_kill, "sluice_wal_records_total").unwrap_or(0.0),
        common::metric_value(
            &before_kill,
            "sluice_storage_rows_written_total{table=\"telemetry\"}"
        )
        .unwrap_or(0.0)
    );
    println!("{report}");
    restart_and_check(&data, &serve_args, &report);
}

/// Replay alone: the load with no checkpoint (so the whole run is in the WAL, and no
/// window state or remembered keys come back at the start), kill -9, restart; the
/// replay's rate, the time to ready, every acknowledged reading stored once.
fn replay(args: &Args) {
    println!(
        "replay: {} devices, {} msgs/s, QoS 1, {} connections, {} s with no checkpoint, then kill -9 and restart",
        args.devices, args.rate, args.connections, args.secs
    );
    let dir = tempfile::tempdir().unwrap();
    // No flush, so no checkpoint, before the kill; the hot store holds the whole run.
    let rows = ((args.rate * args.secs * 1.5) as u64).max(1_000_000);
    let storage = format!(
        "[storage]\nflush_interval = \"1h\"\nflush_rows = {rows}\nflush_bytes = {}\nmax_hot_rows = {rows}\n",
        1u64 << 40
    );
    let config = write_config(dir.path(), args, &storage);
    let data = dir.path().join("data");
    let serve_args = ["--config", config.to_str().unwrap()];
    let sluice = common::Sluice::start(&data, &serve_args);
    let steal = Steal::start();
    let report = run_loadgen(
        &sluice.mqtt.to_string(),
        args.devices,
        args.rate,
        args.secs,
        args.connections,
    );
    assert!(
        !data.join("wal/checkpoint").exists(),
        "a checkpoint was taken during the load: the replay would not be of the whole run"
    );
    sluice.kill();
    println!(
        "killed after the load; WAL on disk {:.0} MiB; host steal {:.1} % during the load",
        parquet_bytes(&data.join("wal")) as f64 / (1 << 20) as f64,
        steal.percent()
    );
    println!("{report}");
    restart_and_check(&data, &serve_args, &report);
}

/// Starts sluice again on `data` (killed before), prints the replay's log line, the time
/// to ready and the replay's rate, and checks that every reading `report` counts as
/// acknowledged is stored, none twice.
fn restart_and_check(data: &std::path::Path, serve_args: &[&str], report: &Report) {
    let restarting = Instant::now();
    let steal = Steal::start();
    let sluice = common::Sluice::start(data, serve_args);
    let ready_in = restarting.elapsed();
    let stolen = steal.percent();
    let peak_rss = status_kib(sluice.pid(), "VmHWM:");
    let log = sluice.log_text();
    let line = strip_ansi(
        log.lines()
            .find(|l| l.contains("write-ahead log replayed"))
            .expect("the replay's log line"),
    );
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (records, took_ms) = (field("records"), field("took_ms"));
    println!("{}", line.trim());
    println!(
        "ready {:.2} s after the restart (peak RSS {} MiB, host steal {stolen:.1} %); replayed {records:.0} records in {took_ms:.0} ms: {:.0} records/s; remembered {:.0} keys in {:.0} ms",
        ready_in.as_secs_f64(),
        peak_rss / 1024,
        records / (took_ms / 1e3),
        field("remembered_keys"),
        field("remember_ms"),
    );
    let stored = sluice.scalar("SELECT count(*) FROM telemetry") as u64;
    let twice = sluice.scalar(
        "SELECT count(*) FROM (SELECT device_id, ts FROM telemetry GROUP BY device_id, ts HAVING count(*) > 1)",
    );
    println!(
        "stored {stored} (SQL count) of {} acknowledged, {} sent; readings stored more than once: {twice}",
        report.acked, report.sent
    );
    assert!(sluice.terminate().success());
    assert!(
        stored >= report.acked,
        "acknowledged readings were lost: {stored} stored of {} acknowledged",
        report.acked
    );
    assert_eq!(twice, 0, "a reading stored twice");
}

/// `line` without the terminal colour codes (`ESC [ … m`) tracing writes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Memory the kernel holds for TCP sockets, KiB (`mem` of /proc/net/sockstat, in pages).
fn tcp_memory_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields
                .iter()
                .position(|f| *f == "mem")
                .and_then(|i| fields.get(i + 1)?.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4)
}

/// Set in the environment of the child process that plays the discarding sink.
const SINK_ENV: &str = "SLUICE_BENCH_SINK";

/// The load generator alone: against a stand-in broker (this benchmark re-run as a child
/// process) that answers CONNECT, PUBLISH and PINGREQ with rumqttc's own MQTT codec and
/// throws the messages away. Steps the rate up until the loadgen stops keeping up.
fn loadgen_alone(args: &Args) {
    let mut sink = Command::new(std::env::current_exe().unwrap())
        .env(SINK_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sink.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", port.trim());
    println!(
        "loadgen alone: 100,000 devices, QoS 1, {} connections, {} s per step, against a sink that acknowledges and discards",
        args.connections, args.secs
    );
    let me = std::process::id();
    let mut rate = args.from;
    let mut best = 0.0;
    loop {
        let cpu = (cpu_seconds(me), cpu_seconds(sink.id()));
        let report = run_loadgen(&addr, 100_000, rate, args.secs, args.connections);
        let (loadgen_cpu, sink_cpu) = (
            (cpu_seconds(me) - cpu.0) / report.elapsed_s,
            (cpu_seconds(sink.id()) - cpu.1) / report.elapsed_s,
        );
        let acked_rate = report.acked as f64 / args.secs;
        // Kept up: 99 % of the target acknowledged within the run, p99 within 1 s.
        let sustained = acked_rate >= 0.99 * rate && report.latency.p99_us <= 1_000_000;
        println!(
            "{rate:>8.0} msgs/s target: acked {acked_rate:>8.0}/s  PUBACK p50 {:.1} ms p99 {:.1} ms  loadgen {loadgen_cpu:.2} cores  sink {sink_cpu:.2} cores  peak RSS {} MiB  {}",
            report.latency.p50_us as f64 / 1e3,
            report.latency.p99_us as f64 / 1e3,
            status_kib(me, "VmHWM:") / 1024,
            if sustained { "kept up" } else { "FELL BEHIND" }
        );
        if !sustained {
            break;
        }
        best = rate;
        rate += args.step;
    }
    drop(sink.stdin.take()); // the sink exits when its stdin closes
    let _ = sink.wait();
    println!("loadgen alone keeps up to: {best:.0} msgs/s");
}

/// The sink's process: prints its port, serves until stdin closes.
fn discarding_sink() {
    use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck, QoS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    runtime.spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let mut input = bytes::BytesMut::with_capacity(64 * 1024);
                let mut output = bytes::BytesMut::new();
                while socket.read_buf(&mut input).await.is_ok_and(|n| n > 0) {
                    loop {
                        let reply = match Packet::read(&mut input, 1 << 20) {
                            Ok(Packet::Connect(_)) => {
                                Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
                            }
                            Ok(Packet::Publish(p)) if p.qos == QoS::AtLeastOnce => {
                                Packet::PubAck(PubAck::new(p.pkid))
                            }
                            Ok(Packet::PingReq) => Packet::PingResp,
                            Ok(Packet::Disconnect) => return,
                            Ok(_) => continue,
                            Err(rumqttc::Error::InsufficientBytes(_)) => break,
                            Err(_) => return,
                        };
                        reply.write(&mut output, 1 << 20).unwrap();
                    }
                    if !output.is_empty() {
                        if socket.write_all(&output).await.is_err() {
                            return;
                        }
                        output.clear();
                    }
                }
            });
        }
    });
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}
