//! One MQTT client surface over rumqttc's two protocol versions (3.1.1 and 5), reduced to
//! what the load generator needs: publish, disconnect, and the events that move latency.

use std::time::Duration;

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PubAckReason};

/// MQTT protocol version spoken by the simulated devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        })
    }
}

/// What one connection is configured with.
pub(crate) struct Options {
    pub(crate) protocol: Protocol,
    pub(crate) client_id: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) max_inflight: u16,
}

/// The events of a connection the load generator acts on.
pub(crate) enum Event {
    ConnAck,
    /// A PUBLISH was written to the socket, with its packet id (0 for QoS 0).
    Published(u16),
    /// The broker acknowledged a QoS 1 PUBLISH.
    PubAck(u16),
    /// The broker answered a QoS 1 PUBLISH with an error reason code (MQTT 5 only).
    Refused(u16, String),
    /// Our DISCONNECT was written.
    Disconnected,
    Other,
}

pub(crate) enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

pub(crate) enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

const KEEP_ALIVE: Duration = Duration::from_secs(30);
const MAX_PACKET: u32 = 1024 * 1024;

/// A client and its (not yet connected) event loop; the request channel holds twice the
/// in-flight window.
pub(crate) fn client(options: &Options) -> (Client, EventLoop) {
    let cap = usize::from(options.max_inflight) * 2;
    match options.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(&options.client_id, &options.host, options.port);
            o.set_keep_alive(KEEP_ALIVE)
                .set_inflight(options.max_inflight)
                .set_max_packet_size(MAX_PACKET as usize, MAX_PACKET as usize);
            let (c, e) = rumqttc::AsyncClient::new(o, cap);
            (Client::V311(c), EventLoop::V311(Box::new(e)))
        }
        Protocol::V5 => {
            let mut o =
                rumqttc::v5::MqttOptions::new(&options.client_id, &options.host, options.port);
            o.set_keep_alive(KEEP_ALIVE)
                .set_outgoing_inflight_upper_limit(options.max_inflight)
                .set_max_packet_size(Some(MAX_PACKET));
            let (c, e) = rumqttc::v5::AsyncClient::new(o, cap);
            (Client::V5(c), EventLoop::V5(Box::new(e)))
        }
    }
}

impl Client {
    /// Queues a PUBLISH; an error means the event loop has ended.
    pub(crate) async fn publish(
        &self,
        topic: String,
        qos1: bool,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        match self {
            Client::V311(c) => {
                let qos = if qos1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                c.publish(topic, qos, false, payload)
                    .await
                    .map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let qos = if qos1 {
                    QoS5::AtLeastOnce
                } else {
                    QoS5::AtMostOnce
                };
                c.publish(topic, qos, false, payload)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    pub(crate) async fn disconnect(&self) {
        // An error only means the connection is already gone.
        match self {
            Client::V311(c) => drop(c.disconnect().await),
            Client::V5(c) => drop(c.disconnect().await),
        }
    }
}

impl EventLoop {
    /// The next event; an error is a broken or refused connection.
    pub(crate) async fn poll(&mut self) -> Result<Event, String> {
        let outgoing = |o: Outgoing| match o {
            Outgoing::Publish(pkid) => Event::Published(pkid),
            Outgoing::Disconnect => Event::Disconnected,
            _ => Event::Other,
        };
        match self {
            EventLoop::V311(e) => match e.poll().await.map_err(|e| e.to_string())? {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => Ok(Event::ConnAck),
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack)) => {
                    Ok(Event::PubAck(ack.pkid))
                }
                rumqttc::Event::Incoming(_) => Ok(Event::Other),
                rumqttc::Event::Outgoing(o) => Ok(outgoing(o)),
            },
            EventLoop::V5(e) => match e.poll().await.map_err(|e| e.to_string())? {
                rumqttc::v5::Event::Incoming(Packet5::ConnAck(_)) => Ok(Event::ConnAck),
                rumqttc::v5::Event::Incoming(Packet5::PubAck(ack)) => Ok(match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                        Event::PubAck(ack.pkid)
                    }
                    reason => Event::Refused(ack.pkid, format!("{reason:?}")),
                }),
                rumqttc::v5::Event::Incoming(_) => Ok(Event::Other),
                rumqttc::v5::Event::Outgoing(o) => Ok(outgoing(o)),
            },
        }
    }
}
