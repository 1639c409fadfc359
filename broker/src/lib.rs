//! The embedded MQTT broker: rumqttd's router and listeners (MQTT 3.1.1 and 5) started
//! from typed config, and one in-process subscription that drains them.
//!
//! `broker` knows MQTT, not telemetry: it hands every publish matching its filter to the
//! caller as a [`Delivery`]. Two things rumqttd does not do are added here:
//! - **Loss detection.** rumqttd drops the oldest log segment under a slow reader and
//!   moves the reader's cursor on, silently. Each forward carries the log offset, which
//!   rises by one per message, so [`Subscription`] counts every skipped message.
//! - **Draining.** After the listeners stop, [`Drain`] publishes a marker through the same
//!   log; when the subscription reads it, everything the broker acknowledged before has
//!   been delivered.
//! - **Meters.** Connections, messages by QoS and bytes per listener, counted in the codec
//!   (see [`MqttMeters`]).

mod meters;
mod probe;

pub use meters::MqttMeters;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{IntCounter, Registry};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, SegmentConfig, Server,
    ServerSettings,
};

/// Errors starting or draining the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the MQTT listener on {addr} did not accept a connection within {waited:?}: {detail}")]
    NotReady {
        addr: SocketAddr,
        waited: Duration,
        detail: String,
    },
    #[error("invalid broker setting: {0}")]
    Config(String),
    #[error("the broker's router stopped: {0}")]
    Router(String),
    #[error("cannot start the broker's threads: {0}")]
    Runtime(std::io::Error),
}

/// Settings of the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 listener.
    pub mqtt_addr: SocketAddr,
    /// MQTT 5 listener, if any.
    pub mqtt5_addr: Option<SocketAddr>,
    /// Connections accepted at once; further ones are closed without CONNACK.
    pub max_connections: usize,
    /// Largest MQTT packet accepted; a client sending a larger one is disconnected.
    pub max_packet_bytes: usize,
    /// Memory for messages waiting to be read by the subscription. A subscriber that falls
    /// further behind than this loses the oldest messages (counted as skipped).
    pub buffer_bytes: usize,
    /// Size of one segment of that buffer; memory is reclaimed a segment at a time.
    pub segment_bytes: usize,
    /// Threads serving MQTT connections.
    pub io_threads: usize,
    /// Time a client has to send CONNECT after connecting.
    pub connect_timeout: Duration,
    /// Packets read from one connection per network batch.
    pub max_inflight: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 1883)),
            mqtt5_addr: Some(SocketAddr::from(([127, 0, 0, 1], 1884))),
            max_connections: 10_000,
            max_packet_bytes: 2 * 1024 * 1024,
            buffer_bytes: 128 * 1024 * 1024,
            segment_bytes: 16 * 1024 * 1024,
            io_threads: 2,
            connect_timeout: Duration::from_secs(10),
            max_inflight: 100,
        }
    }
}

/// Addresses the listeners are bound to (port 0 resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddrs {
    pub mqtt: SocketAddr,
    pub mqtt5: Option<SocketAddr>,
}

/// One message taken from the broker.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: Bytes,
    pub payload: Bytes,
}

/// What [`Subscription::recv`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Zero or more deliveries were appended; keep reading.
    Open,
    /// The drain marker was read: every message acknowledged before [`Drain::start`]
    /// has been delivered.
    Drained,
}

/// The running broker. Dropping it stops the listeners (the router thread lives on
/// until the process exits, as rumqttd has no way to stop it).
pub struct Broker {
    addrs: ListenAddrs,
    meters: MqttMeters,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Broker {
    /// Starts the router, subscribes one in-process link to `filter`, then starts the
    /// listeners and waits until each accepts an MQTT connection. Returns once the broker
    /// is ready: no message can arrive before the subscription exists.
    pub fn start(
        config: &BrokerConfig,
        filter: &str,
    ) -> Result<(Broker, Subscription, Drain), BrokerError> {
        validate(config)?;
        let segment_count = (config.buffer_bytes / config.segment_bytes).max(1);
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: config.max_connections + 2,
                max_outgoing_packet_count: 200,
                // Other subscribers' filters (e.g. a user's mosquitto_sub) get a small log.
                max_segment_size: 1024 * 1024,
                max_segment_count: 4,
                custom_segment: Some(HashMap::from([(
                    filter.to_owned(),
                    SegmentConfig {
                        max_segment_size: config.segment_bytes,
                        max_segment_count: segment_count,
                    },
                )])),
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        );
        let router_tx = router.spawn();

        let (mut link_tx, link_rx, _ack) =
            LinkBuilder::new("sluice-ingest", router_tx.clone()).build()?;
        link_tx.subscribe(filter)?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.io_threads.max(1))
            .thread_name("mqtt-io")
            .enable_all()
            .build()
            .map_err(BrokerError::Runtime)?;

        let connections = ConnectionSettings {
            connection_timeout_ms: config.connect_timeout.as_millis().min(u16::MAX as u128) as u16,
            max_payload_size: config.max_packet_bytes,
            max_inflight_count: config.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        };
        let meters = MqttMeters::new();
        let mqtt = resolve_port(config.mqtt_addr)?;
        let mqtt5 = config.mqtt5_addr.map(resolve_port).transpose()?;
        // A macro rather than a function: rumqttd does not export the router channel's
        // item type, so it can only be passed where it is inferred.
        macro_rules! spawn_listener {
            ($name:expr, $addr:expr, $protocol:expr) => {{
                let (failed_tx, failed_rx) = std::sync::mpsc::channel::<String>();
                let protocol = meters::Metered::new($protocol, meters.listener($name));
                let mut server = Server::new(settings($name, $addr, &connections), router_tx.clone(), protocol);
                runtime.spawn(async move {
                    let message = match server.start(LinkType::Remote).await {
                        Ok(()) => "the listener stopped".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    tracing::error!(error = %message, "MQTT listener stopped");
                    let _ = failed_tx.send(message);
                });
                failed_rx
            }};
        }
        let mut listeners = vec![(mqtt, 4u8, spawn_listener!("mqtt", mqtt, V4))];
        if let Some(addr) = mqtt5 {
            listeners.push((addr, 5, spawn_listener!("mqtt5", addr, V5)));
        }
        for (addr, version, failed) in &listeners {
            let waited = Duration::from_secs(10);
            probe::wait_until_accepting(*addr, *version, waited, || failed.try_recv().ok())
                .map_err(|detail| BrokerError::NotReady {
                    addr: *addr,
                    waited,
                    detail,
                })?;
            // With a port resolved from 0, another process could have bound it first and
            // answered the probe: our listener then fails to bind, at once. Give it a
            // moment to say so.
            if let Ok(detail) = failed.recv_timeout(Duration::from_millis(50)) {
                return Err(BrokerError::NotReady {
                    addr: *addr,
                    waited,
                    detail,
                });
            }
        }
        tracing::info!(%mqtt, mqtt5 = ?mqtt5, "MQTT broker ready");

        let marker = marker_topic(filter);
        Ok((
            Broker {
                addrs: ListenAddrs { mqtt, mqtt5 },
                meters,
                runtime: Some(runtime),
            },
            Subscription {
                rx: link_rx,
                last_offset: None,
                counters: SubscriptionCounters::new(),
                marker: marker.clone(),
                resumed: false,
            },
            Drain {
                tx: link_tx,
                marker,
            },
        ))
    }

    pub fn addrs(&self) -> ListenAddrs {
        self.addrs
    }

    /// The listeners' meters (connections, messages by QoS, bytes), to register.
    pub fn meters(&self) -> &MqttMeters {
        &self.meters
    }

    /// Closes every client connection and stops accepting new ones. Messages already
    /// acknowledged stay in the log for the subscription to read.
    ///
    /// Blocks for up to two seconds: call it from a thread that may block, not from
    /// inside an async task.
    pub fn stop_listeners(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl From<LinkError> for BrokerError {
    fn from(e: LinkError) -> Self {
        // LinkError can carry a whole router event; the message is what a caller uses.
        BrokerError::Router(e.to_string())
    }
}

fn validate(config: &BrokerConfig) -> Result<(), BrokerError> {
    if config.segment_bytes < 1024 {
        return Err(BrokerError::Config(format!(
            "mqtt.segment_bytes is {}, it must be at least 1024",
            config.segment_bytes
        )));
    }
    if config.buffer_bytes < config.segment_bytes {
        return Err(BrokerError::Config(format!(
            "mqtt.buffer_bytes ({}) must be at least mqtt.segment_bytes ({})",
            config.buffer_bytes, config.segment_bytes
        )));
    }
    if config.max_connections == 0 {
        return Err(BrokerError::Config(
            "mqtt.max_connections must be at least 1".into(),
        ));
    }
    // Every connection is a file descriptor. Past the process's limit accept() fails, and
    // rumqttd retries it at once, forever: refuse such a setting instead.
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

fn settings(name: &str, listen: SocketAddr, connections: &ConnectionSettings) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    }
}

/// rumqttd binds its listeners itself and does not report the port it got, so port 0 is
/// resolved here: bind, read the port, release it for rumqttd. Another process could take
/// the port in between; the readiness probe would then fail rather than pass silently
/// only if that process does not speak MQTT, so this is for tests and local use.
fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map_err(|source| BrokerError::Listen { addr, source })
}

/// A topic matching `filter` that no device can be expected to use.
fn marker_topic(filter: &str) -> Bytes {
    let nonce = format!(
        "sluice-drain-{:016x}{:08x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64,
        std::process::id()
    );
    let topic: Vec<&str> = filter
        .split('/')
        .map(|level| match level {
            "+" | "#" => nonce.as_str(),
            other => other,
        })
        .collect();
    Bytes::from(topic.join("/"))
}

/// Sends the drain marker.
pub struct Drain {
    tx: LinkTx,
    marker: Bytes,
}

impl Drain {
    /// Publishes the marker behind every message the router has taken so far. Call it
    /// after [`Broker::stop_listeners`], then read the [`Subscription`] until
    /// [`Received::Drained`].
    pub fn start(mut self) -> Result<(), BrokerError> {
        self.tx.publish(self.marker.clone(), Bytes::new())?;
        Ok(())
    }
}

/// The in-process subscription: the only consumer of telemetry.
pub struct Subscription {
    rx: LinkRx,
    last_offset: Option<u64>,
    counters: SubscriptionCounters,
    marker: Bytes,
    /// The last read found the link paused by the router (its buffer was full) and
    /// resumed it: more is waiting right now.
    resumed: bool,
}

/// Counters of a subscription (Prometheus counters, readable from any thread).
#[derive(Clone)]
pub struct SubscriptionCounters {
    skipped: IntCounter,
    delivered: IntCounter,
    bytes: IntCounter,
}

impl SubscriptionCounters {
    fn new() -> Self {
        SubscriptionCounters {
            skipped: IntCounter::new(
                "sluice_broker_skipped_messages_total",
                "Messages the broker dropped before sluice read them (ingestion fell behind by more than mqtt.buffer_bytes)",
            )
            .expect("valid metric"),
            delivered: IntCounter::new(
                "sluice_broker_messages_total",
                "Messages read from the broker",
            )
            .expect("valid metric"),
            bytes: IntCounter::new(
                "sluice_broker_bytes_total",
                "Bytes (topic and payload) of the messages read from the broker",
            )
            .expect("valid metric"),
        }
    }

    /// Exports the counters through `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.skipped.clone()))?;
        registry.register(Box::new(self.bytes.clone()))?;
        registry.register(Box::new(self.delivered.clone()))
    }

    /// Messages the broker dropped before this subscription read them.
    pub fn skipped(&self) -> u64 {
        self.skipped.get()
    }

    /// Messages delivered to the caller.
    pub fn delivered(&self) -> u64 {
        self.delivered.get()
    }
}

impl Subscription {
    pub fn counters(&self) -> SubscriptionCounters {
        self.counters.clone()
    }

    /// Appends up to `max` more deliveries to `out`, waiting until `deadline` for the
    /// first one and not at all for the rest.
    pub fn recv(
        &mut self,
        out: &mut Vec<Delivery>,
        max: usize,
        deadline: Instant,
    ) -> Result<Received, BrokerError> {
        let mut first = true;
        let limit = out.len() + max;
        while out.len() < limit {
            let notification = if first {
                first = false;
                match self.rx.recv_deadline(deadline) {
                    Ok(n) => n,
                    Err(LinkError::RecvTimeout(_)) => return Ok(Received::Open),
                    Err(e) => return Err(e.into()),
                }
            } else {
                // Only what is already buffered: never wait once something was read.
                match self.rx.recv_deadline(Instant::now()) {
                    Ok(n) => n,
                    Err(LinkError::RecvTimeout(_)) => return Ok(Received::Open),
                    Err(e) => return Err(e.into()),
                }
            };
            match notification {
                Some(Notification::Forward(forward)) => {
                    if let Some((_, offset)) = forward.cursor {
                        self.track(offset);
                    }
                    if forward.publish.topic == self.marker {
                        return Ok(Received::Drained);
                    }
                    self.counters.delivered.inc();
                    self.counters.bytes.inc_by(
                        (forward.publish.topic.len() + forward.publish.payload.len()) as u64,
                    );
                    out.push(Delivery {
                        topic: forward.publish.topic,
                        payload: forward.publish.payload,
                    });
                }
                // The router paused this link because its buffer filled: ask for more.
                Some(Notification::Unschedule) => {
                    self.rx.ready()?;
                    self.resumed = true;
                }
                Some(_) | None => {}
            }
        }
        Ok(Received::Open)
    }

    /// Like [`recv`](Self::recv), then keeps collecting for `linger` after the first
    /// delivery (or until `max`). It sleeps meanwhile instead of waking for each of the
    /// router's hand-offs, and the router buffers for it (up to 200 messages, then the
    /// link is paused and resumed here without sleeping). At tens of thousands of messages
    /// a second this turns thousands of thread wake-ups into a few hundred.
    pub fn recv_batch(
        &mut self,
        out: &mut Vec<Delivery>,
        max: usize,
        deadline: Instant,
        linger: Duration,
    ) -> Result<Received, BrokerError> {
        let limit = out.len() + max;
        let before = out.len();
        self.resumed = false;
        match self.recv(out, max, deadline)? {
            Received::Drained => return Ok(Received::Drained),
            Received::Open if out.len() == before => return Ok(Received::Open),
            Received::Open => {}
        }
        let until = Instant::now() + linger;
        while out.len() < limit {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let wait = if std::mem::take(&mut self.resumed) {
                until
            } else {
                std::thread::sleep(until - now);
                Instant::now()
            };
            if self.recv(out, limit - out.len(), wait)? == Received::Drained {
                return Ok(Received::Drained);
            }
        }
        Ok(Received::Open)
    }

    fn track(&mut self, offset: u64) {
        if let Some(last) = self.last_offset
            && offset > last + 1
        {
            let lost = offset - last - 1;
            self.counters.skipped.inc_by(lost);
            tracing::error!(
                lost,
                "the broker dropped messages before sluice could read them (ingestion fell behind by more than mqtt.buffer_bytes)"
            );
        }
        self.last_offset = Some(offset);
    }
}
