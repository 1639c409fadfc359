//! Delivery of alert transitions, off the ingestion path: MQTT (QoS 1, topic
//! `alerts/{deviceId}/{rule}`, on sluice's own broker), webhooks (HTTP POST with a
//! timeout, retries with exponential backoff and jitter, a circuit breaker per endpoint),
//! and a dead-letter table for whatever cannot be delivered.
//!
//! [`Notifier::notify`] never blocks: each channel has a bounded queue, and an event that
//! finds its queue full is a dead letter at once. Each channel runs on its own thread.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::{RecordBatch, StringArray, TimestampNanosecondArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::alert::AlertEvent;
use crate::stage::{TableSink, wall_ns};

/// The table of notifications that could not be delivered.
pub const DEAD_LETTER_TABLE: &str = "alert_dead_letters";

/// Events waiting per channel; beyond, new events are dead letters.
const QUEUE: usize = 10_000;
/// An MQTT publish the broker has not acknowledged after this long is a dead letter.
const MQTT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// At a stop, queued events get this long to go out (one attempt each).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One `[[webhook]]` entry of the configuration, as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    pub url: String,
    /// Per attempt (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Attempts per event before it is a dead letter (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Wait after the first failed attempt, doubled after each (default 500ms)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// …up to this (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<String>,
    /// Consecutive failed attempts that open the circuit (default 5)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker_failures: Option<u32>,
    /// …which stays open this long before one trial attempt (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker_cooldown: Option<String>,
}

/// A validated webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: String,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
}

impl WebhookSpec {
    /// Checks the entry; the error names its URL.
    pub fn compile(&self) -> Result<Webhook, String> {
        let url = &self.url;
        let fail = |what: String| Err(format!("webhook {url:?}: {what}"));
        match reqwest::Url::parse(url) {
            Ok(parsed)
                if ["http", "https"].contains(&parsed.scheme()) && parsed.host().is_some() => {}
            Ok(_) => return fail("must be an http:// or https:// URL with a host".into()),
            Err(e) => return fail(format!("is not a URL: {e}")),
        }
        let duration = |key: &str, text: &Option<String>, default: Duration| {
            text.as_deref().map_or(Ok(default), |t| {
                humantime::parse_duration(t)
                    .map_err(|e| format!("webhook {url:?}: {key} = {t:?} is not a duration ({e})"))
            })
        };
        let webhook = Webhook {
            url: url.clone(),
            timeout: duration("timeout", &self.timeout, Duration::from_secs(5))?,
            max_attempts: self.max_attempts.unwrap_or(6),
            backoff: duration("backoff", &self.backoff, Duration::from_millis(500))?,
            max_backoff: duration("max_backoff", &self.max_backoff, Duration::from_secs(30))?,
            breaker_failures: self.breaker_failures.unwrap_or(5),
            breaker_cooldown: duration(
                "breaker_cooldown",
                &self.breaker_cooldown,
                Duration::from_secs(30),
            )?,
        };
        if webhook.timeout.is_zero() {
            return fail("timeout must be more than 0".into());
        }
        if webhook.max_attempts == 0 || webhook.breaker_failures == 0 {
            return fail("max_attempts and breaker_failures must be at least 1".into());
        }
        if webhook.max_backoff < webhook.backoff {
            return fail("max_backoff must be at least backoff".into());
        }
        Ok(webhook)
    }
}

/// Validates a whole webhook set (each entry, and URLs unique).
pub fn compile_webhooks(specs: &[WebhookSpec]) -> Result<Vec<Webhook>, String> {
    let hooks = specs
        .iter()
        .map(WebhookSpec::compile)
        .collect::<Result<Vec<_>, _>>()?;
    for (i, hook) in hooks.iter().enumerate() {
        if hooks[..i].iter().any(|h| h.url == hook.url) {
            return Err(format!("webhook {:?} is listed twice", hook.url));
        }
    }
    Ok(hooks)
}

fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The JSON body of a notification (MQTT payload and webhook body alike).
pub fn notification_json(event: &AlertEvent) -> String {
    serde_json::json!({
        "rule": &*event.rule,
        "device": &*event.device,
        "state": event.state.as_str(),
        "severity": &*event.severity,
        "metric": event.metric.as_deref(),
        "value": event.value,
        "threshold": event.threshold,
        "started_at": rfc3339(event.started_at),
        "event_time": rfc3339(event.event_time),
        "duration_s": event.duration_s(),
        "reason": event.reason,
    })
    .to_string()
}

/// The MQTT topic of a notification.
pub fn notification_topic(event: &AlertEvent) -> String {
    format!("alerts/{}/{}", event.device, event.rule)
}

static DEAD_LETTER_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("ts", ts, false),
        Field::new("channel", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("attempts", DataType::UInt32, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("payload", DataType::Utf8, false),
    ]))
});

/// Schema of `alert_dead_letters`.
pub fn dead_letter_schema() -> SchemaRef {
    DEAD_LETTER_SCHEMA.clone()
}

/// A notification on its way.
#[derive(Debug, Clone)]
struct Job {
    rule: Arc<str>,
    device: Box<str>,
    state: &'static str,
    topic: String,
    payload: Arc<str>,
}

impl Job {
    fn new(event: &AlertEvent) -> Job {
        Job {
            rule: event.rule.clone(),
            device: event.device.clone(),
            state: event.state.as_str(),
            topic: notification_topic(event),
            payload: notification_json(event).into(),
        }
    }
}

/// Writes dead letters to their table and counts deliveries.
#[derive(Clone)]
struct Outcomes {
    sink: Arc<dyn TableSink>,
    metrics: DeliveryMetrics,
}

impl Outcomes {
    fn delivered(&self, channel: &str) {
        self.metrics.outcome(channel, "delivered");
    }

    fn dead(&self, channel: &str, job: &Job, attempts: u32, error: &str) {
        tracing::warn!(channel, rule = %job.rule, device = %job.device, attempts, error, "alert notification not delivered: kept in alert_dead_letters");
        self.metrics.outcome(channel, "dead_letter");
        let batch = RecordBatch::try_new(
            DEAD_LETTER_SCHEMA.clone(),
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![wall_ns()]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec![channel])),
                Arc::new(StringArray::from(vec![&*job.rule])),
                Arc::new(StringArray::from(vec![&*job.device])),
                Arc::new(StringArray::from(vec![job.state])),
                Arc::new(UInt32Array::from(vec![attempts])),
                Arc::new(StringArray::from(vec![error])),
                Arc::new(StringArray::from(vec![&*job.payload])),
            ],
        );
        match batch {
            Ok(batch) => self.sink.append(DEAD_LETTER_TABLE, batch),
            Err(e) => tracing::error!(error = %e, "cannot build a dead-letter row (a bug)"),
        }
    }
}

/// Prometheus figures of delivery.
#[derive(Clone)]
pub struct DeliveryMetrics {
    outcomes: IntCounterVec,
    circuit_open: IntGaugeVec,
}

impl DeliveryMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = DeliveryMetrics {
            outcomes: IntCounterVec::new(
                Opts::new(
                    "sluice_alert_deliveries_total",
                    "Alert notifications by channel (mqtt or the webhook URL) and outcome: delivered, failed_attempt, dead_letter",
                ),
                &["channel", "outcome"],
            )?,
            circuit_open: IntGaugeVec::new(
                Opts::new(
                    "sluice_webhook_circuit_open",
                    "1 while a webhook's circuit breaker is open (attempts paused)",
                ),
                &["channel"],
            )?,
        };
        registry.register(Box::new(metrics.outcomes.clone()))?;
        registry.register(Box::new(metrics.circuit_open.clone()))?;
        Ok(metrics)
    }

    pub fn unregistered() -> Self {
        Self::new(&Registry::new()).unwrap_or_else(|e| unreachable!("fresh registry: {e}"))
    }

    fn outcome(&self, channel: &str, outcome: &str) {
        self.outcomes.with_label_values(&[channel, outcome]).inc();
    }
}

/// Sends every alert transition to every channel.
pub struct Notifier {
    mqtt: Option<MqttChannel>,
    webhooks: Mutex<Vec<Endpoint>>,
    outcomes: Outcomes,
}

impl Notifier {
    /// `broker`: where to publish (sluice's own MQTT listener); `None` publishes nothing.
    /// Dead letters go to `sink`'s `alert_dead_letters`.
    pub fn start(
        broker: Option<SocketAddr>,
        webhooks: Vec<Webhook>,
        sink: Arc<dyn TableSink>,
        metrics: DeliveryMetrics,
    ) -> std::io::Result<Notifier> {
        let outcomes = Outcomes { sink, metrics };
        let mqtt = broker
            .map(|addr| MqttChannel::start(addr, outcomes.clone()))
            .transpose()?;
        let notifier = Notifier {
            mqtt,
            webhooks: Mutex::new(Vec::new()),
            outcomes,
        };
        notifier.set_webhooks(webhooks)?;
        Ok(notifier)
    }

    /// Queues `event` on every channel; never blocks.
    pub fn notify(&self, event: &AlertEvent) {
        let job = Job::new(event);
        if let Some(mqtt) = &self.mqtt {
            mqtt.send(job.clone());
        }
        for endpoint in self
            .webhooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            endpoint.send(job.clone(), &self.outcomes);
        }
    }

    /// Replaces the webhooks (a reload): an endpoint listed with the same settings keeps
    /// running (and its queue); a removed or changed one stops, its queued notifications
    /// going out within the stop grace or to the dead letters, and a changed one starts
    /// again with its new settings.
    pub fn set_webhooks(&self, webhooks: Vec<Webhook>) -> std::io::Result<()> {
        let mut endpoints = self.webhooks.lock().unwrap_or_else(|p| p.into_inner());
        let mut old = std::mem::take(&mut *endpoints);
        for hook in webhooks {
            match old
                .iter()
                .position(|e| e.hook.url == hook.url && *e.hook == hook)
            {
                Some(i) => endpoints.push(old.swap_remove(i)),
                None => endpoints.push(Endpoint::start(hook, self.outcomes.clone())?),
            }
        }
        drop(endpoints);
        for endpoint in old {
            endpoint.stop();
        }
        Ok(())
    }

    /// Delivers what is queued (within a grace period) and stops; what is left is a dead
    /// letter.
    pub fn shutdown(&self) {
        let endpoints =
            std::mem::take(&mut *self.webhooks.lock().unwrap_or_else(|p| p.into_inner()));
        let stopping: Vec<_> = endpoints.into_iter().map(Endpoint::begin_stop).collect();
        if let Some(mqtt) = &self.mqtt {
            mqtt.stop();
        }
        for thread in stopping.into_iter().flatten() {
            let _ = thread.join();
        }
    }
}

/// One webhook's queue and worker.
struct Endpoint {
    hook: Arc<Webhook>,
    tx: Option<Sender<Job>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    fn start(hook: Webhook, outcomes: Outcomes) -> std::io::Result<Endpoint> {
        let hook = Arc::new(hook);
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let stopping = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            hook: hook.clone(),
            stopping: stopping.clone(),
            outcomes,
            client: reqwest::blocking::Client::builder()
                .timeout(hook.timeout)
                .build()
                .map_err(std::io::Error::other)?,
            failures: 0,
            open_until: None,
            stop_deadline: None,
            jitter: ChaCha8Rng::seed_from_u64(wall_ns() as u64),
            last_error: String::new(),
        };
        let thread = std::thread::Builder::new()
            .name("alerts-webhook".into())
            .spawn(move || worker.run(rx))?;
        Ok(Endpoint {
            hook,
            tx: Some(tx),
            stopping,
            thread: Some(thread),
        })
    }

    fn send(&self, job: Job, outcomes: &Outcomes) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => outcomes.dead(
                &self.hook.url,
                &job,
                0,
                &format!("{QUEUE} notifications already waiting for this webhook"),
            ),
            Err(TrySendError::Disconnected(job)) => {
                outcomes.dead(&self.hook.url, &job, 0, "the webhook worker stopped")
            }
        }
    }

    fn begin_stop(mut self) -> Option<JoinHandle<()>> {
        self.stopping.store(true, Ordering::SeqCst);
        self.tx = None;
        self.thread.take()
    }

    fn stop(self) {
        if let Some(thread) = self.begin_stop() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    hook: Arc<Webhook>,
    stopping: Arc<AtomicBool>,
    outcomes: Outcomes,
    client: reqwest::blocking::Client,
    /// Consecutive failed attempts.
    failures: u32,
    open_until: Option<Instant>,
    stop_deadline: Option<Instant>,
    jitter: ChaCha8Rng,
    /// The endpoint's latest failure, for dead letters written without an attempt.
    last_error: String,
}

enum Attempt {
    Delivered,
    /// Worth retrying (connection error, timeout, 5xx, 408, 429).
    Retry(String),
    /// The endpoint refuses this notification (other 4xx): retrying will not help.
    Refused(String),
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            self.deliver(&job);
        }
    }

    fn stopping(&mut self) -> bool {
        if self.stopping.load(Ordering::Relaxed) {
            self.stop_deadline
                .get_or_insert_with(|| Instant::now() + STOP_GRACE);
            true
        } else {
            false
        }
    }

    /// Sleeps up to `d`; false if a stop cut it short.
    fn sleep(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.stopping() {
                return false;
            }
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
        true
    }

    fn deliver(&mut self, job: &Job) {
        let url = self.hook.url.clone();
        let mut attempts = 0;
        let mut last_error = String::new();
        while attempts < self.hook.max_attempts {
            let stopped =
                self.stopping() && self.stop_deadline.is_some_and(|d| Instant::now() >= d);
            let open = self.open_until.filter(|until| *until > Instant::now());
            if let Some(until) = open
                && !stopped
                && !self.stopping()
            {
                self.sleep(until - Instant::now());
            }
            let open = self.open_until.is_some_and(|until| until > Instant::now());
            if stopped || (open && self.stopping()) {
                let mut error = "sluice stopped before delivery".to_owned();
                if open {
                    error.push_str(" (the circuit was open)");
                }
                if !self.last_error.is_empty() {
                    error.push_str(&format!("; last error: {}", self.last_error));
                }
                return self.outcomes.dead(&url, job, attempts, &error);
            }
            attempts += 1;
            match self.attempt(job) {
                Attempt::Delivered => {
                    self.close_circuit();
                    return self.outcomes.delivered(&url);
                }
                Attempt::Refused(error) => {
                    self.close_circuit();
                    return self.outcomes.dead(&url, job, attempts, &error);
                }
                Attempt::Retry(error) => {
                    self.outcomes.metrics.outcome(&url, "failed_attempt");
                    self.failures += 1;
                    if self.failures >= self.hook.breaker_failures && self.open_until.is_none() {
                        tracing::warn!(url, failures = self.failures, cooldown = ?self.hook.breaker_cooldown, "webhook circuit open: pausing attempts");
                        self.outcomes
                            .metrics
                            .circuit_open
                            .with_label_values(&[&url])
                            .set(1);
                    }
                    if self.failures >= self.hook.breaker_failures {
                        self.open_until = Some(Instant::now() + self.hook.breaker_cooldown);
                    }
                    self.last_error.clone_from(&error);
                    last_error = error;
                    if attempts < self.hook.max_attempts && !self.stopping() {
                        let backoff = self.backoff(attempts);
                        self.sleep(backoff);
                    }
                }
            }
        }
        let error = format!("gave up after {attempts} attempts: {last_error}");
        self.outcomes.dead(&url, job, attempts, &error);
    }

    fn close_circuit(&mut self) {
        if self.open_until.take().is_some() {
            tracing::info!(url = %self.hook.url, "webhook circuit closed");
            self.outcomes
                .metrics
                .circuit_open
                .with_label_values(&[&self.hook.url])
                .set(0);
        }
        self.failures = 0;
    }

    /// The wait after failed attempt `n` (1-based): `backoff · 2^(n−1)` capped at
    /// `max_backoff`, jittered to between half and all of it, so endpoints recovering
    /// from an outage are not hit in lockstep.
    fn backoff(&mut self, n: u32) -> Duration {
        let base = self
            .hook
            .backoff
            .saturating_mul(1 << (n - 1).min(20))
            .min(self.hook.max_backoff);
        base.mul_f64(self.jitter.random_range(0.5..=1.0))
    }

    fn attempt(&self, job: &Job) -> Attempt {
        let response = self
            .client
            .post(&self.hook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(job.payload.to_string())
            .send();
        match response {
            Ok(r) if r.status().is_success() => Attempt::Delivered,
            Ok(r) => {
                let status = r.status();
                let error = format!("HTTP {status}");
                if status.is_client_error()
                    && status != reqwest::StatusCode::REQUEST_TIMEOUT
                    && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                {
                    Attempt::Refused(error)
                } else {
                    Attempt::Retry(error)
                }
            }
            Err(e) if e.is_timeout() => {
                Attempt::Retry(format!("no answer within {:?}", self.hook.timeout))
            }
            Err(e) => Attempt::Retry(error_chain(&e)),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Publishes on sluice's broker as an ordinary MQTT client, QoS 1: a notification counts
/// as delivered when the broker acknowledges it.
struct MqttChannel {
    client: rumqttc::Client,
    inflight: Arc<Mutex<VecDeque<Inflight>>>,
    outcomes: Outcomes,
    stopping: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Inflight {
    job: Job,
    pkid: Option<u16>,
    queued: Instant,
}

const MQTT: &str = "mqtt";
/// How long the publisher waits for an event before it looks at `stopping` again.
const POLL_EVENTS: Duration = Duration::from_secs(1);

impl MqttChannel {
    fn start(broker: SocketAddr, outcomes: Outcomes) -> std::io::Result<MqttChannel> {
        let mut addr = broker;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let client_id = format!("sluice-alerts-{}", std::process::id());
        let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(1000);
        let (client, mut connection) = rumqttc::Client::new(options, QUEUE);
        let inflight: Arc<Mutex<VecDeque<Inflight>>> = Arc::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let inflight = inflight.clone();
            let outcomes = outcomes.clone();
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name("alerts-mqtt".into())
                .spawn(move || {
                    let mut last_error = String::new();
                    let mut stop_deadline: Option<Instant> = None;
                    loop {
                        if stopping.load(Ordering::Relaxed) {
                            let deadline =
                                *stop_deadline.get_or_insert_with(|| Instant::now() + STOP_GRACE);
                            let empty = inflight
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .is_empty();
                            if empty || Instant::now() >= deadline {
                                break;
                            }
                        }
                        // rumqttc drops a connection attempt whose CONNACK has not come
                        // when this times out, and connects again: a short timeout made
                        // a loaded broker see several connections from this client.
                        match connection.recv_timeout(POLL_EVENTS) {
                            Ok(Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                                let mut queue = inflight.lock().unwrap_or_else(|p| p.into_inner());
                                if !queue.iter().any(|i| i.pkid == Some(pkid))
                                    && let Some(next) = queue.iter_mut().find(|i| i.pkid.is_none())
                                {
                                    next.pkid = Some(pkid);
                                }
                            }
                            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack)))) => {
                                let mut queue = inflight.lock().unwrap_or_else(|p| p.into_inner());
                                if let Some(i) = queue.iter().position(|i| i.pkid == Some(ack.pkid))
                                {
                                    queue.remove(i);
                                    outcomes.delivered(MQTT);
                                }
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => {
                                last_error =
                                    format!("cannot reach the broker: {}", error_chain(&e));
                                tracing::debug!(error = %last_error, "alert publisher");
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            Err(rumqttc::RecvTimeoutError::Timeout) => {}
                            Err(rumqttc::RecvTimeoutError::Disconnected) => break,
                        }
                        let expired: Vec<Inflight> = {
                            let mut queue = inflight.lock().unwrap_or_else(|p| p.into_inner());
                            let mut expired = Vec::new();
                            while queue
                                .front()
                                .is_some_and(|i| i.queued.elapsed() >= MQTT_ACK_TIMEOUT)
                            {
                                expired.extend(queue.pop_front());
                            }
                            expired
                        };
                        for i in expired {
                            let error = format!(
                                "no PUBACK from the broker within {MQTT_ACK_TIMEOUT:?} {last_error}"
                            );
                            outcomes.dead(MQTT, &i.job, 1, error.trim_end());
                        }
                    }
                    let left =
                        std::mem::take(&mut *inflight.lock().unwrap_or_else(|p| p.into_inner()));
                    for i in left {
                        outcomes.dead(
                            MQTT,
                            &i.job,
                            1,
                            "sluice stopped before the broker acknowledged it",
                        );
                    }
                })?
        };
        Ok(MqttChannel {
            client,
            inflight,
            outcomes,
            stopping,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, job: Job) {
        if self.stopping.load(Ordering::Relaxed) {
            return self.outcomes.dead(MQTT, &job, 0, "the broker is stopping");
        }
        let mut queue = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= QUEUE {
            drop(queue);
            return self.outcomes.dead(
                MQTT,
                &job,
                0,
                &format!("{QUEUE} notifications already waiting for the broker"),
            );
        }
        match self.client.try_publish(
            job.topic.clone(),
            rumqttc::QoS::AtLeastOnce,
            false,
            job.payload.as_bytes().to_vec(),
        ) {
            Ok(()) => queue.push_back(Inflight {
                job,
                pkid: None,
                queued: Instant::now(),
            }),
            Err(e) => {
                drop(queue);
                self.outcomes
                    .dead(MQTT, &job, 0, &format!("cannot queue the publish: {e}"));
            }
        }
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
        let _ = self.client.try_disconnect();
    }
}
