//! rumqttd's codec for the version a connection speaks, behind the checks of
//! [`frame`](crate::frame).
//!
//! rumqttd's `V4`/`V5` decode and encode every packet; sluice frames first (so that no
//! packet type the codec cannot take reaches it, and so that an oversized packet is
//! refused from its header), and keeps MQTT 5 properties away from the 3.1.1 encoder,
//! which panics on them. A panic inside the codec anyway is caught and becomes a
//! malformed packet: it ends that one connection, never the listener.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::{BufMut, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Packet, Protocol};

use crate::frame::{self, FrameError, Header};

/// The MQTT version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V311,
    V5,
}

/// Why a packet could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// Larger than the connection's maximum packet size (whole packet, bytes).
    TooLarge(usize),
    /// Not a packet a client may send here (type or reserved flags).
    NotAllowed(u8),
    /// The codec refused it.
    Malformed(String),
}

/// One packet read, with the fixed header sluice parsed itself.
pub(crate) struct Read {
    pub(crate) header: Header,
    pub(crate) packet: Packet,
    /// PUBLISH only: its packet identifier (0 for QoS 0), read from the wire.
    pub(crate) pkid: u16,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Codec {
    pub(crate) version: Version,
}

impl Codec {
    pub(crate) fn new(version: Version) -> Codec {
        Codec { version }
    }

    /// Takes the next whole packet off the front of `buf`; `Ok(None)` when more bytes
    /// are needed.
    pub(crate) fn read(
        &self,
        buf: &mut BytesMut,
        max_packet: usize,
    ) -> Result<Option<Read>, ReadError> {
        let header = match frame::header(buf, max_packet) {
            Ok(header) => header,
            Err(FrameError::Incomplete) => return Ok(None),
            Err(FrameError::TooLarge(len)) => return Err(ReadError::TooLarge(len)),
            Err(FrameError::MalformedLength) => {
                return Err(ReadError::Malformed(
                    "remaining length over four bytes".into(),
                ));
            }
        };
        if buf.len() < header.frame_len() {
            // Nothing reserved for what the header declares: the buffer grows with the
            // bytes that arrive (the connection's reads), so a remaining length of
            // 256 MiB costs nothing until 256 MiB come.
            return Ok(None);
        }
        if !frame::client_may_send(&header) {
            return Err(ReadError::NotAllowed(header.byte1));
        }
        if header.kind() == frame::kind::SUBSCRIBE
            && !frame::subscribe_options_valid(
                &header,
                &buf[..header.frame_len()],
                self.version == Version::V5,
            )
        {
            return Err(ReadError::Malformed(
                "reserved subscription option bits".into(),
            ));
        }
        let pkid = if header.kind() == frame::kind::PUBLISH {
            frame::publish_pkid(&header, &buf[..header.frame_len()])
        } else {
            0
        };
        let version = self.version;
        // `max_packet` is already enforced (over the whole packet); the codec's own limit
        // is on the remaining length only.
        let decoded = catch_unwind(AssertUnwindSafe(|| match version {
            Version::V311 => V4.read_mut(buf, usize::MAX),
            Version::V5 => V5.read_mut(buf, usize::MAX),
        }));
        match decoded {
            Ok(Ok(packet)) => Ok(Some(Read {
                header,
                packet,
                pkid,
            })),
            Ok(Err(e)) => Err(ReadError::Malformed(e.to_string())),
            Err(_) => Err(ReadError::Malformed(
                "the codec could not decode the packet".into(),
            )),
        }
    }

    /// Appends `packet` to `buf`. Properties are dropped for MQTT 3.1.1, which has none.
    /// A successful PUBACK: the same four bytes in both versions (MQTT 5 leaves out the
    /// reason code and properties when it is Success and there are none [MQTT-3.4.2.1]).
    pub(crate) fn write_puback(&self, pkid: u16, buf: &mut BytesMut) {
        buf.put_u8(0x40);
        buf.put_u8(2);
        buf.put_u16(pkid);
    }

    pub(crate) fn write(&self, packet: Packet, buf: &mut BytesMut) -> Result<(), String> {
        let version = self.version;
        let packet = match version {
            Version::V311 => without_properties(packet),
            Version::V5 => packet,
        };
        let start = buf.len();
        let written = catch_unwind(AssertUnwindSafe(|| match version {
            Version::V311 => V4.write(packet, buf),
            Version::V5 => V5.write(packet, buf),
        }));
        match written {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                buf.truncate(start);
                Err(e.to_string())
            }
            Err(_) => {
                buf.truncate(start);
                Err("the codec could not encode the packet".into())
            }
        }
    }
}

/// The same packet without its MQTT 5 parts.
fn without_properties(packet: Packet) -> Packet {
    match packet {
        Packet::ConnAck(a, _) => Packet::ConnAck(a, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(a, _) => Packet::PubAck(a, None),
        Packet::SubAck(a, _) => Packet::SubAck(a, None),
        Packet::PubRec(a, _) => Packet::PubRec(a, None),
        Packet::PubRel(a, _) => Packet::PubRel(a, None),
        Packet::PubComp(a, _) => Packet::PubComp(a, None),
        Packet::UnsubAck(a, _) => Packet::UnsubAck(a, None),
        Packet::Disconnect(d, _) => Packet::Disconnect(d, None),
        Packet::Subscribe(s, _) => Packet::Subscribe(s, None),
        Packet::Unsubscribe(u, _) => Packet::Unsubscribe(u, None),
        Packet::Connect(c, _, will, _, login) => Packet::Connect(c, None, will, None, login),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{PubAck, PubAckReason, Publish, PublishProperties};

    #[test]
    fn packets_are_framed_before_the_codec_sees_them() {
        let codec = Codec::new(Version::V5);
        // A CONNACK sent by a client: rumqttd's v5 decoder would panic on it.
        let mut buf = BytesMut::from(&[0x20, 0x03, 0x00, 0x00, 0x00][..]);
        assert_eq!(
            codec.read(&mut buf, 100).err(),
            Some(ReadError::NotAllowed(0x20))
        );
        // Half a packet: wait for the rest.
        let mut buf = BytesMut::from(&[0x30, 0x0a, 0x00][..]);
        assert!(codec.read(&mut buf, 100).unwrap().is_none());
        // Too large, known from the header alone.
        let mut buf = BytesMut::from(&[0x30, 0x7f][..]);
        assert_eq!(
            codec.read(&mut buf, 100).err(),
            Some(ReadError::TooLarge(129))
        );
        // QoS 3.
        let mut buf = BytesMut::from(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01][..]);
        assert!(matches!(
            codec.read(&mut buf, 100),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn mqtt_3_1_1_never_gets_properties() {
        let mut buf = BytesMut::new();
        let publish = Publish::new("a/b", "x", false);
        let props = PublishProperties {
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        Codec::new(Version::V311)
            .write(Packet::Publish(publish, Some(props)), &mut buf)
            .unwrap();
        assert_eq!(&buf[..], &[0x30, 0x06, 0x00, 0x03, b'a', b'/', b'b', b'x']);
        buf.clear();
        let ack = PubAck {
            pkid: 7,
            reason: PubAckReason::Success,
        };
        Codec::new(Version::V311)
            .write(Packet::PubAck(ack, None), &mut buf)
            .unwrap();
        assert_eq!(&buf[..], &[0x40, 0x02, 0x00, 0x07]);
    }

    /// Whatever a client sends, reading ends in a packet, "more bytes", or an error:
    /// never a panic (inside rumqttd's codec or out of it).
    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let hook = std::panic::take_hook();
        let panics = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = panics.clone();
        std::panic::set_hook(Box::new(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        for version in [Version::V311, Version::V5] {
            let codec = Codec::new(version);
            for _ in 0..20_000 {
                let len = (next() % 40) as usize;
                // A plausible first byte and length most of the time, so that bodies
                // reach the decoders.
                let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if len >= 2 && next() % 4 != 0 {
                    bytes[0] = ((next() % 15) as u8 + 1) << 4 | (next() % 16) as u8;
                    bytes[1] = (len - 2) as u8;
                }
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(_)) = codec.read(&mut buf, 1024) {}
            }
        }
        std::panic::set_hook(hook);
        let caught = panics.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            caught, 0,
            "{caught} inputs panicked inside the codec (caught, but they should not)"
        );
    }

    #[test]
    fn a_publish_is_read_with_its_packet_id() {
        let codec = Codec::new(Version::V311);
        let mut buf = BytesMut::from(
            &[
                0x32, 0x08, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x09, b'x', 0xc0, 0x00,
            ][..],
        );
        let read = codec.read(&mut buf, 100).unwrap().unwrap();
        assert_eq!(read.pkid, 9);
        let Packet::Publish(p, None) = read.packet else {
            panic!("not a publish")
        };
        assert_eq!((&p.topic[..], &p.payload[..]), (&b"a/b"[..], &b"x"[..]));
        let ping = codec.read(&mut buf, 100).unwrap().unwrap();
        assert!(matches!(ping.packet, Packet::PingReq(_)));
        assert!(buf.is_empty());
    }
}
