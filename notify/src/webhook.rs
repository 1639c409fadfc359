//! Webhooks: HTTP POST of each notification's JSON, one task per endpoint on the
//! notifier's runtime, attempts paced by the [`Policy`].

use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::policy::{Breaker, Circuit, Next, Outcome, Policy};
use crate::{Job, Outcomes, QUEUE, error_chain};

/// One `[[webhook]]` entry of the configuration, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSpec {
    pub url: String,
    /// Per attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per event before it is a dead letter.
    pub max_attempts: u32,
    /// Wait after the first failed attempt, doubled after each…
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// …up to this.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Consecutive failed attempts that open the circuit…
    pub breaker_failures: u32,
    /// …which stays open this long before one trial attempt.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

impl Default for WebhookSpec {
    fn default() -> Self {
        WebhookSpec {
            url: String::new(),
            timeout: Duration::from_secs(5),
            max_attempts: 6,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

/// A validated webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: reqwest::Url,
    pub timeout: Duration,
    pub policy: Policy,
}

impl WebhookSpec {
    /// Checks the entry; the error names its URL.
    pub fn compile(&self) -> Result<Webhook, String> {
        let text = &self.url;
        let fail = |what: &str| Err(format!("webhook {text:?}: {what}"));
        let url = match reqwest::Url::parse(text) {
            Ok(url) if ["http", "https"].contains(&url.scheme()) && url.host().is_some() => url,
            Ok(_) => return fail("must be an http:// or https:// URL with a host"),
            Err(e) => return fail(&format!("is not a URL: {e}")),
        };
        if self.timeout.is_zero() {
            return fail("timeout must be more than 0");
        }
        if self.max_attempts == 0 || self.breaker_failures == 0 {
            return fail("max_attempts and breaker_failures must be at least 1");
        }
        if self.max_backoff < self.backoff {
            return fail("max_backoff must be at least backoff");
        }
        Ok(Webhook {
            url,
            timeout: self.timeout,
            policy: Policy {
                max_attempts: self.max_attempts,
                backoff: self.backoff,
                max_backoff: self.max_backoff,
                breaker_failures: self.breaker_failures,
                breaker_cooldown: self.breaker_cooldown,
            },
        })
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
            return Err(format!("webhook {:?} is listed twice", hook.url.as_str()));
        }
    }
    Ok(hooks)
}

/// One webhook's queue and task.
pub(crate) struct Endpoint {
    pub(crate) hook: Arc<Webhook>,
    /// The label of its metrics and dead letters.
    channel: Arc<str>,
    tx: Option<mpsc::Sender<Job>>,
    /// Set at a stop: the time by which queued notifications must have gone.
    stop: watch::Sender<Option<Instant>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Endpoint {
    pub(crate) fn start(
        hook: Webhook,
        client: reqwest::Client,
        outcomes: Outcomes,
        runtime: &tokio::runtime::Handle,
    ) -> Endpoint {
        let hook = Arc::new(hook);
        let channel: Arc<str> = hook.url.as_str().into();
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stop, stopping) = watch::channel(None);
        let worker = Worker {
            hook: hook.clone(),
            channel: channel.clone(),
            client,
            outcomes,
            breaker: Breaker::default(),
            rng: ChaCha8Rng::seed_from_u64(crate::wall_ns() as u64),
            stopping,
        };
        let task = runtime.spawn(worker.run(rx));
        Endpoint {
            hook,
            channel,
            tx: Some(tx),
            stop,
            task: Some(task),
        }
    }

    /// Queues `job`; a full queue makes it a dead letter at once. Never waits.
    pub(crate) fn send(&self, job: Job, outcomes: &Outcomes) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => outcomes.dead(
                &self.channel,
                &job,
                0,
                &format!("{QUEUE} notifications already waiting for this webhook"),
            ),
            Err(mpsc::error::TrySendError::Closed(job)) => {
                outcomes.dead(&self.channel, &job, 0, "the webhook worker stopped")
            }
        }
    }

    /// Stops taking notifications; those queued get until `deadline` (one attempt each
    /// at most once the stop began). The task ends when they have gone.
    pub(crate) fn begin_stop(
        mut self,
        deadline: std::time::Instant,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let _ = self.stop.send(Some(Instant::from_std(deadline)));
        self.tx = None;
        self.task.take()
    }
}

/// Resolves at a stop's deadline (never without a stop).
async fn stop_deadline(mut stopping: watch::Receiver<Option<Instant>>) {
    loop {
        let deadline = *stopping.borrow_and_update();
        if let Some(deadline) = deadline {
            return tokio::time::sleep_until(deadline).await;
        }
        if stopping.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

struct Worker {
    hook: Arc<Webhook>,
    channel: Arc<str>,
    client: reqwest::Client,
    outcomes: Outcomes,
    breaker: Breaker,
    rng: ChaCha8Rng,
    stopping: watch::Receiver<Option<Instant>>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(job) = rx.recv().await {
            self.deliver(&job).await;
        }
    }

    /// Waits until `at`; false if a stop began meanwhile (or had begun).
    async fn wait(&mut self, at: Instant) -> bool {
        if self.stopping.borrow().is_some() {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep_until(at) => true,
            _ = self.stopping.changed() => false,
        }
    }

    async fn deliver(&mut self, job: &Job) {
        let mut attempt = 0;
        loop {
            let now = Instant::now();
            let deadline = *self.stopping.borrow();
            let paused = self.breaker.paused_until(now.into_std());
            if let Some(deadline) = deadline
                && (now >= deadline || paused.is_some())
            {
                let error = self.breaker.stopped(now.into_std());
                return self.outcomes.dead(&self.channel, job, attempt, &error);
            }
            if let Some(until) = paused
                && !self.wait(Instant::from_std(until)).await
            {
                continue;
            }
            attempt += 1;
            let outcome = tokio::select! {
                outcome = self.attempt(job) => outcome,
                () = stop_deadline(self.stopping.clone()) => {
                    let error = format!("{} (an attempt was under way)", self.breaker.stopped(Instant::now().into_std()));
                    return self.outcomes.dead(&self.channel, job, attempt, &error);
                }
            };
            if matches!(outcome, Outcome::Failed(_)) {
                self.outcomes
                    .metrics
                    .outcome(&self.channel, "failed_attempt");
            }
            let policy = self.hook.policy;
            let (next, circuit) = policy.after(
                &mut self.breaker,
                attempt,
                outcome,
                std::time::Instant::now(),
                &mut self.rng,
            );
            self.circuit(circuit);
            match next {
                Next::Delivered => return self.outcomes.delivered(&self.channel),
                Next::Dead(error) => {
                    return self.outcomes.dead(&self.channel, job, attempt, &error);
                }
                Next::RetryAt(at) => {
                    // At a stop, retries go at once (within the deadline).
                    self.wait(Instant::from_std(at)).await;
                }
            }
        }
    }

    fn circuit(&self, circuit: Circuit) {
        let gauge = self.outcomes.metrics.circuit_open(&self.channel);
        match circuit {
            Circuit::Opened => {
                tracing::warn!(url = %self.channel, cooldown = ?self.hook.policy.breaker_cooldown, "webhook circuit open: pausing attempts");
                gauge.set(1);
            }
            Circuit::Closed => {
                tracing::info!(url = %self.channel, "webhook circuit closed");
                gauge.set(0);
            }
            Circuit::Unchanged => {}
        }
    }

    async fn attempt(&self, job: &Job) -> Outcome {
        let response = self
            .client
            .post(self.hook.url.clone())
            .timeout(self.hook.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(job.payload.to_string())
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => Outcome::Delivered,
            Ok(r) if r.status().is_redirection() => Outcome::Refused(format!(
                "HTTP {} (redirects are not followed: configure the URL it points to)",
                r.status()
            )),
            Ok(r) => {
                let status = r.status();
                let error = format!("HTTP {status}");
                if status.is_client_error()
                    && status != reqwest::StatusCode::REQUEST_TIMEOUT
                    && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                {
                    Outcome::Refused(error)
                } else {
                    Outcome::Failed(error)
                }
            }
            Err(e) if e.is_timeout() => {
                Outcome::Failed(format!("no answer within {:?}", self.hook.timeout))
            }
            Err(e) => Outcome::Failed(error_chain(&e)),
        }
    }
}
