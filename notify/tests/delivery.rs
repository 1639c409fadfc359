//! Delivery against real local HTTP endpoints: retries, refusals, the circuit breaker,
//! dead letters (batched), a full queue and a stop with notifications still queued; and
//! the MQTT channel through an in-process publisher.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::UInt32Type;
use axum::http::StatusCode;
use prometheus::Registry;
use sluice_aggregator::{AlertEvent, AlertState, TableSink};
use sluice_ingest::Refused;
use sluice_notify::{
    BoxFuture, DEAD_LETTER_TABLE, DeliveryMetrics, Notifier, Publish, WebhookSpec, compile_webhooks,
};

#[derive(Default)]
struct Captured(Mutex<Vec<RecordBatch>>);

impl TableSink for Captured {
    fn append(&self, table: &str, batch: RecordBatch) -> Result<(), Refused> {
        assert_eq!(table, DEAD_LETTER_TABLE);
        self.0.lock().unwrap().push(batch);
        Ok(())
    }
}

impl Captured {
    /// (attempts, error) of each dead letter.
    fn letters(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        for b in self.0.lock().unwrap().iter() {
            let attempts = b.column(5).as_primitive::<UInt32Type>();
            let errors = b.column(6).as_string::<i32>();
            for row in 0..b.num_rows() {
                out.push((attempts.value(row), errors.value(row).to_owned()));
            }
        }
        out
    }
}

/// An endpoint answering every request with `status` after `delay`.
struct Endpoint {
    url: String,
    hits: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

fn endpoint(status: StatusCode, delay: Duration) -> Endpoint {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            status
        }
    });
    runtime.spawn(async move { axum::serve(listener, app).await });
    Endpoint {
        url,
        hits,
        _runtime: runtime,
    }
}

fn event(device: &str) -> AlertEvent {
    AlertEvent {
        rule: "overheat".into(),
        device: device.into(),
        state: AlertState::Firing,
        severity: "critical".into(),
        metric: Some("temperature".into()),
        value: Some(90.0),
        threshold: Some(80.0),
        started_at: 1_705_314_600_000_000_000,
        event_time: 1_705_314_660_000_000_000,
        reason: None,
    }
}

fn start(url: &str, extra: &str, sink: Arc<Captured>) -> (Notifier, Registry) {
    let spec: WebhookSpec = toml_spec(url, extra);
    let registry = Registry::new();
    let notifier = Notifier::start(
        None::<Arc<dyn Publish>>,
        compile_webhooks(&[spec]).unwrap(),
        sink,
        DeliveryMetrics::new(&registry).unwrap(),
    )
    .unwrap();
    (notifier, registry)
}

fn toml_spec(url: &str, extra: &str) -> WebhookSpec {
    let mut spec = WebhookSpec {
        url: url.into(),
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        ..WebhookSpec::default()
    };
    for kv in extra.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap();
        let duration = || humantime::parse_duration(v).unwrap();
        match k {
            "max_attempts" => spec.max_attempts = v.parse().unwrap(),
            "breaker_failures" => spec.breaker_failures = v.parse().unwrap(),
            "breaker_cooldown" => spec.breaker_cooldown = duration(),
            "timeout" => spec.timeout = duration(),
            _ => panic!("{k}"),
        }
    }
    spec
}

/// Waits until `done`; fails the test, naming `what`, if that takes longer than `within`.
fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn gauge(registry: &Registry, name: &str) -> i64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_gauge().get_value() as i64)
        })
        .sum()
}

#[test]
fn a_failing_endpoint_is_retried_then_dead_lettered_and_its_circuit_opens() {
    let server = endpoint(StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO);
    let sink = Arc::new(Captured::default());
    let (notifier, registry) = start(
        &server.url,
        "max_attempts=3,breaker_failures=4,breaker_cooldown=300ms",
        sink.clone(),
    );
    notifier.notify(&event("a"));
    notifier.notify(&event("b"));
    wait_for("2 dead letters", Duration::from_secs(10), || {
        sink.letters().len() == 2
    });
    let letters = sink.letters();
    assert_eq!(
        letters[0],
        (
            3,
            "gave up after 3 attempts: HTTP 500 Internal Server Error".into()
        )
    );
    assert_eq!(letters[1].0, 3);
    // a: 3 attempts; b: 1 more opens the circuit (4 in a row), then it waits out the
    // cooldown before each of its last two.
    assert_eq!(server.hits.load(Ordering::SeqCst), 6);
    assert_eq!(gauge(&registry, "sluice_webhook_circuit_open"), 1);
    notifier.shutdown();
}

#[test]
fn a_client_error_is_not_retried_and_an_unreachable_endpoint_is_a_dead_letter() {
    let refusing = endpoint(StatusCode::BAD_REQUEST, Duration::ZERO);
    let sink = Arc::new(Captured::default());
    let (notifier, _) = start(&refusing.url, "max_attempts=5", sink.clone());
    notifier.notify(&event("a"));
    wait_for("1 dead letter", Duration::from_secs(10), || {
        sink.letters().len() == 1
    });
    assert_eq!(sink.letters(), [(1, "HTTP 400 Bad Request".to_owned())]);
    assert_eq!(refusing.hits.load(Ordering::SeqCst), 1);
    notifier.shutdown();

    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let sink = Arc::new(Captured::default());
    let (notifier, _) = start(&url, "max_attempts=2", sink.clone());
    notifier.notify(&event("a"));
    wait_for("1 dead letter", Duration::from_secs(10), || {
        sink.letters().len() == 1
    });
    let letters = sink.letters();
    assert_eq!(letters[0].0, 2);
    assert!(
        letters[0].1.starts_with("gave up after 2 attempts"),
        "{letters:?}"
    );
    notifier.shutdown();
}

#[test]
fn an_https_webhook_speaks_tls() {
    // A plain-HTTP endpoint cannot complete a TLS handshake: the attempt fails (and is
    // never counted as delivered), so the notification ends as a dead letter.
    let plain = endpoint(StatusCode::OK, Duration::ZERO);
    let url = plain.url.replace("http://", "https://");
    let sink = Arc::new(Captured::default());
    let (notifier, _) = start(&url, "max_attempts=1", sink.clone());
    notifier.notify(&event("a"));
    wait_for("1 dead letter", Duration::from_secs(10), || {
        sink.letters().len() == 1
    });
    let letters = sink.letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    // rustls read the plain-HTTP answer as a TLS record and refused it.
    assert!(
        letters[0].1.starts_with("gave up after 1 attempts")
            && letters[0].1.contains("corrupt message"),
        "{letters:?}"
    );
    notifier.shutdown();
}

#[test]
fn notify_never_waits_for_a_slow_endpoint_and_a_stop_keeps_what_was_not_sent() {
    // Every request hangs past its timeout.
    let slow = endpoint(StatusCode::OK, Duration::from_secs(30));
    let sink = Arc::new(Captured::default());
    let (notifier, _) = start(
        &slow.url,
        "max_attempts=1,timeout=1s,breaker_failures=2",
        sink.clone(),
    );
    // Ten thousand fit in the queue; the rest are dead letters at once. Each call returns
    // at once: a call that waited for the endpoint would take its 1 s timeout or more,
    // and one that wrote its dead letter itself would wait for storage.
    let mut slowest = Duration::ZERO;
    for i in 0..10_050 {
        let event = event(&format!("d{i}"));
        let started = Instant::now();
        notifier.notify(&event);
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a notify call took {slowest:?}"
    );
    wait_for("at least 49 dead letters", Duration::from_secs(5), || {
        sink.letters().len() >= 49
    });
    let full = sink
        .letters()
        .iter()
        .filter(|(attempts, e)| *attempts == 0 && e.contains("already waiting"))
        .count();
    assert!((49..=50).contains(&full), "{full}");
    // The stop gives the queue a grace period, then keeps the rest as dead letters.
    notifier.shutdown();
    assert_eq!(
        sink.letters().len(),
        10_050,
        "every notification is accounted for"
    );
    // One writer appends them in batches (one append each would make a webhook outage
    // cost one storage append per notification).
    let appends = sink.0.lock().unwrap().len();
    assert!(appends <= 20, "{appends} appends for 10,050 dead letters");
    let mut kinds: Vec<String> = sink.letters().into_iter().map(|(_, e)| e).collect();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "10000 notifications already waiting for this webhook",
            "gave up after 1 attempts: no answer within 1s",
            "sluice stopped before delivery (the circuit was open); last error: no answer within 1s"
        ],
        "the first attempts time out, two in a row open the circuit, and the rest are kept at the stop"
    );
}

/// An in-process publisher that takes a while for each message, and records them.
struct SlowPublisher {
    delay: Duration,
    topics: Arc<Mutex<Vec<String>>>,
    refuse: bool,
}

impl Publish for SlowPublisher {
    fn publish(&self, topic: String, payload: Arc<str>) -> BoxFuture<Result<(), String>> {
        let (delay, topics, refuse) = (self.delay, self.topics.clone(), self.refuse);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if refuse {
                return Err("the broker is stopped: no client is connected to receive it".into());
            }
            let json: serde_json::Value = serde_json::from_str(&payload).unwrap();
            assert_eq!(json["device"], topic.split('/').nth(1).unwrap());
            topics.lock().unwrap().push(topic);
            Ok(())
        })
    }
}

#[test]
fn mqtt_notifications_are_published_in_order_without_making_notify_wait() {
    let topics: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = Arc::new(Captured::default());
    let registry = Registry::new();
    let notifier = Notifier::start(
        Some(Arc::new(SlowPublisher {
            delay: Duration::from_millis(100),
            topics: topics.clone(),
            refuse: false,
        })),
        Vec::new(),
        sink.clone(),
        DeliveryMetrics::new(&registry).unwrap(),
    )
    .unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        let started = Instant::now();
        notifier.notify(&event(&format!("d{i}")));
        slowest = slowest.max(started.elapsed());
    }
    // Each publish takes 100 ms: a notify that waited for one would take that long.
    assert!(
        slowest < Duration::from_millis(50),
        "a notify call took {slowest:?}"
    );
    wait_for("30 publishes", Duration::from_secs(10), || {
        topics.lock().unwrap().len() == 30
    });
    let expected: Vec<String> = (0..30).map(|i| format!("alerts/d{i}/overheat")).collect();
    assert_eq!(*topics.lock().unwrap(), expected, "in the order emitted");
    notifier.shutdown();
    assert!(sink.letters().is_empty());

    // A broker that cannot take them: every one is a dead letter saying why.
    let sink = Arc::new(Captured::default());
    let notifier = Notifier::start(
        Some(Arc::new(SlowPublisher {
            delay: Duration::ZERO,
            topics: Arc::default(),
            refuse: true,
        })),
        Vec::new(),
        sink.clone(),
        DeliveryMetrics::unregistered(),
    )
    .unwrap();
    notifier.notify(&event("a"));
    notifier.notify(&event("b"));
    notifier.shutdown();
    let why = "the broker is stopped: no client is connected to receive it";
    assert_eq!(sink.letters(), vec![(1, why.to_owned()); 2]);
}

#[test]
fn webhook_durations_are_typed_in_the_configuration() {
    let spec: WebhookSpec =
        toml::from_str("url = \"http://h/\"\ntimeout = \"2s\"\nbackoff = \"250ms\"\n").unwrap();
    assert_eq!(spec.timeout, Duration::from_secs(2));
    assert_eq!(spec.backoff, Duration::from_millis(250));
    assert_eq!(spec.max_attempts, 6, "defaults for what is not written");
    let error = toml::from_str::<WebhookSpec>("url = \"http://h/\"\ntimeout = \"soon\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("timeout") && error.contains("soon"),
        "{error}"
    );
}

#[test]
fn webhooks_are_validated_by_url() {
    assert!(compile_webhooks(&[toml_spec("https://example.com/hook", "")]).is_ok());
    let error = compile_webhooks(&[toml_spec("ftp://example.com/hook", "")]).unwrap_err();
    assert!(
        error.contains("must be an http:// or https:// URL"),
        "{error}"
    );
    let error = compile_webhooks(&[toml_spec("not a url", "")]).unwrap_err();
    assert!(
        error.starts_with("webhook \"not a url\": is not a URL"),
        "{error}"
    );
    let mut spec = toml_spec("http://127.0.0.1:9/", "");
    spec.timeout = Duration::ZERO;
    let error = compile_webhooks(&[spec]).unwrap_err();
    assert!(error.contains("timeout must be more than 0"), "{error}");
    let twice = compile_webhooks(&[toml_spec("http://h/", ""), toml_spec("http://h/", "")]);
    assert!(twice.unwrap_err().contains("listed twice"));
}
