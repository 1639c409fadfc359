//! sluice's MQTT front door through the real binary, with clients no one here wrote:
//! mosquitto_pub / mosquitto_sub (Debian's `mosquitto-clients`), Eclipse Paho
//! (`paho-mqtt` from PyPI) over TCP, TLS and WebSocket, and rumqttc; the conformance
//! checks of `tests/mqtt/conformance.py`; back-pressure against a storage fault; the
//! accounting identity after a mixed run.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{Sluice, metric_value, python_has, telemetry};

const CLIENTS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqtt/clients.py");

/// Whether the mosquitto clients are installed; `.ci/run` installs them and sets
/// `CI_REQUIRE_MOSQUITTO`, under which their absence fails the test.
fn have_mosquitto() -> bool {
    let have = Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("mosquitto_pub"));
    if !have {
        assert!(
            std::env::var_os("CI_REQUIRE_MOSQUITTO").is_none(),
            "CI_REQUIRE_MOSQUITTO is set but mosquitto_pub is missing"
        );
        eprintln!("skipped: mosquitto_pub is not installed (Debian: mosquitto-clients)");
    }
    have
}

fn have_paho() -> bool {
    python_has("paho.mqtt", "CI_REQUIRE_PAHO")
}

/// A client process whose stdout lines are collected.
struct Peer {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Peer {
    fn spawn(command: &mut Command) -> Peer {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("client starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Peer {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`.
    fn wait_for(&mut self, prefix: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.seen.iter().any(|l| l.starts_with(prefix)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no {prefix:?} line within {within:?}: {:?}", self.seen),
            }
        }
    }

    /// Waits for the process to end; returns its success and every stdout line.
    fn finish(mut self, within: Duration) -> (bool, Vec<String>) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(50));
        self.seen.extend(self.lines.try_iter());
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        if !status.success() {
            eprintln!("client failed: {status}: {stderr}");
        }
        (status.success(), self.seen)
    }
}

fn paho(args: &[&str]) -> Command {
    let mut command = Command::new("python3");
    command.arg(CLIENTS_PY).args(args);
    command
}

fn mosquitto(program: &str, addr: SocketAddr, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args);
    command
}

/// Polls /metrics until `series` reaches `want`.
fn wait_metric(sluice: &Sluice, series: &str, want: f64, within: Duration) -> f64 {
    let started = Instant::now();
    loop {
        let value = metric_value(&sluice.get("/metrics").1, series).unwrap_or(0.0);
        if value >= want || started.elapsed() > within {
            return value;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn reading(device: &str, temperature: f64) -> (String, String) {
    let (topic, payload) = telemetry(device, "2024-01-15T10:30:00Z", temperature, 80.0);
    (topic, String::from_utf8(payload).unwrap())
}

/// A rumqttc client (3.1.1 with keep alive 0, or 5) publishing one QoS 1 message.
fn rumqttc_publish(addr: SocketAddr, v5: bool, client_id: &str, topic: &str, payload: &str) {
    let (host, port) = (addr.ip().to_string(), addr.port());
    if v5 {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{Client, Event, MqttOptions};
        let mut options = MqttOptions::new(client_id, host, port);
        // rumqttc's MQTT 5 client wants at least 5 s.
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(options, 10);
        client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_owned())
            .unwrap();
        for event in connection.iter() {
            if let Event::Incoming(Packet::PubAck(_)) = event.expect("rumqttc v5 connection") {
                break;
            }
        }
        let _ = client.disconnect();
    } else {
        use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::ZERO);
        let (client, mut connection) = Client::new(options, 10);
        client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_owned())
            .unwrap();
        for event in connection.iter() {
            if let Event::Incoming(Packet::PubAck(_)) = event.expect("rumqttc connection") {
                break;
            }
        }
        let _ = client.disconnect();
    }
}

/// A rumqttc subscriber: the topics it received, as they come.
fn rumqttc_subscribe(
    addr: SocketAddr,
    v5: bool,
    client_id: &str,
    filter: &str,
) -> Arc<Mutex<Vec<String>>> {
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = received.clone();
    let (subscribed_tx, subscribed) = mpsc::channel();
    let (host, port) = (addr.ip().to_string(), addr.port());
    let (client_id, filter) = (client_id.to_owned(), filter.to_owned());
    std::thread::spawn(move || {
        if v5 {
            use rumqttc::v5::mqttbytes::QoS;
            use rumqttc::v5::mqttbytes::v5::Packet;
            use rumqttc::v5::{Client, Event, MqttOptions};
            let mut options = MqttOptions::new(client_id, host, port);
            options.set_keep_alive(Duration::from_secs(30));
            let (client, mut connection) = Client::new(options, 100);
            client.subscribe(filter, QoS::AtLeastOnce).unwrap();
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => drop(subscribed_tx.send(())),
                    Ok(Event::Incoming(Packet::Publish(p))) => sink
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&p.topic).into_owned()),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        } else {
            use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
            let mut options = MqttOptions::new(client_id, host, port);
            options.set_keep_alive(Duration::from_secs(30));
            let (client, mut connection) = Client::new(options, 100);
            client.subscribe(filter, QoS::AtLeastOnce).unwrap();
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => drop(subscribed_tx.send(())),
                    Ok(Event::Incoming(Packet::Publish(p))) => sink.lock().unwrap().push(p.topic),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    });
    subscribed
        .recv_timeout(Duration::from_secs(10))
        .expect("subscribed");
    received
}

#[test]
fn peer_clients_publish_and_subscribe_on_one_port_with_both_versions() {
    if !have_mosquitto() || !have_paho() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), &[]);
    let addr = sluice.mqtt;
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let filter = "devices/+/telemetry";
    let publishers = 6;
    let count = publishers.to_string();

    // Subscribers: mosquitto_sub and Paho, each in both versions, and rumqttc in both.
    let mut subscribers = vec![
        Peer::spawn(&mut mosquitto(
            "mosquitto_sub",
            addr,
            &[
                "-V", "mqttv311", "-q", "1", "-t", filter, "-C", &count, "-W", "30", "-v",
            ],
        )),
        Peer::spawn(&mut mosquitto(
            "mosquitto_sub",
            addr,
            &[
                "-V", "mqttv5", "-q", "1", "-t", filter, "-C", &count, "-W", "30", "-v",
            ],
        )),
        Peer::spawn(&mut paho(&[
            "sub", &host, &port, "3.1.1", filter, &count, "30",
        ])),
        Peer::spawn(&mut paho(&["sub", &host, &port, "5", filter, &count, "30"])),
    ];
    for paho_sub in &mut subscribers[2..] {
        paho_sub.wait_for("subscribed", Duration::from_secs(10));
    }
    let rumqttc_subs = [
        rumqttc_subscribe(addr, false, "rumqttc-sub-4", filter),
        rumqttc_subscribe(addr, true, "rumqttc-sub-5", filter),
    ];
    // mosquitto_sub prints nothing when subscribed: every subscriber has a router link
    // once its SUBSCRIBE is in the router.
    assert_eq!(
        wait_metric(
            &sluice,
            "sluice_mqtt_router_links",
            6.0,
            Duration::from_secs(10)
        ),
        6.0
    );

    // Publishers: each client in each version sends one reading (Paho and rumqttc with
    // keep alive 0, which mosquitto_pub does not allow).
    let (t, p) = reading("peer-mosquitto-4", 21.0);
    assert!(
        mosquitto(
            "mosquitto_pub",
            addr,
            &["-V", "mqttv311", "-q", "1", "-t", &t, "-m", &p]
        )
        .status()
        .unwrap()
        .success()
    );
    let (t, p) = reading("peer-mosquitto-5", 22.0);
    assert!(
        mosquitto(
            "mosquitto_pub",
            addr,
            &["-V", "mqttv5", "-q", "1", "-t", &t, "-m", &p]
        )
        .status()
        .unwrap()
        .success()
    );
    let (t, p) = reading("peer-paho-4", 23.0);
    assert!(
        paho(&["pub", &host, &port, "3.1.1", &t, &p, "1"])
            .status()
            .unwrap()
            .success()
    );
    let (t, p) = reading("peer-paho-5", 24.0);
    assert!(
        paho(&["pub", &host, &port, "5", &t, &p, "1"])
            .status()
            .unwrap()
            .success()
    );
    let (t, p) = reading("peer-rumqttc-4", 25.0);
    rumqttc_publish(addr, false, "rumqttc-pub-4", &t, &p);
    let (t, p) = reading("peer-rumqttc-5", 26.0);
    rumqttc_publish(addr, true, "rumqttc-pub-5", &t, &p);

    let expected: Vec<String> = [
        "mosquitto-4",
        "mosquitto-5",
        "paho-4",
        "paho-5",
        "rumqttc-4",
        "rumqttc-5",
    ]
    .iter()
    .map(|d| format!("devices/peer-{d}/telemetry"))
    .collect();
    for (i, subscriber) in subscribers.into_iter().enumerate() {
        let (ok, lines) = subscriber.finish(Duration::from_secs(30));
        assert!(ok, "subscriber {i}: {lines:?}");
        for topic in &expected {
            assert!(
                lines.iter().any(|l| l.contains(topic.as_str())),
                "subscriber {i} missed {topic}: {lines:?}"
            );
        }
    }
    for (i, received) in rumqttc_subs.iter().enumerate() {
        let started = Instant::now();
        while received.lock().unwrap().len() < publishers
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut got = received.lock().unwrap().clone();
        got.sort();
        assert_eq!(got, expected, "rumqttc subscriber {i}");
    }
    // Every reading is a row, once.
    assert_eq!(
        sluice.wait_for("SELECT count(*) FROM telemetry", 6, Duration::from_secs(10)),
        6
    );
    assert_eq!(
        sluice.scalar("SELECT count(DISTINCT device_id) FROM telemetry"),
        6
    );
}

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate file, key file).
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    (cert_file, key_file)
}

#[test]
fn tls_handshakes_run_in_their_own_task_and_an_idle_socket_delays_nobody() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt.tls]\naddr = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let tls = sluice.mqtts.expect("the ready line names the TLS listener");

    // A socket that opens TCP on the TLS port and says nothing: rumqttd's listener waited
    // for its handshake before accepting anyone else.
    let _idle = TcpStream::connect(tls).unwrap();
    let cafile = cert.to_str().unwrap();
    for (i, version) in ["mqttv311", "mqttv5"].iter().enumerate() {
        let (topic, payload) = reading(&format!("tls-{i}"), 20.0);
        let started = Instant::now();
        let status = mosquitto(
            "mosquitto_pub",
            tls,
            &[
                "--cafile", cafile, "-V", version, "-q", "1", "-t", &topic, "-m", &payload,
            ],
        )
        .status()
        .unwrap();
        let took = started.elapsed();
        assert!(status.success(), "{version} over TLS");
        assert!(
            took < Duration::from_secs(1),
            "{version}: connect, handshake, publish took {took:?}"
        );
    }
    assert_eq!(
        sluice.wait_for("SELECT count(*) FROM telemetry", 2, Duration::from_secs(10)),
        2
    );
    // Plain MQTT on the TLS port is not MQTT: refused, and the listener goes on.
    let (_, plain) = raw_exchange(tls, &connect_packet(4, 30, "plain-on-tls"), 4);
    assert!(plain.is_empty() || plain[0] != 0x20, "{plain:02x?}");
    assert_eq!(
        metric_value(
            &sluice.get("/metrics").1,
            "sluice_mqtt_connection_attempts_total{listener=\"mqtts\",outcome=\"accepted\",reason=\"ok\"}"
        ),
        Some(2.0)
    );
}

#[test]
fn a_bad_tls_certificate_stops_the_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = certificate(dir.path());
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt.tls]\naddr = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = \"/no/such/key.pem\"\n",
            cert.display().to_string()
        ),
    )
    .unwrap();
    let (ok, _, stderr) = common::cli(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--mqtt-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--pg-addr",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    assert!(stderr.contains("/no/such/key.pem"), "{stderr}");
}

#[test]
fn browsers_subscribe_to_alerts_over_websocket() {
    if !have_paho() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        "[mqtt.ws]\naddr = \"127.0.0.1:0\"\n\n[[alert]]\nname = \"overheat\"\nmetric = \"temperature\"\nabove = 80.0\n",
    )
    .unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let ws = sluice
        .ws
        .expect("the ready line names the WebSocket listener");
    let (host, port) = (ws.ip().to_string(), ws.port().to_string());
    // Paho over WebSocket (subprotocol mqtt, path /mqtt), as MQTT.js and Paho JS in a
    // browser connect; both versions.
    let mut subscribers = vec![
        Peer::spawn(&mut paho(&[
            "sub",
            &host,
            &port,
            "5",
            "alerts/#",
            "1",
            "30",
            "websockets",
        ])),
        Peer::spawn(&mut paho(&[
            "sub",
            &host,
            &port,
            "3.1.1",
            "alerts/#",
            "1",
            "30",
            "websockets",
        ])),
    ];
    for s in &mut subscribers {
        s.wait_for("subscribed", Duration::from_secs(10));
    }
    // A device overheats (over plain MQTT); the rule fires; the notification reaches the
    // browsers.
    let (topic, payload) = telemetry("ws-device", "2024-01-15T10:30:00Z", 91.0, 80.0);
    assert_eq!(
        common::publish(
            sluice.mqtt,
            vec![(topic, payload)],
            rumqttc::QoS::AtLeastOnce,
            1
        ),
        1
    );
    for (i, subscriber) in subscribers.into_iter().enumerate() {
        let (ok, lines) = subscriber.finish(Duration::from_secs(30));
        assert!(ok, "WebSocket subscriber {i}: {lines:?}");
        let alert = lines
            .iter()
            .find(|l| l.starts_with("message alerts/ws-device/overheat"))
            .unwrap();
        assert!(alert.contains("\"state\":\"firing\""), "{alert}");
    }
    // A WebSocket client can publish too.
    let (topic, payload) = reading("ws-publisher", 20.0);
    assert!(
        paho(&[
            "pub",
            &host,
            &port,
            "5",
            &topic,
            &payload,
            "1",
            "websockets"
        ])
        .status()
        .unwrap()
        .success()
    );
    assert_eq!(
        sluice.wait_for("SELECT count(*) FROM telemetry", 2, Duration::from_secs(10)),
        2
    );
}

#[test]
fn a_stalled_pipeline_holds_pubacks_and_every_acknowledged_message_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    // A small hot store and queue, so that a storage fault stalls the pipeline quickly.
    std::fs::write(
        &config,
        "[windows]\nenabled = false\n[ingest]\nqueue_messages = 500\nbatch_rows = 100\n\
         [storage]\nflush_interval = \"1s\"\nflush_rows = 500\nmax_hot_rows = 1000\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let sluice = Sluice::start(&data, &["--config", config.to_str().unwrap()]);
    // The fault: the telemetry table's directory becomes a file, so flushes fail (even
    // for root) and the hot store fills up.
    let table = data.join("telemetry");
    let aside = data.join("telemetry.aside");
    std::fs::rename(&table, &aside).unwrap();
    std::fs::write(&table, b"not a directory").unwrap();

    let total = 5000;
    let acked = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let acked = acked.clone();
        let addr = sluice.mqtt;
        std::thread::spawn(move || {
            use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
            let mut options =
                MqttOptions::new("stalled-publisher", addr.ip().to_string(), addr.port());
            options.set_keep_alive(Duration::from_secs(60));
            options.set_inflight(100);
            let (client, mut connection) = Client::new(options, 200);
            std::thread::spawn(move || {
                for i in 0..total {
                    let (topic, payload) = telemetry(
                        &format!("stall-{}", i % 50),
                        &format!("2024-01-15T10:{:02}:{:02}Z", i / 3000, (i / 50) % 60),
                        20.0,
                        80.0,
                    );
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .unwrap();
                }
            });
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        if acked.fetch_add(1, Ordering::SeqCst) + 1 == total {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("publisher: {e}"),
                }
            }
        })
    };
    // Acknowledgements stop once the hot store and the queue are full…
    let mut last = usize::MAX;
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = acked.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "acknowledgements never stopped"
        );
    }
    assert!(
        last < total,
        "every message was acknowledged while nothing could be stored"
    );
    assert!(
        last >= 1000,
        "the hot store and the queue take some: {last}"
    );
    let metrics = sluice.get("/metrics").1;
    assert_eq!(
        metric_value(&metrics, "sluice_broker_skipped_messages_total"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&metrics, "sluice_mqtt_refused_messages_total"),
        Some(0.0)
    );
    assert!(sluice.log_text().contains("flush failed"));

    // …and resume when the disk is back: nothing was lost or doubled.
    std::fs::remove_file(&table).unwrap();
    std::fs::rename(&aside, &table).unwrap();
    publisher.join().unwrap();
    assert_eq!(acked.load(Ordering::SeqCst), total);
    assert_eq!(
        sluice.wait_for(
            "SELECT count(*) FROM telemetry",
            total as i64,
            Duration::from_secs(30)
        ),
        total as i64
    );
    let metrics = sluice.get("/metrics").1;
    assert_eq!(
        metric_value(&metrics, "sluice_broker_skipped_messages_total"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_mqtt_pipeline_messages_total{source=\"publish\"}"
        ),
        Some(total as f64)
    );
}

/// A CONNECT packet (protocol level 4 or 5, clean session).
fn connect_packet(level: u8, keep_alive: u16, client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Sends `packet` on a new connection; returns the socket and up to `want` bytes of
/// the answer.
fn raw_exchange(addr: SocketAddr, packet: &[u8], want: usize) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
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

#[test]
fn every_publish_is_accounted_for_after_a_mixed_run() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), &[]);
    let addr = sluice.mqtt;
    // An MQTT subscriber sees telemetry (so those readings are also routed) and status
    // topics.
    let seen = rumqttc_subscribe(addr, true, "accounting-watcher", "devices/#");
    // A fleet with malformed messages, QoS 0 and 1, over both versions.
    for (protocol, qos, seed) in [("3.1.1", "1", "1"), ("5", "0", "2")] {
        let (ok, _, stderr) = common::cli(&[
            "loadgen",
            "--broker",
            &addr.to_string(),
            "--protocol",
            protocol,
            "--qos",
            qos,
            "--devices",
            "200",
            "--rate",
            "1000",
            "--duration",
            "2",
            "--connections",
            "2",
            "--bad-rate",
            "0.1",
            "--seed",
            seed,
        ]);
        assert!(ok, "{stderr}");
    }
    // A QoS 2 message sent twice before its PUBREL: acknowledged twice, handed on once.
    let (mut raw, connack) = raw_exchange(addr, &connect_packet(4, 0, "accounting-qos2"), 4);
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let (topic, payload) = telemetry("qos2-device", "2024-01-15T10:30:00Z", 20.0, 80.0);
    let mut publish = vec![0x34];
    let body_len = 2 + topic.len() + 2 + payload.len();
    let mut len = body_len;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        publish.push(byte);
        if len == 0 {
            break;
        }
    }
    publish.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(&[0x00, 0x07]);
    publish.extend_from_slice(&payload);
    raw.write_all(&publish).unwrap();
    publish[0] = 0x3c; // DUP
    raw.write_all(&publish).unwrap();
    let mut pubrecs = [0u8; 8];
    raw.read_exact(&mut pubrecs).unwrap();
    assert_eq!(pubrecs, [0x50, 0x02, 0x00, 0x07, 0x50, 0x02, 0x00, 0x07]);
    raw.write_all(&[0x62, 0x02, 0x00, 0x07]).unwrap();
    let mut pubcomp = [0u8; 4];
    raw.read_exact(&mut pubcomp).unwrap();
    assert_eq!(pubcomp, [0x70, 0x02, 0x00, 0x07]);
    raw.write_all(&[0xe0, 0x00]).unwrap();

    let sum = |m: &str, s: &str| metric_value(m, s).unwrap_or(0.0);
    let started = Instant::now();
    let metrics = loop {
        let m = sluice.get("/metrics").1;
        let handed_on = sum(&m, "sluice_mqtt_pipeline_messages_total");
        let stored = sum(&m, "sluice_ingest_rows_total") + sum(&m, "sluice_ingest_rejects_total");
        if handed_on == stored && handed_on > 0.0 || started.elapsed() > Duration::from_secs(20) {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // From the wire to the pipeline: every PUBLISH read was handed on or refused (the
    // QoS 2 duplicate is the one refused).
    assert_eq!(
        sum(&metrics, "sluice_mqtt_messages_received_total"),
        sum(
            &metrics,
            "sluice_mqtt_pipeline_messages_total{source=\"publish\"}"
        ) + sum(&metrics, "sluice_mqtt_refused_messages_total"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("sluice_mqtt"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        sum(
            &metrics,
            "sluice_mqtt_refused_messages_total{reason=\"qos2_duplicate\"}"
        ),
        1.0
    );
    assert_eq!(sum(&metrics, "sluice_mqtt_refused_messages_total"), 1.0);
    // From the pipeline to the tables.
    assert_eq!(
        sum(&metrics, "sluice_mqtt_pipeline_messages_total"),
        sum(&metrics, "sluice_ingest_rows_total") + sum(&metrics, "sluice_ingest_rejects_total")
    );
    // Decoded readings become queryable when their batch is sealed.
    let rows = sum(&metrics, "sluice_ingest_rows_total") as i64;
    let rejects = sum(&metrics, "sluice_ingest_rejects_total") as i64;
    let within = Duration::from_secs(10);
    assert_eq!(
        sluice.wait_for("SELECT count(*) FROM telemetry", rows, within),
        rows
    );
    assert_eq!(
        sluice.wait_for("SELECT count(*) FROM rejects", rejects, within),
        rejects
    );
    assert_eq!(
        sluice.scalar("SELECT count(*) FROM telemetry WHERE device_id = 'qos2-device'"),
        1
    );
    // Copies went to the subscriber; the router skipped none.
    assert!(sum(&metrics, "sluice_mqtt_routed_messages_total") > 0.0);
    assert!(!seen.lock().unwrap().is_empty());
    assert_eq!(sum(&metrics, "sluice_broker_skipped_messages_total"), 0.0);
}

#[test]
fn the_conformance_checks_pass() {
    if !have_paho() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        "[mqtt]\ndeny_subscribe = [\"test/nosubscribe\"]\nmax_session_expiry = \"1h\"\n",
    )
    .unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqtt/conformance.py");
    let out = Command::new("python3")
        .args([
            script,
            "--host",
            &sluice.mqtt.ip().to_string(),
            "--port",
            &sluice.mqtt.port().to_string(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        out.status.success() && failed.is_empty(),
        "{}\n{stdout}\n{}",
        failed.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().filter(|l| l.starts_with("PASS")).count() >= 50,
        "{stdout}"
    );
}

#[test]
fn a_device_refused_at_the_connection_limit_retries_with_its_own_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    // One connection (sluice's own alert notifications take none: they are published
    // in-process).
    std::fs::write(&config, "[mqtt]\nmax_connections = 1\n").unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let addr = sluice.mqtt;
    assert_eq!(
        metric_value(
            &sluice.get("/metrics").1,
            "sluice_mqtt_connections{listener=\"mqtt\"}"
        ),
        Some(0.0)
    );
    let code = |answer: &[u8]| (answer.len() >= 4 && answer[0] == 0x20).then(|| answer[3]);

    let (first, answer) = raw_exchange(addr, &connect_packet(4, 30, "device-a"), 4);
    assert_eq!(code(&answer), Some(0));
    // Full: a CONNACK says so, in each version's words.
    let (_, answer) = raw_exchange(addr, &connect_packet(4, 30, "device-b"), 4);
    assert_eq!(code(&answer), Some(3), "3.1.1: server unavailable");
    let (_, answer) = raw_exchange(addr, &connect_packet(5, 30, "device-b"), 5);
    assert_eq!(code(&answer), Some(0x97), "MQTT 5: quota exceeded");
    // Room frees up; the refused device comes back with its own client id (the case
    // that made rumqttd 0.20 panic and poison the listener), then others.
    let connected = "sluice_mqtt_connections{listener=\"mqtt\"}";
    let room = || {
        let started = Instant::now();
        while metric_value(&sluice.get("/metrics").1, connected) != Some(0.0) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "a connection did not close"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    drop(first);
    room();
    let (retried, answer) = raw_exchange(addr, &connect_packet(4, 30, "device-b"), 4);
    assert_eq!(code(&answer), Some(0), "the refused device gets in");
    drop(retried);
    for (i, level) in [(0, 5u8), (1, 4), (2, 5)] {
        room();
        let (_, answer) = raw_exchange(addr, &connect_packet(level, 30, &format!("fresh-{i}")), 4);
        assert_eq!(code(&answer), Some(0), "fresh-{i}");
    }
    let metrics = sluice.get("/metrics").1;
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_mqtt_connection_attempts_total{listener=\"mqtt\",outcome=\"refused\",reason=\"server_full\"}"
        ),
        Some(2.0)
    );
}

/// Whether `mosquitto_passwd` (Debian: mosquitto) is installed; `.ci/run` installs it.
fn have_mosquitto_passwd() -> bool {
    let have = Command::new("mosquitto_passwd").output().is_ok();
    if !have {
        assert!(
            std::env::var_os("CI_REQUIRE_MOSQUITTO").is_none(),
            "CI_REQUIRE_MOSQUITTO is set but mosquitto_passwd is missing"
        );
        eprintln!("skipped: mosquitto_passwd is not installed (Debian: mosquitto)");
    }
    have
}

fn mosquitto_passwd(args: &[&str]) {
    let status = Command::new("mosquitto_passwd")
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "mosquitto_passwd {args:?}: {status}");
}

/// What a rumqttc client (3.1.1 or 5) gets for its CONNECT: `accepted` or the code of
/// the refusal, as rumqttc names it.
fn rumqttc_connect(
    addr: SocketAddr,
    v5: bool,
    client_id: &str,
    credentials: Option<(&str, &str)>,
) -> String {
    let (host, port) = (addr.ip().to_string(), addr.port());
    if v5 {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{Client, ConnectionError, Event, MqttOptions};
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(5));
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, mut connection) = Client::new(options, 10);
        let outcome = match connection.iter().next() {
            Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => "accepted".to_owned(),
            Some(Err(ConnectionError::ConnectionRefused(code))) => format!("{code:?}"),
            other => format!("unexpected: {other:?}"),
        };
        let _ = client.disconnect();
        outcome
    } else {
        use rumqttc::{Client, ConnectionError, Event, MqttOptions, Packet};
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::ZERO);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, mut connection) = Client::new(options, 10);
        let outcome = match connection.iter().next() {
            Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => "accepted".to_owned(),
            Some(Err(ConnectionError::ConnectionRefused(code))) => format!("{code:?}"),
            other => format!("unexpected: {other:?}"),
        };
        let _ = client.disconnect();
        outcome
    }
}

/// paho (`clients.py`) as `user`, or anonymously: its exit status and its lines.
fn paho_as(user: Option<(&str, &str)>, args: &[&str]) -> (bool, Vec<String>) {
    paho_with(None, user, args, Duration::from_secs(20))
}

/// paho as `client_id` (one of its own when `None`), with `user`'s credentials (a
/// token as the password, say), given `within` to finish: its exit status and lines.
fn paho_with(
    client_id: Option<&str>,
    user: Option<(&str, &str)>,
    args: &[&str],
    within: Duration,
) -> (bool, Vec<String>) {
    let mut command = paho(args);
    if let Some(id) = client_id {
        command.env("MQTT_CLIENT_ID", id);
    }
    if let Some((name, password)) = user {
        command
            .env("MQTT_USERNAME", name)
            .env("MQTT_PASSWORD", password);
    }
    Peer::spawn(&mut command).finish(within)
}

/// The first line of `lines` starting with `prefix`.
fn line<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:?}"))
}

/// A Mosquitto user brings the files `mosquitto_passwd` made and an ACL with `user` and
/// `pattern` sections: clients of both versions (paho, rumqttc, mosquitto_pub) are
/// refused with the right CONNACK codes or let in; a device publishing as another is
/// acknowledged (MQTT 5: 0x87), not stored, kept in `rejects` (also after a kill -9, from
/// the WAL); subscriptions outside the ACL are refused; a user added to the file gets in
/// after a reload; a repeated wrong password is answered later and later.
#[test]
fn mosquitto_password_and_acl_files_decide_who_connects_publishes_and_subscribes() {
    if !have_mosquitto() || !have_paho() || !have_mosquitto_passwd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let pw = passwd.to_str().unwrap();
    mosquitto_passwd(&["-c", "-b", pw, "device-1", "pw-1"]);
    mosquitto_passwd(&["-b", pw, "device-2", "pw-2"]);
    // The older salted SHA-512 ($6$) of Mosquitto 1.6.
    mosquitto_passwd(&["-H", "sha512", "-b", pw, "ops", "ops-pw"]);
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "# as Mosquitto reads it\nuser ops\ntopic read devices/#\ntopic readwrite alerts/#\n\n\
         pattern readwrite devices/%u/#\n",
    )
    .unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt.auth]\npassword_file = {pw:?}\nacl_file = {:?}\n",
            acl.to_str().unwrap()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let sluice = Sluice::start(&data, &args);
    let addr = sluice.mqtt;
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let device_1 = Some(("device-1", "pw-1"));

    // Let in with the right password, each version, each client.
    for (version, ts) in [
        ("3.1.1", "2024-01-15T10:30:00Z"),
        ("5", "2024-01-15T10:30:30Z"),
    ] {
        let (topic, payload) = telemetry("device-1", ts, 1.0, 80.0);
        let payload = String::from_utf8(payload).unwrap();
        let (ok, lines) = paho_as(
            device_1,
            &["pub", &host, &port, version, &topic, &payload, "1"],
        );
        assert!(ok, "{version}: {lines:?}");
        assert_eq!(line(&lines, "puback"), "puback 0");
    }
    for v5 in [false, true] {
        assert_eq!(rumqttc_connect(addr, v5, "r-ok", device_1), "accepted");
    }
    let (topic, payload) = reading("ops", 3.0);
    let out = mosquitto(
        "mosquitto_pub",
        addr,
        &["-u", "ops", "-P", "ops-pw", "-q", "1"],
    )
    .args(["-t", &topic, "-m", &payload])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Refused: no user name (3.1.1: 5, MQTT 5: 0x87), a wrong password (4, 0x86).
    let wrong = Some(("device-2", "not-it"));
    // (rumqttc names 3.1.1's 5 and 4 and MQTT 5's 0x87 and 0x86 alike.)
    for v5 in [false, true] {
        assert_eq!(rumqttc_connect(addr, v5, "r-anon", None), "NotAuthorized");
        assert_eq!(
            rumqttc_connect(addr, v5, "r-wrong", wrong),
            "BadUserNamePassword"
        );
        assert_eq!(
            rumqttc_connect(addr, v5, "r-unknown", Some(("nobody", "pw-1"))),
            "BadUserNamePassword"
        );
    }
    for version in ["3.1.1", "5"] {
        let (ok, lines) = paho_as(
            None,
            &[
                "pub",
                &host,
                &port,
                version,
                "devices/x/telemetry",
                "{}",
                "1",
            ],
        );
        assert!(!ok);
        // paho reports a 3.1.1 return code as its MQTT 5 counterpart.
        assert_eq!(line(&lines, "refused"), "refused 135 Not authorized");
    }
    let out = mosquitto("mosquitto_pub", addr, &["-u", "device-2", "-P", "nope"])
        .args(["-t", "devices/device-2/telemetry", "-m", "{}"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad user name or password"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Failures of one user from one address slow that user's next attempts.
    let started = Instant::now();
    assert_eq!(
        rumqttc_connect(addr, false, "r-wrong", wrong),
        "BadUserNamePassword"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "a repeated wrong password is answered at once: {:?}",
        started.elapsed()
    );

    // device-1 publishing as device-2: acknowledged (0x87 in MQTT 5), not stored.
    let (topic, payload) = reading("device-2", 9.0);
    for (version, code) in [("3.1.1", "puback 0"), ("5", "puback 135")] {
        let (ok, lines) = paho_as(
            device_1,
            &["pub", &host, &port, version, &topic, &payload, "1"],
        );
        assert!(ok, "{version}: {lines:?}");
        assert_eq!(line(&lines, "puback"), code, "{version}");
    }
    // Only sluice publishes alerts, whatever the ACL grants.
    let (ok, lines) = paho_as(
        Some(("ops", "ops-pw")),
        &["pub", &host, &port, "5", "alerts/d1/overheat", "{}", "1"],
    );
    assert!(ok, "{lines:?}");
    assert_eq!(line(&lines, "puback"), "puback 135");

    // Subscriptions: inside the ACL granted, outside refused (0x80 / 0x87).
    for (user, filter, version, want) in [
        (device_1, "devices/#", "3.1.1", "suback 128"),
        (device_1, "devices/#", "5", "suback 135"),
        (device_1, "alerts/#", "5", "suback 135"),
        (device_1, "devices/device-2/telemetry", "5", "suback 135"),
        (device_1, "devices/device-1/#", "5", "suback 1"),
        (Some(("ops", "ops-pw")), "devices/#", "3.1.1", "suback 1"),
        (Some(("ops", "ops-pw")), "alerts/#", "5", "suback 1"),
    ] {
        let (_, lines) = paho_as(user, &["sub", &host, &port, version, filter, "1", "0.5"]);
        assert_eq!(line(&lines, "suback"), want, "{user:?} {filter} {version}");
    }

    let metrics = sluice.get("/metrics").1;
    let attempts = |reason: &str| {
        metric_value(
            &metrics,
            &format!(
                "sluice_mqtt_connection_attempts_total{{listener=\"mqtt\",outcome=\"refused\",reason=\"{reason}\"}}"
            ),
        )
        .unwrap()
    };
    assert!(attempts("bad_credentials") >= 6.0, "{metrics}");
    assert!(attempts("not_authorized") >= 4.0, "{metrics}");
    assert_eq!(
        metric_value(&metrics, "sluice_mqtt_acl_denied_total{packet=\"publish\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_mqtt_acl_denied_total{packet=\"subscribe\"}"
        ),
        Some(4.0)
    );
    sluice.expect_scalar("SELECT count(*) FROM telemetry", 3, Duration::from_secs(10));
    sluice.expect_scalar(
        "SELECT count(*) FROM rejects WHERE reason = 'not_authorized'",
        3,
        Duration::from_secs(10),
    );

    // A user added to the file gets in once the files are read again.
    mosquitto_passwd(&["-b", pw, "device-3", "pw-3"]);
    let device_3 = Some(("device-3", "pw-3"));
    assert_eq!(
        rumqttc_connect(addr, true, "r-3", device_3),
        "BadUserNamePassword"
    );
    let (status, body) = sluice.post("/reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(rumqttc_connect(addr, true, "r-3", device_3), "accepted");

    // The refused publishes are rejects again after a crash: the WAL says so.
    sluice.kill();
    let sluice = Sluice::start(&data, &args);
    sluice.expect_scalar(
        "SELECT count(*) FROM rejects WHERE reason = 'not_authorized'",
        3,
        Duration::from_secs(10),
    );
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry WHERE device_id = 'device-2'",
        0,
        Duration::from_secs(1),
    );
    sluice.expect_scalar("SELECT count(*) FROM telemetry", 3, Duration::from_secs(1));
}

/// With a password file and no ACL file, a device may publish and subscribe under its
/// own `devices/{user name}/` only; a malformed password file stops the start with its
/// line named.
#[test]
fn without_an_acl_a_device_keeps_to_its_own_topics() {
    if !have_paho() || !have_mosquitto_passwd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let pw = passwd.to_str().unwrap();
    mosquitto_passwd(&["-c", "-b", pw, "device-1", "pw-1"]);
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, format!("[mqtt.auth]\npassword_file = {pw:?}\n")).unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let (host, port) = (sluice.mqtt.ip().to_string(), sluice.mqtt.port().to_string());
    let me = Some(("device-1", "pw-1"));
    for (device, want) in [("device-1", "puback 0"), ("device-2", "puback 135")] {
        let (topic, payload) = reading(device, 1.0);
        let (ok, lines) = paho_as(me, &["pub", &host, &port, "5", &topic, &payload, "1"]);
        assert!(ok, "{lines:?}");
        assert_eq!(line(&lines, "puback"), want, "{device}");
    }
    for (filter, want) in [
        ("devices/device-1/#", "suback 1"),
        ("devices/device-1/commands", "suback 1"),
        ("devices/+/telemetry", "suback 135"),
        ("alerts/#", "suback 135"),
        ("#", "suback 135"),
    ] {
        let (_, lines) = paho_as(me, &["sub", &host, &port, "5", filter, "1", "0.5"]);
        assert_eq!(line(&lines, "suback"), want, "{filter}");
    }
    sluice.expect_scalar("SELECT count(*) FROM telemetry", 1, Duration::from_secs(10));
    sluice.expect_scalar(
        "SELECT count(*) FROM rejects WHERE reason = 'not_authorized'",
        1,
        Duration::from_secs(10),
    );
    drop(sluice);

    std::fs::write(&passwd, "device-1:$7$101$AAAA$AAAA\ndevice-2:secret\n").unwrap();
    let out = common::sluice_command()
        .args([
            "serve",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--pg-addr",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data2"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("line 2") && stderr.contains("device-2") && stderr.contains(pw),
        "{stderr}"
    );
}

/// `[mqtt.limits]`: a client publishing far above its rate is slowed (its socket is not
/// read) and loses nothing; another client at the same time is not slowed; an MQTT 5
/// client that stays over its rate is disconnected with 0x96.
#[test]
fn a_client_over_its_rate_is_slowed_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        "[mqtt.limits]\nmessages_per_second = 20\ndisconnect_after = \"2s\"\n",
    )
    .unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let addr = sluice.mqtt;
    let readings = |device: &str, n: usize| {
        (0..n)
            .map(|i| {
                let ts = format!("2024-01-15T10:{:02}:{:02}Z", i / 60, i % 60);
                telemetry(device, &ts, 20.0, 80.0)
            })
            .collect::<Vec<_>>()
    };
    let flooding = std::thread::spawn(move || {
        let started = Instant::now();
        let acked = common::publish(addr, readings("flood", 100), rumqttc::QoS::AtLeastOnce, 1);
        (acked, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    // (Another client id: `common::publish` names its clients after the process.)
    let started = Instant::now();
    for (topic, payload) in readings("calm", 10) {
        rumqttc_publish(
            addr,
            false,
            "calm",
            &topic,
            &String::from_utf8(payload).unwrap(),
        );
    }
    let calm = started.elapsed();
    let (flood_acked, flood) = flooding.join().unwrap_or_else(|_| {
        let metrics = sluice.get("/metrics").1;
        let closes: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("sluice_mqtt_disconnects_total") && !l.ends_with(" 0"))
            .collect();
        panic!(
            "the flooding client failed: {closes:?}; sluice's log:\n{}",
            sluice.log_text()
        )
    });
    assert_eq!(flood_acked, 100, "nothing lost");
    // 100 messages at 20 a second, 20 of them as a burst: 4 s at least.
    assert!(flood >= Duration::from_secs(3), "the flood took {flood:?}");
    assert!(
        calm < flood / 2,
        "the calm client took {calm:?}, the flood {flood:?}"
    );
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry",
        110,
        Duration::from_secs(10),
    );
    let metrics = sluice.get("/metrics").1;
    assert!(metric_value(&metrics, "sluice_mqtt_throttled_total").unwrap() > 0.0);

    // MQTT 5 (paho), staying over the rate: DISCONNECT 0x96.
    if !have_paho() {
        return;
    }
    let (topic, payload) = reading("v5-flood", 1.0);
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let (ok, lines) = paho_as(None, &["flood", &host, &port, "5", &topic, &payload, "15"]);
    assert!(ok, "{lines:?}");
    assert_eq!(
        line(&lines, "disconnect"),
        "disconnect 150 Message rate too high"
    );
    let metrics = sluice.get("/metrics").1;
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_mqtt_disconnects_total{reason=\"rate_too_high\"}"
        ),
        Some(1.0)
    );
}

/// `openssl` with `args`, in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl` (the real one) in `dir`: a CA named `ca` and a device certificate for
/// `cn` it signs, as `{name}.pem` and `{name}.key`.
fn openssl_ca_and_device(dir: &Path, ca: &str, name: &str, cn: &str) {
    let run = |args: &[&str]| openssl(dir, args);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    if !dir.join(format!("{ca}.pem")).exists() {
        run(&[
            &["req", "-x509", "-days", "1"][..],
            &ec,
            &[
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-subj",
                &format!("/CN={ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        ]
        .concat());
    }
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    ]
    .concat());
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &format!("{name}.csr"),
        "-CA",
        &format!("{ca}.pem"),
        "-CAkey",
        &format!("{ca}.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "client.ext",
        "-out",
        &format!("{name}.pem"),
    ]);
}

/// Client certificates on the TLS listener (`client_ca_file`): a device connects with
/// the certificate a test CA (made by openssl) signed for it and no password, its CN is
/// its identity (its own topics only: publishing as another device is a reject); a
/// certificate of another CA fails the handshake; without one, the client is refused
/// (CONNACK 5), or, with `require_client_cert`, the handshake fails.
#[test]
fn a_client_certificate_is_the_device_identity() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    openssl_ca_and_device(dir.path(), "fleet-ca", "device-7", "device-7");
    openssl_ca_and_device(dir.path(), "rogue-ca", "rogue", "device-7");
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let start = |require: bool| {
        let config = dir.path().join(format!("sluice-{require}.toml"));
        std::fs::write(
            &config,
            format!(
                "[mqtt.tls]\naddr = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n\
                 client_ca_file = {:?}\nrequire_client_cert = {require}\n",
                cert.to_str().unwrap(),
                key.to_str().unwrap(),
                path("fleet-ca.pem"),
            ),
        )
        .unwrap();
        Sluice::start(
            &dir.path().join(format!("data-{require}")),
            &["--config", config.to_str().unwrap()],
        )
    };
    let cafile = cert.to_str().unwrap().to_owned();
    let publish = |tls: SocketAddr, device: &str, identity: Option<&str>| {
        let (topic, payload) = reading(device, 20.0);
        let mut args = vec!["--cafile", &cafile, "-V", "mqttv311", "-q", "1"];
        let (cert, key) = identity.map_or((String::new(), String::new()), |name| {
            (path(&format!("{name}.pem")), path(&format!("{name}.key")))
        });
        if identity.is_some() {
            args.extend(["--cert", &cert, "--key", &key]);
        }
        args.extend(["-t", &topic, "-m", &payload]);
        let out = mosquitto("mosquitto_pub", tls, &args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let sluice = start(false);
    let tls = sluice.mqtts.unwrap();
    let (ok, err) = publish(tls, "device-7", Some("device-7"));
    assert!(ok, "{err}");
    // Its CN is its identity: another device's topic is not its own (acknowledged, as
    // 3.1.1 has no code for it, and kept as a reject).
    let (ok, err) = publish(tls, "device-8", Some("device-7"));
    assert!(ok, "{err}");
    let (ok, err) = publish(tls, "device-7", Some("rogue"));
    assert!(!ok, "another CA's certificate is refused");
    assert!(!err.is_empty());
    let (ok, err) = publish(tls, "device-7", None);
    assert!(!ok);
    assert!(err.contains("not authorised"), "{err}");
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry WHERE device_id = 'device-7'",
        1,
        Duration::from_secs(10),
    );
    sluice.expect_scalar(
        "SELECT count(*) FROM rejects WHERE reason = 'not_authorized'",
        1,
        Duration::from_secs(10),
    );
    drop(sluice);

    let sluice = start(true);
    let tls = sluice.mqtts.unwrap();
    let (ok, _) = publish(tls, "device-7", None);
    assert!(!ok, "no certificate, no handshake");
    let (ok, err) = publish(tls, "device-7", Some("device-7"));
    assert!(ok, "{err}");
}

/// Whether PyJWT with its `cryptography` backend is installed; `.ci/run` installs it.
fn have_pyjwt() -> bool {
    python_has("jwt, cryptography", "CI_REQUIRE_PYJWT")
}

/// A token signed by PyJWT (a JWT library no one here wrote) with the key in `key`
/// (an HMAC secret, or a PEM private key), over `claims`; `exp_in`/`nbf_in` (seconds
/// from now) become `exp`/`nbf`. `HS256-public-key` is the attacker's token: HS256 with
/// a public key's PEM as the secret (PyJWT refuses to make it, so it is made by hand).
fn pyjwt(algorithm: &str, key: &Path, claims: &str) -> String {
    let script = "import base64, hashlib, hmac, json, sys, time, jwt\n\
        alg, key, claims = sys.argv[1], open(sys.argv[2], 'rb').read(), json.loads(sys.argv[3])\n\
        for k in ('exp', 'nbf'):\n\
        \x20   if k + '_in' in claims: claims[k] = int(time.time()) + claims.pop(k + '_in')\n\
        if alg == 'HS256-public-key':\n\
        \x20   b = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b'=')\n\
        \x20   signed = b({'alg': 'HS256', 'typ': 'JWT'}) + b'.' + b(claims)\n\
        \x20   mac = hmac.new(key, signed, hashlib.sha256).digest()\n\
        \x20   print((signed + b'.' + base64.urlsafe_b64encode(mac).rstrip(b'=')).decode())\n\
        else:\n\
        \x20   print(jwt.encode(claims, key, algorithm=alg))\n";
    let out = Command::new("python3")
        .args(["-c", script, algorithm])
        .arg(key)
        .arg(claims)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `[mqtt.auth.jwt]`: the password is a token PyJWT signed; it lets a client in as the
/// client id its `sub` names, while it is current and its signature verifies (HS256
/// with a secret file; ES256 and RS256 with public keys `openssl` made). Refused:
/// expired, not yet valid, forged, for another client id (3.1.1: 4 / 5; MQTT 5: 0x86 /
/// 0x87). A token's device publishes under its own topics only, whatever user name it
/// gives; a rotated secret takes effect on `/reload`.
#[test]
fn jwt_tokens_let_devices_in_as_their_client_id() {
    if !have_paho() || !have_mosquitto() || !have_pyjwt() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    // As `echo` writes it; PyJWT signs with the bytes before the line break.
    std::fs::write(&secret, "a fleet secret of thirty-two bytes\n").unwrap();
    let signing = dir.path().join("signing");
    std::fs::write(&signing, "a fleet secret of thirty-two bytes").unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt.auth.jwt]\nsecret_file = {:?}\n",
            secret.to_str().unwrap()
        ),
    )
    .unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let addr = sluice.mqtt;
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let token = |claims: &str| pyjwt("HS256", &signing, claims);
    let valid = token(r#"{"sub": "device-7", "exp_in": 600}"#);

    // paho, both versions: the client id the token names, any user name.
    for (version, ts) in [
        ("3.1.1", "2024-01-15T10:30:00Z"),
        ("5", "2024-01-15T10:30:30Z"),
    ] {
        let (topic, payload) = telemetry("device-7", ts, 1.0, 80.0);
        let payload = String::from_utf8(payload).unwrap();
        let (ok, lines) = paho_with(
            Some("device-7"),
            Some(("anyone", &valid)),
            &["pub", &host, &port, version, &topic, &payload, "1"],
            Duration::from_secs(20),
        );
        assert!(ok, "{version}: {lines:?}");
        assert_eq!(line(&lines, "puback"), "puback 0", "{version}");
    }
    // Its identity is the client id, not the user name it gives: another device's
    // topic is refused (the default policy), even with that device's name as user name.
    let (topic, payload) = reading("device-8", 2.0);
    let (ok, lines) = paho_with(
        Some("device-7"),
        Some(("device-8", &valid)),
        &["pub", &host, &port, "5", &topic, &payload, "1"],
        Duration::from_secs(20),
    );
    assert!(ok, "{lines:?}");
    assert_eq!(line(&lines, "puback"), "puback 135");
    // mosquitto_pub, too.
    let (topic, payload) = telemetry("device-7", "2024-01-15T10:31:00Z", 3.0, 80.0);
    let payload = String::from_utf8(payload).unwrap();
    let out = mosquitto(
        "mosquitto_pub",
        addr,
        &["-i", "device-7", "-u", "device-7", "-P", &valid, "-q", "1"],
    )
    .args(["-t", &topic, "-m", &payload])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // rumqttc, both versions: let in, and refused with the codes of each version.
    let cases = [
        ("valid", valid.clone(), "accepted"),
        (
            "expired",
            token(r#"{"sub": "device-7", "exp_in": -30}"#),
            "BadUserNamePassword",
        ),
        (
            "not yet valid",
            token(r#"{"sub": "device-7", "nbf_in": 600}"#),
            "BadUserNamePassword",
        ),
        (
            "wrong signature",
            {
                let other = dir.path().join("other");
                std::fs::write(&other, "another secret, not the fleet's").unwrap();
                pyjwt("HS256", &other, r#"{"sub": "device-7", "exp_in": 600}"#)
            },
            "BadUserNamePassword",
        ),
        (
            "sub is another client",
            token(r#"{"sub": "device-8", "exp_in": 600}"#),
            "NotAuthorized",
        ),
        ("no sub", token(r#"{"exp_in": 600}"#), "NotAuthorized"),
        ("not a token", "device-7".to_owned(), "BadUserNamePassword"),
    ];
    // (Each case under its own user name: refusals of one user name from one address
    // are answered later and later, and a token's user name is free.)
    for v5 in [false, true] {
        for (what, token, want) in &cases {
            assert_eq!(
                rumqttc_connect(addr, v5, "device-7", Some((what, token))),
                *want,
                "{what} (v5: {v5})"
            );
        }
        assert_eq!(rumqttc_connect(addr, v5, "device-7", None), "NotAuthorized");
    }
    let metrics = sluice.get("/metrics").1;
    for (reason, want) in [("bad_credentials", 8.0), ("not_authorized", 6.0)] {
        let series = format!(
            "sluice_mqtt_connection_attempts_total{{listener=\"mqtt\",outcome=\"refused\",reason=\"{reason}\"}}"
        );
        assert_eq!(metric_value(&metrics, &series), Some(want), "{series}");
    }
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry WHERE device_id = 'device-7'",
        3,
        Duration::from_secs(10),
    );
    sluice.expect_scalar(
        "SELECT count(*) FROM rejects WHERE reason = 'not_authorized'",
        1,
        Duration::from_secs(10),
    );

    // A rotated secret: old tokens out, new ones in, once the files are read again.
    std::fs::write(&secret, "the next fleet secret, rotated\n").unwrap();
    std::fs::write(&signing, "the next fleet secret, rotated").unwrap();
    let (status, body) = sluice.post("/reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        rumqttc_connect(addr, true, "device-7", Some(("old", &valid))),
        "BadUserNamePassword"
    );
    let rotated = token(r#"{"sub": "device-7", "exp_in": 600}"#);
    assert_eq!(
        rumqttc_connect(addr, true, "device-7", Some(("new", &rotated))),
        "accepted"
    );

    // A connection lasts as long as its token: closed at its exp (MQTT 5: DISCONNECT
    // 0x87), as EMQX does; the device comes back with a new one.
    let short = token(r#"{"sub": "device-7", "exp_in": 3}"#);
    let started = Instant::now();
    let (ok, lines) = paho_with(
        Some("device-7"),
        Some(("short-lived", &short)),
        &[
            "sub",
            &host,
            &port,
            "5",
            "devices/device-7/commands",
            "1",
            "30",
        ],
        Duration::from_secs(40),
    );
    let took = started.elapsed();
    assert!(!ok, "{lines:?}");
    assert_eq!(line(&lines, "suback"), "suback 1");
    assert!(
        line(&lines, "disconnect").starts_with("disconnect 135 "),
        "{lines:?}"
    );
    assert!(
        took > Duration::from_millis(1500) && took < Duration::from_secs(15),
        "{took:?}"
    );
    let metrics = sluice.get("/metrics").1;
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_mqtt_disconnects_total{reason=\"credentials_expired\"}"
        ),
        Some(1.0)
    );
    drop(sluice);

    // Public keys made by openssl: ES256 (P-256) and RS256; a token "signed" with
    // HS256 using the public key as its secret (the algorithm confusion attack) and one
    // signed by another key are refused.
    openssl(
        dir.path(),
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.key",
        ],
    );
    openssl(
        dir.path(),
        &["ec", "-in", "ec.key", "-pubout", "-out", "ec.pub"],
    );
    openssl(
        dir.path(),
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec2.key",
        ],
    );
    openssl(dir.path(), &["genrsa", "-out", "rsa.key", "2048"]);
    openssl(
        dir.path(),
        &["rsa", "-in", "rsa.key", "-pubout", "-out", "rsa.pub"],
    );
    let key = |name: &str| dir.path().join(name);
    for (public, algorithm, private, foreign) in [
        ("ec.pub", "ES256", "ec.key", Some("ec2.key")),
        ("rsa.pub", "RS256", "rsa.key", None),
    ] {
        std::fs::write(
            &config,
            format!(
                "[mqtt.auth.jwt]\npublic_key_file = {:?}\n",
                key(public).to_str().unwrap()
            ),
        )
        .unwrap();
        let sluice = Sluice::start(
            &dir.path().join(format!("data-{algorithm}")),
            &["--config", config.to_str().unwrap()],
        );
        let claims = r#"{"sub": "device-9", "exp_in": 600}"#;
        let signed = pyjwt(algorithm, &key(private), claims);
        let confused = pyjwt("HS256-public-key", &key(public), claims);
        for v5 in [false, true] {
            let connect = |token: &str| {
                rumqttc_connect(sluice.mqtt, v5, "device-9", Some(("device-9", token)))
            };
            assert_eq!(connect(&signed), "accepted", "{algorithm}");
            assert_eq!(connect(&confused), "BadUserNamePassword", "{algorithm}");
            if let Some(foreign) = foreign {
                let forged = pyjwt(algorithm, &key(foreign), claims);
                assert_eq!(connect(&forged), "BadUserNamePassword", "{algorithm}");
            }
        }
    }
}
