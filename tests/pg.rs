//! The PostgreSQL endpoint with real clients: psql (Debian's postgresql-client), psycopg
//! (PyPI) and pgjdbc (Debian's libpostgresql-jdbc-java, run from a JDK), Grafana's macro
//! expansions, password authentication, and the read-only rules on both SQL endpoints.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Sluice, publish, telemetry};
use rumqttc::QoS;

/// Readings at 10:00:10, 10:00:40 and 10:01:10 for d1, one at 10:00:20 for d2.
fn start_with_readings(extra_args: &[&str]) -> (tempfile::TempDir, Sluice) {
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&dir.path().join("data"), extra_args);
    let messages = vec![
        telemetry("d1", "2024-01-15T10:00:10Z", 20.5, 90.0),
        telemetry("d1", "2024-01-15T10:00:40Z", 21.5, 89.0),
        telemetry("d1", "2024-01-15T10:01:10Z", 22.5, 88.0),
        telemetry("d2", "2024-01-15T10:00:20Z", 30.0, 50.0),
    ];
    assert_eq!(publish(sluice.mqtt, messages, QoS::AtLeastOnce, 1), 4);
    sluice.expect_scalar("SELECT count(*) FROM telemetry", 4, Duration::from_secs(10));
    (dir, sluice)
}

/// Runs psql (unaligned, tuples only) with `args`; returns (success, stdout, stderr).
fn psql(sluice: &Sluice, password: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new("psql");
    command
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", &sluice.pg.ip().to_string()])
        .args(["-p", &sluice.pg.port().to_string()])
        .args(["-U", "grafana", "-d", "sluice"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD");
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let out = command
        .output()
        .expect("psql is installed (apt-get install postgresql-client)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn psql_ok(sluice: &Sluice, sql: &str) -> String {
    let (ok, out, err) = psql(sluice, None, &["-c", sql]);
    assert!(ok, "{sql}: {err}");
    out
}

/// Runs a client program (`program args… HOST PORT`) against the PostgreSQL endpoint; it
/// must succeed and print `ok`.
fn client_says_ok(sluice: &Sluice, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .arg(sluice.pg.ip().to_string())
        .arg(sluice.pg.port().to_string())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{program}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn psql_lists_and_describes_the_tables_and_runs_queries() {
    let (_dir, sluice) = start_with_readings(&[]);
    let tables = psql_ok(&sluice, "\\dt");
    for table in [
        "telemetry",
        "rejects",
        "telemetry_1m",
        "telemetry_1h",
        "telemetry_late",
        "alerts",
        "alert_dead_letters",
    ] {
        assert!(
            tables.contains(&format!("public|{table}|table|")),
            "{tables}"
        );
    }
    let columns = psql_ok(&sluice, "\\d telemetry");
    for column in [
        "device_id|text",
        "ts|timestamp with time zone",
        "temperature|double precision",
    ] {
        assert!(columns.contains(column), "{columns}");
    }
    assert_eq!(
        psql_ok(
            &sluice,
            "SELECT device_id, count(*), max(temperature), min(ts) FROM telemetry \
             GROUP BY device_id ORDER BY device_id"
        ),
        "d1|3|22.5|2024-01-15 10:00:10.000000+00\nd2|1|30.0|2024-01-15 10:00:20.000000+00\n"
    );
    // NULL comes back as NULL, not as a string.
    assert_eq!(
        psql_ok(
            &sluice,
            "SELECT coalesce(firmware_version, 'none'), extra IS NULL FROM telemetry LIMIT 1"
        ),
        "2.1.0|t\n"
    );
}

/// Grafana's PostgreSQL data source expands its macros before it sends a query; these are
/// its expansions for a 10:00–11:00 UTC dashboard range.
#[test]
fn grafana_macro_expansions_run() {
    let (_dir, sluice) = start_with_readings(&[]);
    let cases = [
        (
            // $__timeGroupAlias(ts,'1m'), $__timeFilter(ts)
            "SELECT floor(extract(epoch from ts)/60)*60 AS \"time\", count(*) AS readings \
             FROM telemetry WHERE ts BETWEEN '2024-01-15T10:00:00Z' AND '2024-01-15T11:00:00Z' \
             GROUP BY 1 ORDER BY 1",
            "1705312800.0|3\n1705312860.0|1\n",
        ),
        (
            // $__time(ts), $__timeFilter(ts), a $device variable
            "SELECT ts AS \"time\", temperature FROM telemetry \
             WHERE ts BETWEEN '2024-01-15T10:00:00Z' AND '2024-01-15T11:00:00Z' \
             AND device_id = 'd1' ORDER BY 1",
            "2024-01-15 10:00:10.000000+00|20.5\n2024-01-15 10:00:40.000000+00|21.5\n\
             2024-01-15 10:01:10.000000+00|22.5\n",
        ),
        (
            // $__unixEpochFilter(extract(epoch from ts))
            "SELECT count(*) FROM telemetry WHERE extract(epoch from ts) >= 1705312800 \
             AND extract(epoch from ts) <= 1705312830",
            "2\n",
        ),
        (
            // Devices silent for more than 5 minutes at 10:10.
            "SELECT device_id, max(ts) FROM telemetry GROUP BY device_id \
             HAVING max(ts) < TIMESTAMP '2024-01-15T10:10:00Z' - INTERVAL '5 minutes' ORDER BY 1",
            "d1|2024-01-15 10:01:10.000000+00\nd2|2024-01-15 10:00:20.000000+00\n",
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(psql_ok(&sluice, sql), expected, "{sql}");
    }
}

/// The metadata queries of Grafana's PostgreSQL data source (its `postgresMetaQuery.ts`,
/// Grafana 10–12): the version probe of the data source settings page and the query
/// builder's schema, table and column lists.
#[test]
fn grafana_query_editor_metadata_queries_run() {
    let (_dir, sluice) = start_with_readings(&[]);
    assert_eq!(
        psql_ok(
            &sluice,
            "SELECT current_setting('server_version_num')::int/100 as version"
        ),
        "1600\n"
    );
    assert_eq!(
        psql_ok(
            &sluice,
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ),
        ""
    );
    let schemas = psql_ok(
        &sluice,
        "SELECT schema_name AS \"name\" FROM information_schema.schemata \
         WHERE schema_name NOT IN ('information_schema', 'pg_catalog', 'pg_toast', \
         '_timescaledb_cache', '_timescaledb_catalog', '_timescaledb_internal', \
         '_timescaledb_config', 'timescaledb_information', 'timescaledb_experimental') \
         ORDER BY schema_name",
    );
    assert_eq!(schemas, "public\n");
    let tables = psql_ok(
        &sluice,
        "SELECT quote_ident(table_name) AS \"table\" FROM information_schema.tables \
         WHERE quote_ident(table_schema) = 'public' ORDER BY 1",
    );
    assert!(tables.lines().any(|t| t == "telemetry"), "{tables}");
    // Without a schema chosen, Grafana asks for the tables with a search_path idiom that
    // datafusion-postgres replaces by '' (its own blocklist): every table comes back
    // schema-qualified, which the builder then uses as it is.
    let search_path = "quote_ident(table_schema) IN (SELECT CASE WHEN trim(s[i]) = '\"$user\"' \
        THEN user ELSE trim(s[i]) END FROM generate_series(\
        array_lower(string_to_array(current_setting('search_path'),','),1), \
        array_upper(string_to_array(current_setting('search_path'),','),1)) as i, \
        string_to_array(current_setting('search_path'),',') s)";
    let tables = psql_ok(
        &sluice,
        &format!(
            "SELECT CASE WHEN {search_path} THEN quote_ident(table_name) \
             ELSE quote_ident(table_schema) || '.' || quote_ident(table_name) END AS \"table\" \
             FROM information_schema.tables WHERE quote_ident(table_schema) NOT IN \
             ('information_schema', 'pg_catalog', '_timescaledb_cache', '_timescaledb_catalog', \
             '_timescaledb_internal', '_timescaledb_config', 'timescaledb_information', \
             'timescaledb_experimental') ORDER BY CASE WHEN {search_path} THEN 0 ELSE 1 END, 1"
        ),
    );
    assert!(tables.lines().any(|t| t == "public.telemetry"), "{tables}");
    let columns = psql_ok(
        &sluice,
        &format!(
            "SELECT quote_ident(column_name) AS \"column\", data_type AS \"type\" \
             FROM information_schema.columns WHERE \
             CASE WHEN array_length(parse_ident('public.telemetry'),1) = 2 \
             THEN quote_ident(table_schema) = (parse_ident('public.telemetry'))[1] \
             AND quote_ident(table_name) = (parse_ident('public.telemetry'))[2] \
             ELSE quote_ident(table_name) = 'public.telemetry' AND {search_path} END"
        ),
    );
    // In PostgreSQL's words, which the builder picks its operators by.
    assert!(
        columns.starts_with(
            "device_id|text\nts|timestamp with time zone\n\
             received_at|timestamp with time zone\ntemperature|double precision\n"
        ),
        "{columns}"
    );
    // current_setting names an unknown setting, as PostgreSQL does.
    let (ok, _, err) = psql(&sluice, None, &["-c", "SELECT current_setting('no_such')"]);
    assert!(
        !ok && err.contains("unrecognized configuration parameter"),
        "{err}"
    );
}

#[test]
fn psycopg_runs_queries_with_parameters_and_gets_the_right_types() {
    if !common::python_has("psycopg", "CI_REQUIRE_PSYCOPG") {
        return;
    }
    let (_dir, sluice) = start_with_readings(&[]);
    let script = r#"
import sys, datetime, psycopg
with psycopg.connect(host=sys.argv[1], port=int(sys.argv[2]), user="analyst", dbname="sluice") as conn:
    names = [r[0] for r in conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")]
    assert "telemetry" in names and "alerts" in names, names
    rows = conn.execute(
        "SELECT device_id, ts, temperature, firmware_version, lat FROM telemetry "
        "WHERE device_id = %s AND temperature > %s ORDER BY ts",
        ("d1", 21.0)).fetchall()
    assert len(rows) == 2, rows
    device, ts, temperature, firmware, lat = rows[0]
    assert device == "d1" and isinstance(device, str), rows
    assert ts == datetime.datetime(2024, 1, 15, 10, 0, 40, tzinfo=datetime.timezone.utc), ts
    assert temperature == 21.5 and isinstance(temperature, float), rows
    assert firmware == "2.1.0" and lat == 1.5, rows
    (count,) = conn.execute("SELECT count(*) FROM telemetry WHERE ts >= %s",
        (datetime.datetime(2024, 1, 15, 10, 0, 30, tzinfo=datetime.timezone.utc),)).fetchone()
    assert count == 2 and isinstance(count, int), count
    (nothing,) = conn.execute("SELECT NULL::double precision").fetchone()
    assert nothing is None
    (kind,) = conn.execute(
        "SELECT data_type FROM information_schema.columns WHERE table_name = %s AND column_name = %s",
        ("telemetry", "ts")).fetchone()
    assert kind == "timestamp with time zone", kind
print("ok")
"#;
    client_says_ok(&sluice, "python3", &["-c", script]);
}

/// pgjdbc, the driver of DBeaver and every JDBC tool: its catalog browsing
/// (`DatabaseMetaData`), prepared statements with parameters, Java types, SQLSTATEs. The
/// client is `tests/jdbc/SluiceJdbc.java`, run from source by the JDK; the driver is
/// Debian's `libpostgresql-jdbc-java`.
#[test]
fn jdbc_browses_the_catalog_and_runs_prepared_statements() {
    const DRIVER: &str = "/usr/share/java/postgresql.jar";
    let have_java = Command::new("java")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_java || !std::path::Path::new(DRIVER).exists() {
        assert!(
            std::env::var_os("CI_REQUIRE_JDBC").is_none(),
            "CI_REQUIRE_JDBC is set but java or {DRIVER} is missing"
        );
        eprintln!("skipped: needs java and {DRIVER} (see .ci/run for how to install them)");
        return;
    }
    let (_dir, sluice) = start_with_readings(&[]);
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/jdbc/SluiceJdbc.java");
    client_says_ok(&sluice, "java", &["-cp", DRIVER, client]);
}

/// The authentication request the server answers a StartupMessage with: its code
/// (3 cleartext password, 10 SASL) and, for SASL, the mechanisms offered.
fn authentication_request(sluice: &Sluice) -> (i32, String) {
    use std::io::{Read, Write};
    let mut body = Vec::new();
    body.extend_from_slice(&196_608i32.to_be_bytes()); // protocol 3.0
    body.extend_from_slice(b"user\0grafana\0database\0sluice\0\0");
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    let mut socket = std::net::TcpStream::connect(sluice.pg).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket.write_all(&startup).unwrap();
    let mut header = [0u8; 5];
    socket.read_exact(&mut header).unwrap();
    assert_eq!(header[0], b'R', "an authentication request");
    let len = i32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; len - 4];
    socket.read_exact(&mut rest).unwrap();
    let code = i32::from_be_bytes(rest[..4].try_into().unwrap());
    (
        code,
        String::from_utf8_lossy(&rest[4..])
            .replace('\0', " ")
            .trim()
            .to_owned(),
    )
}

/// A password is checked by SCRAM-SHA-256 (the default: the client proves it knows the
/// password without sending it) or in clear text when configured so; psql logs in with
/// either.
#[test]
fn a_password_is_required_when_configured() {
    for (auth, method) in [
        ("", (10, "SCRAM-SHA-256")),
        ("password_auth = \"cleartext\"\n", (3, "")),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sluice.toml");
        std::fs::write(&config, format!("[pg]\npassword = \"s3cret\"\n{auth}")).unwrap();
        let sluice = Sluice::start(
            &dir.path().join("data"),
            &["--config", config.to_str().unwrap()],
        );
        let (ok, _, err) = psql(&sluice, Some("wrong"), &["-c", "SELECT 1"]);
        assert!(!ok, "{method:?}: a wrong password is refused");
        assert!(
            err.to_lowercase()
                .contains("password authentication failed"),
            "{method:?}: {err}"
        );
        let (ok, _, _) = psql(&sluice, None, &["-c", "SELECT 1", "-w"]);
        assert!(!ok, "{method:?}: no password is refused");
        let (code, mechanisms) = authentication_request(&sluice);
        assert_eq!((code, mechanisms.as_str()), method);
        let (ok, out, err) = psql(&sluice, Some("s3cret"), &["-c", "SELECT 1"]);
        assert!(ok, "{method:?}: {err}");
        assert_eq!(out, "1\n", "{method:?}");
    }
}

#[test]
fn both_sql_endpoints_refuse_writes_and_file_access() {
    let (_dir, sluice) = start_with_readings(&[]);
    let outside = sluice.data_dir.with_extension("copied.csv");
    let forbidden = [
        "CREATE TABLE t (a INT)".to_owned(),
        "CREATE VIEW v AS SELECT 1".to_owned(),
        "INSERT INTO telemetry (device_id) VALUES ('x')".to_owned(),
        "UPDATE telemetry SET battery = 0".to_owned(),
        "DELETE FROM telemetry".to_owned(),
        "DROP TABLE telemetry".to_owned(),
        format!("COPY telemetry TO '{}'", outside.display()),
        format!("COPY (SELECT 1) TO '{}' STORED AS CSV", outside.display()),
        "CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '/etc/passwd'".to_owned(),
        "SET datafusion.execution.batch_size = 1".to_owned(),
        format!("EXPLAIN ANALYZE COPY (SELECT 1) TO '{}'", outside.display()),
        "SELECT 1 AS x INTO t".to_owned(),
    ];
    for sql in &forbidden {
        let (ok, _, err) = psql(&sluice, None, &["-c", sql]);
        assert!(!ok, "PostgreSQL endpoint ran {sql}");
        assert!(
            err.contains("read-only") || err.contains("parser error"),
            "{sql}: {err}"
        );
        let response = reqwest::blocking::Client::new()
            .post(format!("{}/query", sluice.http))
            .body(sql.clone())
            .send()
            .unwrap();
        let status = response.status().as_u16();
        let body = response.text().unwrap();
        assert_eq!(status, 400, "HTTP ran {sql}: {body}");
        assert!(
            body.contains("read-only") || body.contains("parser error"),
            "{sql}: {body}"
        );
    }
    assert!(
        !outside.exists(),
        "nothing was written outside the data directory"
    );
    assert_eq!(sluice.scalar("SELECT count(*) FROM telemetry"), 4);
    // A session setting of the client itself is fine.
    assert_eq!(
        psql_ok(&sluice, "SET application_name = 'grafana'"),
        "SET\n",
        "SET is accepted"
    );
}

/// Resident and peak memory of a process, in bytes (Linux).
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    (kib("VmRSS:") * 1024, kib("VmHWM:") * 1024)
}

/// `[query]`'s limits: the queries that took 6.4 GiB and 40 s of a core before, and
/// cross joins over `telemetry`, through HTTP and psql, each end with a clear error
/// (a function's result over the memory, the timeout, the result cap) with its
/// SQLSTATE, while the server goes on ingesting and answering, its memory under the
/// limit.
#[test]
fn hostile_queries_end_in_clear_errors_and_the_server_keeps_serving() {
    const MAX_MEMORY: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[query]\nmax_memory_bytes = {MAX_MEMORY}\ntimeout = \"3s\"\nmax_result_bytes = 1048576\n"
        ),
    )
    .unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let readings = |from: usize, n: usize| {
        (from..from + n)
            .map(|i| {
                let ts = format!("2024-01-15T10:{:02}:{:02}Z", i / 60 % 60, i % 60);
                telemetry(&format!("d{}", i % 30), &ts, 20.0, 80.0)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        publish(sluice.mqtt, readings(0, 300), QoS::AtLeastOnce, 2),
        300
    );
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry",
        300,
        Duration::from_secs(10),
    );
    let (rss_before, _) = memory_of(sluice.pid());

    for (sql, says, sqlstate) in [
        (
            "SELECT length(repeat('x', 2000000000))",
            "repeat() would build 2000000000 bytes",
            "53200",
        ),
        (
            "SELECT count(*) FROM generate_series(1, 20000000000)",
            "ran longer than query.timeout (3s)",
            "57014",
        ),
        (
            // (A filter, so that the count is not taken from the row counts alone.)
            "SELECT count(*) FROM telemetry a, telemetry b, telemetry c, telemetry d \
             WHERE a.temperature + b.temperature + c.temperature + d.temperature > 0",
            "ran longer than query.timeout (3s)",
            "57014",
        ),
        (
            "SELECT a.device_id, a.ts, a.temperature, b.device_id FROM telemetry a, telemetry b, telemetry c",
            "larger than query.max_result_bytes (1048576 bytes)",
            "54000",
        ),
    ] {
        let response = reqwest::blocking::Client::new()
            .post(format!("{}/query", sluice.http))
            .body(sql)
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{sql}");
        let body = response.text().unwrap();
        assert!(body.contains(says), "HTTP {sql}: {body}");

        let (ok, _, stderr) = psql(&sluice, None, &["-v", "VERBOSITY=verbose", "-c", sql]);
        assert!(!ok, "psql {sql}");
        assert!(
            stderr.contains(&format!("ERROR:  {sqlstate}: ")) && stderr.contains(says),
            "psql {sql}: {stderr}"
        );
        // Still answering, on both endpoints.
        assert_eq!(sluice.scalar("SELECT count(*) FROM telemetry"), 300);
        assert_eq!(
            psql_ok(&sluice, "SELECT count(*) FROM telemetry").trim(),
            "300"
        );
    }

    // Still ingesting.
    assert_eq!(
        publish(sluice.mqtt, readings(300, 20), QoS::AtLeastOnce, 1),
        20
    );
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry",
        320,
        Duration::from_secs(10),
    );
    let (_, peak) = memory_of(sluice.pid());
    assert!(
        peak < rss_before + MAX_MEMORY + (256 << 20),
        "peak RSS {} MiB, {} MiB before the queries",
        peak >> 20,
        rss_before >> 20
    );
}
