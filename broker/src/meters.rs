//! The broker's metrics, counted where things happen in sluice's connection layer.
//!
//! Accounting of PUBLISH packets (every one read is exactly one of these):
//! `sluice_mqtt_messages_received_total` =
//! Σ `sluice_mqtt_pipeline_messages_total{source="publish"}` +
//! Σ `sluice_mqtt_refused_messages_total`. Wills add `source="will"` messages to the
//! pipeline. Copies for MQTT subscribers (`sluice_mqtt_routed_messages_total`) are on top
//! of that, never instead of it.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::transport::Listener;

/// Why a connection attempt was refused (the `reason` label), or `ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    Ok,
    /// No CONNECT within `mqtt.connect_timeout` (TLS and WebSocket handshakes included).
    Timeout,
    /// Closed, or not MQTT, before a CONNECT was read.
    Closed,
    /// MQTT 3.1 or a level sluice does not speak.
    ProtocolVersion,
    /// The CONNECT could not be decoded or broke a rule of the specification.
    Malformed,
    ClientId,
    BadCredentials,
    NotAuthorized,
    /// `mqtt.max_connections` reached.
    ServerFull,
    /// The process is stopping.
    Unavailable,
}

impl Attempt {
    const ALL: [Attempt; 10] = [
        Attempt::Ok,
        Attempt::Timeout,
        Attempt::Closed,
        Attempt::ProtocolVersion,
        Attempt::Malformed,
        Attempt::ClientId,
        Attempt::BadCredentials,
        Attempt::NotAuthorized,
        Attempt::ServerFull,
        Attempt::Unavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            Attempt::Ok => "ok",
            Attempt::Timeout => "timeout",
            Attempt::Closed => "closed",
            Attempt::ProtocolVersion => "protocol_version",
            Attempt::Malformed => "malformed",
            Attempt::ClientId => "client_id",
            Attempt::BadCredentials => "bad_credentials",
            Attempt::NotAuthorized => "not_authorized",
            Attempt::ServerFull => "server_full",
            Attempt::Unavailable => "unavailable",
        }
    }
}

/// Why a connection ended (the `reason` label of `sluice_mqtt_disconnects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// The client sent DISCONNECT.
    Client,
    /// The socket closed or failed without a DISCONNECT.
    Network,
    /// Nothing read for 1.5 × keep alive.
    KeepAlive,
    /// Another connection took the client id over.
    TakenOver,
    /// A malformed packet or a protocol error.
    Protocol,
    /// A packet larger than `mqtt.max_packet_bytes`.
    TooLarge,
    /// More unacknowledged QoS 1/2 publishes than the Receive Maximum.
    ReceiveMaximum,
    /// Writing to the client took longer than `mqtt.write_timeout`.
    WriteTimeout,
    /// sluice is stopping.
    Shutdown,
    /// The pipeline or the router is gone.
    Internal,
    /// What the client sent could not be stored (a full disk).
    NotStored,
    /// An MQTT 5 client stayed over `[mqtt.limits]` (DISCONNECT 0x96).
    RateTooHigh,
    /// The credentials it connected with expired (a JWT's `exp`; MQTT 5: DISCONNECT 0x87).
    CredentialsExpired,
}

impl Close {
    const ALL: [Close; 13] = [
        Close::Client,
        Close::Network,
        Close::KeepAlive,
        Close::TakenOver,
        Close::Protocol,
        Close::TooLarge,
        Close::ReceiveMaximum,
        Close::WriteTimeout,
        Close::Shutdown,
        Close::Internal,
        Close::NotStored,
        Close::RateTooHigh,
        Close::CredentialsExpired,
    ];

    fn label(self) -> &'static str {
        match self {
            Close::Client => "client",
            Close::Network => "network",
            Close::KeepAlive => "keep_alive",
            Close::TakenOver => "taken_over",
            Close::Protocol => "protocol_error",
            Close::TooLarge => "too_large",
            Close::ReceiveMaximum => "receive_maximum",
            Close::WriteTimeout => "write_timeout",
            Close::Shutdown => "shutdown",
            Close::Internal => "internal",
            Close::NotStored => "not_stored",
            Close::RateTooHigh => "rate_too_high",
            Close::CredentialsExpired => "credentials_expired",
        }
    }
}

/// Why a PUBLISH read from a client was not handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A QoS 2 publish sent again before its PUBREL: acknowledged, not delivered twice.
    Qos2Duplicate,
    /// Its topic (or topic alias) broke the rules; the connection was closed.
    Topic,
    /// Over the Receive Maximum; the connection was closed.
    ReceiveMaximum,
    /// Read but not handed on because the connection closed first (not acknowledged).
    Closed,
    /// Handed on but not stored (a full disk); the connection was closed, nothing
    /// acknowledged.
    NotStored,
}

impl Refused {
    const ALL: [Refused; 5] = [
        Refused::Qos2Duplicate,
        Refused::Topic,
        Refused::ReceiveMaximum,
        Refused::Closed,
        Refused::NotStored,
    ];

    fn label(self) -> &'static str {
        match self {
            Refused::Qos2Duplicate => "qos2_duplicate",
            Refused::Topic => "invalid_topic",
            Refused::ReceiveMaximum => "receive_maximum",
            Refused::Closed => "connection_closed",
            Refused::NotStored => "not_stored",
        }
    }
}

/// Why a message for a subscriber was not sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// Larger than the Maximum Packet Size the client asked for [MQTT-3.1.2-25].
    TooLarge,
    /// Another of the client's subscriptions delivered the same message.
    Overlap,
    /// The client's own message on a No Local subscription [MQTT-3.8.3-3].
    NoLocal,
    /// A retained message on a subscription with Retain Handling 2 [MQTT-3.3.1-11].
    RetainHandling,
}

impl Dropped {
    const ALL: [Dropped; 4] = [
        Dropped::TooLarge,
        Dropped::Overlap,
        Dropped::NoLocal,
        Dropped::RetainHandling,
    ];

    fn label(self) -> &'static str {
        match self {
            Dropped::TooLarge => "too_large",
            Dropped::Overlap => "overlapping_subscription",
            Dropped::NoLocal => "no_local",
            Dropped::RetainHandling => "retain_handling",
        }
    }
}

/// The broker's meters (Prometheus metrics, readable from any thread).
#[derive(Clone)]
pub struct MqttMeters {
    connected: IntGaugeVec,
    attempts: IntCounterVec,
    messages: IntCounterVec,
    bytes_in: IntCounterVec,
    bytes_out: IntCounterVec,
    disconnects: IntCounterVec,
    refused: IntCounterVec,
    pipeline: IntCounterVec,
    pub(crate) routed: IntCounter,
    pub(crate) forwarded: IntCounter,
    dropped: IntCounterVec,
    pub(crate) skipped: IntCounter,
    /// Times a connection's reading was paused by `[mqtt.limits]`.
    pub(crate) throttled: IntCounter,
    denied: IntCounterVec,
    pub(crate) router_links: IntGauge,
    pub(crate) sessions_stored: IntGauge,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl MqttMeters {
    pub(crate) fn new() -> MqttMeters {
        let meters = MqttMeters {
            connected: IntGaugeVec::new(
                Opts::new(
                    "sluice_mqtt_connections",
                    "MQTT clients connected now (CONNACK sent, connection not closed yet), by listener",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            attempts: counter_vec(
                "sluice_mqtt_connection_attempts_total",
                "Sockets accepted, by listener, outcome (accepted: CONNACK 0; refused) and reason",
                &["listener", "outcome", "reason"],
            ),
            messages: counter_vec(
                "sluice_mqtt_messages_received_total",
                "PUBLISH packets read from MQTT clients, by listener and QoS",
                &["listener", "qos"],
            ),
            bytes_in: counter_vec(
                "sluice_mqtt_received_bytes_total",
                "Bytes read from MQTT clients (whole packets of every type), by listener",
                &["listener"],
            ),
            bytes_out: counter_vec(
                "sluice_mqtt_sent_bytes_total",
                "Bytes written to MQTT clients, by listener",
                &["listener"],
            ),
            disconnects: counter_vec(
                "sluice_mqtt_disconnects_total",
                "MQTT connections ended after their CONNACK, by reason",
                &["reason"],
            ),
            refused: counter_vec(
                "sluice_mqtt_refused_messages_total",
                "PUBLISH packets read but not handed to the pipeline, by reason",
                &["reason"],
            ),
            pipeline: counter_vec(
                "sluice_mqtt_pipeline_messages_total",
                "Messages handed to the ingest pipeline: client publishes and wills",
                &["source"],
            ),
            routed: IntCounter::new(
                "sluice_mqtt_routed_messages_total",
                "Copies of messages handed to the router for MQTT subscribers and the retained store",
            )
            .expect("valid metric"),
            forwarded: IntCounter::new(
                "sluice_mqtt_forwarded_messages_total",
                "PUBLISH packets sent to MQTT subscribers",
            )
            .expect("valid metric"),
            dropped: counter_vec(
                "sluice_mqtt_dropped_forwards_total",
                "Messages for a subscriber not sent to it, as MQTT requires, by reason",
                &["reason"],
            ),
            skipped: IntCounter::new(
                "sluice_broker_skipped_messages_total",
                "Messages the router did not forward to a subscription: it fell behind by more \
                 than the router's log (mqtt.subscriber_buffer_bytes) or the message expired \
                 (MQTT 5 message expiry) first",
            )
            .expect("valid metric"),
            throttled: IntCounter::new(
                "sluice_mqtt_throttled_total",
                "Times a connection over [mqtt.limits] had its reading paused until its rate allowed more",
            )
            .expect("valid metric"),
            denied: counter_vec(
                "sluice_mqtt_acl_denied_total",
                "What [mqtt.auth]'s ACL refused, by packet: a PUBLISH (handed to the pipeline, \
                 which keeps it as a not_authorized reject; routed nowhere) or a SUBSCRIBE's \
                 topic filter (SUBACK 0x80 / 0x87)",
                &["packet"],
            ),
            router_links: IntGauge::new(
                "sluice_mqtt_router_links",
                "Connections registered with the router (clients that subscribe or keep a persistent session)",
            )
            .expect("valid metric"),
            sessions_stored: IntGauge::new(
                "sluice_mqtt_sessions_stored",
                "Persistent sessions kept for clients that are not connected",
            )
            .expect("valid metric"),
        };
        // Every series exists from the start, so a rate over it is 0, not "no data".
        for listener in Listener::ALL {
            let name = listener.label();
            meters.connected.with_label_values(&[name]);
            for attempt in Attempt::ALL {
                meters.attempt_counter(listener, attempt);
            }
            for qos in ["0", "1", "2"] {
                meters.messages.with_label_values(&[name, qos]);
            }
            meters.bytes_in.with_label_values(&[name]);
            meters.bytes_out.with_label_values(&[name]);
        }
        for close in Close::ALL {
            meters.disconnects.with_label_values(&[close.label()]);
        }
        for refused in Refused::ALL {
            meters.refused.with_label_values(&[refused.label()]);
        }
        for dropped in Dropped::ALL {
            meters.dropped.with_label_values(&[dropped.label()]);
        }
        for source in ["publish", "will"] {
            meters.pipeline.with_label_values(&[source]);
        }
        for packet in ["publish", "subscribe"] {
            meters.denied.with_label_values(&[packet]);
        }
        meters
    }

    /// A PUBLISH (`publish`) or a subscription (`subscribe`) the ACL refused.
    pub(crate) fn denied(&self, packet: &'static str) {
        self.denied.with_label_values(&[packet]).inc();
    }

    /// Exports the meters through `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.connected.clone()))?;
        registry.register(Box::new(self.attempts.clone()))?;
        registry.register(Box::new(self.messages.clone()))?;
        registry.register(Box::new(self.bytes_in.clone()))?;
        registry.register(Box::new(self.bytes_out.clone()))?;
        registry.register(Box::new(self.disconnects.clone()))?;
        registry.register(Box::new(self.refused.clone()))?;
        registry.register(Box::new(self.pipeline.clone()))?;
        registry.register(Box::new(self.routed.clone()))?;
        registry.register(Box::new(self.forwarded.clone()))?;
        registry.register(Box::new(self.dropped.clone()))?;
        registry.register(Box::new(self.skipped.clone()))?;
        registry.register(Box::new(self.throttled.clone()))?;
        registry.register(Box::new(self.denied.clone()))?;
        registry.register(Box::new(self.router_links.clone()))?;
        registry.register(Box::new(self.sessions_stored.clone()))
    }

    /// Messages the router did not forward to a subscription (see the metric's help).
    pub fn skipped(&self) -> u64 {
        self.skipped.get()
    }

    /// Messages handed to the pipeline so far (publishes and wills).
    pub fn pipeline_messages(&self) -> u64 {
        ["publish", "will"]
            .iter()
            .map(|s| self.pipeline.with_label_values(&[s]).get())
            .sum()
    }

    fn attempt_counter(&self, listener: Listener, attempt: Attempt) -> IntCounter {
        let outcome = if attempt == Attempt::Ok {
            "accepted"
        } else {
            "refused"
        };
        self.attempts
            .with_label_values(&[listener.label(), outcome, attempt.label()])
    }

    pub(crate) fn attempt(&self, listener: Listener, attempt: Attempt) {
        self.attempt_counter(listener, attempt).inc();
    }

    pub(crate) fn listener(&self, listener: Listener) -> ListenerMeters {
        let name = listener.label();
        let qos = |level: &str| self.messages.with_label_values(&[name, level]);
        ListenerMeters {
            connected: self.connected.with_label_values(&[name]),
            qos: [qos("0"), qos("1"), qos("2")],
            bytes_in: self.bytes_in.with_label_values(&[name]),
            bytes_out: self.bytes_out.with_label_values(&[name]),
            publishes: self.pipeline.with_label_values(&["publish"]),
        }
    }

    pub(crate) fn closed(&self, close: Close) {
        self.disconnects.with_label_values(&[close.label()]).inc();
    }

    pub(crate) fn refused(&self, refused: Refused, n: u64) {
        self.refused.with_label_values(&[refused.label()]).inc_by(n);
    }

    pub(crate) fn will(&self) {
        self.pipeline.with_label_values(&["will"]).inc();
    }

    pub(crate) fn dropped(&self, dropped: Dropped) {
        self.dropped.with_label_values(&[dropped.label()]).inc();
    }
}

/// One listener's series, resolved once so that counting takes no label lookup.
pub(crate) struct ListenerMeters {
    pub(crate) connected: IntGauge,
    pub(crate) qos: [IntCounter; 3],
    pub(crate) bytes_in: IntCounter,
    pub(crate) bytes_out: IntCounter,
    pub(crate) publishes: IntCounter,
}
