//! `sluice`: MQTT telemetry in, SQL out. This binary wires the library crates and holds
//! the command line; see ARCHITECTURE.md for the map.

/// jemalloc: at a million devices with windows on, glibc malloc kept ~35 % more resident
/// memory for the same live data (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod config;
mod durable;
mod fatal;
mod http;
mod output;
mod pg;
mod server;
mod sql;
mod status;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};
use crate::output::Format;
use crate::server::Server;
use crate::status::Sample;

#[derive(Parser)]
#[command(name = "sluice", version, about = "MQTT telemetry in, SQL out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: MQTT broker, ingestion, storage, HTTP query endpoint.
    Serve(ServeArgs),
    /// Run the server with a built-in simulated fleet and a live status line.
    Demo(DemoArgs),
    /// Run SQL against a live server (hot + cold data) or a data directory (Parquet).
    Sql(SqlArgs),
    /// Publish simulated seed-schema telemetry to an MQTT broker.
    Loadgen(LoadgenArgs),
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// TOML configuration file (settings: see README).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for Parquet files [default: sluice-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// MQTT listener, 3.1.1 and 5 [default: 127.0.0.1:1883].
    #[arg(long, value_name = "HOST:PORT")]
    mqtt_addr: Option<SocketAddr>,
    /// HTTP listener for /ready, /metrics, /query [default: 127.0.0.1:8080].
    #[arg(long, value_name = "HOST:PORT")]
    http_addr: Option<SocketAddr>,
    /// PostgreSQL wire-protocol listener [default: 127.0.0.1:5433].
    #[arg(long, value_name = "HOST:PORT")]
    pg_addr: Option<SocketAddr>,
}

impl ServeArgs {
    /// Loads the configuration now, and a way to load it again for a reload.
    fn load_with_reload(&self) -> anyhow::Result<(Config, server::LoadConfig)> {
        let args = self.clone();
        Ok((self.load()?, Arc::new(move || args.load())))
    }

    fn load(&self) -> anyhow::Result<Config> {
        Config::load(
            self.config.as_deref(),
            std::env::vars(),
            &Overrides {
                data_dir: self.data_dir.clone(),
                mqtt_addr: self.mqtt_addr,
                http_addr: self.http_addr,
                pg_addr: self.pg_addr,
            },
        )
    }
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Simulated devices.
    #[arg(long, default_value_t = 5000)]
    devices: u64,
    /// Messages per second from all devices together.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Stop after this long (e.g. 30s, 5m); by default run until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

#[derive(Args)]
struct SqlArgs {
    /// A running sluice server, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL", conflicts_with = "data_dir")]
    server: Option<String>,
    /// The server's `http.token`, sent as `Authorization: Bearer`.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Query the Parquet files of a data directory (no server needed).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// The query; without it, an interactive prompt.
    query: Option<String>,
}

#[derive(Args)]
struct LoadgenArgs {
    /// MQTT broker, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// MQTT protocol version (sluice serves 3.1.1 and 5 on the same port).
    #[arg(long, default_value = "3.1.1", value_parser = ["3.1.1", "5"])]
    protocol: String,
    #[arg(long, default_value_t = 1000)]
    devices: u64,
    /// Messages per second, all devices together [default: devices / interval].
    #[arg(long, value_name = "MSGS_PER_S")]
    rate: Option<f64>,
    /// Seconds between two readings of one device (when --rate is not given).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    interval: f64,
    /// Fraction of messages sent malformed, cycling through every reject reason.
    #[arg(long, default_value_t = 0.0)]
    bad_rate: f64,
    /// Fraction of devices that run hot (82–90 °C) 3 minutes in every 10.
    #[arg(long, default_value_t = 0.0)]
    anomaly_rate: f64,
    /// Seconds to run.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// MQTT connections the devices are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// QoS 1 messages awaiting PUBACK per connection.
    #[arg(long, default_value_t = 100)]
    max_inflight: u16,
    /// Print the final report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        // rumqttd logs every ordinary client disconnect as an error ("router-drop",
        // "no-connection id … is already gone"): those two modules are silenced. Messages
        // it drops are counted and logged by sluice itself.
        Command::Serve(_) => {
            "info,rumqttd=warn,rumqttd::server::broker=off,rumqttd::router::routing=off"
        }
        _ => "warn,rumqttd=error,rumqttd::server::broker=off,rumqttd::router::routing=off",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Demo(args) => demo(&args),
        Command::Sql(args) => run_sql(args),
        Command::Loadgen(args) => loadgen(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sluice-rt")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves when SIGINT or SIGTERM arrives; a second signal exits at once.
async fn shutdown_signal() {
    async fn any_signal() {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    any_signal().await;
    tokio::spawn(async {
        any_signal().await;
        eprintln!("second signal: exiting without finishing the flush");
        std::process::exit(130);
    });
}

fn print_ready(server: &Server, config: &Config) {
    let addrs = server.addrs;
    let optional = |name: &str, addr: Option<SocketAddr>| {
        addr.map(|a| format!(" {name}={a}")).unwrap_or_default()
    };
    println!(
        "sluice ready: mqtt={}{}{} http=http://{} pg={} data_dir={}",
        addrs.mqtt,
        optional("mqtts", addrs.mqtt_tls),
        optional("ws", addrs.mqtt_ws),
        addrs.http,
        addrs.pg,
        config.data_dir.display()
    );
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let (config, load) = args.load_with_reload()?;
    let fatal = fatal::install();
    let runtime = runtime()?;
    let server = Server::start(&config, runtime.handle(), load)?;
    print_ready(&server, &config);
    let status = spawn_status_log(&server);
    let panicked = runtime.block_on(async {
        tokio::select! {
            () = shutdown_signal() => None,
            what = fatal.wait() => Some(what),
        }
    });
    status.store(true, Ordering::SeqCst);
    let report = server.shutdown()?;
    println!(
        "sluice stopped: {} rows written to {} Parquet files in the final flush",
        report.flushed_rows, report.flushed_files
    );
    // A pipeline thread may also panic during the shutdown itself.
    match panicked.or_else(|| fatal.get()) {
        Some(what) => anyhow::bail!("{what} (sluice stopped; what was stored was flushed)"),
        None => Ok(()),
    }
}

/// Logs a status line every 10 s while the server runs; set the flag to stop.
fn spawn_status_log(server: &Server) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let storage = server.storage.clone();
    let mqtt = server.mqtt.clone();
    let flag = stop.clone();
    std::thread::spawn(move || {
        let mut last = Sample::take(&storage, &mqtt);
        let mut waited = Duration::ZERO;
        while !flag.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(500));
            waited += Duration::from_millis(500);
            if waited < Duration::from_secs(10) {
                continue;
            }
            let now = Sample::take(&storage, &mqtt);
            tracing::info!(
                msgs_per_s = now.rate_since(&last).round(),
                hot_rows = now.hot_rows,
                cold_rows = now.cold_rows,
                rejects = now.rejects,
                subscriber_skips = now.skipped,
                "status"
            );
            last = now;
            waited = Duration::ZERO;
        }
    });
    stop
}

fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    let (config, load) = args.serve.load_with_reload()?;
    let fatal = fatal::install();
    let runtime = runtime()?;
    let server = Server::start(&config, runtime.handle(), load)?;
    print_ready(&server, &config);
    println!(
        "simulating {} devices at {} msgs/s over MQTT. Try, in another terminal:\n  \
         cargo run --release -- sql --server http://{} \"SELECT device_id, count(*), avg(temperature) FROM telemetry GROUP BY device_id ORDER BY device_id LIMIT 10\"\n\
         Ctrl-C stops the demo; everything received is flushed to {} first.\n",
        args.devices,
        args.rate,
        server.addrs.http,
        config.data_dir.display()
    );

    let mut loadgen = sluice_loadgen::LoadgenConfig::new(server.addrs.mqtt.to_string());
    loadgen.devices = args.devices;
    loadgen.rate = args.rate;
    loadgen.duration = args.duration;
    loadgen.connections = 4.min(args.devices as usize).max(1);
    let progress = Arc::new(sluice_loadgen::Progress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let fleet = runtime.spawn(sluice_loadgen::run(loadgen, progress.clone(), stop.clone()));
    let signal = runtime.spawn(shutdown_signal());

    let tty = std::io::stdout().is_terminal();
    let mut previous = Sample::take(&server.storage, &server.mqtt);
    while !signal.is_finished() && !fleet.is_finished() && fatal.get().is_none() {
        std::thread::sleep(Duration::from_secs(1));
        let now = Sample::take(&server.storage, &server.mqtt);
        let p = progress.snapshot();
        let line = format!(
            "{} | publish→ack p99 {:.1} ms",
            now.line(&previous),
            p.p99_us as f64 / 1e3
        );
        if tty {
            print!("\r\x1b[2K{line}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        } else {
            println!("{line}");
        }
        previous = now;
    }
    if tty {
        println!();
    }
    stop.store(true, Ordering::SeqCst);
    match runtime.block_on(fleet) {
        Ok(Ok(report)) => println!("loadgen: {report}"),
        Ok(Err(e)) => eprintln!("loadgen stopped: {e}"),
        Err(e) => eprintln!("loadgen failed: {e}"),
    }
    // Kept past the shutdown: after the final flush its counts are what is on disk.
    let storage = server.storage.clone();
    let report = server.shutdown()?;
    let total = storage
        .stats(sluice_ingest::TELEMETRY_TABLE)
        .map(|s| s.cold_rows)
        .unwrap_or_default();
    println!(
        "stopped: final flush wrote {} rows; {} telemetry rows on disk. Query them offline:\n  \
         cargo run --release -- sql --data-dir {} \"SELECT count(*) FROM telemetry\"",
        report.flushed_rows,
        total,
        config.data_dir.display()
    );
    match fatal.get() {
        Some(what) => anyhow::bail!("{what} (sluice stopped; what was stored was flushed)"),
        None => Ok(()),
    }
}

fn run_sql(args: SqlArgs) -> anyhow::Result<()> {
    let backend = match (&args.server, &args.data_dir) {
        (Some(url), _) => sql::Backend::server(url, args.token.clone())?,
        (None, Some(dir)) => sql::Backend::offline(dir.clone())?,
        (None, None) => anyhow::bail!("give --server URL (a running sluice) or --data-dir DIR"),
    };
    match &args.query {
        Some(query) => sql::run_one(&backend, query, args.format),
        None => sql::repl(&backend, args.format),
    }
}

fn loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    let mut config = sluice_loadgen::LoadgenConfig::new(args.broker);
    config.protocol = match args.protocol.as_str() {
        "5" => sluice_loadgen::Protocol::V5,
        _ => sluice_loadgen::Protocol::V311,
    };
    config.devices = args.devices;
    if args.rate.is_none() && !(args.interval.is_finite() && args.interval > 0.0) {
        anyhow::bail!("--interval must be a positive number of seconds");
    }
    config.rate = args.rate.unwrap_or(args.devices as f64 / args.interval);
    config.bad_rate = args.bad_rate;
    config.anomaly_rate = args.anomaly_rate;
    if !(args.duration.is_finite() && args.duration > 0.0) {
        anyhow::bail!("--duration must be a positive number of seconds");
    }
    config.duration = Some(Duration::from_secs_f64(args.duration));
    config.qos = args.qos;
    config.seed = args.seed;
    config.connections = args.connections;
    config.max_inflight = args.max_inflight;
    let runtime = runtime()?;
    let progress = Arc::new(sluice_loadgen::Progress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let run = runtime.spawn(sluice_loadgen::run(config, progress.clone(), stop.clone()));
    let signal = runtime.spawn(shutdown_signal());
    let tty = std::io::stderr().is_terminal();
    let mut window = (std::time::Instant::now(), 0u64, 0.0f64);
    while !run.is_finished() {
        std::thread::sleep(Duration::from_millis(250));
        if signal.is_finished() {
            stop.store(true, Ordering::SeqCst);
        }
        if tty {
            let p = progress.snapshot();
            // Acknowledged messages per second over the last second.
            if window.0.elapsed() >= Duration::from_secs(1) {
                window = (
                    std::time::Instant::now(),
                    p.acked,
                    (p.acked - window.1) as f64 / window.0.elapsed().as_secs_f64(),
                );
            }
            eprint!(
                "\r\x1b[2Krate {:.0} msgs/s  sent {}  acked {}  in flight {}  errors {}  p50 {:.2} ms  p99 {:.2} ms",
                window.2,
                p.sent,
                p.acked,
                p.in_flight,
                p.errors,
                p.p50_us as f64 / 1e3,
                p.p99_us as f64 / 1e3
            );
        }
    }
    if tty {
        eprintln!();
    }
    let report = runtime.block_on(run)??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
