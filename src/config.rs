//! The server's settings: one serde tree with documented defaults, layered
//! defaults < TOML file (`--config`) < `SLUICE_*` environment < command-line flags.
//! An unknown or invalid setting fails at start with a message naming it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Every setting of `sluice serve`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    /// Where Parquet files are written (`<data_dir>/telemetry/date=…/hour=…/*.parquet`).
    pub data_dir: PathBuf,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub pg: PgConfig,
    pub ingest: IngestConfig,
    pub storage: StorageConfig,
    pub windows: WindowsConfig,
    /// `[[alert]]` rules (README: "Alerts"); reloaded on SIGHUP and `POST /reload`.
    #[serde(rename = "alert", skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<sluice_aggregator::RuleSpec>,
    /// `[[webhook]]` endpoints every alert transition is posted to; reloaded too.
    #[serde(rename = "webhook", skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<sluice_aggregator::WebhookSpec>,
}

/// Per-device event-time windows (`telemetry_1m`, `telemetry_1h`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct WindowsConfig {
    /// Compute the window tables (their cost at the reference load: BENCHMARKS.md).
    pub enabled: bool,
    /// Size of the windows of `telemetry_1m`.
    #[serde(with = "humantime_serde")]
    pub size: Duration,
    /// Size of the rollup windows of `telemetry_1h`, a multiple of `size`.
    #[serde(with = "humantime_serde")]
    pub rollup: Duration,
    /// Readings up to this far behind a device's latest event time still count.
    #[serde(with = "humantime_serde")]
    pub lateness: Duration,
    /// After this long without a reading, a device's windows close by the server clock.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for WindowsConfig {
    fn default() -> Self {
        let w = sluice_aggregator::WindowConfig::default();
        WindowsConfig {
            enabled: true,
            size: w.size,
            rollup: w.rollup,
            lateness: w.lateness,
            idle_timeout: w.idle_timeout,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MqttConfig {
    /// MQTT 3.1.1 and 5 on one port (the CONNECT says which). Use 0.0.0.0:1883 to accept
    /// devices from the network.
    pub addr: SocketAddr,
    /// Clients connected at once; more are refused with a CONNACK.
    pub max_connections: usize,
    /// Largest MQTT packet a client may send; a larger one closes its connection.
    pub max_packet_bytes: usize,
    /// Time a new connection has to complete its CONNECT (TLS and WebSocket handshakes
    /// included).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time a write to a client may take before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// QoS 1 and 2 messages an MQTT 5 client may have unacknowledged.
    pub receive_maximum: u16,
    /// Topic aliases an MQTT 5 client may set.
    pub topic_alias_maximum: u16,
    /// Longest keep alive an MQTT 5 client gets (0s: as it asks).
    #[serde(with = "humantime_serde")]
    pub max_keep_alive: Duration,
    /// Longest a persistent session outlives its connection.
    #[serde(with = "humantime_serde")]
    pub max_session_expiry: Duration,
    /// Router memory for each subscribed filter: an MQTT subscriber further behind
    /// loses the oldest messages (counted in `sluice_broker_skipped_messages_total`).
    pub subscriber_buffer_bytes: usize,
    /// Threads serving MQTT connections.
    pub io_threads: usize,
    /// Topic filters refused at SUBSCRIBE (return code 0x80).
    pub deny_subscribe: Vec<String>,
    /// MQTT over TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<MqttTlsConfig>,
    /// MQTT over WebSocket (subprotocol `mqtt`), for browser clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws: Option<MqttWsConfig>,
}

/// `[mqtt.tls]`: present, it turns the TLS listener on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct MqttTlsConfig {
    #[serde(default = "MqttTlsConfig::default_addr")]
    pub addr: SocketAddr,
    /// PEM: the server certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: its private key.
    pub key_file: PathBuf,
}

impl MqttTlsConfig {
    fn default_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8883))
    }
}

/// `[mqtt.ws]`: present, it turns the WebSocket listener on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct MqttWsConfig {
    #[serde(default = "MqttWsConfig::default_addr")]
    pub addr: SocketAddr,
}

impl MqttWsConfig {
    fn default_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8083))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct HttpConfig {
    /// HTTP address for `/ready`, `/metrics`, `/query` and `/flush`.
    pub addr: SocketAddr,
}

/// The PostgreSQL wire-protocol endpoint (psql, Grafana, JDBC, psycopg).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PgConfig {
    /// 5433, not 5432, so that a PostgreSQL server on the same machine is not in the way.
    pub addr: SocketAddr,
    /// When set, clients must send this password (any user name); otherwise no
    /// authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 5433)),
            password: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct IngestConfig {
    /// Decoding threads.
    pub workers: usize,
    /// Messages queued in front of the decoders; MQTT connections stop reading beyond.
    pub queue_messages: usize,
    /// A batch is sealed (made queryable) at this many rows…
    pub batch_rows: usize,
    /// …or when its oldest row has waited this long.
    #[serde(with = "humantime_serde")]
    pub batch_age: Duration,
    /// Larger payloads are rejected as `too_large`.
    pub max_message_bytes: usize,
    /// How much of a rejected payload is kept in `rejects.payload`.
    pub reject_payload_bytes: usize,
    /// Readings timestamped further ahead of their arrival are rejected
    /// (`invalid_timestamp`).
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct StorageConfig {
    /// In-memory rows are written to Parquet at least this often.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// …and as soon as a table holds this many in-memory rows…
    pub flush_rows: usize,
    /// …or all tables together this many bytes.
    pub flush_bytes: usize,
    /// Ingestion waits while a table holds this many in-memory rows (flushes failing).
    pub max_hot_rows: usize,
    pub row_group_rows: usize,
    pub zstd_level: i32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("sluice-data"),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            pg: PgConfig::default(),
            ingest: IngestConfig::default(),
            storage: StorageConfig::default(),
            windows: WindowsConfig::default(),
            alerts: Vec::new(),
            webhooks: Vec::new(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        let broker = sluice_broker::BrokerConfig::default();
        MqttConfig {
            addr: broker.addr,
            max_connections: broker.max_connections,
            max_packet_bytes: broker.max_packet_bytes,
            connect_timeout: broker.connect_timeout,
            write_timeout: broker.write_timeout,
            receive_maximum: broker.receive_maximum,
            topic_alias_maximum: broker.topic_alias_maximum,
            max_keep_alive: broker.max_keep_alive,
            max_session_expiry: broker.max_session_expiry,
            subscriber_buffer_bytes: broker.subscriber_buffer_bytes,
            io_threads: broker.io_threads,
            deny_subscribe: broker.deny_subscribe,
            tls: None,
            ws: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        let pipeline = sluice_ingest::PipelineConfig::default();
        IngestConfig {
            workers: pipeline.workers,
            queue_messages: pipeline.queue_messages,
            batch_rows: pipeline.seal.max_rows,
            batch_age: pipeline.seal.max_age,
            max_message_bytes: pipeline.limits.max_payload_bytes,
            reject_payload_bytes: pipeline.reject_payload_bytes,
            max_clock_skew: pipeline.limits.max_clock_skew,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        let storage = sluice_storage::StorageConfig::new("");
        StorageConfig {
            flush_interval: storage.flush_interval,
            flush_rows: storage.flush_rows,
            flush_bytes: storage.flush_bytes,
            max_hot_rows: storage.max_hot_rows,
            row_group_rows: storage.write.row_group_rows,
            zstd_level: storage.write.zstd_level,
        }
    }
}

/// Settings given as command-line flags: the top layer.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_addr: Option<SocketAddr>,
}

impl Config {
    /// Loads the layers: defaults, then `file`, then `SLUICE_*` variables from `env`
    /// (`SLUICE_DATA_DIR`, `SLUICE_MQTT__ADDR`, `SLUICE_STORAGE__FLUSH_INTERVAL`, …:
    /// a double underscore separates sections; the flags' names `SLUICE_MQTT_ADDR`,
    /// `SLUICE_HTTP_ADDR`, `SLUICE_PG_ADDR` work too), then `overrides`.
    pub(crate) fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                anyhow::bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SLUICE_"))
            .collect();
        for (key, value) in env {
            let path = match key.as_str() {
                // The flags' names work as variables too.
                "SLUICE_MQTT_ADDR" => "mqtt.addr".to_owned(),
                "SLUICE_HTTP_ADDR" => "http.addr".to_owned(),
                "SLUICE_PG_ADDR" => "pg.addr".to_owned(),
                _ => key["SLUICE_".len()..]
                    .to_ascii_lowercase()
                    .replace("__", "."),
            };
            let value: figment::value::Value = value.parse().unwrap_or_else(|e| match e {});
            figment = figment.merge(Serialized::default(&path, value));
        }
        let mut config: Config = figment.extract().map_err(|e| {
            anyhow::anyhow!(
                "invalid configuration: {}",
                e.into_iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        if let Some(dir) = &overrides.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(addr) = overrides.mqtt_addr {
            config.mqtt.addr = addr;
        }
        if let Some(addr) = overrides.http_addr {
            config.http.addr = addr;
        }
        if let Some(addr) = overrides.pg_addr {
            config.pg.addr = addr;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("mqtt.max_connections", self.mqtt.max_connections),
            ("mqtt.io_threads", self.mqtt.io_threads),
            ("ingest.workers", self.ingest.workers),
            ("ingest.queue_messages", self.ingest.queue_messages),
            (
                "mqtt.receive_maximum",
                usize::from(self.mqtt.receive_maximum),
            ),
            ("ingest.batch_rows", self.ingest.batch_rows),
            ("ingest.max_message_bytes", self.ingest.max_message_bytes),
            ("storage.flush_rows", self.storage.flush_rows),
            ("storage.flush_bytes", self.storage.flush_bytes),
            ("storage.row_group_rows", self.storage.row_group_rows),
        ];
        for (name, value) in positive {
            if value == 0 {
                anyhow::bail!("invalid configuration: {name} must be at least 1");
            }
        }
        if self.storage.max_hot_rows < self.storage.flush_rows {
            anyhow::bail!(
                "invalid configuration: storage.max_hot_rows ({}) must be at least storage.flush_rows ({})",
                self.storage.max_hot_rows,
                self.storage.flush_rows
            );
        }
        if !(1..=22).contains(&self.storage.zstd_level) {
            anyhow::bail!(
                "invalid configuration: storage.zstd_level must be 1..=22, got {}",
                self.storage.zstd_level
            );
        }
        if self.mqtt.max_packet_bytes < self.ingest.max_message_bytes {
            anyhow::bail!(
                "invalid configuration: mqtt.max_packet_bytes ({}) must be at least ingest.max_message_bytes ({}), or oversized messages disconnect their device instead of landing in rejects",
                self.mqtt.max_packet_bytes,
                self.ingest.max_message_bytes
            );
        }
        if let Some(windows) = self.aggregator()?.windows {
            windows
                .validate()
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        }
        self.webhooks()?;
        if self.ingest.batch_age.is_zero() || self.storage.flush_interval.is_zero() {
            anyhow::bail!(
                "invalid configuration: ingest.batch_age and storage.flush_interval must be more than 0"
            );
        }
        Ok(())
    }

    /// The broker's settings; `direct_filter` is the telemetry topic filter.
    pub(crate) fn broker(&self, direct_filter: &str) -> sluice_broker::BrokerConfig {
        let mqtt = &self.mqtt;
        sluice_broker::BrokerConfig {
            addr: mqtt.addr,
            tls: mqtt.tls.as_ref().map(|t| sluice_broker::TlsConfig {
                addr: t.addr,
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
            }),
            ws_addr: mqtt.ws.as_ref().map(|w| w.addr),
            max_connections: mqtt.max_connections,
            max_packet_bytes: mqtt.max_packet_bytes,
            connect_timeout: mqtt.connect_timeout,
            write_timeout: mqtt.write_timeout,
            receive_maximum: mqtt.receive_maximum,
            topic_alias_maximum: mqtt.topic_alias_maximum,
            max_keep_alive: mqtt.max_keep_alive,
            max_session_expiry: mqtt.max_session_expiry,
            subscriber_buffer_bytes: mqtt.subscriber_buffer_bytes,
            io_threads: mqtt.io_threads,
            direct_filter: direct_filter.to_owned(),
            deny_subscribe: mqtt.deny_subscribe.clone(),
        }
    }

    pub(crate) fn pipeline(&self) -> sluice_ingest::PipelineConfig {
        sluice_ingest::PipelineConfig {
            workers: self.ingest.workers,
            queue_messages: self.ingest.queue_messages,
            seal: sluice_ingest::SealPolicy {
                max_rows: self.ingest.batch_rows,
                max_age: self.ingest.batch_age,
            },
            limits: sluice_ingest::DecodeLimits {
                max_payload_bytes: self.ingest.max_message_bytes,
                max_clock_skew: self.ingest.max_clock_skew,
            },
            reject_payload_bytes: self.ingest.reject_payload_bytes,
        }
    }

    /// The aggregator's settings; fails on an invalid `[[alert]]`.
    pub(crate) fn aggregator(&self) -> anyhow::Result<sluice_aggregator::AggregatorConfig> {
        Ok(sluice_aggregator::AggregatorConfig {
            windows: self
                .windows
                .enabled
                .then_some(sluice_aggregator::WindowConfig {
                    size: self.windows.size,
                    rollup: self.windows.rollup,
                    lateness: self.windows.lateness,
                    idle_timeout: self.windows.idle_timeout,
                }),
            rules: self.rules()?,
            state: Some(std::sync::Arc::new(crate::server::StateFiles(
                sluice_storage::StateDir::new(self.data_dir.join("state")),
            ))),
            ..sluice_aggregator::AggregatorConfig::default()
        })
    }

    /// The `[[alert]]` rules, validated.
    pub(crate) fn rules(&self) -> anyhow::Result<Vec<sluice_aggregator::Rule>> {
        sluice_aggregator::compile_rules(&self.alerts)
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    /// The `[[webhook]]` endpoints, validated.
    pub(crate) fn webhooks(&self) -> anyhow::Result<Vec<sluice_aggregator::Webhook>> {
        sluice_aggregator::compile_webhooks(&self.webhooks)
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    pub(crate) fn storage(&self) -> sluice_storage::StorageConfig {
        sluice_storage::StorageConfig {
            data_dir: self.data_dir.clone(),
            flush_interval: self.storage.flush_interval,
            flush_rows: self.storage.flush_rows,
            flush_bytes: self.storage.flush_bytes,
            max_hot_rows: self.storage.max_hot_rows,
            write: sluice_storage::WriteOptions {
                row_group_rows: self.storage.row_group_rows,
                zstd_level: self.storage.zstd_level,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sluice.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from/file\"\n[mqtt]\naddr = \"127.0.0.1:1000\"\n[storage]\nflush_interval = \"5s\"\nflush_rows = 10\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                ("SLUICE_MQTT__ADDR", "127.0.0.1:2000"),
                ("SLUICE_INGEST__BATCH_AGE", "50ms"),
                ("SLUICE_HTTP_ADDR", "127.0.0.1:3000"),
                ("OTHER", "ignored"),
            ]),
            &Overrides {
                data_dir: Some("/from/flag".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(config.mqtt.addr, "127.0.0.1:2000".parse().unwrap());
        assert_eq!(config.ingest.batch_age, Duration::from_millis(50));
        assert_eq!(config.storage.flush_interval, Duration::from_secs(5));
        assert_eq!(config.storage.flush_rows, 10);
        assert_eq!(config.http.addr, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(
            config.mqtt.max_connections,
            MqttConfig::default().max_connections
        );
    }

    #[test]
    fn unknown_and_invalid_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sluice.toml");
        std::fs::write(&file, "[mqtt]\nadress = \"x\"\n").unwrap();
        let error = Config::load(Some(&file), env(&[]), &Overrides::default())
            .unwrap_err()
            .to_string();
        // The key's full name and the fault, not only the misspelled word echoed back.
        assert!(error.contains("unknown field"), "{error}");
        assert!(error.contains("mqtt.adress"), "{error}");

        let error = Config::load(
            None,
            env(&[("SLUICE_MQTT__ADDR", "not-an-address")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("\"default.mqtt.addr\""), "{error}");
        assert!(error.contains("invalid socket address"), "{error}");

        let error = Config::load(
            None,
            env(&[("SLUICE_STORAGE__FLUSH_INTERVAL", "soon")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("flush_interval"), "{error}");

        let error = Config::load(
            None,
            env(&[("SLUICE_INGEST__WORKERS", "0")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("ingest.workers"), "{error}");

        for (rules, expected) in [
            (
                "[[alert]]\nname = \"overheat\"\nmetric = \"temprature\"\nabove = 80.0\n",
                "alert \"overheat\": unknown metric \"temprature\"",
            ),
            (
                "[[alert]]\nname = \"overheat\"\nmetric = \"temperature\"\nabove = 80.0\nclear_below = 85.0\n",
                "alert \"overheat\": clear_below (85) must not be above",
            ),
            (
                "[[alert]]\nname = \"overheat\"\nmetric = \"temperature\"\nabove = 80.0\nfor = \"a while\"\n",
                "alert \"overheat\": for = \"a while\" is not a duration",
            ),
            (
                "[[alert]]\nname = \"x\"\nmetric = \"battery\"\nbelow = 1\nwhen = \"now\"\n",
                "unknown field: found `when`",
            ),
            (
                "[[webhook]]\nurl = \"ftp://example.com\"\n",
                "webhook \"ftp://example.com\": must be an http:// or https:// URL",
            ),
        ] {
            std::fs::write(&file, rules).unwrap();
            let error = Config::load(Some(&file), env(&[]), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{error}");
        }
        let rules = "[[alert]]\nname = \"overheat\"\nmetric = \"temperature\"\nabove = 80.0\n\n[[alert]]\nname = \"silent\"\nno_data_for = \"5m\"\n";
        std::fs::write(&file, rules).unwrap();
        let config = Config::load(Some(&file), env(&[]), &Overrides::default()).unwrap();
        let names: Vec<String> = config
            .rules()
            .unwrap()
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["overheat", "silent"]);

        let error = Config::load(
            Some(Path::new("/no/such/file.toml")),
            env(&[]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("/no/such/file.toml"), "{error}");
    }
}
