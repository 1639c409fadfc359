//! The load generator against the embedded broker on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_broker::{
    AllowAll, BoxFuture, Broker, BrokerConfig, Durable, Inbound, NotTaken, Pipeline, durable_now,
};
use sluice_loadgen::{LoadgenConfig, LoadgenError, Progress, Protocol, run};

/// Keeps every message the broker hands on.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<Inbound>>>);

impl Pipeline for Collect {
    fn deliver(&self, messages: Vec<Inbound>) -> BoxFuture<Result<Durable, NotTaken>> {
        self.0.lock().unwrap().extend(messages);
        Box::pin(std::future::ready(Ok(durable_now())))
    }
}

fn broker() -> (Broker, Collect) {
    let config = BrokerConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        direct_filter: "devices/+/telemetry".into(),
        ..BrokerConfig::default()
    };
    let collect = Collect::default();
    let broker = Broker::start(&config, Arc::new(collect.clone()), Arc::new(AllowAll)).unwrap();
    (broker, collect)
}

/// Runs the loadgen on a runtime of its own until it ends.
fn run_to_end(config: LoadgenConfig) -> Result<sluice_loadgen::Report, LoadgenError> {
    tokio::runtime::Runtime::new().unwrap().block_on(run(
        config,
        Arc::new(Progress::default()),
        Arc::new(AtomicBool::new(false)),
    ))
}

#[test]
fn each_device_reports_once_per_interval_and_every_message_is_acked() {
    fleet_is_delivered_exactly(Protocol::V311);
}

#[test]
fn mqtt5_devices_are_delivered_exactly_too() {
    fleet_is_delivered_exactly(Protocol::V5);
}

/// 300 devices report every 0.2 s for 2 s: 10 messages each, all acknowledged, all
/// delivered by the broker with the right topic.
fn fleet_is_delivered_exactly(protocol: Protocol) {
    let (broker, collect) = broker();
    // One port for both versions.
    let addr = broker.addrs().mqtt;
    let mut config = LoadgenConfig::new(addr.to_string());
    config.protocol = protocol;
    config.devices = 300;
    config.rate = 1500.0; // every device every 0.2 s
    config.duration = Some(Duration::from_secs(2));
    config.connections = 4;
    config.seed = 42;
    let report = run_to_end(config).unwrap();
    assert_eq!(
        (report.sent, report.acked, report.errors),
        (3000, 3000, 0),
        "{report:?}"
    );
    assert_eq!(report.latency.count, 3000);

    // Every acknowledged message was handed on before its PUBACK.
    let started = Instant::now();
    while collect.0.lock().unwrap().len() < 3000 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let got = collect.0.lock().unwrap().clone();
    assert_eq!(got.len(), 3000);
    let mut per_device: HashMap<String, usize> = HashMap::new();
    for d in &got {
        let json: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
        let id = json["deviceId"].as_str().unwrap().to_owned();
        assert_eq!(d.topic, format!("devices/{id}/telemetry"));
        *per_device.entry(id).or_default() += 1;
    }
    assert_eq!(per_device.len(), 300);
    assert!(per_device.values().all(|&n| n == 10));
    assert!(per_device.contains_key("device-000299"));
}

#[test]
fn a_missing_broker_is_a_clear_error() {
    // Port 1 is privileged and unused: the connection is refused at once. (A port freed
    // by binding port 0 could be handed to another test's broker a moment later.)
    let addr = "127.0.0.1:1";
    let mut config = LoadgenConfig::new(addr);
    config.connections = 1;
    let error = run_to_end(config).unwrap_err();
    assert!(matches!(error, LoadgenError::Connect { .. }), "{error}");
    assert!(error.to_string().contains(addr));
}

#[test]
fn more_connections_than_open_files_is_refused_before_connecting() {
    use nix::sys::resource::{Resource, getrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let mut config = LoadgenConfig::new("127.0.0.1:1");
    config.connections = usize::try_from(hard).unwrap_or(usize::MAX / 2);
    config.devices = config.connections as u64;
    let error = run_to_end(config).unwrap_err();
    assert!(matches!(error, LoadgenError::Config(_)), "{error}");
    assert!(error.to_string().contains("ulimit -n"), "{error}");
}

#[test]
fn bad_settings_are_refused_by_name() {
    for (change, name) in [
        (
            Box::new(|c: &mut LoadgenConfig| c.devices = 0) as Box<dyn Fn(&mut LoadgenConfig)>,
            "--devices",
        ),
        (Box::new(|c: &mut LoadgenConfig| c.rate = -1.0), "--rate"),
        (Box::new(|c: &mut LoadgenConfig| c.qos = 2), "--qos"),
        (
            Box::new(|c: &mut LoadgenConfig| c.bad_rate = 1.5),
            "--bad-rate",
        ),
        (
            Box::new(|c: &mut LoadgenConfig| c.connections = 5000),
            "--connections",
        ),
        (
            Box::new(|c: &mut LoadgenConfig| c.broker = "nohost".into()),
            "--broker",
        ),
    ] {
        let mut config = LoadgenConfig::new("127.0.0.1:1");
        change(&mut config);
        let error = run_to_end(config).unwrap_err();
        assert!(error.to_string().contains(name), "{error}");
    }
}

#[test]
fn a_broker_that_dies_mid_run_ends_the_run_at_its_duration_with_a_report() {
    let (mut broker, collect) = broker();
    let mut config = LoadgenConfig::new(broker.addrs().mqtt.to_string());
    config.devices = 200;
    config.rate = 400.0;
    config.connections = 2;
    config.duration = Some(Duration::from_secs(3));
    let started = Instant::now();
    let runner = std::thread::spawn(move || run_to_end(config));
    // The broker goes away under the load: its connections close and nothing listens.
    std::thread::sleep(Duration::from_secs(1));
    broker.shutdown(Duration::from_secs(1));
    drop(broker);
    let report = runner.join().unwrap().expect("a report, not an error");
    let took = started.elapsed();
    // 3 s of schedule, at most 1 s to say goodbye to a dead broker, and slack for a
    // loaded machine; before, it never ended.
    assert!(took < Duration::from_secs(8), "the run took {took:?}");
    assert!(
        report.errors >= 1,
        "the lost connections are counted: {report}"
    );
    assert!(report.acked < report.sent, "{report}");
    assert!(report.acked > 0, "{report}");
    // Every message acknowledged before the broker died had reached its pipeline.
    assert!(
        collect.0.lock().unwrap().len() as u64 >= report.acked,
        "{report}"
    );
}

#[test]
fn an_mqtt5_fleet_keeps_within_the_brokers_receive_maximum() {
    // The broker lets 5 QoS 1 publishes wait per connection; the fleet asks for 100. A
    // sixth would be a protocol error (DISCONNECT 0x93), counted as an error.
    let config = BrokerConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        direct_filter: "devices/+/telemetry".into(),
        receive_maximum: 5,
        ..BrokerConfig::default()
    };
    let collect = Collect::default();
    let broker = Broker::start(&config, Arc::new(collect.clone()), Arc::new(AllowAll)).unwrap();
    let mut config = LoadgenConfig::new(broker.addrs().mqtt.to_string());
    config.protocol = Protocol::V5;
    config.devices = 1000;
    config.rate = 20_000.0;
    config.duration = Some(Duration::from_secs(1));
    config.connections = 2;
    config.max_inflight = 100;
    let report = run_to_end(config).unwrap();
    // The window, not the schedule, sets the pace: the run ends with the schedule
    // unfinished, the messages handed to a full window not yet written.
    assert_eq!(report.errors, 0, "{report}");
    assert!(report.acked > 100, "{report}");
    assert!(report.sent < 20_000, "{report}");
    assert!(report.sent - report.acked <= 2 * 5, "{report}");
    assert!(collect.0.lock().unwrap().len() as u64 >= report.acked);
}
