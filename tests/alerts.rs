//! Alerts end to end: the real binary, readings published over MQTT that cross
//! thresholds, a real MQTT client subscribed to `alerts/#`, a local webhook receiver that
//! refuses its first attempts, the `alerts` table through `sluice sql`, reloads (HTTP and
//! SIGHUP) and a restart with a firing alert.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Sluice, publish, telemetry};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// A real MQTT client subscribed to `alerts/#`: every notification, in arrival order.
struct Subscriber {
    received: Arc<Mutex<Vec<(String, Value)>>>,
    /// sluice's `/metrics`.
    metrics: String,
    /// MQTT notifications sluice had published when the subscription was in place.
    published_before: f64,
}

/// MQTT notifications sluice has published (into its router) so far.
fn published(metrics_url: &str) -> f64 {
    let text = reqwest::blocking::get(metrics_url).unwrap().text().unwrap();
    common::metric_value(
        &text,
        "sluice_alert_deliveries_total{channel=\"mqtt\",outcome=\"delivered\"}",
    )
    .unwrap_or(0.0)
}

impl Subscriber {
    fn connect(sluice: &Sluice, id: &str) -> Subscriber {
        let mut options = MqttOptions::new(
            format!("alerts-{id}-{}", std::process::id()),
            sluice.mqtt.ip().to_string(),
            sluice.mqtt.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut connection) = Client::new(options, 100);
        client.subscribe("alerts/#", QoS::AtLeastOnce).unwrap();
        let received: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
        let sink = received.clone();
        std::thread::spawn(move || {
            let _client = client;
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).unwrap();
                        sink.lock().unwrap().push((p.topic, json));
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        subscribed
            .recv_timeout(Duration::from_secs(10))
            .expect("subscribed");
        let metrics = format!("{}/metrics", sluice.http);
        Subscriber {
            received,
            published_before: published(&metrics),
            metrics,
        }
    }

    /// Waits until `count` notifications arrived, then until this subscriber has every
    /// one sluice published since it subscribed (sluice's own count, a barrier instead
    /// of a sleep): a notification published twice is in what this returns.
    fn wait(&self, count: usize, within: Duration) -> Vec<(String, Value)> {
        wait_until(&format!("{count} notifications"), within, || {
            self.received.lock().unwrap().len() >= count
        });
        wait_until(
            "every notification sluice published to reach the subscriber",
            within,
            || {
                let since = published(&self.metrics) - self.published_before;
                self.received.lock().unwrap().len() as f64 >= since
            },
        );
        self.received.lock().unwrap().clone()
    }
}

/// Waits until `done`; fails the test, naming `what`, if that takes longer than `within`.
fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A webhook endpoint on 127.0.0.1:0 answering 503 to its first `refuse` requests.
struct Receiver {
    url: String,
    requests: Arc<AtomicUsize>,
    accepted: Arc<Mutex<Vec<Value>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    fn start(refuse: usize) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let accepted: Arc<Mutex<Vec<Value>>> = Arc::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (count, store) = (requests.clone(), accepted.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (count, store) = (count.clone(), store.clone());
                async move {
                    if count.fetch_add(1, Ordering::SeqCst) < refuse {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    store
                        .lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    axum::http::StatusCode::OK
                }
            }),
        );
        runtime.spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url,
            requests,
            accepted,
            _runtime: runtime,
        }
    }
}

/// A minute-aligned time ten minutes ago, so readings are recent (within the clock-skew
/// bound) and windows line up.
fn t0() -> i64 {
    let now = chrono::Utc::now().timestamp();
    (now - 600) / 60 * 60
}

fn at(t0: i64, offset: i64) -> String {
    chrono::DateTime::from_timestamp(t0 + offset, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Publishes readings (device, seconds after t0, temperature, battery), in order.
fn send(sluice: &Sluice, t0: i64, readings: &[(&str, i64, f64, f64)]) {
    let messages: Vec<_> = readings
        .iter()
        .map(|(d, s, t, b)| telemetry(d, &at(t0, *s), *t, *b))
        .collect();
    assert_eq!(
        publish(sluice.mqtt, messages, QoS::AtLeastOnce, 1),
        readings.len()
    );
}

const RULES: &str = r#"
[[alert]]
name = "overheat"
metric = "temperature"
above = 80.0
clear_below = 75.0
for = "1m"
severity = "critical"

[[alert]]
name = "low_battery"
metric = "battery"
below = 20
clear_above = 25

[[alert]]
name = "silent"
no_data_for = "4s"
"#;

/// The configuration file; `windows` on or off (alerts run either way).
fn config(dir: &std::path::Path, windows: bool, body: &str) -> std::path::PathBuf {
    let path = dir.join("sluice.toml");
    write_config(&path, windows, body);
    path
}

fn write_config(path: &std::path::Path, windows: bool, body: &str) {
    // One decoder keeps each device's readings in publish order (the test sends them
    // milliseconds apart; real devices are seconds apart).
    std::fs::write(
        path,
        format!("[ingest]\nworkers = 1\n[windows]\nenabled = {windows}\n{body}"),
    )
    .unwrap();
}

fn topic_states(notes: &[(String, Value)]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for (topic, json) in notes {
        *counts
            .entry((topic.clone(), json["state"].as_str().unwrap().to_owned()))
            .or_default() += 1;
    }
    counts
}

fn expected(pairs: &[(&str, &str)]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for (topic, state) in pairs {
        *counts
            .entry((topic.to_string(), state.to_string()))
            .or_default() += 1;
    }
    counts
}

#[test]
fn threshold_crossings_reach_mqtt_webhooks_and_the_alerts_table_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(2);
    let config = config(
        dir.path(),
        true,
        &format!(
            "{RULES}\n[[webhook]]\nurl = \"{}\"\nbackoff = \"50ms\"\n",
            receiver.url
        ),
    );
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let subscriber = Subscriber::connect(&sluice, "a");
    let t0 = t0();

    send(
        &sluice,
        t0,
        &[
            ("device-1", 0, 70.0, 90.0),
            ("device-2", 0, 20.0, 15.0), // low battery, no `for`: fires
            ("device-3", 0, 20.0, 80.0),
            ("device-1", 10, 85.0, 90.0),  // pending
            ("device-1", 40, 86.0, 90.0),  // held 30 s of 60
            ("device-2", 30, 20.0, 22.0),  // between the thresholds: still firing
            ("device-1", 70, 87.0, 90.0),  // held 60 s: fires
            ("device-1", 100, 78.0, 90.0), // under 80 but not under 75: no flap
            ("device-2", 60, 20.0, 30.0),  // above 25: resolved
            ("device-1", 130, 74.0, 90.0), // under 75: resolved after 120 s
        ],
    );
    let thresholds = [
        ("alerts/device-2/low_battery", "firing"),
        ("alerts/device-1/overheat", "firing"),
        ("alerts/device-2/low_battery", "resolved"),
        ("alerts/device-1/overheat", "resolved"),
    ];
    let notes = subscriber.wait(4, Duration::from_secs(10));
    assert_eq!(
        topic_states(&notes[..4.min(notes.len())]),
        expected(&thresholds),
        "{notes:#?}"
    );
    let fired = &notes
        .iter()
        .find(|(t, j)| t == "alerts/device-1/overheat" && j["state"] == "firing")
        .unwrap()
        .1;
    assert_eq!(fired["rule"], "overheat");
    assert_eq!(fired["device"], "device-1");
    assert_eq!(fired["severity"], "critical");
    assert_eq!(fired["metric"], "temperature");
    assert_eq!(fired["value"], 87.0);
    assert_eq!(fired["threshold"], 80.0);
    assert_eq!(fired["started_at"], at(t0, 10));
    assert_eq!(fired["event_time"], at(t0, 70));

    // Now everyone goes quiet for longer than `no_data_for`, then speaks again.
    let silent: Vec<_> = (1..=3)
        .flat_map(|d| {
            [
                (format!("alerts/device-{d}/silent"), "firing"),
                (format!("alerts/device-{d}/silent"), "resolved"),
            ]
        })
        .collect();
    subscriber.wait(7, Duration::from_secs(15));
    send(
        &sluice,
        t0,
        &[
            ("device-1", 131, 70.0, 90.0),
            ("device-2", 131, 20.0, 90.0),
            ("device-3", 131, 20.0, 90.0),
        ],
    );
    let notes = subscriber.wait(10, Duration::from_secs(10));
    let mut all: Vec<(&str, &str)> = thresholds.to_vec();
    all.extend(silent.iter().map(|(t, s)| (t.as_str(), *s)));
    assert_eq!(topic_states(&notes), expected(&all), "{notes:#?}");

    // The webhook got the same ten, after refusing the first two attempts.
    wait_until("10 webhook deliveries", Duration::from_secs(10), || {
        receiver.accepted.lock().unwrap().len() >= 10
    });
    let hooked: Vec<(String, Value)> = receiver
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|j| {
            let topic = format!(
                "alerts/{}/{}",
                j["device"].as_str().unwrap(),
                j["rule"].as_str().unwrap()
            );
            (topic, j.clone())
        })
        .collect();
    assert_eq!(topic_states(&hooked), expected(&all), "{hooked:#?}");
    assert_eq!(receiver.requests.load(Ordering::SeqCst), 12);

    // The whole history is a table; nothing went to the dead letters.
    sluice.expect_scalar("SELECT count(*) FROM alerts", 10, Duration::from_secs(10));
    let out = sluice.sql_csv(
        "SELECT rule, device_id, state, value, threshold, started_at, duration_s FROM alerts \
         WHERE rule <> 'silent' ORDER BY ts, rule",
    );
    assert_eq!(
        out[1..],
        [
            format!("low_battery,device-2,firing,15.0,20.0,{},", at(t0, 0)),
            format!("low_battery,device-2,resolved,30.0,25.0,{},60.0", at(t0, 0)),
            format!("overheat,device-1,firing,87.0,80.0,{},", at(t0, 10)),
            format!("overheat,device-1,resolved,74.0,75.0,{},120.0", at(t0, 10)),
        ],
        "{out:?}"
    );
    assert_eq!(sluice.scalar("SELECT count(*) FROM alert_dead_letters"), 0);
    // Windows run beside alerts: device-1's first minute (readings at 0, 10, 40 s) closed.
    let out = sluice.sql_csv(&format!(
        "SELECT readings, temperature_max FROM telemetry_1m \
         WHERE device_id = 'device-1' AND window_start = TIMESTAMP '{}'",
        at(t0, 0)
    ));
    assert_eq!(out[1..], ["3,86.0"], "{out:?}");
    let (_, metrics) = sluice.get("/metrics");
    assert!(
        metrics.contains("sluice_alert_transitions_total{rule=\"overheat\",state=\"firing\"} 1"),
        "{metrics}"
    );
    assert!(sluice.terminate().success());
}

#[test]
fn reloads_apply_valid_rules_refuse_invalid_ones_and_a_restart_remembers_a_firing_alert() {
    let dir = tempfile::tempdir().unwrap();
    let hot = "[[alert]]\nname = \"hot\"\nmetric = \"temperature\"\nabove = 50\n";
    // Windows off: alerts run without them.
    let config = config(dir.path(), false, hot);
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let sluice = Sluice::start(&data, &args);
    let subscriber = Subscriber::connect(&sluice, "b");
    let t0 = t0();

    // An invalid rule set is refused, by name, and the running rule stays.
    write_config(
        &config,
        false,
        &format!("{hot}[[alert]]\nname = \"typo\"\nmetric = \"temprature\"\nabove = 1\n"),
    );
    let (status, body) = sluice.post("/reload");
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("alert \\\"typo\\\": unknown metric"),
        "{body}"
    );
    send(&sluice, t0, &[("d1", 0, 60.0, 90.0)]);
    let notes = subscriber.wait(1, Duration::from_secs(10));
    assert_eq!(
        topic_states(&notes),
        expected(&[("alerts/d1/hot", "firing")])
    );

    // A valid new set by SIGHUP: `cold` appears, `hot` stays (and stays firing).
    write_config(
        &config,
        false,
        &format!("{hot}[[alert]]\nname = \"cold\"\nmetric = \"temperature\"\nbelow = 0\n"),
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &sluice.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_until("the reload", Duration::from_secs(10), || {
        sluice.log_text().contains("reloaded: 2 alert rules")
    });
    send(&sluice, t0, &[("d2", 0, -5.0, 90.0)]);
    let notes = subscriber.wait(2, Duration::from_secs(10));
    assert_eq!(
        topic_states(&notes),
        expected(&[("alerts/d1/hot", "firing"), ("alerts/d2/cold", "firing")])
    );
    assert!(sluice.terminate().success());

    // After a restart, d1's alert is still firing: a hot reading does not fire it again,
    // a cool one resolves it, with its original start.
    let sluice = Sluice::start(&data, &args);
    let subscriber = Subscriber::connect(&sluice, "c");
    send(
        &sluice,
        t0,
        &[("d1", 10, 70.0, 90.0), ("d1", 20, 40.0, 90.0)],
    );
    let notes = subscriber.wait(1, Duration::from_secs(10));
    assert_eq!(
        topic_states(&notes),
        expected(&[("alerts/d1/hot", "resolved")]),
        "{notes:#?}"
    );
    assert_eq!(notes[0].1["started_at"], at(t0, 0));
    assert_eq!(notes[0].1["duration_s"], 20.0);
    sluice.expect_scalar("SELECT count(*) FROM alerts", 3, Duration::from_secs(10));
    assert_eq!(
        sluice.scalar("SELECT count(*) FROM telemetry_1m"),
        0,
        "windows are off"
    );
    assert!(sluice.terminate().success());
}
