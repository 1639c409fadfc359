//! MQTT meters per listener, counted as packets cross the wire.
//!
//! rumqttd 0.20 hands an embedding program no counts: its router meters are pushed only
//! on a timer that its own `Broker::start` spawns (sluice builds the router itself), and
//! the router's connection count goes down on disconnects. What rumqttd does take from
//! the embedder is the codec: a listener parses and writes every packet through a
//! [`Protocol`] value, cloned once per accepted socket and dropped when the connection
//! ends. [`Metered`] wraps rumqttd's own codec and counts what passes through it:
//! - a CONNECT read, then either a successful CONNACK written (accepted; the client is
//!   connected until its codec is dropped) or none (refused: bad credentials, zero
//!   keep-alive, an invalid client id, the router full);
//! - each PUBLISH read, by the QoS bits of its fixed header (read before the codec
//!   consumes the packet);
//! - the bytes of every whole packet read.
//!
//! The cost is two relaxed atomic increments per message on the I/O threads.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use rumqttd::protocol::{ConnectReturnCode, Error, Packet, Protocol};

/// The MQTT meters of every listener (Prometheus metrics, readable from any thread).
#[derive(Clone)]
pub struct MqttMeters {
    connected: IntGaugeVec,
    attempts: IntCounterVec,
    messages: IntCounterVec,
    bytes: IntCounterVec,
}

impl MqttMeters {
    pub(crate) fn new() -> MqttMeters {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        MqttMeters {
            connected: IntGaugeVec::new(
                Opts::new(
                    "sluice_mqtt_connections",
                    "MQTT clients connected now (CONNACK sent, connection not closed yet), by listener",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            attempts: vec(
                "sluice_mqtt_connection_attempts_total",
                "MQTT CONNECT packets read, by listener and outcome: accepted (successful \
                 CONNACK) or refused (closed without one: bad credentials, zero keep-alive, \
                 invalid client id, broker full)",
                &["listener", "outcome"],
            ),
            messages: vec(
                "sluice_mqtt_messages_received_total",
                "PUBLISH packets read from MQTT clients, by listener and QoS",
                &["listener", "qos"],
            ),
            bytes: vec(
                "sluice_mqtt_received_bytes_total",
                "Bytes of the MQTT packets read from clients (whole packets of every type), by listener",
                &["listener"],
            ),
        }
    }

    /// The meters of one listener; every series it has starts at 0.
    pub(crate) fn listener(&self, name: &str) -> ListenerMeters {
        let qos = |level: &str| self.messages.with_label_values(&[name, level]);
        ListenerMeters {
            connected: self.connected.with_label_values(&[name]),
            accepted: self.attempts.with_label_values(&[name, "accepted"]),
            refused: self.attempts.with_label_values(&[name, "refused"]),
            qos: [qos("0"), qos("1"), qos("2")],
            bytes: self.bytes.with_label_values(&[name]),
        }
    }

    /// Exports the meters through `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.connected.clone()))?;
        registry.register(Box::new(self.attempts.clone()))?;
        registry.register(Box::new(self.messages.clone()))?;
        registry.register(Box::new(self.bytes.clone()))
    }
}

/// One listener's series, resolved once so that counting takes no label lookup.
#[derive(Clone)]
pub(crate) struct ListenerMeters {
    connected: IntGauge,
    accepted: IntCounter,
    refused: IntCounter,
    qos: [IntCounter; 3],
    bytes: IntCounter,
}

/// rumqttd's codec `P`, counting into one listener's meters. The listener clones it for
/// each socket it accepts, so one value follows one connection.
pub(crate) struct Metered<P> {
    inner: P,
    meters: ListenerMeters,
    /// This connection sent CONNECT.
    connect_read: bool,
    /// The broker accepted it (an atomic only because `write` takes `&self`).
    connected: AtomicBool,
}

impl<P> Metered<P> {
    pub(crate) fn new(inner: P, meters: ListenerMeters) -> Metered<P> {
        Metered {
            inner,
            meters,
            connect_read: false,
            connected: AtomicBool::new(false),
        }
    }
}

impl<P: Clone> Clone for Metered<P> {
    /// A new connection's codec: nothing read or written yet.
    fn clone(&self) -> Self {
        Metered::new(self.inner.clone(), self.meters.clone())
    }
}

impl<P: Protocol> Protocol for Metered<P> {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let before = stream.len();
        let header = stream.first().copied().unwrap_or_default();
        let packet = self.inner.read_mut(stream, max_size)?;
        self.meters.bytes.inc_by((before - stream.len()) as u64);
        match &packet {
            // Bits 2-1 of a PUBLISH's first byte are its QoS; the codec refuses 3.
            Packet::Publish(..) => {
                if let Some(counter) = self.meters.qos.get(usize::from((header >> 1) & 0b11)) {
                    counter.inc();
                }
            }
            Packet::Connect(..) => self.connect_read = true,
            _ => {}
        }
        Ok(packet)
    }

    fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<usize, Error> {
        if let Packet::ConnAck(ack, _) = &packet
            && ack.code == ConnectReturnCode::Success
            && !self.connected.swap(true, Ordering::Relaxed)
        {
            self.meters.accepted.inc();
            self.meters.connected.inc();
        }
        self.inner.write(packet, out)
    }
}

impl<P> Drop for Metered<P> {
    /// The connection is over (rumqttd drops its codec with it).
    fn drop(&mut self) {
        if *self.connected.get_mut() {
            self.meters.connected.dec();
        } else if self.connect_read {
            self.meters.refused.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::QoS;
    use rumqttc::mqttbytes::v4 as client;
    use rumqttd::protocol::ConnAck;
    use rumqttd::protocol::v4::V4;

    fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
        let family = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("no {name}"));
        let metric = family
            .get_metric()
            .iter()
            .find(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .unwrap_or_else(|| panic!("no {name}{labels:?}"));
        if family.get_field_type() == prometheus::proto::MetricType::GAUGE {
            metric.get_gauge().get_value()
        } else {
            metric.get_counter().get_value()
        }
    }

    /// The bytes a real client (rumqttc's encoder) sends.
    fn connect_bytes() -> BytesMut {
        let mut out = BytesMut::new();
        client::Connect::new("meter-test").write(&mut out).unwrap();
        out
    }

    fn publish_bytes(qos: QoS) -> BytesMut {
        let mut publish = client::Publish::new("devices/d/telemetry", qos, "{}");
        publish.pkid = if qos == QoS::AtMostOnce { 0 } else { 7 };
        let mut out = BytesMut::new();
        publish.write(&mut out).unwrap();
        out
    }

    fn connack(code: ConnectReturnCode) -> Packet {
        Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        )
    }

    #[test]
    fn counts_connections_messages_by_qos_and_bytes() {
        let meters = MqttMeters::new();
        let registry = Registry::new();
        meters.register(&registry).unwrap();
        let listener = Metered::new(V4, meters.listener("mqtt"));
        let get = |name, labels: &[(&str, &str)]| value(&registry, name, labels);
        let mqtt = ("listener", "mqtt");
        let outcome = |o| {
            get(
                "sluice_mqtt_connection_attempts_total",
                &[mqtt, ("outcome", o)],
            )
        };
        let qos = |level| {
            get(
                "sluice_mqtt_messages_received_total",
                &[mqtt, ("qos", level)],
            )
        };
        let bytes = || get("sluice_mqtt_received_bytes_total", &[mqtt]);
        assert_eq!(
            (outcome("accepted"), outcome("refused"), bytes()),
            (0.0, 0.0, 0.0)
        );

        let mut connection = listener.clone();
        let mut wire = connect_bytes();
        let sent = [
            publish_bytes(QoS::AtMostOnce),
            publish_bytes(QoS::AtLeastOnce),
            publish_bytes(QoS::AtLeastOnce),
            publish_bytes(QoS::ExactlyOnce),
        ];
        for packet in &sent {
            wire.extend_from_slice(packet);
        }
        let total = wire.len();
        assert!(matches!(
            connection.read_mut(&mut wire, 1 << 20),
            Ok(Packet::Connect(..))
        ));
        let mut out = BytesMut::new();
        connection
            .write(connack(ConnectReturnCode::Success), &mut out)
            .unwrap();
        for _ in &sent {
            assert!(matches!(
                connection.read_mut(&mut wire, 1 << 20),
                Ok(Packet::Publish(..))
            ));
        }
        assert!(wire.is_empty());
        assert_eq!(get("sluice_mqtt_connections", &[mqtt]), 1.0);
        assert_eq!(outcome("accepted"), 1.0);
        assert_eq!((qos("0"), qos("1"), qos("2")), (1.0, 2.0, 1.0));
        assert_eq!(bytes(), total as f64);

        // A packet is counted once it is whole.
        let mut partial = connect_bytes();
        let rest = partial.split_off(3);
        let mut refused = listener.clone();
        assert!(matches!(
            refused.read_mut(&mut partial, 1 << 20),
            Err(Error::InsufficientBytes(_))
        ));
        assert_eq!(bytes(), total as f64);
        partial.unsplit(rest);
        refused.read_mut(&mut partial, 1 << 20).unwrap();
        refused
            .write(connack(ConnectReturnCode::NotAuthorized), &mut out)
            .unwrap();

        // Closed: the accepted connection leaves the gauge, the refused one is counted,
        // a socket closed before CONNECT is neither.
        drop(listener.clone());
        drop(refused);
        drop(connection);
        assert_eq!(get("sluice_mqtt_connections", &[mqtt]), 0.0);
        assert_eq!((outcome("accepted"), outcome("refused")), (1.0, 1.0));
        assert_eq!(bytes(), (total + connect_bytes().len()) as f64);
    }
}
