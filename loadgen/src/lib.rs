//! A simulated device fleet publishing seed-schema telemetry over MQTT.
//!
//! Devices `device-000000`… are spread over a few MQTT connections (gateway style). Each
//! connection sends on an open-loop schedule ([`Schedule`]) and measures latency from the
//! scheduled time to the PUBACK (QoS 1) or to the write (QoS 0).

mod bad;
mod fleet;
mod mqtt;
mod schedule;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

pub use bad::{BAD_KINDS, bad_message};
pub use fleet::{Fleet, Reading, device_id};
pub use mqtt::Protocol;
pub use schedule::Schedule;

/// `sluice-loadgen-<pid>-<n>`: unique per configuration made in this process, so two runs
/// against one broker never share a client id (the broker would drop the older one).
fn unique_client_prefix() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    format!(
        "sluice-loadgen-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Connections connecting at once.
const CONCURRENT_CONNECTS: usize = 64;
/// Attempts to connect one connection before the run fails.
const CONNECT_ATTEMPTS: u64 = 3;

/// File descriptors kept for everything but the MQTT connections.
const RESERVED_FILES: u64 = 64;

/// Errors that stop a run.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("invalid loadgen setting: {0}")]
    Config(String),
    #[error("cannot connect to the MQTT broker at {broker}: {detail}")]
    Connect { broker: String, detail: String },
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct LoadgenConfig {
    /// `host:port` of the MQTT broker.
    pub broker: String,
    /// MQTT 3.1.1 or 5.
    pub protocol: Protocol,
    pub devices: u64,
    /// Messages per second, all devices together.
    pub rate: f64,
    /// How long to send; `None` runs until stopped.
    pub duration: Option<Duration>,
    /// 0 or 1.
    pub qos: u8,
    pub seed: u64,
    /// MQTT connections the devices are spread over.
    pub connections: usize,
    /// QoS 1 messages awaiting PUBACK per connection.
    pub max_inflight: u16,
    pub client_id_prefix: String,
    /// Fraction of messages replaced by malformed ones, cycling through [`BAD_KINDS`].
    pub bad_rate: f64,
    /// Fraction of devices that periodically run hot (see [`Fleet::with_anomaly_rate`]).
    pub anomaly_rate: f64,
}

impl LoadgenConfig {
    pub fn new(broker: impl Into<String>) -> Self {
        LoadgenConfig {
            broker: broker.into(),
            protocol: Protocol::V311,
            devices: 1000,
            rate: 1000.0,
            duration: Some(Duration::from_secs(10)),
            qos: 1,
            seed: 1,
            connections: 4,
            max_inflight: 100,
            client_id_prefix: unique_client_prefix(),
            bad_rate: 0.0,
            anomaly_rate: 0.0,
        }
    }

    fn validate(&self) -> Result<(String, u16), LoadgenError> {
        let bad = |what: String| Err(LoadgenError::Config(what));
        if self.devices == 0 {
            return bad("--devices must be at least 1".into());
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return bad(format!(
                "--rate must be a positive number, got {}",
                self.rate
            ));
        }
        if self.qos > 1 {
            return bad(format!("--qos must be 0 or 1, got {}", self.qos));
        }
        if self.connections == 0 || self.connections as u64 > self.devices {
            return bad(format!(
                "--connections must be between 1 and --devices ({}), got {}",
                self.devices, self.connections
            ));
        }
        for (name, value) in [
            ("--bad-rate", self.bad_rate),
            ("--anomaly-rate", self.anomaly_rate),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return bad(format!("{name} must be between 0 and 1, got {value}"));
            }
        }
        if let Some(limit) = sluice_broker::raise_open_files_limit() {
            let room = limit.saturating_sub(RESERVED_FILES);
            if self.connections as u64 > room {
                return bad(format!(
                    "--connections {} needs as many open files, but this process may open \
                     {limit} (ulimit -n): use at most {room} per loadgen process and run \
                     several",
                    self.connections
                ));
            }
        }
        if self.max_inflight == 0 {
            return bad("--max-inflight must be at least 1".into());
        }
        let (host, port) = self
            .broker
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_owned(), p.parse().ok()?)))
            .ok_or_else(|| {
                LoadgenError::Config(format!("--broker must be HOST:PORT, got {:?}", self.broker))
            })?;
        Ok((host, port))
    }
}

/// Live counters of a run, readable while it goes.
pub struct Progress {
    sent: AtomicU64,
    bad: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            sent: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_us: Mutex::new(new_histogram()),
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// A moment's view of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProgressSnapshot {
    pub sent: u64,
    /// Of those sent, malformed on purpose (`--bad-rate`).
    pub bad: u64,
    pub acked: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Progress {
    pub fn snapshot(&self) -> ProgressSnapshot {
        let sent = self.sent.load(Ordering::Relaxed);
        let acked = self.acked.load(Ordering::Relaxed);
        let latency = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        ProgressSnapshot {
            sent,
            bad: self.bad.load(Ordering::Relaxed),
            acked,
            errors: self.errors.load(Ordering::Relaxed),
            in_flight: sent.saturating_sub(acked),
            p50_us: latency.value_at_quantile(0.5),
            p99_us: latency.value_at_quantile(0.99),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencyReport {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub devices: u64,
    pub connections: usize,
    pub protocol: Protocol,
    pub qos: u8,
    pub target_rate: f64,
    pub elapsed_s: f64,
    /// Messages handed to the MQTT clients.
    pub sent: u64,
    /// Of those, malformed on purpose (`bad_rate`).
    pub bad: u64,
    /// QoS 1: PUBACKs received. QoS 0: messages written to the socket.
    pub acked: u64,
    pub errors: u64,
    pub acked_rate: f64,
    /// From the scheduled time to the PUBACK (QoS 1) or to the write (QoS 0).
    pub latency: LatencyReport,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.latency;
        let what = if self.qos == 1 {
            "publish→PUBACK"
        } else {
            "schedule→write"
        };
        writeln!(
            f,
            "{} devices over {} MQTT {} connections, QoS {}, target {:.0} msgs/s, {:.1} s",
            self.devices,
            self.connections,
            self.protocol,
            self.qos,
            self.target_rate,
            self.elapsed_s
        )?;
        writeln!(
            f,
            "sent {} (malformed {})  acked {}  errors {}  rate {:.0} msgs/s",
            self.sent, self.bad, self.acked, self.errors, self.acked_rate
        )?;
        write!(
            f,
            "{what} latency: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            l.p50_us as f64 / 1e3,
            l.p90_us as f64 / 1e3,
            l.p99_us as f64 / 1e3,
            l.p999_us as f64 / 1e3,
            l.max_us as f64 / 1e3
        )
    }
}

/// Runs the fleet until `duration` passes or `stop` is set, then waits (up to 10 s) for
/// outstanding acknowledgements and disconnects.
pub async fn run(
    config: LoadgenConfig,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
) -> Result<Report, LoadgenError> {
    let (host, port) = config.validate()?;
    let started = Instant::now();
    let wall_start = SystemTime::now();
    let connections = config.connections as u64;
    let mut tasks = Vec::with_capacity(config.connections);
    let connecting = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CONNECTS));
    for c in 0..connections {
        let schedule = Schedule::for_connection(c, connections, config.devices, config.rate);
        let indices = (0..schedule.devices)
            .map(|slot| Schedule::device_index(c, connections, slot))
            .collect();
        let options = Options {
            protocol: config.protocol,
            client_id: format!("{}-{c}", config.client_id_prefix),
            host: host.clone(),
            port,
            max_inflight: config.max_inflight,
        };
        let connection = Connection {
            schedule,
            fleet: Fleet::new(config.seed, indices).with_anomaly_rate(config.anomaly_rate),
            bad_rate: config.bad_rate,
            rng: ChaCha8Rng::seed_from_u64(config.seed.wrapping_add(c)),
            qos1: config.qos == 1,
            started,
            wall_start,
            duration: config.duration,
            progress: progress.clone(),
            stop: stop.clone(),
            broker: config.broker.clone(),
        };
        tasks.push(tokio::spawn(connection.run(options, connecting.clone())));
    }
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(join) => {
                first_error.get_or_insert(LoadgenError::Connect {
                    broker: config.broker.clone(),
                    detail: format!("a connection task failed: {join}"),
                });
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let snapshot = progress.snapshot();
    let latency = progress
        .latency_us
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    Ok(Report {
        devices: config.devices,
        connections: config.connections,
        protocol: config.protocol,
        qos: config.qos,
        target_rate: config.rate,
        elapsed_s: elapsed,
        sent: snapshot.sent,
        bad: snapshot.bad,
        acked: snapshot.acked,
        errors: snapshot.errors,
        acked_rate: snapshot.acked as f64 / elapsed.max(1e-9),
        latency: LatencyReport {
            count: latency.len(),
            p50_us: latency.value_at_quantile(0.5),
            p90_us: latency.value_at_quantile(0.9),
            p99_us: latency.value_at_quantile(0.99),
            p999_us: latency.value_at_quantile(0.999),
            max_us: latency.max(),
        },
    })
}

struct Connection {
    schedule: Schedule,
    fleet: Fleet,
    bad_rate: f64,
    /// Decides which messages are malformed, reproducibly from the seed.
    rng: ChaCha8Rng,
    /// QoS 1 (else 0).
    qos1: bool,
    started: Instant,
    wall_start: SystemTime,
    duration: Option<Duration>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    broker: String,
}

/// Where a connection connects, and how.
struct Options {
    protocol: Protocol,
    client_id: String,
    host: String,
    port: u16,
    max_inflight: u16,
}

/// Bytes of PUBLISH packets written at once at most.
const WRITE_BYTES: usize = 64 * 1024;
/// A connection writes at most this often: what became due meanwhile goes in one write,
/// as a gateway forwarding many devices does (latency is still measured from each
/// message's scheduled time, so the wait counts against the broker's figures, not for
/// them). Without it, a broker that answers every write at once has the connection
/// write a few messages at a time, tens of thousands of times a second.
const WRITE_EVERY: Duration = Duration::from_millis(1);
/// How often a waiting connection looks at the stop flag and the end of the run.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// How long a lost connection waits before it connects again.
const RECONNECT_AFTER: Duration = Duration::from_millis(200);
/// How long a run waits for the acknowledgements still outstanding at its end.
const DRAIN: Duration = Duration::from_secs(10);

/// Messages encoded and not yet written, with their packet ids and scheduled times.
#[derive(Default)]
struct Outbox {
    bytes: bytes::BytesMut,
    messages: Vec<(u16, Instant)>,
}

impl Connection {
    async fn run(
        mut self,
        options: Options,
        connecting: Arc<tokio::sync::Semaphore>,
    ) -> Result<(), LoadgenError> {
        // Connect first, so a broker that is not there is an error, not a silent stall.
        // Only a few connections connect at once (a broker's listen backlog is small),
        // and a refused or timed-out attempt is retried a few times.
        let permit = connecting
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut attempts = 0;
        let connected = loop {
            attempts += 1;
            // A fresh client id per attempt: a broker may still hold the last one.
            let client_id = match attempts {
                1 => options.client_id.clone(),
                n => format!("{}-retry{n}", options.client_id),
            };
            let attempt = tokio::time::timeout(
                Duration::from_secs(10),
                mqtt::connect(&options.host, options.port, options.protocol, &client_id),
            )
            .await
            .unwrap_or_else(|_| Err("no CONNACK within 10 s".into()));
            match attempt {
                Ok(connection) => break Ok(connection),
                Err(detail) if attempts >= CONNECT_ATTEMPTS => break Err(detail),
                Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempts)).await,
            }
        };
        drop(permit);
        let mut link = match connected {
            Ok(connection) => Some(connection),
            Err(detail) => {
                return Err(LoadgenError::Connect {
                    broker: self.broker,
                    detail: format!("{detail} (after {attempts} attempts)"),
                });
            }
        };
        // This connection's schedule starts now: connecting thousands of connections takes
        // a while, and latency is measured from the schedule.
        self.started = Instant::now();
        self.wall_start = SystemTime::now();
        let end = self.duration.map(|d| self.started + d);

        let window = |link: &Option<mqtt::Connection>| {
            let receive_maximum = link.as_ref().map_or(u16::MAX, |l| l.receive_maximum);
            usize::from(options.max_inflight.min(receive_maximum))
        };
        let mut state = Flow {
            in_flight: HashMap::with_capacity(usize::from(options.max_inflight)),
            outbox: Outbox::default(),
            next_pkid: 1,
            histogram: new_histogram(),
            merged_at: Instant::now(),
            last_write: Instant::now(),
        };
        let mut j: u64 = 0;
        let mut reconnect_at = Instant::now();
        loop {
            let now = Instant::now();
            let room = window(&link);
            let full = self.qos1 && state.in_flight.len() + state.outbox.messages.len() >= room;
            // Past the end, what is due is still sent, unless it cannot be.
            let over = end.is_some_and(|end| now >= end);
            if self.stop.load(Ordering::Relaxed) || (over && (link.is_none() || full)) {
                break;
            }
            // Everything due by now, as far as the window allows.
            let mut made = 0;
            while state.outbox.bytes.len() < WRITE_BYTES
                && (!self.qos1 || state.in_flight.len() + state.outbox.messages.len() < room)
            {
                let due = self.schedule.due(j);
                if self.duration.is_some_and(|d| due >= d) || self.started + due > now {
                    break;
                }
                self.encode(j, &mut state, options.protocol);
                j += 1;
                made += 1;
            }
            self.progress.sent.fetch_add(made, Ordering::Relaxed);
            let schedule_done = self.duration.is_some_and(|d| self.schedule.due(j) >= d);
            if schedule_done && state.outbox.messages.is_empty() {
                break;
            }

            if let Some(connection) = link.as_mut() {
                let keep_alive = now >= state.last_write + mqtt::KEEP_ALIVE / 2;
                let ready = state.outbox.bytes.len() >= WRITE_BYTES
                    || (!state.outbox.bytes.is_empty() && now >= state.last_write + WRITE_EVERY);
                if ready || keep_alive {
                    let written = if state.outbox.bytes.is_empty() {
                        connection.ping().await
                    } else {
                        write_until(connection, &state.outbox.bytes, end, &self.stop).await
                    };
                    match written {
                        Ok(()) => state.written(self.qos1, &self.progress),
                        Err(_) => {
                            link = None;
                            self.lost(&mut state);
                            reconnect_at = Instant::now() + RECONNECT_AFTER;
                            continue;
                        }
                    }
                }
            }

            // Wait for the next message, an acknowledgement, the keep alive or a stop.
            let mut wake = Instant::now() + STOP_CHECK;
            if !state.outbox.messages.is_empty() {
                wake = wake.min(state.last_write + WRITE_EVERY);
            } else if !schedule_done && (!self.qos1 || state.in_flight.len() < window(&link)) {
                wake = wake
                    .min((self.started + self.schedule.due(j)).max(state.last_write + WRITE_EVERY));
            }
            match link.as_mut() {
                Some(connection) => {
                    wake = wake.min(state.last_write + mqtt::KEEP_ALIVE / 2);
                    let read = tokio::select! {
                        read = connection.read() => Some(read),
                        () = tokio::time::sleep_until(wake.into()) => None,
                    };
                    let alive = match read {
                        None => true,
                        Some(Ok(true)) => state.take_events(connection, &self.progress),
                        Some(Ok(false) | Err(_)) => false,
                    };
                    if !alive {
                        link = None;
                        self.lost(&mut state);
                        reconnect_at = Instant::now() + RECONNECT_AFTER;
                    }
                }
                None => {
                    tokio::time::sleep_until(wake.min(reconnect_at).into()).await;
                    if Instant::now() >= reconnect_at {
                        match tokio::time::timeout(
                            Duration::from_secs(1),
                            mqtt::connect(
                                &options.host,
                                options.port,
                                options.protocol,
                                &options.client_id,
                            ),
                        )
                        .await
                        {
                            Ok(Ok(connection)) => link = Some(connection),
                            Ok(Err(_)) | Err(_) => {
                                self.progress.errors.fetch_add(1, Ordering::Relaxed);
                                reconnect_at = Instant::now() + RECONNECT_AFTER;
                            }
                        }
                    }
                }
            }
            state.merge(&self.progress, false);
        }

        // Let outstanding QoS 1 messages be acknowledged (unless the connection is lost:
        // then none will be), then leave cleanly.
        if let Some(mut connection) = link {
            let deadline = Instant::now() + DRAIN;
            let mut alive = true;
            while alive && !state.in_flight.is_empty() && Instant::now() < deadline {
                alive = tokio::select! {
                    read = connection.read() => match read {
                        Ok(true) => state.take_events(&mut connection, &self.progress),
                        Ok(false) | Err(_) => false,
                    },
                    () = tokio::time::sleep_until(deadline.into()) => true,
                };
            }
            if alive {
                let _ = tokio::time::timeout(Duration::from_secs(1), connection.disconnect()).await;
            }
        }
        state.merge(&self.progress, true);
        Ok(())
    }

    /// Makes message `j` and puts it into the outbox.
    fn encode(&mut self, j: u64, state: &mut Flow, protocol: Protocol) {
        let due = self.schedule.due(j);
        let slot = self.schedule.slot(j) as usize;
        let wall = self.wall_start + due;
        let unix = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let reading = self.fleet.next_reading(slot, unix);
        let id = device_id(reading.device_index);
        let timestamp = chrono::DateTime::<chrono::Utc>::from(wall)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let malformed = self.bad_rate > 0.0 && self.rng.random_range(0.0..1.0) < self.bad_rate;
        let (topic, payload) = if malformed {
            let kind = self.progress.bad.fetch_add(1, Ordering::Relaxed) as usize;
            bad_message(kind, &id, &timestamp)
        } else {
            (
                format!("devices/{id}/telemetry"),
                self.fleet.payload(&reading, &id, &timestamp),
            )
        };
        let pkid = if self.qos1 { state.pkid() } else { 0 };
        mqtt::encode_publish(
            protocol,
            &mut state.outbox.bytes,
            topic,
            payload,
            self.qos1,
            pkid,
        );
        state.outbox.messages.push((pkid, self.started + due));
    }

    /// The connection broke: what it had written and not seen acknowledged never will
    /// be; what is encoded waits for the next connection.
    fn lost(&self, state: &mut Flow) {
        state.in_flight.clear();
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("loadgen connection lost; reconnecting");
    }
}

/// A connection's messages on their way.
struct Flow {
    /// Scheduled times of QoS 1 messages written, by packet id, awaiting PUBACK.
    in_flight: HashMap<u16, Instant>,
    outbox: Outbox,
    next_pkid: u16,
    histogram: Histogram<u64>,
    merged_at: Instant,
    last_write: Instant,
}

impl Flow {
    /// A packet id not in flight.
    fn pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.in_flight.contains_key(&pkid) {
                return pkid;
            }
        }
    }

    /// The outbox was written.
    fn written(&mut self, qos1: bool, progress: &Progress) {
        let now = Instant::now();
        self.last_write = now;
        self.outbox.bytes.clear();
        if qos1 {
            self.in_flight.extend(self.outbox.messages.drain(..));
        } else {
            let n = self.outbox.messages.len() as u64;
            for (_, due) in self.outbox.messages.drain(..) {
                record(&mut self.histogram, now, due);
            }
            progress.acked.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Takes the acknowledgements read; false when the broker broke the connection.
    fn take_events(&mut self, connection: &mut mqtt::Connection, progress: &Progress) -> bool {
        let now = Instant::now();
        let mut acked = 0;
        let alive = loop {
            match connection.next_event() {
                Ok(Some(mqtt::Event::PubAck(pkid))) => {
                    if let Some(due) = self.in_flight.remove(&pkid) {
                        record(&mut self.histogram, now, due);
                        acked += 1;
                    }
                }
                Ok(Some(mqtt::Event::Refused(pkid, reason))) => {
                    self.in_flight.remove(&pkid);
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%reason, "the broker refused a message");
                }
                Ok(Some(mqtt::Event::Other)) => {}
                Ok(None) => break true,
                Err(e) => {
                    tracing::warn!(error = %e, "loadgen connection ended by the broker");
                    break false;
                }
            }
        };
        progress.acked.fetch_add(acked, Ordering::Relaxed);
        alive
    }

    /// Hands the latencies recorded to the shared histogram now and then.
    fn merge(&mut self, progress: &Progress, now_anyway: bool) {
        let now = Instant::now();
        if now_anyway || now.duration_since(self.merged_at) >= Duration::from_millis(200) {
            merge(progress, &mut self.histogram);
            self.merged_at = now;
        }
    }
}

/// Writes `bytes`, giving up when the run ends or is stopped (a broker that stopped
/// reading would otherwise hold the run).
async fn write_until(
    connection: &mut mqtt::Connection,
    bytes: &[u8],
    end: Option<Instant>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let write = connection.write(bytes);
    tokio::pin!(write);
    loop {
        tokio::select! {
            written = &mut write => return written,
            () = tokio::time::sleep(STOP_CHECK) => {
                if end.is_some_and(|end| Instant::now() >= end) || stop.load(Ordering::Relaxed) {
                    return Err(std::io::Error::other("the run ended while writing"));
                }
            }
        }
    }
}

fn record(histogram: &mut Histogram<u64>, now: Instant, due: Instant) {
    let micros = now.saturating_duration_since(due).as_micros() as u64;
    histogram.saturating_record(micros.max(1));
}

fn merge(progress: &Progress, local: &mut Histogram<u64>) {
    if local.is_empty() {
        return;
    }
    let mut global = progress
        .latency_us
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let _ = global.add(&*local);
    local.reset();
}
