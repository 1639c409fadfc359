//! A simulated device fleet publishing seed-schema telemetry over MQTT.
//!
//! Devices `device-000000`… are spread over a few MQTT connections (gateway style). Each
//! connection sends on an open-loop schedule ([`Schedule`]) and measures latency from the
//! scheduled time to the PUBACK (QoS 1) or to the write (QoS 0).

mod bad;
mod fleet;
mod mqtt;
mod schedule;

use std::collections::{HashMap, VecDeque};
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
        let options = mqtt::Options {
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

/// State shared by a connection's sender and its event loop.
#[derive(Default)]
struct InFlight {
    /// Scheduled times of messages handed to the client, not yet written.
    queued: VecDeque<Instant>,
    /// Scheduled times of QoS 1 messages written, by packet id, awaiting PUBACK.
    unacked: HashMap<u16, Instant>,
    /// The connection failed and has not been accepted again: nothing outstanding will
    /// be acknowledged, and the client may not take new messages.
    lost: bool,
}

impl Connection {
    async fn run(
        mut self,
        options: mqtt::Options,
        connecting: Arc<tokio::sync::Semaphore>,
    ) -> Result<(), LoadgenError> {
        let in_flight = Arc::new(Mutex::new(InFlight::default()));

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
            // A fresh client id per attempt: rumqttd 0.20 panics when a client id comes
            // back after a failed connection setup (see ARCHITECTURE.md).
            let (client, mut eventloop) = mqtt::client(&mqtt::Options {
                client_id: match attempts {
                    1 => options.client_id.clone(),
                    n => format!("{}-retry{n}", options.client_id),
                },
                host: options.host.clone(),
                ..options
            });
            let attempt = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let mqtt::Event::ConnAck = eventloop.poll().await? {
                        return Ok::<(), String>(());
                    }
                }
            })
            .await
            .unwrap_or_else(|_| Err("no CONNACK within 10 s".into()));
            match attempt {
                Ok(()) => break Ok((client, eventloop)),
                Err(detail) if attempts >= CONNECT_ATTEMPTS => break Err(detail),
                Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempts)).await,
            }
        };
        drop(permit);
        let (client, eventloop) = match connected {
            Ok(connection) => connection,
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

        let mut events = tokio::spawn(event_loop(
            eventloop,
            self.qos1,
            in_flight.clone(),
            self.progress.clone(),
        ));

        let mut j: u64 = 0;
        loop {
            let due = self.schedule.due(j);
            if self.duration.is_some_and(|d| due >= d) || self.stop.load(Ordering::Relaxed) {
                break;
            }
            let due_at = self.started + due;
            if due_at > Instant::now() {
                // Wake at least every 100 ms so a stop is honoured at low rates too.
                let wake = due_at.min(Instant::now() + Duration::from_millis(100));
                tokio::time::sleep_until(wake.into()).await;
                if wake < due_at {
                    continue;
                }
            }
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
            in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .queued
                .push_back(due_at);
            // The client takes a message only while its event loop drains its queue; with
            // the broker gone it never does, so the wait is bounded by the run's end and
            // the stop flag.
            let publish = client.publish(topic, self.qos1, payload);
            tokio::pin!(publish);
            let published = loop {
                tokio::select! {
                    published = &mut publish => break Some(published),
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        let over = self.duration.is_some_and(|d| self.started.elapsed() >= d);
                        if over || self.stop.load(Ordering::Relaxed) {
                            break None;
                        }
                    }
                }
            };
            match published {
                Some(Ok(())) => {}
                // The event loop ended, or the run is over with the broker not taking
                // messages: this one was never sent, so it awaits nothing.
                Some(Err(_)) | None => {
                    in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .queued
                        .pop_back();
                    break;
                }
            }
            self.progress.sent.fetch_add(1, Ordering::Relaxed);
            j += 1;
        }

        // Let outstanding QoS 1 messages be acknowledged (unless the connection is lost:
        // then none will be), then leave cleanly.
        let drain_deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < drain_deadline {
            let settled = {
                let state = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                state.lost || (state.queued.is_empty() && state.unacked.is_empty())
            };
            if settled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
        let lost = in_flight.lock().unwrap_or_else(|p| p.into_inner()).lost;
        if !lost {
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut events).await;
        }
        // A lost connection's event loop keeps trying to reconnect: it ends here.
        events.abort();
        Ok(())
    }
}

async fn event_loop(
    mut eventloop: mqtt::EventLoop,
    qos1: bool,
    in_flight: Arc<Mutex<InFlight>>,
    progress: Arc<Progress>,
) {
    let mut local = new_histogram();
    let mut merged_at = Instant::now();
    loop {
        let event = eventloop.poll().await;
        let now = Instant::now();
        match event {
            Ok(mqtt::Event::Published(pkid)) => {
                let mut state = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(due) = state.queued.pop_front() {
                    if !qos1 {
                        drop(state);
                        record(&mut local, now, due);
                        progress.acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        state.unacked.insert(pkid, due);
                    }
                }
            }
            Ok(mqtt::Event::PubAck(pkid)) => {
                let due = in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .unacked
                    .remove(&pkid);
                if let Some(due) = due {
                    record(&mut local, now, due);
                    progress.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(mqtt::Event::Refused(pkid, reason)) => {
                in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .unacked
                    .remove(&pkid);
                progress.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%reason, "the broker refused a message");
            }
            Ok(mqtt::Event::Disconnected) => break,
            Ok(mqtt::Event::ConnAck) => {
                in_flight.lock().unwrap_or_else(|p| p.into_inner()).lost = false;
            }
            Ok(_) => {}
            Err(e) => {
                in_flight.lock().unwrap_or_else(|p| p.into_inner()).lost = true;
                progress.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "loadgen connection error; reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if now.duration_since(merged_at) >= Duration::from_millis(200) {
            merge(&progress, &mut local);
            merged_at = now;
        }
    }
    merge(&progress, &mut local);
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
