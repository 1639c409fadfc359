//! sluice's connection layer with real MQTT clients on loopback: rumqttc (3.1.1 and 5)
//! and raw packets where a library would not send what the test needs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_broker::{
    AllowAll, BoxFuture, Broker, BrokerConfig, Durable, Inbound, NotTaken, Pipeline, durable_now,
};

/// A pipeline that keeps what it gets, and can be paused.
#[derive(Default)]
struct Collect {
    messages: Mutex<Vec<Inbound>>,
    gate: tokio::sync::RwLock<()>,
}

struct Handle(Arc<Collect>);

impl Pipeline for Handle {
    fn deliver(&self, messages: Vec<Inbound>) -> BoxFuture<Result<Durable, NotTaken>> {
        let collect = self.0.clone();
        Box::pin(async move {
            let _open = collect.gate.read().await;
            collect.messages.lock().unwrap().extend(messages);
            Ok(durable_now())
        })
    }
}

impl Collect {
    fn topics(&self) -> Vec<String> {
        let messages = self.messages.lock().unwrap();
        messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.topic).into_owned())
            .collect()
    }

    fn payloads(&self, topic: &str) -> Vec<String> {
        let messages = self.messages.lock().unwrap();
        messages
            .iter()
            .filter(|m| m.topic == topic.as_bytes())
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }
}

fn config() -> BrokerConfig {
    BrokerConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        direct_filter: "devices/+/telemetry".into(),
        ..BrokerConfig::default()
    }
}

fn start(config: BrokerConfig) -> (Broker, Arc<Collect>) {
    let collect = Arc::new(Collect::default());
    let broker = Broker::start(
        &config,
        Arc::new(Handle(collect.clone())),
        Arc::new(AllowAll),
    )
    .unwrap();
    (broker, collect)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Publishes `count` QoS 1 messages with rumqttc (3.1.1) and returns how many PUBACKs came.
async fn publish_v4(addr: SocketAddr, client_id: &str, topic: &str, count: usize) -> usize {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::ZERO);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let topic = topic.to_owned();
    tokio::spawn(async move {
        for i in 0..count {
            client
                .publish(&topic, QoS::AtLeastOnce, false, format!("{i}"))
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while acked < count {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("3.1.1 connection error: {e}"),
            Err(_) => break,
        }
    }
    acked
}

async fn publish_v5(addr: SocketAddr, client_id: &str, topic: &str, count: usize) -> usize {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let topic = topic.to_owned();
    tokio::spawn(async move {
        for i in 0..count {
            client
                .publish(&topic, QoS::AtLeastOnce, false, format!("{i}"))
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while acked < count {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("MQTT 5 connection error: {e}"),
            Err(_) => break,
        }
    }
    acked
}

/// A CONNECT packet: protocol name and level, flags, keep alive, client id.
fn connect_packet(name: &str, level: u8, flags: u8, keep_alive: u16, client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(name.len() as u16).to_be_bytes());
    body.extend_from_slice(name.as_bytes());
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Sends `packet` on a new connection and returns the first bytes answered (empty if
/// the server closed without a word).
fn exchange(addr: SocketAddr, packet: &[u8], want: usize) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(packet).unwrap();
    let mut answer = vec![0u8; want];
    let mut got = 0;
    while got < want {
        match stream.read(&mut answer[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    answer.truncate(got);
    (stream, answer)
}

/// Session present and the return/reason code of the CONNACK at the start of `answer`.
fn connack(answer: &[u8]) -> Option<(bool, u8)> {
    (answer.len() >= 4 && answer[0] == 0x20).then(|| (answer[2] & 1 == 1, answer[3]))
}

/// Whether the server closed `stream` (EOF) within `within`.
fn closed(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 64];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn both_protocol_versions_publish_on_one_port_in_order() {
    let (broker, collect) = start(config());
    let addr = broker.addrs().mqtt;
    let rt = runtime();
    assert_eq!(
        rt.block_on(publish_v4(addr, "d1", "devices/d1/telemetry", 300)),
        300
    );
    assert_eq!(
        rt.block_on(publish_v5(addr, "d2", "devices/d2/telemetry", 300)),
        300
    );
    let expected: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    assert_eq!(collect.payloads("devices/d1/telemetry"), expected);
    assert_eq!(collect.payloads("devices/d2/telemetry"), expected);
    assert_eq!(broker.meters().pipeline_messages(), 600);
}

#[test]
fn keep_alive_zero_is_accepted_and_never_times_out() {
    let (broker, _) = start(config());
    let addr = broker.addrs().mqtt;
    for level in [4u8, 5] {
        let (mut stream, answer) = exchange(
            addr,
            &connect_packet("MQTT", level, 0x02, 0, &format!("ka0-{level}")),
            4,
        );
        assert_eq!(connack(&answer), Some((false, 0)), "level {level}");
        assert!(!closed(&mut stream, Duration::from_millis(300)));
    }
}

#[test]
fn every_refusal_is_a_connack_with_its_code() {
    let mut config = config();
    config.max_connections = 1;
    let (broker, _) = start(config);
    let addr = broker.addrs().mqtt;
    // MQTT 3.1 (MQIsdp, level 3): return code 1, then the socket closes.
    let (mut s, answer) = exchange(addr, &connect_packet("MQIsdp", 3, 0x02, 30, "old"), 4);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x01]);
    assert!(closed(&mut s, Duration::from_secs(3)));
    // A level above 5 from an MQTT 5 client: 0x84.
    let (_, answer) = exchange(addr, &connect_packet("MQTT", 6, 0x02, 30, "new"), 4);
    assert_eq!(connack(&answer), Some((false, 0x84)));
    // 3.1.1, empty client id with a persistent session: 2 (identifier rejected).
    let (_, answer) = exchange(addr, &connect_packet("MQTT", 4, 0x00, 30, ""), 4);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x02]);

    // The connection limit (1): 3.1.1 gets 3, MQTT 5 gets 0x97.
    let (_first, answer) = exchange(addr, &connect_packet("MQTT", 4, 0x02, 30, "first"), 4);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x00]);
    let (_, answer) = exchange(addr, &connect_packet("MQTT", 4, 0x02, 30, "device-7"), 4);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x03]);
    let (_, answer) = exchange(addr, &connect_packet("MQTT", 5, 0x02, 30, "device-7"), 4);
    assert_eq!(connack(&answer), Some((false, 0x97)));
    // Room frees up; the refused device retries with its own client id (the case that
    // made rumqttd 0.20 panic and poison the listener), then fresh clients connect.
    drop(_first);
    wait_until(
        "the first connection to close",
        Duration::from_secs(5),
        || {
            exchange(addr, &connect_packet("MQTT", 4, 0x02, 30, "device-7"), 4).1
                == [0x20, 0x02, 0x00, 0x00]
        },
    );
    for i in 0..3 {
        wait_until("a fresh client", Duration::from_secs(5), || {
            connack(
                &exchange(
                    addr,
                    &connect_packet("MQTT", 5, 0x02, 30, &format!("fresh-{i}")),
                    4,
                )
                .1,
            ) == Some((false, 0))
        });
    }
}

#[test]
fn a_second_connection_with_the_same_client_id_takes_over() {
    let (broker, collect) = start(config());
    let addr = broker.addrs().mqtt;
    let (mut first, answer) = exchange(addr, &connect_packet("MQTT", 5, 0x02, 30, "twin"), 4);
    assert_eq!(connack(&answer), Some((false, 0)));
    let (_second, answer) = exchange(addr, &connect_packet("MQTT", 4, 0x02, 30, "twin"), 4);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x00]);
    // The first (MQTT 5) hears DISCONNECT 0x8E, session taken over, then EOF.
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = first.read_to_end(&mut rest);
    assert!(
        rest.windows(3)
            .any(|w| w == [0xe0, 0x01, 0x8e] || w[..2] == [0xe0, 0x02] && w[2] == 0x8e),
        "{rest:02x?}"
    );
    // The second works.
    let rt = runtime();
    assert_eq!(
        rt.block_on(publish_v4(addr, "twin", "devices/twin/telemetry", 5)),
        5
    );
    assert_eq!(collect.payloads("devices/twin/telemetry").len(), 5);
}

#[test]
fn packets_only_a_server_sends_close_that_connection_and_nothing_else() {
    let (broker, collect) = start(config());
    let addr = broker.addrs().mqtt;
    for level in [4u8, 5] {
        let (mut s, _) = exchange(
            addr,
            &connect_packet("MQTT", level, 0x02, 30, &format!("rogue-{level}")),
            4,
        );
        // A CONNACK, a SUBACK and an AUTH from a client.
        s.write_all(&[
            0x20, 0x02, 0x00, 0x00, 0x90, 0x03, 0x00, 0x01, 0x00, 0xf0, 0x00,
        ])
        .unwrap();
        assert!(closed(&mut s, Duration::from_secs(3)), "level {level}");
    }
    // The listener is fine.
    let rt = runtime();
    assert_eq!(
        rt.block_on(publish_v5(addr, "after", "devices/after/telemetry", 3)),
        3
    );
    assert_eq!(collect.topics().len(), 3);
}

#[test]
fn a_full_pipeline_holds_pubacks_and_loses_nothing() {
    let (broker, collect) = start(config());
    let addr = broker.addrs().mqtt;
    let rt = runtime();
    let paused = rt.block_on(collect.gate.write());
    let publisher = rt.spawn(publish_v4(
        addr,
        "patient",
        "devices/patient/telemetry",
        200,
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !publisher.is_finished(),
        "PUBACKs came while the pipeline held nothing"
    );
    assert!(collect.topics().is_empty());
    drop(paused);
    assert_eq!(rt.block_on(publisher).unwrap(), 200);
    let expected: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(collect.payloads("devices/patient/telemetry"), expected);
    assert_eq!(broker.meters().skipped(), 0);
}

#[test]
fn subscribers_get_other_topics_and_direct_ones_while_they_watch() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (broker, collect) = start(config());
    let addr = broker.addrs().mqtt;
    let rt = runtime();
    let received = rt.block_on(async {
        let mut options = MqttOptions::new("watcher", addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        client
            .subscribe("alerts/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .subscribe("devices/+/telemetry", QoS::AtLeastOnce)
            .await
            .unwrap();
        let mut subacks = 0;
        while subacks < 2 {
            if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
                subacks += 1;
            }
        }
        assert_eq!(publish_v4(addr, "alerter", "alerts/d1/hot", 2).await, 2);
        assert_eq!(publish_v5(addr, "d9", "devices/d9/telemetry", 2).await, 2);
        let mut received = Vec::new();
        while received.len() < 4 {
            match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => received.push(p.topic.clone()),
                Ok(Ok(_)) => {}
                other => panic!("subscriber: {other:?}"),
            }
        }
        received
    });
    assert_eq!(received.iter().filter(|t| *t == "alerts/d1/hot").count(), 2);
    assert_eq!(
        received
            .iter()
            .filter(|t| *t == "devices/d9/telemetry")
            .count(),
        2
    );
    // Every publish reached the pipeline too, whatever its topic.
    assert_eq!(collect.topics().len(), 4);
}

#[test]
fn an_idle_socket_delays_nobody_and_is_closed_at_the_connect_timeout() {
    let mut config = config();
    config.connect_timeout = Duration::from_millis(500);
    let (broker, _) = start(config);
    let addr = broker.addrs().mqtt;
    let mut idle = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    let (_, answer) = exchange(addr, &connect_packet("MQTT", 4, 0x02, 30, "busy"), 4);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x00]);
    assert!(started.elapsed() < Duration::from_millis(400));
    assert!(closed(&mut idle, Duration::from_secs(3)));
}
