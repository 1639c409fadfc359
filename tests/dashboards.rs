//! Every query of every dashboard in `dashboards/json/` runs against the real thing after
//! a short load: each PromQL expression on a real Prometheus server (Debian's
//! `prometheus`) scraping a running sluice, each SQL query, with Grafana's macros expanded
//! as Grafana expands them, through the PostgreSQL endpoint with a real client (psql).
//! Each must succeed and return data.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sluice, publish, telemetry};
use rumqttc::QoS;
use serde_json::Value;

/// (dashboard, panel or variable title, datasource type, query) for every query.
fn queries() -> Vec<(String, String, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/json");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "three dashboards: {files:?}");
    for file in files {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = dashboard["title"].as_str().unwrap().to_owned();
        for panel in dashboard["panels"].as_array().unwrap() {
            let kind = panel["datasource"]["type"].as_str().unwrap().to_owned();
            for target in panel["targets"].as_array().unwrap() {
                let query = target["expr"]
                    .as_str()
                    .or(target["rawSql"].as_str())
                    .unwrap_or_else(|| panic!("{name}: a target without a query"));
                let title = panel["title"].as_str().unwrap().to_owned();
                out.push((name.clone(), title, kind.clone(), query.to_owned()));
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            let kind = variable["datasource"]["type"].as_str().unwrap().to_owned();
            let query = variable["query"].as_str().unwrap().to_owned();
            let title = format!("${}", variable["name"].as_str().unwrap());
            out.push((name.clone(), title, kind, query));
        }
    }
    out
}

/// Grafana's PostgreSQL macros for a time range (seconds since the epoch), as Grafana
/// 10/11 expands them, and the dashboard variable `$device`.
fn expand(sql: &str, from: i64, to: i64, device: &str) -> String {
    let iso = |s: i64| {
        chrono::DateTime::from_timestamp(s, 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let mut out = sql.replace("$device", device);
    // $__name(args) with one level of parentheses inside the arguments at most.
    while let Some(start) = out.find("$__") {
        let open = start + out[start..].find('(').unwrap();
        let mut depth = 0;
        let mut close = open;
        for (i, c) in out[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let name = &out[start + 3..open];
        let args: Vec<String> = out[open + 1..close]
            .split(',')
            .map(|a| a.trim().to_owned())
            .collect();
        let interval = |a: &str| -> i64 {
            let a = a.trim_matches('\'');
            humantime::parse_duration(a).unwrap().as_secs() as i64
        };
        let expansion = match name {
            "timeFilter" => format!("{} BETWEEN '{}' AND '{}'", args[0], iso(from), iso(to)),
            "time" => format!("{} AS \"time\"", args[0]),
            "timeGroup" => format!(
                "floor(extract(epoch from {})/{})*{}",
                args[0],
                interval(&args[1]),
                interval(&args[1])
            ),
            "timeGroupAlias" => format!(
                "floor(extract(epoch from {})/{})*{} AS \"time\"",
                args[0],
                interval(&args[1]),
                interval(&args[1])
            ),
            "unixEpochFilter" => format!("{} >= {from} AND {} <= {to}", args[0], args[0]),
            other => panic!("macro $__{other} is not expanded by this test"),
        };
        out.replace_range(start..=close, &expansion);
    }
    out
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (host:port) every second.
    fn start(target: &str) -> Option<Prometheus> {
        if Command::new("prometheus")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI_REQUIRE_PROMETHEUS").is_none(),
                "prometheus is required in CI (apt-get install prometheus)"
            );
            eprintln!("skipped the PromQL half: prometheus is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        prometheus.wait_for_series("up", "Prometheus did not scrape sluice");
        Some(prometheus)
    }

    /// Scrapes of sluice so far.
    fn scrapes(&self) -> u64 {
        self.query("count_over_time(up[1h])")
            .ok()
            .and_then(|r| r.first()?["value"][1].as_str()?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits until Prometheus scraped sluice `n` more times (what rates and quantiles
    /// over the last change need), instead of sleeping for as long as that may take.
    fn wait_scrapes(&self, n: u64) {
        let target = self.scrapes() + n;
        wait(
            &format!("Prometheus did not scrape sluice {n} more times"),
            || self.scrapes() >= target,
        );
    }

    /// Waits until `promql` has a series; fails the test with `failure` after 30 s.
    fn wait_for_series(&self, promql: &str, failure: &str) {
        wait(failure, || {
            self.query(promql).is_ok_and(|result| !result.is_empty())
        });
    }

    /// The result vector of an instant query, or the error.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let response = reqwest::blocking::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_str(&response.text().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

/// Polls `done` every 100 ms; fails the test with `failure` after 30 s.
fn wait(failure: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(30), "{failure}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn psql(sluice: &Sluice, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", &sluice.pg.ip().to_string()])
        .args(["-p", &sluice.pg.port().to_string()])
        .args(["-U", "grafana", "-d", "sluice", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql is installed (apt-get install postgresql-client)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn iso(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[test]
fn every_dashboard_query_runs_and_returns_data() {
    let dir = tempfile::tempdir().unwrap();
    // A rule that fires on this load, and a webhook nobody listens on (a dead letter).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[alert]]\nname = \"warm\"\nmetric = \"temperature\"\nabove = 25.0\n\
             [[webhook]]\nurl = \"{hook}\"\nmax_attempts = 1\n"
        ),
    )
    .unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let prometheus = Prometheus::start(sluice.http.trim_start_matches("http://"));

    // The load, in two waves a few scrapes apart so that rates and histogram quantiles
    // have something to work on: 20 devices over the last 4 minutes (their first
    // windows close), one device silent for 10 minutes, one malformed message.
    let now = chrono::Utc::now().timestamp();
    let wave = |offsets: &[i64]| {
        let mut messages = Vec::new();
        for d in 0..20 {
            for &back in offsets {
                let t = 20.0 + d as f64 * 0.5 + back as f64 / 60.0;
                messages.push(telemetry(
                    &format!("dev-{d:02}"),
                    &iso(now - back),
                    t,
                    80.0 - d as f64,
                ));
            }
        }
        messages
    };
    let mut first = wave(&[240, 180, 120]);
    first.push(telemetry("quiet-one", &iso(now - 600), 21.0, 50.0));
    first.push(("devices/broken/telemetry".into(), b"{not json".to_vec()));
    // Publishes, waits until `stored` readings are queryable.
    let load = |messages: Vec<(String, Vec<u8>)>, stored: i64| {
        let sent = messages.len();
        assert_eq!(publish(sluice.mqtt, messages, QoS::AtLeastOnce, 2), sent);
        let count = "SELECT count(*) FROM telemetry";
        assert_eq!(
            sluice.wait_for(count, stored, Duration::from_secs(10)),
            stored
        );
    };
    load(first, 61);
    assert_eq!(sluice.post("/flush").0, 200);
    // Scrapes between the waves, so that rates see two different values.
    if let Some(prometheus) = &prometheus {
        prometheus.wait_scrapes(2);
    }
    load(wave(&[60, 0]), 101);
    // Every alert of the wave is a dead letter (the webhook is unreachable); the
    // aggregator writes the alert and window rows on its own schedule (batch age 1 s).
    for table in ["alert_dead_letters", "alerts", "telemetry_1m"] {
        sluice.expect_at_least(
            &format!("SELECT count(*) FROM {table}"),
            1,
            Duration::from_secs(10),
        );
    }
    assert_eq!(sluice.post("/flush").0, 200);
    // The alert gauges are set on the aggregator's tick (every 5 s): once Prometheus
    // has them, two more scrapes for the rates over the last change.
    if let Some(prometheus) = &prometheus {
        prometheus.wait_for_series(
            "sluice_alerts{state=\"firing\"} > 0",
            "Prometheus never saw a firing alert",
        );
        prometheus.wait_scrapes(2);
    }

    let (from, to) = (now - 3600, now + 60);
    let mut failures = Vec::new();
    let queries = queries();
    for (dashboard, title, kind, query) in &queries {
        let outcome = match kind.as_str() {
            "prometheus" => match &prometheus {
                Some(p) => p.query(query).and_then(|result| {
                    let values: Vec<&Value> = result.iter().map(|r| &r["value"][1]).collect();
                    if values.is_empty() {
                        Err("no series".into())
                    } else if values.iter().all(|v| *v == "NaN") {
                        Err(format!("only NaN: {result:?}"))
                    } else {
                        Ok(())
                    }
                }),
                None => Ok(()),
            },
            "grafana-postgresql-datasource" => {
                let sql = expand(query, from, to, "dev-03");
                psql(&sluice, &sql).and_then(|out| {
                    if out.trim().is_empty() {
                        Err(format!("no rows: {sql}"))
                    } else {
                        Ok(())
                    }
                })
            }
            other => Err(format!("unknown data source type {other}")),
        };
        if let Err(e) = outcome {
            failures.push(format!("{dashboard} / {title}: {query}\n  → {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
}

#[test]
fn grafana_macros_expand_as_grafana_does() {
    assert_eq!(
        expand(
            "SELECT $__timeGroupAlias(ts, '1m'), count(*) FROM t WHERE $__timeFilter(ts) AND d = '$device'",
            1705312800,
            1705316400,
            "d1"
        ),
        "SELECT floor(extract(epoch from ts)/60)*60 AS \"time\", count(*) FROM t \
         WHERE ts BETWEEN '2024-01-15T10:00:00Z' AND '2024-01-15T11:00:00Z' AND d = 'd1'"
    );
    assert_eq!(
        expand("$__time(ts), $__unixEpochFilter(e)", 1, 2, ""),
        "ts AS \"time\", e >= 1 AND e <= 2"
    );
}

/// Grafana lays panels out by `gridPos` (24 columns) and tells them apart by `id`:
/// overlapping panels are pushed around on load, and two panels with one id confuse links
/// and edits.
#[test]
fn panels_have_unique_ids_and_do_not_overlap() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/json");
    for file in std::fs::read_dir(&dir).unwrap() {
        let path = file.unwrap().path();
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let panels: Vec<(i64, String, [i64; 4])> = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let grid = |k: &str| p["gridPos"][k].as_i64().unwrap();
                (
                    p["id"].as_i64().unwrap(),
                    p["title"].as_str().unwrap().to_owned(),
                    [grid("x"), grid("y"), grid("w"), grid("h")],
                )
            })
            .collect();
        for (i, (id, title, [x, y, w, h])) in panels.iter().enumerate() {
            assert!(
                *w > 0 && *h > 0 && x + w <= 24,
                "{name}: {title} is off the grid"
            );
            for (other_id, other, [ox, oy, ow, oh]) in &panels[i + 1..] {
                assert_ne!(id, other_id, "{name}: {title} and {other} share id {id}");
                let apart = x + w <= *ox || ox + ow <= *x || y + h <= *oy || oy + oh <= *y;
                assert!(apart, "{name}: {title} overlaps {other}");
            }
        }
    }
}
