//! Test harness: the real `sluice` binary on port 0, real MQTT clients, real files.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// The `sluice` binary with no `SLUICE_*` settings inherited from the caller's
/// environment: tests configure it through flags only.
pub fn sluice_command() -> Command {
    let mut command = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SLUICE_") {
            command.env_remove(key);
        }
    }
    command
}

/// A `sluice serve` child process.
pub struct Sluice {
    child: Option<Child>,
    /// MQTT, 3.1.1 and 5.
    pub mqtt: SocketAddr,
    /// MQTT over TLS and over WebSocket, when configured.
    pub mqtts: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub http: String,
    /// The PostgreSQL wire-protocol endpoint.
    pub pg: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Sluice {
    /// Starts `sluice serve` on port 0 everywhere and waits for its ready line.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Sluice {
        let log = data_dir.with_extension("log");
        let mut child = sluice_command()
            .args(["serve", "--mqtt-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("sluice starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("sluice ready:") => break line,
                Some(Ok(_)) => continue,
                _ => panic!(
                    "sluice exited before it was ready:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        };
        // Keep reading stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let optional = |name: &str| {
            ready
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(str::to_owned)
        };
        let field = |name: &str| optional(name).unwrap_or_else(|| panic!("no {name} in {ready:?}"));
        Sluice {
            child: Some(child),
            mqtt: field("mqtt").parse().unwrap(),
            mqtts: optional("mqtts").map(|a| a.parse().unwrap()),
            ws: optional("ws").map(|a| a.parse().unwrap()),
            http: field("http"),
            pg: field("pg").parse().unwrap(),
            data_dir: data_dir.to_path_buf(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Runs a query through `/query` and decodes the Arrow answer.
    pub fn query(&self, sql: &str) -> Vec<RecordBatch> {
        let response = reqwest::blocking::Client::new()
            .post(format!("{}/query?format=arrow", self.http))
            .body(sql.to_owned())
            .send()
            .unwrap();
        let status = response.status();
        let body = response.bytes().unwrap();
        assert!(
            status.is_success(),
            "{sql}: {}",
            String::from_utf8_lossy(&body)
        );
        let reader =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap();
        reader.map(|b| b.unwrap()).collect()
    }

    /// One integer from a one-row, one-column query.
    pub fn scalar(&self, sql: &str) -> i64 {
        int_at(&self.query(sql), 0, 0)
    }

    /// Polls `sql` until it returns `want` or `within` passes; returns the last value,
    /// for the caller to compare with `want` (`#[must_use]`: a wait is not a check).
    #[must_use]
    pub fn wait_for(&self, sql: &str, want: i64, within: Duration) -> i64 {
        self.poll(sql, within, |got| got == want)
    }

    /// Polls `sql` until its value is `done` or `within` passes; returns the last value.
    fn poll(&self, sql: &str, within: Duration, done: impl Fn(i64) -> bool) -> i64 {
        let started = Instant::now();
        loop {
            let got = self.scalar(sql);
            if done(got) || started.elapsed() > within {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `sql` until it returns `want`; fails the test if it does not within `within`.
    pub fn expect_scalar(&self, sql: &str, want: i64, within: Duration) {
        let got = self.wait_for(sql, want, within);
        assert_eq!(got, want, "{sql} after {within:?}");
    }

    /// Polls `sql` until it returns at least `min` and returns that; fails the test if
    /// it does not within `within`.
    pub fn expect_at_least(&self, sql: &str, min: i64, within: Duration) -> i64 {
        let got = self.poll(sql, within, |got| got >= min);
        assert!(
            got >= min,
            "{sql}: {got} after {within:?}, wanted at least {min}"
        );
        got
    }

    /// Runs `sluice sql --server … --format csv SQL` (the real CLI) and returns its lines.
    pub fn sql_csv(&self, sql: &str) -> Vec<String> {
        let (ok, out, err) = cli(&["sql", "--server", &self.http, "--format", "csv", sql]);
        assert!(ok, "{sql}: {err}");
        out.lines().map(str::to_owned).collect()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::blocking::get(format!("{}{path}", self.http)).unwrap();
        (response.status().as_u16(), response.text().unwrap())
    }

    pub fn post(&self, path: &str) -> (u16, String) {
        let response = reqwest::blocking::Client::new()
            .post(format!("{}{path}", self.http))
            .send()
            .unwrap();
        (response.status().as_u16(), response.text().unwrap())
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "sluice did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with SIGKILL (a crash: nothing of sluice runs) and waits.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn int_at(batches: &[RecordBatch], column: usize, row: usize) -> i64 {
    use arrow::array::AsArray;
    let mut row = row;
    for b in batches {
        if row < b.num_rows() {
            return b
                .column(column)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(row);
        }
        row -= b.num_rows();
    }
    panic!("no row {row}")
}

/// Publishes `messages` (topic, payload) over `connections` MQTT 3.1.1 connections and
/// returns how many were acknowledged (QoS 1) or written (QoS 0).
pub fn publish(
    addr: SocketAddr,
    messages: Vec<(String, Vec<u8>)>,
    qos: QoS,
    connections: usize,
) -> usize {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut per_connection: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); connections];
    for (i, m) in messages.into_iter().enumerate() {
        per_connection[i % connections].push(m);
    }
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for (c, messages) in per_connection.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let mut options = MqttOptions::new(
                    format!("test-{}-{c}", std::process::id()),
                    addr.ip().to_string(),
                    addr.port(),
                );
                options.set_keep_alive(Duration::from_secs(30));
                options.set_max_packet_size(4 << 20, 4 << 20);
                let (client, mut eventloop) = AsyncClient::new(options, 200);
                let count = messages.len();
                tokio::spawn(async move {
                    for (topic, payload) in messages {
                        client.publish(topic, qos, false, payload).await.unwrap();
                    }
                });
                let mut done = 0;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while done < count {
                    match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::PubAck(_)))) if qos == QoS::AtLeastOnce => {
                            done += 1
                        }
                        Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))))
                            if qos == QoS::AtMostOnce =>
                        {
                            done += 1
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => panic!("MQTT connection error: {e}"),
                        Err(_) => break,
                    }
                }
                done
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    })
}

/// A telemetry message in the seed schema.
pub fn telemetry(device: &str, ts: &str, temperature: f64, battery: f64) -> (String, Vec<u8>) {
    let payload = serde_json::json!({
        "deviceId": device,
        "timestamp": ts,
        "type": "telemetry",
        "payload": {"temperature": temperature, "humidity": 40.0, "battery": battery, "signalStrength": -70},
        "metadata": {"firmwareVersion": "2.1.0", "location": {"lat": 1.5, "lng": -2.25}}
    });
    (
        format!("devices/{device}/telemetry"),
        serde_json::to_vec(&payload).unwrap(),
    )
}

/// Whether python3 can import `module`. Where it cannot, the caller skips its check,
/// except when the environment variable `ci_flag` is set (`.ci/run` sets it): then a
/// missing module fails the test.
pub fn python_has(module: &str, ci_flag: &str) -> bool {
    let have = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var_os(ci_flag).is_none(),
            "{ci_flag} is set but python3 cannot import {module}"
        );
        eprintln!("skipped: python3 cannot import {module} (see .ci/run for how to install it)");
    }
    have
}

/// Runs the `sluice` binary with `args`; returns (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = sluice_command().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `sluice sql --data-dir DIR --format csv SQL` and returns its output.
pub fn offline_csv(data_dir: &Path, sql: &str) -> String {
    let (ok, stdout, stderr) = cli(&[
        "sql",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--format",
        "csv",
        sql,
    ]);
    assert!(ok, "{sql}: {stderr}");
    stdout
}

/// In a Prometheus text exposition: the value of `series` (name and labels as printed),
/// or the sum of every series of a metric when `series` is a bare name; `None` when no
/// line has it.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    let values: Vec<f64> = exposition
        .lines()
        .filter(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
        .map(|l| {
            let value = l.rsplit(' ').next().unwrap_or_default();
            value
                .parse()
                .unwrap_or_else(|e| panic!("{l:?}: {value:?} is not a number: {e}"))
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
