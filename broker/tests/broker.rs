//! The embedded broker with real MQTT clients on loopback.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sluice_broker::{Broker, BrokerConfig, Delivery, Received, Subscription};

fn config() -> BrokerConfig {
    BrokerConfig {
        mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        mqtt5_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..BrokerConfig::default()
    }
}

/// Publishes `count` QoS 1 messages on `devices/{device}/telemetry` and returns how many
/// were acknowledged.
fn publish(addr: SocketAddr, device: &str, count: usize) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut options = MqttOptions::new(device, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let topic = format!("devices/{device}/telemetry");
        tokio::spawn(async move {
            for i in 0..count {
                client
                    .publish(&topic, QoS::AtLeastOnce, false, format!("{i}").into_bytes())
                    .await
                    .unwrap();
            }
        });
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while acked < count {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("connection error: {e}"),
                Err(_) => break,
            }
        }
        acked
    })
}

fn read_until(sub: &mut Subscription, want: usize, within: Duration) -> (Vec<Delivery>, bool) {
    let started = Instant::now();
    let mut out = Vec::new();
    while out.len() < want && started.elapsed() < within {
        if sub
            .recv(&mut out, 1000, Instant::now() + Duration::from_millis(50))
            .unwrap()
            == Received::Drained
        {
            return (out, true);
        }
    }
    (out, false)
}

#[test]
fn every_acknowledged_message_is_delivered_in_order_on_both_protocols() {
    let (broker, mut sub, _drain) = Broker::start(&config(), "devices/+/telemetry").unwrap();
    let addrs = broker.addrs();
    assert_ne!(addrs.mqtt.port(), 0, "port 0 is resolved");
    assert_eq!(publish(addrs.mqtt, "d1", 500), 500);

    let (got, _) = read_until(&mut sub, 500, Duration::from_secs(10));
    assert_eq!(got.len(), 500);
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.topic, "devices/d1/telemetry");
        assert_eq!(d.payload, format!("{i}").as_bytes());
    }

    // MQTT 5 listener, with rumqttc's v5 client.
    let v5 = addrs.mqtt5.unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut options = rumqttc::v5::MqttOptions::new("d5", v5.ip().to_string(), v5.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
        client
            .publish(
                "devices/d5/telemetry",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                "v5",
            )
            .await
            .unwrap();
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) =
                eventloop.poll().await.unwrap()
            {
                break;
            }
        }
    });
    let (got, _) = read_until(&mut sub, 1, Duration::from_secs(10));
    assert_eq!(got[0].payload, "v5");
    assert_eq!(sub.counters().skipped(), 0);
    assert_eq!(sub.counters().delivered(), 501);
}

#[test]
fn messages_the_broker_drops_for_a_slow_reader_are_counted() {
    let config = BrokerConfig {
        buffer_bytes: 4096,
        segment_bytes: 1024,
        ..config()
    };
    let (broker, mut sub, _drain) = Broker::start(&config, "devices/+/telemetry").unwrap();
    // Nobody reads while 2,000 messages (~60 KB) go through a 4 KB buffer.
    assert_eq!(publish(broker.addrs().mqtt, "d1", 2000), 2000);
    let mut got = Vec::new();
    let idle_since = Instant::now();
    while idle_since.elapsed() < Duration::from_secs(2) {
        sub.recv(&mut got, 1000, Instant::now() + Duration::from_millis(50))
            .unwrap();
    }
    let skipped = sub.counters().skipped();
    assert!(skipped > 0, "a 4 KB buffer cannot hold 60 KB");
    assert_eq!(
        got.len() as u64 + skipped,
        2000,
        "delivered + skipped = published"
    );
}

#[test]
fn draining_delivers_everything_acknowledged_before_the_listeners_stopped() {
    let (mut broker, mut sub, drain) = Broker::start(&config(), "devices/+/telemetry").unwrap();
    assert_eq!(publish(broker.addrs().mqtt, "d1", 3000), 3000);
    broker.stop_listeners();
    assert!(
        std::net::TcpStream::connect(broker.addrs().mqtt).is_err(),
        "listener closed"
    );
    drain.start().unwrap();
    let (got, drained) = read_until(&mut sub, usize::MAX, Duration::from_secs(20));
    assert!(drained, "the marker arrives");
    assert_eq!(got.len(), 3000);
    assert!(got.iter().all(|d| d.topic == "devices/d1/telemetry"));
}

#[test]
fn batched_reads_collect_past_the_routers_pauses_and_stop_at_the_drain_marker() {
    let (mut broker, mut sub, drain) = Broker::start(&config(), "devices/+/telemetry").unwrap();
    // 3,000 messages waiting: far more than the 200 the router hands a link before
    // pausing it, so one batched read must resume the link to get past 200.
    assert_eq!(publish(broker.addrs().mqtt, "d2", 3000), 3000);
    let mut got = Vec::new();
    let outcome = sub
        .recv_batch(
            &mut got,
            2500,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(
        (outcome, got.len()),
        (Received::Open, 2500),
        "max is honoured"
    );
    broker.stop_listeners();
    drain.start().unwrap();
    let started = Instant::now();
    let outcome = loop {
        let outcome = sub
            .recv_batch(
                &mut got,
                10_000,
                Instant::now() + Duration::from_millis(100),
                Duration::from_millis(5),
            )
            .unwrap();
        if outcome == Received::Drained || started.elapsed() > Duration::from_secs(20) {
            break outcome;
        }
    };
    assert_eq!((outcome, got.len()), (Received::Drained, 3000));
    let payloads: Vec<usize> = got
        .iter()
        .map(|d| std::str::from_utf8(&d.payload).unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        payloads,
        (0..3000).collect::<Vec<_>>(),
        "in order, once each"
    );
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = BrokerConfig {
        mqtt_addr: taken.local_addr().unwrap(),
        mqtt5_addr: None,
        ..BrokerConfig::default()
    };
    let error = Broker::start(&config, "devices/+/telemetry")
        .err()
        .expect("the port is in use");
    let text = error.to_string();
    assert!(
        text.contains(&taken.local_addr().unwrap().to_string()),
        "{text}"
    );
}

#[test]
fn more_connections_than_open_files_is_refused_at_start() {
    use nix::sys::resource::{Resource, getrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let config = BrokerConfig {
        max_connections: usize::try_from(hard).unwrap_or(usize::MAX),
        ..config()
    };
    let error = Broker::start(&config, "devices/+/telemetry")
        .err()
        .expect("more connections than files");
    let text = error.to_string();
    assert!(
        text.contains("ulimit -n") && text.contains("max_connections"),
        "{text}"
    );
}
