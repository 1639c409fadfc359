//! End to end: the real `sluice` binary on port 0, real MQTT clients, SQL over HTTP and
//! through the CLI, SIGTERM, and the Parquet files read back.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampNanosecondType};
use common::{Sluice, cli, offline_csv, publish, telemetry};
use rumqttc::QoS;

const T0: i64 = 1_705_312_800; // 2024-01-15T10:00:00Z

/// Deterministic values that use every bit of the mantissa.
fn value(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    match seed % 97 {
        0 => -0.0,
        1 => 1e-300,
        2 => -123_456_789.000_000_1,
        _ => (z as f64 / u64::MAX as f64 - 0.5) * 200.0,
    }
}

fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

struct Sent {
    temperature: f64,
    battery: f64,
    co2: Option<f64>,
}

fn strings(batches: &[RecordBatch]) -> String {
    arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string()
}

#[test]
fn published_readings_come_back_through_sql_exactly_before_and_after_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), &[]);
    let (devices, per_device) = (500, 20);

    // 500 devices × 20 readings, 190 s apart from 10:00, so the hour 10 → 11 boundary
    // is crossed; every 5th reading also carries an extra metric.
    let mut messages = Vec::new();
    let mut sent: HashMap<(String, i64), Sent> = HashMap::new();
    for d in 0..devices {
        let device = format!("dev-{d:04}");
        for i in 0..per_device {
            let ts_ns = (T0 + i * 190) * 1_000_000_000 + d * 1_000_003;
            let seed = (d * 1000 + i) as u64;
            let reading = Sent {
                temperature: value(seed),
                battery: (d + i) as f64,
                co2: (i % 5 == 0).then(|| value(seed + 7_777_777)),
            };
            let mut payload = serde_json::json!({
                "deviceId": device,
                "timestamp": rfc3339(ts_ns),
                "type": "telemetry",
                "payload": {"temperature": reading.temperature, "battery": reading.battery},
            });
            if let Some(co2) = reading.co2 {
                payload["payload"]["co2"] = co2.into();
            }
            messages.push((
                format!("devices/{device}/telemetry"),
                serde_json::to_vec(&payload).unwrap(),
            ));
            sent.insert((device.clone(), ts_ns), reading);
        }
    }
    let total = devices * per_device;
    assert_eq!(
        publish(sluice.mqtt, messages, QoS::AtLeastOnce, 8),
        total as usize
    );

    let count = "SELECT count(*) FROM telemetry";
    assert_eq!(
        sluice.wait_for(count, total, Duration::from_secs(30)),
        total
    );

    // Exact per-device counts.
    let per_device_counts = sluice.query(
        "SELECT device_id, count(*) AS n FROM telemetry GROUP BY device_id ORDER BY device_id",
    );
    let rows: usize = per_device_counts.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, devices as usize);
    for b in &per_device_counts {
        let n = b.column(1).as_primitive::<Int64Type>();
        assert!(n.values().iter().all(|&n| n == per_device), "{:?}", n);
    }

    // Values round-trip bit for bit, extra metrics included.
    let check_values = |batches: &[RecordBatch]| {
        let mut seen = 0;
        for b in batches {
            let device = b.column(0).as_string::<i32>();
            let ts = b.column(1).as_primitive::<TimestampNanosecondType>();
            let temperature = b.column(2).as_primitive::<Float64Type>();
            let battery = b.column(3).as_primitive::<Float64Type>();
            let co2 = b.column(4).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                let key = (device.value(i).to_owned(), ts.value(i));
                let expected = sent
                    .get(&key)
                    .unwrap_or_else(|| panic!("unexpected row {key:?}"));
                assert_eq!(
                    temperature.value(i).to_bits(),
                    expected.temperature.to_bits(),
                    "{key:?}"
                );
                assert_eq!(battery.value(i).to_bits(), expected.battery.to_bits());
                match expected.co2 {
                    Some(v) => assert_eq!(co2.value(i).to_bits(), v.to_bits(), "{key:?}"),
                    None => assert!(co2.is_null(i), "{key:?}"),
                }
                seen += 1;
            }
        }
        assert_eq!(seen, total);
    };
    let values = "SELECT device_id, ts, temperature, battery, extra['co2'] AS co2 FROM telemetry";
    check_values(&sluice.query(values));

    // The same answer from memory, then from Parquet.
    let summary = "SELECT device_id, count(*), min(temperature), max(temperature), sum(battery), \
                   min(ts), max(ts), count(extra['co2']) FROM telemetry GROUP BY device_id ORDER BY device_id";
    let before = strings(&sluice.query(summary));
    let (status, body) = sluice.post("/flush");
    assert_eq!(status, 200, "{body}");
    let flushed: serde_json::Value = serde_json::from_str(&body).unwrap();
    // Every telemetry row, and the window rows closed so far.
    assert!(flushed["rows"].as_u64().unwrap() >= total as u64, "{body}");
    let partitions = dir.path().join("data/telemetry/date=2024-01-15");
    assert!(partitions.join("hour=10").is_dir() && partitions.join("hour=11").is_dir());
    assert_eq!(strings(&sluice.query(summary)), before);
    check_values(&sluice.query(values));

    // One more reading: part hot, part cold, one table.
    let (topic, payload) = telemetry("dev-0000", "2024-01-15T12:00:00Z", 1.0, 1.0);
    assert_eq!(
        publish(sluice.mqtt, vec![(topic, payload)], QoS::AtLeastOnce, 1),
        1
    );
    assert_eq!(
        sluice.wait_for(count, total + 1, Duration::from_secs(10)),
        total + 1
    );

    let metrics = sluice.get("/metrics").1;
    assert!(
        metrics.contains("sluice_broker_skipped_messages_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("sluice_ingest_rows_total {}", total + 1)));

    let data_dir = sluice.data_dir.clone();
    assert!(sluice.terminate().success());
    assert_eq!(
        offline_csv(&data_dir, "SELECT count(*) AS n FROM telemetry"),
        format!(
            "n
{}
",
            total + 1
        )
    );
}

#[test]
fn sigterm_flushes_everything_acknowledged_to_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), &[]);
    let messages: Vec<_> = (0..3000)
        .map(|i| {
            let ts = rfc3339((T0 + i / 300) * 1_000_000_000 + i * 1000);
            telemetry(&format!("d{}", i % 300), &ts, i as f64 / 8.0, 50.0)
        })
        .collect();
    // QoS 1: acknowledged means the broker has it; SIGTERM right after must lose nothing.
    assert_eq!(publish(sluice.mqtt, messages, QoS::AtLeastOnce, 4), 3000);
    let data_dir = sluice.data_dir.clone();
    let status = sluice.terminate();
    assert!(status.success(), "exit status {status}");

    let expected_sum: i64 = (0..3000).sum();
    assert_eq!(
        offline_csv(
            &data_dir,
            "SELECT count(*) AS n, count(DISTINCT device_id) AS devices, sum(temperature) * 8 AS s FROM telemetry"
        ),
        format!("n,devices,s\n3000,300,{expected_sum}.0\n")
    );

    // The WAL is empty: only the record of the last checkpoint is left.
    let wal: Vec<String> = std::fs::read_dir(data_dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(wal, ["checkpoint"]);
    // No temporary file is left behind, and every file is readable. (`state/` holds the
    // open windows, saved at the stop.)
    let mut pending = vec![data_dir.clone()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p == data_dir.join("state") || p == data_dir.join("wal") {
                continue;
            }
            if p.is_dir() {
                pending.push(p);
            } else {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    name.starts_with("part-") && name.ends_with(".parquet"),
                    "{name}"
                );
            }
        }
    }
    read_with_pyarrow(&data_dir, 3000);
}

/// The files are ordinary Parquet: pyarrow (the C++ implementation) reads the Hive
/// layout, UTC timestamps, zstd pages and the sort order. Skipped where pyarrow is not
/// installed, except when `CI_REQUIRE_PYARROW` is set (as `.ci/run` does).
fn read_with_pyarrow(data_dir: &std::path::Path, rows: usize) {
    let script = r#"
import sys, pyarrow.dataset as ds, pyarrow.parquet as pq, pyarrow as pa
root = sys.argv[1] + "/telemetry"
d = ds.dataset(root, format="parquet", partitioning="hive")
t = d.to_table()
assert t.schema.field("ts").type == pa.timestamp("ns", tz="UTC"), t.schema.field("ts").type
assert "date" in t.column_names and "hour" in t.column_names
for f in d.files:
    meta = pq.ParquetFile(f).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD", meta.row_group(0).column(0).compression
    part = pq.read_table(f)
    keys = list(zip(part.column("device_id").to_pylist(), part.column("ts").cast(pa.int64()).to_pylist()))
    assert keys == sorted(keys), "rows are not sorted by device then time"
print(t.num_rows)
"#;
    if !common::python_has("pyarrow", "CI_REQUIRE_PYARROW") {
        return;
    }
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyarrow: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        rows.to_string()
    );
}

#[test]
fn bad_messages_land_in_rejects_with_their_reason_and_nothing_else_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), &[]);

    // The shared examples, each bad one followed by a valid one.
    let mut messages = Vec::new();
    let mut expected_reasons: Vec<(Vec<u8>, Vec<String>)> = Vec::new();
    let mut valid = 0;
    let bad = include_str!("fixtures/bad.jsonl");
    for (i, line) in bad.lines().enumerate() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let topic = case["topic"].as_str().unwrap().to_owned();
        let body: Vec<u8> = if let Some(raw) = case["raw"].as_str() {
            raw.as_bytes().to_vec()
        } else if let Some(hex) = case["raw_hex"].as_str() {
            (0..hex.len())
                .step_by(2)
                .map(|j| u8::from_str_radix(&hex[j..j + 2], 16).unwrap())
                .collect()
        } else if let Some(n) = case["oversize_bytes"].as_u64() {
            vec![b'x'; n as usize]
        } else {
            serde_json::to_vec(&case["payload"]).unwrap()
        };
        let mut reasons = vec![case["reason"].as_str().unwrap().to_owned()];
        let note = case["note"].as_str().unwrap_or_default();
        if note.contains("invalid_json") {
            reasons.push("invalid_json".into());
        }
        if note.contains("non_finite") {
            reasons.push("non_finite".into());
        }
        expected_reasons.push((body.clone(), reasons));
        messages.push((topic, body));
        messages.push(telemetry(
            &format!("ok-{i}"),
            "2024-01-15T10:30:00Z",
            i as f64,
            1.0,
        ));
        valid += 1;
    }
    // A topic outside the contract is kept too, not dropped.
    let stray = br#"{"hello":"world"}"#.to_vec();
    messages.push(("devices/d1/status".into(), stray.clone()));
    expected_reasons.push((stray, vec!["invalid_topic".into()]));

    let good = include_str!("fixtures/good.jsonl");
    for line in good.lines() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        messages.push((
            case["topic"].as_str().unwrap().to_owned(),
            serde_json::to_vec(&case["payload"]).unwrap(),
        ));
        valid += 1;
    }
    let total = messages.len();
    assert_eq!(publish(sluice.mqtt, messages, QoS::AtLeastOnce, 1), total);

    let rejects = expected_reasons.len() as i64;
    assert_eq!(
        sluice.wait_for(
            "SELECT count(*) FROM rejects",
            rejects,
            Duration::from_secs(20)
        ),
        rejects
    );
    assert_eq!(
        sluice.wait_for(
            "SELECT count(*) FROM telemetry",
            valid,
            Duration::from_secs(20)
        ),
        valid
    );

    let batches = sluice.query("SELECT payload, payload_bytes, reason, detail, topic FROM rejects");
    let mut stored: Vec<(Vec<u8>, u64, String)> = Vec::new();
    for b in &batches {
        for i in 0..b.num_rows() {
            assert!(
                !b.column(3).as_string::<i32>().value(i).is_empty(),
                "a detail is given"
            );
            stored.push((
                b.column(0).as_binary::<i32>().value(i).to_vec(),
                b.column(1)
                    .as_primitive::<arrow::datatypes::UInt64Type>()
                    .value(i),
                b.column(2).as_string::<i32>().value(i).to_owned(),
            ));
        }
    }
    for (body, reasons) in &expected_reasons {
        let kept = &body[..body.len().min(1024)];
        let row = stored
            .iter()
            .find(|(payload, size, _)| payload == kept && *size == body.len() as u64)
            .unwrap_or_else(|| panic!("no reject for {:?}", String::from_utf8_lossy(kept)));
        assert!(
            reasons.contains(&row.2),
            "{:?}: got {}, want {reasons:?}",
            String::from_utf8_lossy(kept),
            row.2
        );
    }

    // The good examples are stored as their notes say.
    let good_rows = sluice.query(
        "SELECT device_id, CAST(ts AS BIGINT), temperature, humidity, firmware_version, lat, \
         extra['co2'], extra['pressure'] FROM telemetry \
         WHERE device_id IN ('device-000001', 'sensor-a', 'sensor-b', 'sensor-c') ORDER BY device_id",
    );
    let b = arrow::compute::concat_batches(&good_rows[0].schema(), &good_rows).unwrap();
    let ts = b.column(1).as_primitive::<Int64Type>();
    let temperature = b.column(2).as_primitive::<Float64Type>();
    assert_eq!(
        ts.value(0),
        1_705_314_600_123_000_000,
        "offset converted to UTC"
    );
    assert!(
        b.column(4).is_null(1) && b.column(5).is_null(1),
        "sensor-a has no metadata"
    );
    assert!(b.column(3).is_null(2), "sensor-b has no humidity");
    assert_eq!(b.column(6).as_primitive::<Float64Type>().value(2), 612.0);
    assert_eq!(b.column(7).as_primitive::<Float64Type>().value(2), 1013.25);
    assert_eq!(ts.value(3), 1_705_314_600_000_000_001, "nanoseconds kept");
    assert_eq!(temperature.value(3).to_bits(), 1e-7f64.to_bits());

    // Still serving after all that.
    assert_eq!(sluice.get("/ready").0, 200);
    let (topic, payload) = telemetry("after", "2024-01-15T11:00:00Z", 2.0, 2.0);
    assert_eq!(
        publish(sluice.mqtt, vec![(topic, payload)], QoS::AtMostOnce, 1),
        1
    );
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry WHERE device_id = 'after'",
        1,
        Duration::from_secs(10),
    );
    let metrics = sluice.get("/metrics").1;
    assert!(
        metrics.contains("sluice_ingest_rejects_total{reason=\"too_large\"} 1"),
        "{metrics}"
    );
}

#[test]
fn the_sql_command_reports_errors_clearly_and_formats_results() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), &[]);
    let (topic, payload) = telemetry("d1", "2024-01-15T10:30:00Z", 21.5, 80.0);
    assert_eq!(
        publish(sluice.mqtt, vec![(topic, payload)], QoS::AtLeastOnce, 1),
        1
    );
    sluice.expect_scalar("SELECT count(*) FROM telemetry", 1, Duration::from_secs(10));
    let server = sluice.http.clone();

    let (ok, stdout, _) = cli(&[
        "sql",
        "--server",
        &server,
        "--format",
        "json",
        "SELECT device_id, temperature FROM telemetry",
    ]);
    assert!(ok);
    assert_eq!(stdout.trim(), r#"[{"device_id":"d1","temperature":21.5}]"#);
    let (ok, stdout, _) = cli(&[
        "sql",
        "--server",
        &server,
        "SELECT device_id FROM telemetry",
    ]);
    assert!(ok && stdout.contains("| d1        |"), "{stdout}");

    for (args, message) in [
        (vec!["sql", "--server", &server, "SELEC 1"], "SQL error"),
        (
            vec!["sql", "--server", &server, "SELECT nope FROM telemetry"],
            "nope",
        ),
        (
            vec!["sql", "--server", &server, "DROP TABLE telemetry"],
            "read-only: DROP TABLE telemetry is not allowed",
        ),
        (
            vec!["sql", "--server", "http://127.0.0.1:1", "SELECT 1"],
            "cannot reach",
        ),
        (vec!["sql", "SELECT 1"], "--server"),
        (
            vec!["sql", "--data-dir", "/no/such/dir", "SELECT 1"],
            "/no/such/dir",
        ),
    ] {
        let (ok, _, stderr) = cli(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }

    // The prompt reads statements ending with ';' from standard input.
    let mut child = common::sluice_command()
        .args(["sql", "--server", &server, "--format", "csv"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT count(*) AS n\n  FROM telemetry;\nSELEC;\nSELECT 2 AS two;\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(stdout, "n\n1\ntwo\n2\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: SQL error"));
}

#[test]
fn bad_configuration_fails_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, "[storage]\nflush_intervall = \"5s\"\n").unwrap();
    let (ok, _, stderr) = cli(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("flush_intervall"), "{stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("data");
    let (ok, _, stderr) = cli(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--mqtt-addr",
        &addr,
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    assert!(stderr.contains(&addr), "{stderr}");
}

#[test]
fn a_short_fleet_run_loses_nothing_and_every_malformed_message_is_a_reject() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), &[]);
    let broker = sluice.mqtt.to_string();
    let (ok, stdout, stderr) = cli(&[
        "loadgen",
        "--broker",
        &broker,
        "--devices",
        "10000",
        "--rate",
        "3000",
        "--duration",
        "3",
        "--connections",
        "8",
        "--bad-rate",
        "0.05",
        "--seed",
        "7",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let acked = report["acked"].as_i64().unwrap();
    let bad = report["bad"].as_i64().unwrap();
    assert_eq!(acked, 9000, "{report}");
    assert!(bad > 300 && bad < 600, "about 5 % malformed: {bad}");

    let within = Duration::from_secs(20);
    assert_eq!(
        sluice.wait_for("SELECT count(*) FROM rejects", bad, within),
        bad
    );
    assert_eq!(
        sluice.wait_for("SELECT count(*) FROM telemetry", acked - bad, within),
        acked - bad
    );
    let by_reason =
        sluice.query("SELECT reason, count(*) FROM rejects GROUP BY reason ORDER BY reason");
    let mut reasons = Vec::new();
    for b in &by_reason {
        for i in 0..b.num_rows() {
            reasons.push((
                b.column(0).as_string::<i32>().value(i).to_owned(),
                b.column(1).as_primitive::<Int64Type>().value(i),
            ));
        }
    }
    let mut kinds: Vec<&str> = sluice_loadgen::BAD_KINDS
        .iter()
        .map(|r| r.as_str())
        .collect();
    kinds.sort();
    assert_eq!(
        reasons.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
        kinds
    );
    let per_kind = bad / kinds.len() as i64;
    assert!(
        reasons
            .iter()
            .all(|(_, n)| (per_kind..=per_kind + 1).contains(n)),
        "{reasons:?}"
    );
    // 10,000 devices every 3.3 s for 3 s: each of the 9,000 messages is another device's.
    assert_eq!(
        sluice.scalar("SELECT count(DISTINCT device_id) FROM telemetry"),
        acked - bad
    );
}

/// [`common::metric_value`], which must be there.
fn metric(metrics: &str, series: &str) -> f64 {
    common::metric_value(metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

/// An MQTT client on `addr` (3.1.1, or 5 with `v5`) that stays connected until stopped.
struct Device {
    /// Publishes a payload that is not JSON on `devices/meters/telemetry` at QoS 0 or 1.
    publish: Box<dyn Fn(u8)>,
    stop: Box<dyn FnOnce()>,
    acks: std::sync::mpsc::Receiver<()>,
}

impl Device {
    fn connect(addr: SocketAddr, id: &str, v5: bool) -> Device {
        let (connected_tx, connected) = std::sync::mpsc::channel();
        let (acks_tx, acks) = std::sync::mpsc::channel();
        let (host, port) = (addr.ip().to_string(), addr.port());
        // rumqttc's 3.1.1 and 5 clients have the same API in different modules.
        // rumqttc's 3.1.1 and 5 clients have the same API in different modules: this is
        // expanded where one of them is imported.
        macro_rules! device {
            () => {{
                let mut options = MqttOptions::new(id, host, port);
                options.set_keep_alive(Duration::from_secs(30));
                let (client, mut connection) = Client::new(options, 10);
                std::thread::spawn(move || {
                    for event in connection.iter() {
                        match event {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => drop(connected_tx.send(())),
                            Ok(Event::Incoming(Packet::PubAck(_))) => drop(acks_tx.send(())),
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                });
                let publisher = client.clone();
                Device {
                    publish: Box::new(move |qos| {
                        let qos = [QoS::AtMostOnce, QoS::AtLeastOnce][qos as usize];
                        let topic = "devices/meters/telemetry";
                        publisher.publish(topic, qos, false, "not json").unwrap();
                    }),
                    stop: Box::new(move || client.disconnect().unwrap()),
                    acks,
                }
            }};
        }
        let device = if v5 {
            use rumqttc::v5::mqttbytes::{QoS, v5::Packet};
            use rumqttc::v5::{Client, Event, MqttOptions};
            device!()
        } else {
            use rumqttc::{Client, Event, MqttOptions, Packet};
            device!()
        };
        connected.recv_timeout(Duration::from_secs(10)).unwrap();
        device
    }
}

/// Waits until `ready(/metrics)` holds (for up to 10 s) and returns that text.
fn metrics_when(sluice: &Sluice, ready: impl Fn(&str) -> bool) -> String {
    let started = std::time::Instant::now();
    loop {
        let metrics = sluice.get("/metrics").1;
        if ready(&metrics) || started.elapsed() > Duration::from_secs(10) {
            return metrics;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mqtt_meters_count_connections_messages_by_qos_and_bytes_per_listener() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), &[]);
    let connected = |listener| format!("sluice_mqtt_connections{{listener=\"{listener}\"}}");
    let attempts = |outcome, reason| {
        format!(
            "sluice_mqtt_connection_attempts_total{{listener=\"mqtt\",outcome=\"{outcome}\",reason=\"{reason}\"}}"
        )
    };
    let received =
        |qos| format!("sluice_mqtt_messages_received_total{{listener=\"mqtt\",qos=\"{qos}\"}}");
    let bytes = |listener| format!("sluice_mqtt_received_bytes_total{{listener=\"{listener}\"}}");

    // sluice's own alert notifications are published in-process: no connection.
    let before = sluice.get("/metrics").1;
    assert_eq!(
        metric(&before, &connected("mqtt")),
        0.0,
        "no client of its own"
    );
    assert_eq!(metric(&before, &attempts("accepted", "ok")), 0.0);
    assert_eq!(metric(&before, "sluice_mqtt_messages_received_total"), 0.0);

    // Both protocol versions on the one port.
    let id = |name: &str| format!("meters-{name}-{}", std::process::id());
    let clients = [
        Device::connect(sluice.mqtt, &id("a"), false),
        Device::connect(sluice.mqtt, &id("b"), false),
        Device::connect(sluice.mqtt, &id("c"), false),
        Device::connect(sluice.mqtt, &id("d"), true),
    ];
    let metrics = sluice.get("/metrics").1;
    assert_eq!(metric(&metrics, &connected("mqtt")), 4.0);
    assert_eq!(metric(&metrics, &attempts("accepted", "ok")), 4.0);

    // QoS 0 ×2 and QoS 1 ×3 on 3.1.1, QoS 1 ×1 on 5; the payloads are rejects.
    for (client, qos, count) in [(0, 0, 2), (1, 1, 3), (3, 1, 1)] {
        for _ in 0..count {
            (clients[client].publish)(qos);
        }
        if qos == 1 {
            for _ in 0..count {
                clients[client]
                    .acks
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap();
            }
        }
    }
    // A client that is refused: a CONNECT with an empty client id and a kept session
    // gets return code 2.
    let mut refused = std::net::TcpStream::connect(sluice.mqtt).unwrap();
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("");
    connect.clean_session = false;
    let mut packet = bytes::BytesMut::new();
    connect.write(&mut packet).unwrap();
    std::io::Write::write_all(&mut refused, &packet).unwrap();
    let mut connack = [0u8; 4];
    std::io::Read::read_exact(&mut refused, &mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x02]);

    let metrics = metrics_when(&sluice, |m| {
        metric(m, &attempts("refused", "client_id")) == 1.0
            && metric(m, "sluice_ingest_rejects_total") == 6.0
            && metric(m, "sluice_storage_hot_rows{table=\"rejects\"}") == 6.0
    });
    assert_eq!(metric(&metrics, &received(0)), 2.0);
    assert_eq!(metric(&metrics, &received(1)), 4.0);
    assert_eq!(metric(&metrics, &received(2)), 0.0);
    assert_eq!(metric(&metrics, &attempts("refused", "client_id")), 1.0);
    assert_eq!(
        metric(
            &metrics,
            "sluice_mqtt_messages_received_total{listener=\"ws\",qos=\"1\"}"
        ),
        0.0
    );
    // Wire bytes: every packet read (CONNECTs, PUBLISHes, PINGs…), so at least the
    // publishes' topics and payloads.
    let wire = metric(&metrics, &bytes("mqtt")) - metric(&before, &bytes("mqtt"));
    let publish_bytes = 6.0 * ("devices/meters/telemetry".len() + "not json".len()) as f64;
    assert!(wire > publish_bytes, "{wire} bytes read");
    assert!(metric(&metrics, "sluice_mqtt_sent_bytes_total{listener=\"mqtt\"}") > 0.0);
    // The accounting identity, from the wire to the tables: every PUBLISH read was
    // handed to the pipeline or refused, and everything handed on is a row, a reject or
    // one of sluice's own notifications.
    assert_eq!(
        metric(&metrics, "sluice_mqtt_messages_received_total"),
        metric(
            &metrics,
            "sluice_mqtt_pipeline_messages_total{source=\"publish\"}"
        ) + metric(&metrics, "sluice_mqtt_refused_messages_total")
    );
    assert_eq!(
        metric(&metrics, "sluice_mqtt_pipeline_messages_total"),
        metric(&metrics, "sluice_ingest_rows_total")
            + metric(&metrics, "sluice_ingest_rejects_total")
    );
    assert_eq!(metric(&metrics, "sluice_mqtt_pipeline_messages_total"), 6.0);
    assert_eq!(
        metric(&metrics, "sluice_broker_skipped_messages_total"),
        0.0
    );
    // The six rejects are in memory (sealed into a batch), and the hot store's capacity
    // is shown.
    assert_eq!(
        metric(&metrics, "sluice_storage_hot_rows{table=\"rejects\"}"),
        6.0
    );
    assert!(metric(&metrics, "sluice_storage_hot_bytes{table=\"rejects\"}") > 0.0);
    assert_eq!(
        metric(&metrics, "sluice_storage_hot_capacity_rows"),
        4_000_000.0
    );

    for client in clients {
        (client.stop)();
    }
    drop(refused);
    let metrics = metrics_when(&sluice, |m| metric(m, &connected("mqtt")) == 0.0);
    assert_eq!(metric(&metrics, &connected("mqtt")), 0.0);
    assert_eq!(
        metric(&metrics, "sluice_mqtt_disconnects_total{reason=\"client\"}"),
        4.0
    );
    assert_eq!(
        metric(&metrics, "sluice_ingest_queue_capacity_messages"),
        131_072.0
    );
}

/// With `http.token`, `/query`, `/flush` and `/reload` answer 401 without
/// `Authorization: Bearer TOKEN` (and with a wrong one); `/ready` and `/metrics` stay
/// open; `sluice sql --server` sends the token from `--token` or `SLUICE_TOKEN`.
#[test]
fn an_http_token_guards_queries_flushes_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!("[http]\ntoken_file = {:?}\n", token_file.to_str().unwrap()),
    )
    .unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let client = reqwest::blocking::Client::new();
    let send = |method: reqwest::Method, path: &str, auth: Option<&str>| {
        let mut request = client.request(method, format!("{}{path}", sluice.http));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.body("SELECT 1").send().unwrap();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        (response.status().as_u16(), challenge)
    };
    use reqwest::Method;
    for (method, path) in [
        (Method::POST, "/query"),
        (Method::GET, "/query?sql=SELECT%201"),
        (Method::POST, "/flush"),
        (Method::POST, "/reload"),
    ] {
        for auth in [None, Some("Bearer wrong"), Some("Basic czNjcmV0LXRva2Vu")] {
            let (status, challenge) = send(method.clone(), path, auth);
            assert_eq!(status, 401, "{method} {path} {auth:?}");
            assert_eq!(challenge.as_deref(), Some("Bearer realm=\"sluice\""));
        }
        for auth in ["Bearer s3cret-token", "bearer s3cret-token"] {
            assert_eq!(
                send(method.clone(), path, Some(auth)).0,
                200,
                "{method} {path}"
            );
        }
    }
    assert_eq!(send(Method::GET, "/ready", None).0, 200);
    assert_eq!(send(Method::GET, "/metrics", None).0, 200);

    let (ok, _, stderr) = cli(&["sql", "--server", &sluice.http, "SELECT 41 + 1 AS n"]);
    assert!(!ok);
    assert!(stderr.contains("Authorization: Bearer"), "{stderr}");
    let (ok, stdout, stderr) = cli(&[
        "sql",
        "--server",
        &sluice.http,
        "--token",
        "s3cret-token",
        "--format",
        "csv",
        "SELECT 41 + 1 AS n",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "n\n42");
    let out = common::sluice_command()
        .env("SLUICE_TOKEN", "s3cret-token")
        .args([
            "sql",
            "--server",
            &sluice.http,
            "--format",
            "csv",
            "SELECT 7 AS n",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "n\n7");
}
