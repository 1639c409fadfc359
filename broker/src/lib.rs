//! sluice's MQTT broker: sluice's own connection layer in front of rumqttd's router.
//!
//! What is whose, and why:
//! - **sluice** accepts every socket (plain TCP, TLS, WebSocket) on its own tokio tasks,
//!   reads the CONNECT and picks the codec from its protocol level (3.1.1 and 5 on one
//!   port), answers every refusal with a CONNACK code, enforces keep alive and the
//!   limits, handles client-id takeover, wills and session expiry, and writes every
//!   PUBACK itself: once the [`Pipeline`] has taken the message, so that an
//!   acknowledgement never outruns what sluice holds, and a full pipeline stops the
//!   reading of sockets instead of dropping anything.
//! - **rumqttd's router** keeps subscriptions, retained messages and persistent
//!   sessions, and delivers to MQTT subscribers; **rumqttd's codec**
//!   (`rumqttd::protocol`) encodes and decodes packets.
//!
//! The broker knows MQTT, not telemetry: every PUBLISH goes to the [`Pipeline`] in the
//! order its connection received it; topics matching [`BrokerConfig::direct_filter`]
//! reach the router only while an MQTT subscription can see them.

mod access;
mod codec;
mod connection;
mod egress;
mod frame;
#[cfg(test)]
mod fuzz;
mod listener;
mod meters;
mod options;
mod router;
mod session;
mod throttle;
mod transport;

pub use access::{AccessConfig, AccessControl, AccessError, JwtConfig};
pub use meters::MqttMeters;
pub use options::{MqttAuthOptions, MqttLimitsOptions, MqttOptions, MqttTlsOptions, MqttWsOptions};
pub use router::{PublishError, Publisher};
pub use throttle::RateLimits;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::connection::{Limits, Shared};
use crate::listener::Tasks;
use crate::router::{Router, RouterSettings};
use crate::session::Sessions;
use crate::transport::Listener;

/// A boxed future, as the broker's hooks return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One message a client published (or a will published for it).
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: Bytes,
    pub payload: Bytes,
    /// When sluice read it, ns since the epoch (UTC).
    pub received_at_ns: i64,
    /// Its QoS: 0 is never acknowledged, so nothing waits for it to be durable.
    pub qos: u8,
    /// The client may not publish to its topic ([`Authenticator::may_publish`]): it is
    /// not routed to subscribers, and the pipeline keeps it as a refusal, not as data.
    pub denied: bool,
}

/// Why the pipeline did not take messages: none of them is acknowledged, and the
/// connection is closed (MQTT 5: DISCONNECT with a reason code first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotTaken {
    /// The pipeline is gone (the process is stopping).
    #[error("the pipeline is closed")]
    Closed,
    /// They could not be stored (the write-ahead log failed: a full disk).
    #[error("the messages could not be stored: {0}")]
    NotStored(String),
}

/// Completes once the messages of one delivery are durable, or cannot be.
pub type Durable = BoxFuture<Result<(), NotTaken>>;

/// A [`Durable`] that is done at once (a pipeline that keeps no log).
pub fn durable_now() -> Durable {
    Box::pin(std::future::ready(Ok(())))
}

/// Where every message goes.
pub trait Pipeline: Send + Sync + 'static {
    /// Hands over messages of one connection, in the order they were received. The
    /// future completes when the pipeline has taken them all: until then that connection
    /// reads nothing more (back-pressure). What it gives completes once they are durable
    /// (for a pipeline that logs them): their acknowledgements wait for it, in order,
    /// while the connection goes on reading.
    fn deliver(&self, messages: Vec<Inbound>) -> BoxFuture<Result<Durable, NotTaken>>;
}

/// What a client presented in its CONNECT.
#[derive(Debug)]
pub struct ConnectInfo<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// `mqtt`, `mqtts` or `ws`.
    pub listener: &'static str,
    pub peer: SocketAddr,
    /// The identity of the client certificate the TLS handshake verified, if any.
    pub certificate: Option<&'a str>,
}

/// The decision on a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Let in as the CONNECT says (its user name, if any, is its identity's name).
    Allow,
    /// Let in as `name` (a verified certificate's name, a JWT's client id), or
    /// anonymously (`None`: identified by the client id alone), whatever user name the
    /// CONNECT gave; until `expires` if set
    /// (the connection is closed then: MQTT 5 DISCONNECT 0x87).
    AllowAs {
        name: Option<Arc<str>>,
        expires: Option<std::time::SystemTime>,
    },
    /// CONNACK 4 (3.1.1) / 0x86 (5).
    BadCredentials,
    /// CONNACK 5 / 0x87.
    NotAuthorized,
}

/// A connected client, as its connection's later checks see it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub client_id: Arc<str>,
    /// The name the ACL knows it by (`%u`): its certificate's name, the user name its
    /// password was verified for, its client id when a JWT let it in; the CONNECT's
    /// user name when no authentication is configured; `None` for anonymous clients.
    pub username: Option<Arc<str>>,
}

/// Decides who may connect, and what a connected client may do.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> BoxFuture<AuthOutcome>;

    /// Whether the client may publish to `topic` (its will included, checked at
    /// CONNECT). A refused PUBLISH is handed to the pipeline marked
    /// [`Inbound::denied`], acknowledged (MQTT 5: PUBACK 0x87) and routed nowhere.
    fn may_publish(&self, _identity: &Identity, _topic: &str) -> bool {
        true
    }

    /// Whether the client may subscribe to `filter` (refused: SUBACK 0x80 / 0x87).
    fn may_subscribe(&self, _identity: &Identity, _filter: &str) -> bool {
        true
    }
}

/// Lets every client connect.
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(&self, _: &ConnectInfo<'_>) -> BoxFuture<AuthOutcome> {
        Box::pin(std::future::ready(AuthOutcome::Allow))
    }
}

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid broker setting: {0}")]
    Config(String),
    #[error("cannot use the TLS certificate or key: {0}")]
    Tls(String),
    #[error("cannot start the broker's threads: {0}")]
    Runtime(std::io::Error),
}

/// The TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub addr: SocketAddr,
    /// PEM: the server certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: the CAs that sign devices' certificates. A client presenting a certificate
    /// one of them signed is the identity the certificate names ([`ClientIdentity`]),
    /// with no password; one signed by another CA fails the handshake.
    pub client_ca_file: Option<PathBuf>,
    /// Without a valid client certificate the handshake fails.
    pub require_client_cert: bool,
    /// Which name of the certificate is the identity.
    pub client_identity: ClientIdentity,
}

/// The name of a client certificate that is the device's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIdentity {
    /// The subject's common name (AWS IoT's thing name, say).
    #[default]
    Cn,
    /// The first DNS name of the subject alternative names.
    SanDns,
    /// The first URI of the subject alternative names.
    SanUri,
}

/// Settings of the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 and 5 over TCP.
    pub addr: SocketAddr,
    /// MQTT over TLS.
    pub tls: Option<TlsConfig>,
    /// MQTT over WebSocket (subprotocol `mqtt`, any path).
    pub ws_addr: Option<SocketAddr>,
    /// Clients connected at once; more are refused with a CONNACK (3.1.1: 3, server
    /// unavailable; 5: 0x97, quota exceeded).
    pub max_connections: usize,
    /// Largest packet (whole packet) accepted from a client: a larger one closes the
    /// connection (MQTT 5: DISCONNECT 0x95). Told to MQTT 5 clients in the CONNACK.
    pub max_packet_bytes: usize,
    /// Time from accept to a complete CONNECT (TLS and WebSocket handshakes included).
    pub connect_timeout: Duration,
    /// Time a write to a client may take before the connection is closed.
    pub write_timeout: Duration,
    /// QoS 1 and 2 publishes an MQTT 5 client may have unacknowledged (Receive Maximum);
    /// more is a protocol error (DISCONNECT 0x93).
    pub receive_maximum: u16,
    /// Topic aliases an MQTT 5 client may set (0: none).
    pub topic_alias_maximum: u16,
    /// Keep alive an MQTT 5 client gets at most (Server Keep Alive); zero: as asked.
    pub max_keep_alive: Duration,
    /// How long a persistent session outlives its connection at most (3.1.1 persistent
    /// sessions get exactly this).
    pub max_session_expiry: Duration,
    /// Memory of the router's log for each subscribed filter: a subscriber further
    /// behind loses the oldest messages (counted).
    pub subscriber_buffer_bytes: usize,
    /// Threads serving connections.
    pub io_threads: usize,
    /// Topics that go to the pipeline only, and to the router only while an MQTT
    /// subscription (or the retained store) needs them.
    pub direct_filter: String,
    /// Topic filters refused at SUBSCRIBE (return code 0x80).
    pub deny_subscribe: Vec<String>,
    /// Messages and bytes a second each connection may send (off by default).
    pub rate_limits: RateLimits,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 1883)),
            tls: None,
            ws_addr: None,
            max_connections: 10_000,
            max_packet_bytes: 2 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            max_keep_alive: Duration::from_secs(60),
            max_session_expiry: Duration::from_secs(86_400),
            subscriber_buffer_bytes: 16 * 1024 * 1024,
            io_threads: 2,
            direct_filter: "#".into(),
            deny_subscribe: Vec::new(),
            rate_limits: RateLimits::default(),
        }
    }
}

/// Addresses the listeners are bound to (port 0 resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddrs {
    pub mqtt: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
}

/// Listeners bound, nothing accepted yet: the addresses are known (port 0 resolved), so
/// that what serves the messages can be wired to them before the first one arrives.
pub struct Bound {
    config: BrokerConfig,
    addrs: ListenAddrs,
    sockets: Vec<(Listener, tokio::net::TcpListener)>,
    runtime: tokio::runtime::Runtime,
    router: Arc<Router>,
    meters: MqttMeters,
}

impl Bound {
    pub fn addrs(&self) -> ListenAddrs {
        self.addrs
    }

    /// Publishes into the router from inside the process (sluice's alert notifications),
    /// usable before the listeners serve.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.router.clone(), self.meters.clone())
    }

    /// Starts the router and accepts connections; every message goes to `pipeline`.
    pub fn start(
        self,
        pipeline: Arc<dyn Pipeline>,
        auth: Arc<dyn Authenticator>,
    ) -> Result<Broker, BrokerError> {
        let Bound {
            config,
            addrs,
            sockets,
            runtime,
            router,
            meters,
        } = self;
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let listeners = Listener::ALL
            .into_iter()
            .map(|l| (l, meters.listener(l)))
            .collect::<HashMap<_, _>>();
        let shared = Arc::new(Shared {
            limits: Limits {
                max_connections: config.max_connections,
                max_packet: config.max_packet_bytes,
                connect_timeout: config.connect_timeout,
                write_timeout: config.write_timeout,
                receive_maximum: config.receive_maximum,
                topic_alias_max: config.topic_alias_maximum,
                max_keep_alive: config.max_keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
                max_session_expiry: config.max_session_expiry.as_secs().min(u64::from(u32::MAX))
                    as u32,
                deny_subscribe: config.deny_subscribe.clone(),
                rate: config.rate_limits,
            },
            router: router.clone(),
            sessions: Arc::new(Sessions::default()),
            pipeline,
            auth,
            meters: meters.clone(),
            listeners,
            shutdown,
            connected: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            tls,
            client_identity: config
                .tls
                .as_ref()
                .map(|t| t.client_identity)
                .unwrap_or_default(),
            // A WebSocket message carries at most one MQTT packet's worth and some.
            ws_max_message: config.max_packet_bytes + 16,
        });
        let tasks = Arc::new(Tasks::new());
        for (listener, socket) in sockets {
            runtime.spawn(listener::accept_loop(
                shared.clone(),
                tasks.clone(),
                listener,
                socket,
            ));
        }
        tracing::info!(mqtt = %addrs.mqtt, tls = ?addrs.tls, ws = ?addrs.ws, "MQTT broker ready (3.1.1 and 5)");
        Ok(Broker {
            addrs,
            meters,
            stop,
            tasks,
            runtime: Some(runtime),
            router,
        })
    }
}

/// The running broker.
pub struct Broker {
    addrs: ListenAddrs,
    meters: MqttMeters,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Arc<Tasks>,
    runtime: Option<tokio::runtime::Runtime>,
    router: Arc<Router>,
}

impl Broker {
    /// Binds the listeners (port 0 is resolved); [`Bound::start`] then serves them.
    pub fn bind(config: &BrokerConfig) -> Result<Bound, BrokerError> {
        validate(config)?;
        if let Some(tls) = &config.tls {
            // Refuse a bad certificate before anything listens.
            tls_acceptor(tls)?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.io_threads.max(1))
            .thread_name("mqtt-io")
            .enable_all()
            .build()
            .map_err(BrokerError::Runtime)?;
        let mut sockets = Vec::new();
        let entered = runtime.enter();
        let mut bind = |listener: Listener, addr: SocketAddr| -> Result<SocketAddr, BrokerError> {
            let socket =
                listener::bind(addr).map_err(|source| BrokerError::Listen { addr, source })?;
            let local = socket
                .local_addr()
                .map_err(|source| BrokerError::Listen { addr, source })?;
            sockets.push((listener, socket));
            Ok(local)
        };
        let mqtt = bind(Listener::Tcp, config.addr)?;
        let tls = config
            .tls
            .as_ref()
            .map(|t| bind(Listener::Tls, t.addr))
            .transpose()?;
        let ws = config.ws_addr.map(|a| bind(Listener::Ws, a)).transpose()?;
        drop(entered);
        let router = Router::start(RouterSettings {
            max_links: config.max_connections,
            segment_bytes: (config.subscriber_buffer_bytes / 4).max(1024),
            segments: 4,
            direct_filter: config.direct_filter.clone(),
        })
        .map_err(BrokerError::Runtime)?;
        Ok(Bound {
            config: config.clone(),
            addrs: ListenAddrs { mqtt, tls, ws },
            sockets,
            runtime,
            router: Arc::new(router),
            meters: MqttMeters::new(),
        })
    }

    /// Binds and starts at once.
    pub fn start(
        config: &BrokerConfig,
        pipeline: Arc<dyn Pipeline>,
        auth: Arc<dyn Authenticator>,
    ) -> Result<Broker, BrokerError> {
        Broker::bind(config)?.start(pipeline, auth)
    }

    pub fn addrs(&self) -> ListenAddrs {
        self.addrs
    }

    /// The broker's meters, to register.
    pub fn meters(&self) -> &MqttMeters {
        &self.meters
    }

    /// Publishes into the router from inside the process (see [`Bound::publisher`]).
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.router.clone(), self.meters.clone())
    }

    /// Stops accepting, closes every connection (MQTT 5: DISCONNECT 0x8B), and waits up
    /// to `within` for their tasks to end. Every message a client was acknowledged for
    /// is in the pipeline by then; those not acknowledged the client sends again.
    ///
    /// Blocks: call it from a thread that may block, not from async code.
    /// From then on a [`Publisher`] refuses to publish: nobody is connected to get it.
    pub fn shutdown(&mut self, within: Duration) {
        self.router.close();
        let _ = self.stop.send(true);
        let deadline = Instant::now() + within;
        while self.tasks.count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn validate(config: &BrokerConfig) -> Result<(), BrokerError> {
    if config.max_connections == 0 {
        return Err(BrokerError::Config(
            "mqtt.max_connections must be at least 1".into(),
        ));
    }
    if config.receive_maximum == 0 {
        return Err(BrokerError::Config(
            "mqtt.receive_maximum must be at least 1".into(),
        ));
    }
    if config.max_packet_bytes < 64 {
        return Err(BrokerError::Config(format!(
            "mqtt.max_packet_bytes is {}, it must be at least 64",
            config.max_packet_bytes
        )));
    }
    if config.subscriber_buffer_bytes < 4096 {
        return Err(BrokerError::Config(format!(
            "mqtt.subscriber_buffer_bytes is {}, it must be at least 4096",
            config.subscriber_buffer_bytes
        )));
    }
    for filter in &config.deny_subscribe {
        if !frame::valid_filter(filter) {
            return Err(BrokerError::Config(format!(
                "mqtt.deny_subscribe: {filter:?} is not a valid topic filter"
            )));
        }
    }
    if !frame::valid_filter(&config.direct_filter) {
        return Err(BrokerError::Config(format!(
            "the direct filter {:?} is not a valid topic filter",
            config.direct_filter
        )));
    }
    // Every connection is a file descriptor: refuse a limit the process cannot reach.
    if let Some(limit) = raise_open_files_limit() {
        let room = limit.saturating_sub(RESERVED_FILES);
        if config.max_connections as u64 > room {
            return Err(BrokerError::Config(format!(
                "mqtt.max_connections is {}, but this process may open {limit} files \
                 (ulimit -n) and keeps {RESERVED_FILES} for Parquet files and HTTP clients: \
                 lower mqtt.max_connections to {room} or raise the limit",
                config.max_connections
            )));
        }
    }
    Ok(())
}

/// File descriptors kept for everything but MQTT connections (Parquet files being written
/// and read, HTTP clients, the runtime's own).
const RESERVED_FILES: u64 = 1000;

/// Raises this process's soft open-files limit to the hard one (as servers commonly do)
/// and returns it; `None` where it cannot be read.
pub fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

fn tls_acceptor(config: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, BrokerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", config.cert_file.display())))?;
    if certs.is_empty() {
        return Err(BrokerError::Tls(format!(
            "{}: no certificate in it",
            config.cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", config.key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError::Tls(e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(file) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(file)
                .map_err(|e| BrokerError::Tls(format!("{}: {e}", file.display())))?
            {
                let ca = ca.map_err(|e| BrokerError::Tls(format!("{}: {e}", file.display())))?;
                roots
                    .add(ca)
                    .map_err(|e| BrokerError::Tls(format!("{}: {e}", file.display())))?;
            }
            if roots.is_empty() {
                return Err(BrokerError::Tls(format!(
                    "{}: no CA certificate in it",
                    file.display()
                )));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if config.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| BrokerError::Tls(format!("{}: {e}", file.display())))?,
            )
        }
    };
    let server = builder.with_single_cert(certs, key).map_err(|e| {
        BrokerError::Tls(format!(
            "{} and {}: {e}",
            config.cert_file.display(),
            config.key_file.display()
        ))
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// The identity `which` names in a (verified) client certificate, if it has one.
pub(crate) fn certificate_identity(der: &[u8], which: ClientIdentity) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    match which {
        ClientIdentity::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        ClientIdentity::SanDns | ClientIdentity::SanUri => {
            let san = cert.subject_alternative_name().ok()??;
            san.value
                .general_names
                .iter()
                .find_map(|name| match (name, which) {
                    (GeneralName::DNSName(n), ClientIdentity::SanDns) => Some((*n).to_owned()),
                    (GeneralName::URI(u), ClientIdentity::SanUri) => Some((*u).to_owned()),
                    _ => None,
                })
        }
    }
}
