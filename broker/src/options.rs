//! `[mqtt]`: the broker's settings as users write them (TOML, `SLUICE_MQTT__*`), owned
//! here beside the defaults they document; the binary composes them into its
//! configuration and turns them into a [`BrokerConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{AccessConfig, BrokerConfig, ClientIdentity, JwtConfig, RateLimits, TlsConfig};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttOptions {
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
    pub tls: Option<MqttTlsOptions>,
    /// MQTT over WebSocket (subprotocol `mqtt`), for browser clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws: Option<MqttWsOptions>,
    /// Who may connect, publish and subscribe.
    pub auth: MqttAuthOptions,
    /// How fast one connection may send.
    pub limits: MqttLimitsOptions,
}

/// `[mqtt.limits]`: per connection, as token buckets. A connection over its rate is
/// slowed by not reading its socket; an MQTT 5 client that stays over it for
/// `disconnect_after` is disconnected with 0x96 (message rate too high).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttLimitsOptions {
    /// PUBLISH packets a second (0: no limit).
    pub messages_per_second: u64,
    /// Bytes a second, every packet counted (0: no limit).
    pub bytes_per_second: u64,
    /// A burst of this long at the rate may be sent at once.
    #[serde(with = "humantime_serde")]
    pub burst: Duration,
    /// "0s": never disconnect, only slow down.
    #[serde(with = "humantime_serde")]
    pub disconnect_after: Duration,
}

impl Default for MqttLimitsOptions {
    fn default() -> Self {
        MqttLimitsOptions {
            messages_per_second: 0,
            bytes_per_second: 0,
            burst: Duration::from_secs(1),
            disconnect_after: Duration::from_secs(10),
        }
    }
}

/// `[mqtt.auth]`: Mosquitto's files. With none of them every client may connect and do
/// anything (keep the listeners on 127.0.0.1 then).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttAuthOptions {
    /// A password file made by `mosquitto_passwd`: clients must give a user name and
    /// its password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// `[mqtt.auth.jwt]`: the password is a JWT signed by this key, naming the client id
    /// in its `sub` (or `claim`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// An ACL file in Mosquitto's format. Without one (and with a password file), a
    /// client may publish and subscribe only under its own device's topics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl_file: Option<PathBuf>,
    /// Lets clients without credentials connect while authentication is on.
    pub allow_anonymous: bool,
}

/// `[mqtt.tls]`: present, it turns the TLS listener on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsOptions {
    #[serde(default = "MqttTlsOptions::default_addr")]
    pub addr: SocketAddr,
    /// PEM: the server certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: its private key.
    pub key_file: PathBuf,
    /// PEM: the CAs that sign devices' certificates. A client presenting one they
    /// signed is the identity it names (`client_identity`), with no password; one
    /// signed by another CA fails the handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a valid certificate (at the TLS handshake).
    #[serde(default)]
    pub require_client_cert: bool,
    /// `cn` (the subject's common name), `san_dns` or `san_uri`.
    #[serde(default)]
    pub client_identity: ClientIdentity,
}

impl MqttTlsOptions {
    fn default_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8883))
    }
}

/// `[mqtt.ws]`: present, it turns the WebSocket listener on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttWsOptions {
    #[serde(default = "MqttWsOptions::default_addr")]
    pub addr: SocketAddr,
}

impl MqttWsOptions {
    fn default_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8083))
    }
}

impl Default for MqttOptions {
    fn default() -> Self {
        let broker = BrokerConfig::default();
        MqttOptions {
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
            auth: MqttAuthOptions::default(),
            limits: MqttLimitsOptions::default(),
        }
    }
}

impl MqttOptions {
    /// The first setting that is out of range, as `key: why` (the key relative to
    /// `[mqtt]`).
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("io_threads", self.io_threads),
            ("receive_maximum", usize::from(self.receive_maximum)),
        ] {
            if value == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if let Some(tls) = &self.tls
            && tls.require_client_cert
            && tls.client_ca_file.is_none()
        {
            return Err("tls.require_client_cert needs tls.client_ca_file".into());
        }
        let limited = self.limits.messages_per_second > 0 || self.limits.bytes_per_second > 0;
        if limited && self.limits.burst.is_zero() {
            return Err("limits.burst must be more than 0s".into());
        }
        Ok(())
    }

    /// The access control of [`MqttAuthOptions`]; `own_topics` the default policy's filter
    /// (`{identity}` for the client's), `reserved` the filters no client may publish to.
    pub fn access_config(&self, own_topics: &str, reserved: &[&str]) -> AccessConfig {
        AccessConfig {
            password_file: self.auth.password_file.clone(),
            jwt: self.auth.jwt.clone(),
            acl_file: self.auth.acl_file.clone(),
            allow_anonymous: self.auth.allow_anonymous,
            certificates: self
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca_file.is_some()),
            own_topics: own_topics.to_owned(),
            reserved: reserved.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    /// The broker's settings; `direct_filter`: the topics that go to the pipeline only
    /// (see [`BrokerConfig::direct_filter`]).
    pub fn broker_config(&self, direct_filter: &str) -> BrokerConfig {
        BrokerConfig {
            addr: self.addr,
            tls: self.tls.as_ref().map(|t| TlsConfig {
                addr: t.addr,
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
                client_ca_file: t.client_ca_file.clone(),
                require_client_cert: t.require_client_cert,
                client_identity: t.client_identity,
            }),
            ws_addr: self.ws.as_ref().map(|w| w.addr),
            max_connections: self.max_connections,
            max_packet_bytes: self.max_packet_bytes,
            connect_timeout: self.connect_timeout,
            write_timeout: self.write_timeout,
            receive_maximum: self.receive_maximum,
            topic_alias_maximum: self.topic_alias_maximum,
            max_keep_alive: self.max_keep_alive,
            max_session_expiry: self.max_session_expiry,
            subscriber_buffer_bytes: self.subscriber_buffer_bytes,
            io_threads: self.io_threads,
            direct_filter: direct_filter.to_owned(),
            deny_subscribe: self.deny_subscribe.clone(),
            rate_limits: RateLimits {
                messages_per_second: self.limits.messages_per_second,
                bytes_per_second: self.limits.bytes_per_second,
                burst: self.limits.burst,
                disconnect_after: self.limits.disconnect_after,
            },
        }
    }
}
