//! The load generator's MQTT client: one TCP connection publishing with rumqttc's packet
//! codec (3.1.1 or 5), written for throughput rather than generality. A connection's
//! task encodes every message that is due into one buffer and writes it with one call,
//! and reads the broker's acknowledgements in the same task: no channel, no event loop and
//! no timer per message (rumqttc's client costs ~4 µs a message in those; a load generator
//! that takes the cores it is meant to load measures itself).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Seconds of keep alive asked for in the CONNECT; a PINGREQ goes out when nothing was
/// written for half of it.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// The largest packet read from the broker.
const MAX_PACKET: u32 = 1024 * 1024;

/// What the broker said.
#[derive(Debug, PartialEq)]
pub(crate) enum Event {
    /// A QoS 1 PUBLISH was acknowledged.
    PubAck(u16),
    /// A QoS 1 PUBLISH was answered with an error reason code (MQTT 5 only).
    Refused(u16, String),
    /// Anything else that needs no answer (PINGRESP, ...).
    Other,
}

/// An open MQTT connection, past its CONNACK.
pub(crate) struct Connection {
    protocol: Protocol,
    stream: TcpStream,
    read: BytesMut,
    /// QoS 1 publishes the broker lets be unacknowledged at once (MQTT 5 Receive
    /// Maximum; 3.1.1: no limit of its own).
    pub(crate) receive_maximum: u16,
}

/// Connects and waits for the CONNACK; an error says why in words.
pub(crate) async fn connect(
    host: &str,
    port: u16,
    protocol: Protocol,
    client_id: &str,
) -> Result<Connection, String> {
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut out = BytesMut::new();
    let keep_alive = KEEP_ALIVE.as_secs() as u16;
    match protocol {
        Protocol::V311 => {
            let mut connect = rumqttc::Connect::new(client_id);
            connect.keep_alive = keep_alive;
            rumqttc::Packet::Connect(connect)
                .write(&mut out, MAX_PACKET as usize)
                .map_err(|e| e.to_string())?;
        }
        Protocol::V5 => {
            let connect = v5::Connect {
                keep_alive,
                client_id: client_id.to_owned(),
                clean_start: true,
                properties: Some(v5::ConnectProperties {
                    max_packet_size: Some(MAX_PACKET),
                    ..v5::ConnectProperties::new()
                }),
            };
            v5::Packet::Connect(connect, None, None)
                .write(&mut out, None)
                .map_err(|e| e.to_string())?;
        }
    }
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut connection = Connection {
        protocol,
        stream,
        read: BytesMut::with_capacity(4096),
        receive_maximum: u16::MAX,
    };
    loop {
        if connection
            .stream
            .read_buf(&mut connection.read)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("the broker closed the connection before its CONNACK".into());
        }
        match protocol {
            Protocol::V311 => {
                match rumqttc::Packet::read(&mut connection.read, MAX_PACKET as usize) {
                    Ok(rumqttc::Packet::ConnAck(ack)) => {
                        return match ack.code {
                            rumqttc::ConnectReturnCode::Success => Ok(connection),
                            code => Err(format!("connection refused: {code:?}")),
                        };
                    }
                    Ok(other) => return Err(format!("expected a CONNACK, got {other:?}")),
                    Err(rumqttc::Error::InsufficientBytes(_)) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            Protocol::V5 => match v5::Packet::read(&mut connection.read, Some(MAX_PACKET)) {
                Ok(v5::Packet::ConnAck(ack)) => {
                    if ack.code != v5::ConnectReturnCode::Success {
                        return Err(format!("connection refused: {:?}", ack.code));
                    }
                    if let Some(max) = ack.properties.and_then(|p| p.receive_max) {
                        connection.receive_maximum = max;
                    }
                    return Ok(connection);
                }
                Ok(other) => return Err(format!("expected a CONNACK, got {other:?}")),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e.to_string()),
            },
        }
    }
}

/// Encodes a PUBLISH into `out` (`pkid` is used for QoS 1 only).
pub(crate) fn encode_publish(
    protocol: Protocol,
    out: &mut BytesMut,
    topic: String,
    payload: Vec<u8>,
    qos1: bool,
    pkid: u16,
) {
    let written = match protocol {
        Protocol::V311 => {
            let qos = if qos1 {
                rumqttc::QoS::AtLeastOnce
            } else {
                rumqttc::QoS::AtMostOnce
            };
            let mut publish = rumqttc::Publish::from_bytes(topic, qos, Bytes::from(payload));
            publish.pkid = if qos1 { pkid } else { 0 };
            publish.write(out).map_err(|e| e.to_string())
        }
        Protocol::V5 => {
            let qos = if qos1 {
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce
            } else {
                rumqttc::v5::mqttbytes::QoS::AtMostOnce
            };
            let mut publish = v5::Publish::new(topic, qos, payload, None);
            publish.pkid = if qos1 { pkid } else { 0 };
            publish.write(out).map_err(|e| e.to_string())
        }
    };
    // Only a topic over 65,535 bytes fails to encode; the fleet's are short.
    if let Err(e) = written {
        tracing::error!(error = %e, "cannot encode a PUBLISH");
    }
}

impl Connection {
    /// Writes `bytes` (whole packets).
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Keeps the connection alive.
    pub(crate) async fn ping(&mut self) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        match self.protocol {
            Protocol::V311 => rumqttc::Packet::PingReq
                .write(&mut out, MAX_PACKET as usize)
                .map(drop)
                .map_err(std::io::Error::other)?,
            Protocol::V5 => v5::Packet::PingReq(v5::PingReq)
                .write(&mut out, None)
                .map(drop)
                .map_err(std::io::Error::other)?,
        }
        self.write(&out).await
    }

    /// Reads what the broker sent (waits for at least one byte); `Ok(false)` when it
    /// closed the connection.
    pub(crate) async fn read(&mut self) -> std::io::Result<bool> {
        Ok(self.stream.read_buf(&mut self.read).await? > 0)
    }

    /// The next whole packet read so far; `Err` when the broker broke the protocol or
    /// disconnected us.
    pub(crate) fn next_event(&mut self) -> Result<Option<Event>, String> {
        match self.protocol {
            Protocol::V311 => match rumqttc::Packet::read(&mut self.read, MAX_PACKET as usize) {
                Ok(rumqttc::Packet::PubAck(ack)) => Ok(Some(Event::PubAck(ack.pkid))),
                Ok(rumqttc::Packet::Disconnect) => Err("the broker disconnected".into()),
                Ok(_) => Ok(Some(Event::Other)),
                Err(rumqttc::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            Protocol::V5 => match v5::Packet::read(&mut self.read, Some(MAX_PACKET)) {
                Ok(v5::Packet::PubAck(ack)) => Ok(Some(match ack.reason {
                    v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers => {
                        Event::PubAck(ack.pkid)
                    }
                    reason => Event::Refused(ack.pkid, format!("{reason:?}")),
                })),
                Ok(v5::Packet::Disconnect(d)) => {
                    Err(format!("the broker disconnected: {:?}", d.reason_code))
                }
                Ok(_) => Ok(Some(Event::Other)),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// Says goodbye (DISCONNECT) and closes the socket.
    pub(crate) async fn disconnect(mut self) {
        let mut out = BytesMut::new();
        let encoded = match self.protocol {
            Protocol::V311 => rumqttc::Packet::Disconnect
                .write(&mut out, MAX_PACKET as usize)
                .is_ok(),
            Protocol::V5 => v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::NormalDisconnection,
            ))
            .write(&mut out, None)
            .is_ok(),
        };
        if encoded {
            // An error only means the connection is already gone.
            let _ = self.write(&out).await;
        }
        let _ = self.stream.shutdown().await;
    }
}
