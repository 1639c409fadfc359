//! Delivery of alert transitions, off the ingestion path.
//!
//! The aggregator emits each transition to an [`AlertOutput`]; the [`Notifier`] is that
//! output. It sends every transition to every channel:
//! - **MQTT**: QoS 1 on `alerts/{deviceId}/{rule}`, published in-process into the
//!   broker's router ([`Publish`]), never over a socket into sluice's own port;
//! - **webhooks**: HTTP POST of the JSON with a timeout, retries with exponential
//!   backoff and jitter, and a circuit breaker per endpoint ([`policy`]), all on one
//!   small async runtime (`notify` thread);
//! - what cannot be delivered is a row of `alert_dead_letters`, written in batches by
//!   one writer thread.
//!
//! [`Notifier::notify`] never blocks: each channel has a bounded queue, and an event that
//! finds its queue full is a dead letter at once; dead letters are queued for their
//! writer, never written on the caller's thread.
//!
//! Metrics: `sluice_alert_deliveries_total{channel, outcome}` with outcome `delivered`,
//! `failed_attempt`, `dead_letter` or `lost` (a dead letter that could not be stored
//! either, logged as an error), and `sluice_webhook_circuit_open{channel}`.

mod dead;
mod mqtt;
pub mod policy;
mod webhook;

pub use dead::{DEAD_LETTER_TABLE, dead_letter_schema, tables};
pub use mqtt::Publish;
pub use webhook::{Webhook, WebhookSpec, compile_webhooks};

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use sluice_aggregator::{AlertEvent, AlertOutput, TableSink};

use crate::dead::{DeadLetters, Letter};
use crate::mqtt::MqttChannel;
use crate::webhook::Endpoint;

/// A boxed future, as [`Publish`] returns them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Notifications waiting per channel; beyond, new ones are dead letters.
pub(crate) const QUEUE: usize = 10_000;
/// At a stop, queued notifications get this long to go out.
const STOP_GRACE: Duration = Duration::from_secs(5);

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

/// Every notification's topic: only sluice publishes there (with access control on,
/// no client may).
pub const ALERTS_TOPIC_FILTER: &str = "alerts/#";

/// The MQTT topic of a notification.
pub fn notification_topic(event: &AlertEvent) -> String {
    format!("alerts/{}/{}", event.device, event.rule)
}

/// A notification on its way.
#[derive(Debug, Clone)]
pub(crate) struct Job {
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

pub(crate) fn wall_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

/// Counts outcomes and hands dead letters to their writer; shared by every channel.
#[derive(Clone)]
pub(crate) struct Outcomes {
    dead: Arc<DeadLetters>,
    metrics: DeliveryMetrics,
}

impl Outcomes {
    fn delivered(&self, channel: &str) {
        self.metrics.outcome(channel, "delivered");
    }

    fn dead(&self, channel: &str, job: &Job, attempts: u32, error: &str) {
        tracing::warn!(channel, rule = %job.rule, device = %job.device, attempts, error, "alert notification not delivered: kept in alert_dead_letters");
        self.metrics.outcome(channel, "dead_letter");
        self.dead.send(Letter {
            ts: wall_ns(),
            channel: channel.into(),
            rule: job.rule.clone(),
            device: job.device.clone(),
            state: job.state,
            attempts,
            error: error.to_owned(),
            payload: job.payload.clone(),
        });
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
                    "Alert notifications by channel (mqtt or the webhook URL) and outcome: delivered, failed_attempt, dead_letter, lost (a dead letter that could not be stored)",
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

    fn circuit_open(&self, channel: &str) -> IntGauge {
        self.circuit_open.with_label_values(&[channel])
    }
}

/// Sends every alert transition to every channel.
pub struct Notifier {
    /// Set by `shutdown`: later notifications are counted as lost and logged.
    stopped: std::sync::atomic::AtomicBool,
    mqtt: Mutex<Option<MqttChannel>>,
    webhooks: Mutex<Vec<Endpoint>>,
    outcomes: Outcomes,
    client: reqwest::Client,
    dead_writer: Mutex<Option<JoinHandle<()>>>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
}

impl Notifier {
    /// `publisher`: where MQTT notifications go (the broker's router); `None` publishes
    /// nothing. Dead letters go to `sink`'s `alert_dead_letters`.
    pub fn start(
        publisher: Option<Arc<dyn Publish>>,
        webhooks: Vec<Webhook>,
        sink: Arc<dyn TableSink>,
        metrics: DeliveryMetrics,
    ) -> std::io::Result<Notifier> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("notify")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (dead, dead_writer) = DeadLetters::start(sink, metrics.clone())?;
        let outcomes = Outcomes {
            dead: Arc::new(dead),
            metrics,
        };
        // A redirect would be followed as a GET without the body: the notification lost
        // while counted delivered. A 3xx is an answer like any other (refused).
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(std::io::Error::other)?;
        let mqtt = publisher.map(|p| MqttChannel::start(p, outcomes.clone(), &handle));
        let notifier = Notifier {
            stopped: std::sync::atomic::AtomicBool::new(false),
            mqtt: Mutex::new(mqtt),
            webhooks: Mutex::new(Vec::new()),
            outcomes,
            client,
            dead_writer: Mutex::new(Some(dead_writer)),
            runtime: Mutex::new(Some(runtime)),
            handle,
        };
        notifier.set_webhooks(webhooks);
        Ok(notifier)
    }

    /// Queues `event` on every channel; never blocks.
    pub fn notify(&self, event: &AlertEvent) {
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            self.outcomes.metrics.outcome("all", "lost");
            tracing::error!(rule = %event.rule, device = %event.device, "alert notification after delivery stopped: not delivered and not kept");
            return;
        }
        let job = Job::new(event);
        if let Some(mqtt) = &*lock(&self.mqtt) {
            mqtt.send(job.clone(), &self.outcomes);
        }
        for endpoint in lock(&self.webhooks).iter() {
            endpoint.send(job.clone(), &self.outcomes);
        }
    }

    /// Replaces the webhooks (a reload): an endpoint listed with the same settings keeps
    /// running (and its queue); a removed or changed one stops, its queued notifications
    /// going out within the stop grace or to the dead letters, and a changed one starts
    /// again with its new settings. Blocks until the stopped ones are done.
    pub fn set_webhooks(&self, webhooks: Vec<Webhook>) {
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!("webhooks not replaced: alert delivery has stopped");
            return;
        }
        let mut endpoints = lock(&self.webhooks);
        let mut old = std::mem::take(&mut *endpoints);
        for hook in webhooks {
            match old.iter().position(|e| *e.hook == hook) {
                Some(i) => endpoints.push(old.swap_remove(i)),
                None => endpoints.push(Endpoint::start(
                    hook,
                    self.client.clone(),
                    self.outcomes.clone(),
                    &self.handle,
                )),
            }
        }
        drop(endpoints);
        let deadline = Instant::now() + STOP_GRACE;
        let stopping: Vec<_> = old.into_iter().map(|e| e.begin_stop(deadline)).collect();
        join(stopping);
    }

    /// Delivers what is queued (within a grace period) and stops; what is left is a dead
    /// letter, and every dead letter is handed to the table before this returns.
    pub fn shutdown(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + STOP_GRACE;
        let mut stopping: Vec<_> = std::mem::take(&mut *lock(&self.webhooks))
            .into_iter()
            .map(|e| e.begin_stop(deadline))
            .collect();
        if let Some(mut mqtt) = lock(&self.mqtt).take() {
            stopping.push(mqtt.begin_stop(deadline));
        }
        join(stopping);
        if let Some(runtime) = lock(&self.runtime).take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        // Every channel is done: the writer stores what it holds and ends.
        self.outcomes.dead.close();
        if let Some(writer) = lock(&self.dead_writer).take()
            && writer.join().is_err()
        {
            tracing::error!("the dead-letter writer panicked");
        }
    }
}

impl AlertOutput for Notifier {
    fn emit(&self, event: &AlertEvent) {
        self.notify(event);
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(runtime) = lock(&self.runtime).take() {
            runtime.shutdown_background();
        }
    }
}

fn join(tasks: Vec<Option<tokio::task::JoinHandle<()>>>) {
    for task in tasks.into_iter().flatten() {
        if futures::executor::block_on(task).is_err() {
            tracing::error!("an alert delivery task panicked");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
