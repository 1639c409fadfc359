//! "A PUBACK means the reading is on disk", end to end: the real binary killed with -9
//! under a QoS 1 load, restarted on the same data directory; a damaged WAL; a full disk
//! (a real, small tmpfs); redeliveries with and without DUP.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use common::{Sluice, metric_value, publish, sluice_command, telemetry};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// A reading's key as the test knows it: (device, RFC 3339 timestamp).
type Key = (String, String);

fn ts(k: usize) -> String {
    // 2024-01-15T10:00:00Z + 5 s per reading.
    let s = 10 * 3600 + k * 5;
    format!(
        "2024-01-15T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// What a recording client sent and which of it was acknowledged.
#[derive(Default)]
struct Record {
    /// Handed to the MQTT client, in order.
    sent: Vec<Key>,
    acked: BTreeSet<Key>,
}

/// A device fleet on one MQTT 3.1.1 connection (rumqttc) that records every PUBACK:
/// sends `messages` in order until the connection dies or all are acknowledged.
async fn send_recording(
    addr: SocketAddr,
    client_id: String,
    messages: Vec<Key>,
    pace: Duration,
    record: Arc<Mutex<Record>>,
) {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 50);
    let total = messages.len();
    let order = Arc::new(Mutex::new(std::collections::VecDeque::new()));
    let sender = {
        let (order, record) = (order.clone(), record.clone());
        tokio::spawn(async move {
            for (device, at) in messages {
                let (topic, payload) = telemetry(&device, &at, 20.0, 80.0);
                order
                    .lock()
                    .unwrap()
                    .push_back((device.clone(), at.clone()));
                record.lock().unwrap().sent.push((device, at));
                if client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(pace).await;
            }
        })
    };
    let mut in_flight: BTreeMap<u16, Key> = BTreeMap::new();
    let mut acked = 0;
    while acked < total {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                if let Some(key) = order.lock().unwrap().pop_front() {
                    in_flight.insert(pkid, key);
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(key) = in_flight.remove(&ack.pkid) {
                    record.lock().unwrap().acked.insert(key);
                    acked += 1;
                }
            }
            Ok(Ok(_)) => {}
            // The broker died (or the test is over): what was acknowledged is recorded.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    sender.abort();
}

/// Runs `fleets` (client id, messages) at once; returns when every connection ended.
fn run_recording(
    addr: SocketAddr,
    fleets: Vec<(String, Vec<Key>)>,
    pace: Duration,
) -> Arc<Mutex<Record>> {
    let record = Arc::default();
    record_into(&record, addr, fleets, pace);
    record
}

/// [`run_recording`] into a record the caller can watch while the fleets run.
fn record_into(
    record: &Arc<Mutex<Record>>,
    addr: SocketAddr,
    fleets: Vec<(String, Vec<Key>)>,
    pace: Duration,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tasks: Vec<_> = fleets
            .into_iter()
            .map(|(id, messages)| {
                tokio::spawn(send_recording(addr, id, messages, pace, record.clone()))
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// Every (device, ts) of `telemetry` for devices named `prefix…`, with its count.
fn stored(sluice: &Sluice, prefix: &str) -> BTreeMap<Key, i64> {
    let batches = sluice.query(&format!(
        "SELECT device_id, to_char(ts, '%Y-%m-%dT%H:%M:%SZ') AS ts, count(*) AS n FROM telemetry \
         WHERE device_id LIKE '{prefix}%' GROUP BY 1, 2"
    ));
    let mut out = BTreeMap::new();
    for b in &batches {
        let (d, t) = (
            b.column(0).as_string::<i32>(),
            b.column(1).as_string::<i32>(),
        );
        let n = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            out.insert((d.value(i).to_owned(), t.value(i).to_owned()), n.value(i));
        }
    }
    out
}

fn windows_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[windows]\nenabled = true\nsize = \"1m\"\nlateness = \"1m\"\nidle_timeout = \"1h\"\n{extra}"
        ),
    )
    .unwrap();
    config
}

#[test]
fn kill_9_under_qos1_load_loses_no_acknowledged_reading_and_stores_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    // Checkpoints every second: the crash comes after several, with the WAL past the
    // last one to replay.
    let config = windows_config(dir.path(), "[storage]\nflush_interval = \"1s\"\n");
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let sluice = Sluice::start(&data, &args);

    // The loadgen as a second client: it must end at its duration, with its report,
    // although its broker dies under it.
    let loadgen = sluice_command()
        .args(["loadgen", "--broker", &sluice.mqtt.to_string()])
        .args(["--devices", "200", "--rate", "400", "--duration", "8"])
        .args(["--connections", "2", "--qos", "1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // 20 devices, 300 readings each (25 minutes of event time), each device on one of
    // two connections, in order.
    let (devices, readings) = (20, 300);
    let fleets: Vec<(String, Vec<Key>)> = (0..2)
        .map(|c| {
            let messages = (0..readings)
                .flat_map(|k| {
                    (0..devices)
                        .filter(move |d| d % 2 == c)
                        .map(move |d| (format!("kill-{d:02}"), ts(k)))
                })
                .collect();
            (format!("kill-client-{c}"), messages)
        })
        .collect();
    let planned: Vec<Key> = fleets.iter().flat_map(|(_, m)| m.clone()).collect();
    let mqtt = sluice.mqtt;
    // The kill comes on progress, not on the clock (a busy CI machine acknowledges
    // fewer than 300 a second): a sixth of the readings acknowledged and a checkpoint
    // committed, so the restart replays the WAL past it.
    let record: Arc<Mutex<Record>> = Arc::default();
    let killer = {
        let (record, data) = (record.clone(), data.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let checkpointed = || sluice_storage::wal::committed(&data).is_ok_and(|c| c > 1);
            while Instant::now() < deadline
                && (record.lock().unwrap().acked.len() < 1000 || !checkpointed())
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            sluice.kill();
        })
    };
    record_into(&record, mqtt, fleets, Duration::from_millis(1));
    killer.join().unwrap();
    let (sent, acked) = {
        let r = record.lock().unwrap();
        (r.sent.clone(), r.acked.clone())
    };
    assert!(
        acked.len() > 500 && acked.len() < planned.len(),
        "the kill came mid-load: {} of {} acknowledged",
        acked.len(),
        planned.len()
    );

    let started = Instant::now();
    let output = loadgen.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the loadgen outlived its duration by {:?}",
        started.elapsed()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let loadgen_acked = report["acked"].as_i64().unwrap();
    assert!(loadgen_acked > 0, "{report}");

    // A checkpoint committed before the crash: the replay starts from it.
    let checkpoint = sluice_storage::wal::committed(&data).unwrap();
    assert!(
        checkpoint > 1,
        "a checkpoint before the crash: {checkpoint}"
    );

    let restarted = Instant::now();
    let sluice = Sluice::start(&data, &args);
    let ready_in = restarted.elapsed();
    let log = sluice.log_text();
    assert!(log.contains("write-ahead log replayed"), "{log}");

    // Every acknowledged reading is there, exactly once; nothing is there twice.
    let rows = stored(&sluice, "kill-");
    for key in &acked {
        assert_eq!(rows.get(key), Some(&1), "acknowledged {key:?}");
    }
    assert!(rows.values().all(|&n| n == 1), "a reading stored twice");
    let mut per_device: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (d, _) in &acked {
        per_device.entry(d).or_default().0 += 1;
    }
    for (d, _) in rows.keys() {
        per_device.entry(d).or_default().1 += 1;
    }
    for (device, (acked, stored)) in &per_device {
        assert!(
            stored >= acked,
            "{device}: {stored} stored, {acked} acknowledged"
        );
    }
    let total = sluice.scalar("SELECT count(*) FROM telemetry");
    let distinct =
        sluice.scalar("SELECT count(*) FROM (SELECT DISTINCT device_id, ts FROM telemetry)");
    assert_eq!(total, distinct, "exactly once");
    let by_loadgen =
        sluice.scalar("SELECT count(*) FROM telemetry WHERE device_id NOT LIKE 'kill-%'");
    assert!(
        by_loadgen >= loadgen_acked,
        "the loadgen had {loadgen_acked} acknowledged, {by_loadgen} are stored"
    );

    // The devices send again what was not acknowledged (what a device does after a
    // reconnect), then the rest: one row each. Those stored without their PUBACK
    // arriving are the duplicates.
    let resend: Vec<Key> = planned
        .iter()
        .filter(|k| !acked.contains(*k))
        .cloned()
        .collect();
    let already = resend.iter().filter(|k| rows.contains_key(*k)).count() as f64;
    let again = run_recording(
        sluice.mqtt,
        (0..2)
            .map(|c| {
                let mine = resend
                    .iter()
                    .filter(|(d, _)| d[5..].parse::<usize>().unwrap() % 2 == c)
                    .cloned()
                    .collect();
                (format!("kill-client-{c}"), mine)
            })
            .collect(),
        Duration::ZERO,
    );
    assert_eq!(again.lock().unwrap().acked.len(), resend.len());
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry WHERE device_id LIKE 'kill-%'",
        planned.len() as i64,
        Duration::from_secs(10),
    );
    let rows = stored(&sluice, "kill-");
    assert_eq!(rows.len(), planned.len());
    assert!(
        rows.values().all(|&n| n == 1),
        "a resent reading stored twice"
    );
    let metrics = sluice.get("/metrics").1;
    assert_eq!(
        metric_value(&metrics, "sluice_ingest_duplicates_total"),
        Some(already),
        "{} sent without a PUBACK, {already} of them stored before",
        sent.len() - acked.len()
    );

    // Windows closed after the restart equal SQL over the raw rows: a reading 15 minutes
    // after the last closes every window of each device.
    let closing = (0..devices)
        .map(|d| telemetry(&format!("kill-{d:02}"), "2024-01-15T10:40:00Z", 20.0, 80.0))
        .collect::<Vec<_>>();
    assert_eq!(publish(sluice.mqtt, closing, QoS::AtLeastOnce, 2), devices);
    let from_rows = "SELECT device_id, date_bin(INTERVAL '1 minute', ts, TIMESTAMP '2024-01-01T00:00:00Z') AS window_start, count(*) AS readings \
         FROM telemetry WHERE device_id LIKE 'kill-%' AND ts < TIMESTAMP '2024-01-15T10:39:00Z' GROUP BY 1, 2";
    let expected = sluice.scalar(&format!("SELECT count(*) FROM ({from_rows})"));
    assert_eq!(expected, (devices * 25) as i64);
    let windows =
        "SELECT device_id, window_start, readings FROM telemetry_1m WHERE device_id LIKE 'kill-%'";
    assert_eq!(
        sluice.wait_for(
            &format!("SELECT count(*) FROM ({windows})"),
            expected,
            Duration::from_secs(20)
        ),
        expected
    );
    for (a, b) in [(from_rows, windows), (windows, from_rows)] {
        assert_eq!(
            sluice.scalar(&format!("SELECT count(*) FROM (({a}) EXCEPT ({b}))")),
            0,
            "windows differ from the rows:\n{:?}",
            sluice.sql_csv(&format!("({a}) EXCEPT ({b})"))
        );
    }
    assert_eq!(
        sluice.scalar("SELECT count(*) FROM telemetry_late WHERE device_id LIKE 'kill-%'"),
        0
    );
    assert!(
        ready_in < Duration::from_secs(30),
        "ready {ready_in:?} after the restart"
    );
    assert!(sluice.terminate().success());
}

/// A minimal MQTT 3.1.1 client on a raw socket, for what libraries do not let a test
/// choose: the packet id and the DUP flag.
struct Raw(TcpStream);

impl Raw {
    fn connect(addr: SocketAddr, client_id: &str) -> Raw {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        s.write_all(&packet).unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0]);
        Raw(s)
    }

    /// A QoS 1 PUBLISH; returns the PUBACK's packet id.
    fn publish(&mut self, topic: &str, payload: &[u8], pkid: u16, dup: bool) -> u16 {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(payload);
        let mut packet = vec![if dup { 0x3a } else { 0x32 }];
        let mut len = body.len();
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            packet.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        packet.extend(body);
        self.0.write_all(&packet).unwrap();
        let mut ack = [0u8; 4];
        self.0.read_exact(&mut ack).unwrap();
        assert_eq!(ack[..2], [0x40, 2]);
        u16::from_be_bytes([ack[2], ack[3]])
    }
}

#[test]
fn a_redelivery_with_or_without_dup_is_one_row_and_the_first_reading_wins() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), &[]);
    let (topic, payload) = telemetry("redelivered", "2024-01-15T10:00:00Z", 21.5, 80.0);
    let mut raw = Raw::connect(sluice.mqtt, "redelivery-1");
    assert_eq!(raw.publish(&topic, &payload, 7, false), 7);
    // Its PUBACK was "lost": sent again with DUP, then as a new message (a device that
    // simply resends).
    assert_eq!(raw.publish(&topic, &payload, 7, true), 7);
    assert_eq!(raw.publish(&topic, &payload, 8, false), 8);
    // Reconnected (a new connection, the same client id) and resent.
    drop(raw);
    let mut raw = Raw::connect(sluice.mqtt, "redelivery-1");
    assert_eq!(raw.publish(&topic, &payload, 1, true), 1);
    // The same key with other values: the first stays.
    let (_, other) = telemetry("redelivered", "2024-01-15T10:00:00Z", 99.0, 80.0);
    assert_eq!(raw.publish(&topic, &other, 2, false), 2);
    // A peer client resends it too (mosquitto_pub, when installed; `.ci/run` requires it).
    let mut expected_duplicates = 4.0;
    if which("mosquitto_pub") {
        let status = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &sluice.mqtt.port().to_string()])
            .args(["-q", "1", "-t", &topic, "-m"])
            .arg(String::from_utf8(payload.clone()).unwrap())
            .status()
            .unwrap();
        assert!(status.success());
        expected_duplicates += 1.0;
    } else {
        assert!(
            std::env::var_os("CI_REQUIRE_MOSQUITTO").is_none(),
            "mosquitto_pub is required"
        );
    }
    let duplicates =
        |s: &Sluice| metric_value(&s.get("/metrics").1, "sluice_ingest_duplicates_total");
    let started = Instant::now();
    while duplicates(&sluice) != Some(expected_duplicates)
        && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(duplicates(&sluice), Some(expected_duplicates));
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry WHERE device_id = 'redelivered'",
        1,
        Duration::from_secs(10),
    );
    assert_eq!(
        sluice.sql_csv("SELECT temperature FROM telemetry WHERE device_id = 'redelivered'")[1..],
        ["21.5"]
    );
    // Across a restart (the original now in Parquet), still a duplicate.
    let data = sluice.data_dir.clone();
    assert!(sluice.terminate().success());
    let sluice = Sluice::start(&data, &[]);
    let mut raw = Raw::connect(sluice.mqtt, "redelivery-1");
    assert_eq!(raw.publish(&topic, &payload, 3, true), 3);
    let started = Instant::now();
    while duplicates(&sluice) != Some(1.0) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(duplicates(&sluice), Some(1.0));
    assert_eq!(
        sluice.scalar("SELECT count(*) FROM telemetry WHERE device_id = 'redelivered'"),
        1
    );
    assert!(sluice.terminate().success());
}

fn which(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// QoS 1 readings `from..from + n` of `device` on one connection; the keys acknowledged.
fn acknowledged(sluice: &Sluice, device: &str, from: usize, n: usize) -> BTreeSet<Key> {
    let messages = (from..from + n)
        .map(|k| (device.to_owned(), ts(k)))
        .collect();
    let record = run_recording(
        sluice.mqtt,
        vec![(format!("{device}-{from}"), messages)],
        Duration::ZERO,
    );
    let record = record.lock().unwrap();
    record.acked.clone()
}

/// The WAL's segments, oldest first.
fn segments(data: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    out.sort();
    out
}

/// Starts, sends `n` acknowledged readings, is killed: the WAL holds them all (the
/// flush interval is far away).
fn crashed_with(dir: &Path, n: usize) -> PathBuf {
    let data = dir.join("data");
    let sluice = Sluice::start(&data, &[]);
    assert_eq!(acknowledged(&sluice, "wal", 0, n).len(), n);
    sluice.kill();
    data
}

#[test]
fn a_torn_tail_is_cut_off_and_every_acknowledged_record_before_it_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let data = crashed_with(dir.path(), 50);
    // The crash cut a record being written: half a header at the end of the segment.
    let last = segments(&data).pop().unwrap();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    file.write_all(&[200, 0, 0]).unwrap();
    drop(file);
    let sluice = Sluice::start(&data, &[]);
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry",
        50,
        Duration::from_secs(10),
    );
    let log = sluice.log_text();
    assert!(log.contains("torn tail"), "{log}");
    assert_eq!(
        metric_value(&sluice.get("/metrics").1, "sluice_wal_damaged_total"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &sluice.get("/metrics").1,
            "sluice_wal_replayed_records_total"
        ),
        Some(50.0)
    );
    assert!(sluice.terminate().success());
}

#[test]
fn a_log_of_readings_as_they_came_replays_through_the_decoder() {
    // A WAL written before readings were journaled decoded: every record is a message as
    // it came (topic and JSON payload). sluice decodes them at replay, as then.
    use sluice_storage::wal::record::{Record, encode};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("wal")).unwrap();
    let received_at_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let mut messages: Vec<(String, Vec<u8>, bool)> = (0..3)
        .map(|k| {
            let (topic, payload) = telemetry("old", &ts(k), 20.0 + k as f64, 80.0);
            (topic, payload, false)
        })
        .collect();
    messages.push((messages[1].0.clone(), messages[1].1.clone(), false)); // a redelivery
    messages.push(("devices/old/telemetry".into(), b"{not json".to_vec(), false));
    messages.push((messages[0].0.clone(), messages[0].1.clone(), true)); // denied by the ACL
    let mut segment = Vec::new();
    for (topic, payload, denied) in &messages {
        encode(
            &Record {
                received_at_ns,
                topic: topic.as_bytes(),
                payload,
                denied: *denied,
                reading: false,
            },
            &mut segment,
        )
        .unwrap();
    }
    std::fs::write(data.join("wal/00000000000000000001.wal"), &segment).unwrap();

    let sluice = Sluice::start(&data, &[]);
    assert_eq!(sluice.scalar("SELECT count(*) FROM telemetry"), 3);
    assert_eq!(
        sluice.scalar(
            "SELECT CAST(sum(temperature) AS BIGINT) FROM telemetry WHERE device_id = 'old'"
        ),
        63
    );
    assert_eq!(
        sluice.scalar(
            "SELECT count(*) FROM rejects WHERE reason IN ('invalid_json', 'not_authorized')"
        ),
        2
    );
    let metrics = sluice.get("/metrics").1;
    assert_eq!(
        metric_value(&metrics, "sluice_wal_replayed_records_total"),
        Some(6.0)
    );
    assert_eq!(
        metric_value(&metrics, "sluice_ingest_duplicates_total"),
        Some(1.0)
    );
    assert!(sluice.terminate().success());
}

#[test]
fn readings_are_journaled_decoded_and_rejects_as_they_came() {
    // What the WAL holds after a crash: one record per message; an accepted reading in
    // its decoded form (flag 2, no topic, no JSON), a reject as it came.
    use sluice_storage::wal::record::{Found, Scan};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sluice = Sluice::start(&data, &[]);
    assert_eq!(acknowledged(&sluice, "dec", 0, 5).len(), 5);
    publish(
        sluice.mqtt,
        vec![("devices/dec/telemetry".into(), b"{not json".to_vec())],
        QoS::AtLeastOnce,
        1,
    );
    sluice.expect_scalar("SELECT count(*) FROM rejects", 1, Duration::from_secs(10));
    sluice.kill();
    let bytes: Vec<u8> = segments(&data)
        .iter()
        .flat_map(|s| std::fs::read(s).unwrap())
        .collect();
    let records: Vec<_> = Scan::new(&bytes)
        .map(|found| match found {
            Found::Record { record, .. } => record,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(records.len(), 6);
    let (readings, rejects): (Vec<_>, Vec<_>) = records.iter().partition(|r| r.reading);
    assert_eq!(readings.len(), 5);
    for r in &readings {
        assert!(r.topic.is_empty());
        assert!(!r.payload.windows(8).any(|w| w == b"deviceId"), "not JSON");
        assert!(r.payload.windows(3).any(|w| w == b"dec"), "the device id");
        assert!(r.payload.len() < 120, "{} bytes", r.payload.len());
    }
    assert_eq!(rejects[0].topic, b"devices/dec/telemetry");
    assert_eq!(rejects[0].payload, b"{not json");

    let sluice = Sluice::start(&data, &[]);
    assert_eq!(sluice.scalar("SELECT count(*) FROM telemetry"), 5);
    assert_eq!(sluice.scalar("SELECT count(*) FROM rejects"), 1);
    // Their lags were observed before the kill; the replay does not observe them again
    // (the outage's length is not the pipeline's lag).
    let metrics = sluice.get("/metrics").1;
    assert_eq!(
        metric_value(&metrics, "sluice_ingest_rows_total"),
        Some(5.0)
    );
    for lag in [
        "sluice_ingest_lag_seconds_count",
        "sluice_ingest_queryable_lag_seconds_count",
    ] {
        assert_eq!(metric_value(&metrics, lag), Some(0.0), "{lag}");
    }
    assert!(sluice.terminate().success());
}

#[test]
fn a_flipped_byte_mid_segment_sets_its_record_aside_and_replays_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let data = crashed_with(dir.path(), 50);
    let last = segments(&data).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    // 50 records of one size: a byte in the middle of record 25's body.
    let record = bytes.len() / 50;
    assert_eq!(bytes.len(), 50 * record);
    bytes[25 * record + record / 2] ^= 0xff;
    std::fs::write(&last, &bytes).unwrap();
    let sluice = Sluice::start(&data, &[]);
    // One record is damaged; the 49 around it are replayed.
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry",
        49,
        Duration::from_secs(10),
    );
    let aside: Vec<_> = std::fs::read_dir(data.join("wal/corrupt"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(std::fs::metadata(&aside[0]).unwrap().len() > 0);
    let metrics = sluice.get("/metrics").1;
    assert_eq!(
        metric_value(&metrics, "sluice_wal_damaged_total"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "sluice_wal_replayed_records_total"),
        Some(49.0)
    );
    assert!(sluice.log_text().contains("WAL segment damaged"));
    assert!(sluice.terminate().success());
}

#[test]
fn an_unreadable_segment_is_moved_aside_whole_and_the_others_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let data = crashed_with(dir.path(), 30);
    // A second crash later: its segment is the one that cannot be read.
    let sluice = Sluice::start(&data, &[]);
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry",
        30,
        Duration::from_secs(10),
    );
    assert_eq!(acknowledged(&sluice, "wal-b", 0, 20).len(), 20);
    sluice.kill();
    let newest = segments(&data).pop().unwrap();
    // What cannot be read: a directory where the segment was (as root, permissions
    // do not stop a read).
    std::fs::remove_file(&newest).unwrap();
    std::fs::create_dir(&newest).unwrap();
    let sluice = Sluice::start(&data, &[]);
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry WHERE device_id = 'wal'",
        30,
        Duration::from_secs(10),
    );
    assert!(
        data.join("wal/corrupt")
            .join(newest.file_name().unwrap())
            .exists(),
        "moved into corrupt/"
    );
    assert_eq!(
        metric_value(&sluice.get("/metrics").1, "sluice_wal_damaged_total"),
        Some(1.0)
    );
    assert!(sluice.log_text().contains("WAL segment unreadable"));
    assert!(sluice.terminate().success());
}

/// A tmpfs of `size` mounted at `at` for the test's lifetime (needs root or
/// CAP_SYS_ADMIN; `None` otherwise, unless `CI_REQUIRE_TMPFS` is set).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok && std::env::var_os("CI_REQUIRE_TMPFS").is_some() {
            panic!("cannot mount a tmpfs (CI_REQUIRE_TMPFS is set)");
        }
        ok.then(|| Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_withholds_pubacks_makes_sluice_unready_and_it_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "24m") else {
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    };
    let data = disk.0.join("data");
    let sluice = Sluice::start(&data, &[]);
    let mut acked = acknowledged(&sluice, "disk", 0, 20);
    assert_eq!(acked.len(), 20);
    // Fill the disk but for a little.
    let filler = disk.0.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 1 << 20];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    drop(file);
    // Publishes now fail: no PUBACK, the connection closed.
    let mut refused = false;
    for round in 0..200 {
        let got = acknowledged(&sluice, "disk", 100 + round * 10, 10);
        let all = got.len() == 10;
        acked.extend(got);
        if !all {
            refused = true;
            break;
        }
    }
    assert!(refused, "the disk never filled");
    let (status, body) = sluice.get("/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("write-ahead log"), "{body}");
    let metrics = sluice.get("/metrics").1;
    assert_eq!(metric_value(&metrics, "sluice_wal_healthy"), Some(0.0));
    assert!(metric_value(&metrics, "sluice_wal_failed_records_total").unwrap() > 0.0);
    assert!(sluice.log_text().contains("WAL append failed"));

    // Space comes back: sluice sees it by itself, becomes ready and acknowledges again.
    std::fs::remove_file(&filler).unwrap();
    let started = Instant::now();
    while sluice.get("/ready").0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never ready again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = acknowledged(&sluice, "disk", 5000, 10);
    assert_eq!(after.len(), 10);
    acked.extend(after);
    // Every acknowledged reading is stored once, also after a crash.
    let before = sluice.log_text();
    sluice.kill();
    let sluice = Sluice::start(&data, &[]);
    let rows = stored(&sluice, "disk");
    assert!(rows.values().all(|&n| n == 1));
    for key in &acked {
        assert!(
            rows.contains_key(key),
            "acknowledged {key:?} lost\n{before}\n-----\n{}",
            sluice.log_text()
        );
    }
    assert!(sluice.terminate().success());
}
