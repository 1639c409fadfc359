//! The server's settings: one serde tree with documented defaults, layered
//! defaults < TOML file (`--config`) < `SLUICE_*` environment < command-line flags.
//! An unknown or invalid setting fails at start with a message naming it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Every setting of `sluice serve`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    /// Where Parquet files are written (`<data_dir>/telemetry/date=…/hour=…/*.parquet`).
    pub data_dir: PathBuf,
    pub mqtt: sluice_broker::MqttOptions,
    pub http: HttpConfig,
    pub pg: PgConfig,
    pub ingest: sluice_ingest::IngestOptions,
    pub storage: sluice_storage::StorageOptions,
    /// The write-ahead log every message goes through before its PUBACK.
    pub wal: sluice_storage::WalOptions,
    /// What one query of the SQL endpoints may take.
    pub query: sluice_storage::QueryOptions,
    pub windows: sluice_aggregator::WindowsOptions,
    /// `[[alert]]` rules (README: "Alerts"); reloaded on SIGHUP and `POST /reload`.
    #[serde(rename = "alert", skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<sluice_aggregator::RuleSpec>,
    /// `[[webhook]]` endpoints every alert transition is posted to; reloaded too.
    #[serde(rename = "webhook", skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<sluice_notify::WebhookSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct HttpConfig {
    /// HTTP address for `/ready`, `/metrics`, `/query`, `/flush` and `/reload`.
    pub addr: SocketAddr,
    /// When set, `/query`, `/flush` and `/reload` need `Authorization: Bearer TOKEN`
    /// (`SLUICE_TOKEN` sets it too, the variable `sluice sql --server` reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file whose first line is the token (instead of `token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// `/metrics` needs the token too (Prometheus: `authorization: {credentials: …}`).
    /// `/ready` never does.
    pub protect_metrics: bool,
}

impl HttpConfig {
    /// The token, from `token` or `token_file`; an error if both are set, the file
    /// cannot be read, or the token is empty.
    pub(crate) fn token(&self) -> anyhow::Result<Option<String>> {
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                anyhow::bail!("invalid configuration: set http.token or http.token_file, not both")
            }
            (Some(token), None) => token.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "invalid configuration: http.token_file {}: {e}",
                        file.display()
                    )
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
            (None, None) => {
                if self.protect_metrics {
                    anyhow::bail!(
                        "invalid configuration: http.protect_metrics needs http.token or http.token_file"
                    );
                }
                return Ok(None);
            }
        };
        if token.trim().is_empty() {
            anyhow::bail!("invalid configuration: the HTTP token is empty");
        }
        Ok(Some(token))
    }
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
    /// How the password is checked: `scram-sha-256` (the password never crosses the
    /// wire; PostgreSQL's default since 14) or `cleartext` (for old clients).
    pub password_auth: PgPasswordAuth,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub(crate) enum PgPasswordAuth {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "cleartext")]
    Cleartext,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 5433)),
            password: None,
            password_auth: PgPasswordAuth::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("sluice-data"),
            mqtt: Default::default(),
            http: HttpConfig::default(),
            pg: PgConfig::default(),
            ingest: Default::default(),
            storage: Default::default(),
            wal: Default::default(),
            query: Default::default(),
            windows: Default::default(),
            alerts: Vec::new(),
            webhooks: Vec::new(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            token_file: None,
            protect_metrics: false,
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
                // What `sluice sql --server` sends, the server expects.
                "SLUICE_TOKEN" => "http.token".to_owned(),
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
        let sections = [
            ("mqtt", self.mqtt.validate()),
            ("ingest", self.ingest.validate()),
            ("storage", self.storage.validate()),
            ("wal", self.wal.validate()),
            ("query", self.query.validate()),
        ];
        for (section, checked) in sections {
            checked.map_err(|e| anyhow::anyhow!("invalid configuration: {section}.{e}"))?;
        }
        if self.mqtt.max_packet_bytes < self.ingest.max_message_bytes {
            anyhow::bail!(
                "invalid configuration: mqtt.max_packet_bytes ({}) must be at least ingest.max_message_bytes ({}), or oversized messages disconnect their device instead of landing in rejects",
                self.mqtt.max_packet_bytes,
                self.ingest.max_message_bytes
            );
        }
        self.aggregator()?;
        self.webhooks()?;
        self.http.token()?;
        Ok(())
    }

    /// `[mqtt.auth]`'s access control (its files read), or `None` when it sets nothing.
    /// Without an ACL file, a device may publish and subscribe under
    /// `devices/{its user name}/` only; no client may publish to sluice's alerts.
    pub(crate) fn access(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<sluice_broker::AccessControl>>> {
        let config = self.mqtt.access_config(
            "devices/{identity}/#",
            &[sluice_notify::ALERTS_TOPIC_FILTER],
        );
        if !config.is_on() {
            return Ok(None);
        }
        let access = sluice_broker::AccessControl::load(config)
            .map_err(|e| anyhow::anyhow!("invalid configuration: mqtt.auth: {e}"))?;
        Ok(Some(std::sync::Arc::new(access)))
    }

    /// The broker's settings; `direct_filter` is the telemetry topic filter.
    pub(crate) fn broker(&self, direct_filter: &str) -> sluice_broker::BrokerConfig {
        self.mqtt.broker_config(direct_filter)
    }

    pub(crate) fn pipeline(&self) -> sluice_ingest::PipelineConfig {
        self.ingest.pipeline_config()
    }

    /// The aggregator's settings; fails on invalid windows or an invalid `[[alert]]`.
    pub(crate) fn aggregator(&self) -> anyhow::Result<sluice_aggregator::AggregatorConfig> {
        Ok(sluice_aggregator::AggregatorConfig {
            windows: self
                .windows
                .window_config()
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?,
            rules: self.rules()?,
            state: Some(std::sync::Arc::new(crate::durable::StateFiles::legacy(
                &self.data_dir,
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
    pub(crate) fn webhooks(&self) -> anyhow::Result<Vec<sluice_notify::Webhook>> {
        sluice_notify::compile_webhooks(&self.webhooks)
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    pub(crate) fn storage(&self) -> sluice_storage::StorageConfig {
        let mut storage = self.storage.storage_config(&self.data_dir);
        storage.query = self.query.limits();
        storage
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
            sluice_broker::MqttOptions::default().max_connections
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
                "invalid value string \"a while\", expected a duration for key \"default.alert.0.for\"",
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

    #[test]
    fn the_http_token_comes_from_one_place_and_is_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\nsecond line\n").unwrap();
        let load = |toml: &str, vars: &[(&str, &str)]| {
            let config = dir.path().join("sluice.toml");
            std::fs::write(&config, toml).unwrap();
            Config::load(Some(&config), env(vars), &Overrides::default())
                .and_then(|c| c.http.token())
        };
        let file_toml = format!("[http]\ntoken_file = {:?}\n", file.to_str().unwrap());
        assert_eq!(load(&file_toml, &[]).unwrap().as_deref(), Some("from-file"));
        assert_eq!(
            load("", &[("SLUICE_TOKEN", "from-env")])
                .unwrap()
                .as_deref(),
            Some("from-env"),
            "the variable sluice sql reads"
        );
        assert_eq!(load("", &[]).unwrap(), None);
        for (toml, vars, want) in [
            (file_toml.as_str(), &[("SLUICE_TOKEN", "x")][..], "not both"),
            (
                "[http]\ntoken = \" \"\n",
                &[][..],
                "the HTTP token is empty",
            ),
            (
                "[http]\ntoken_file = \"/no/such/token\"\n",
                &[][..],
                "/no/such/token",
            ),
            (
                "[http]\nprotect_metrics = true\n",
                &[][..],
                "needs http.token",
            ),
        ] {
            let error = load(toml, vars).unwrap_err().to_string();
            assert!(error.contains(want), "{toml}: {error}");
        }
    }
}
