//! What sluice reads of a packet before rumqttd's codec sees it: the fixed header
//! (type, flags, remaining length), the protocol of a CONNECT, and the QoS and packet
//! identifier of a PUBLISH (rumqttd keeps those fields crate-private).
//!
//! The checks here stand between a client and rumqttd's codec, which panics
//! (`unreachable!`) on packet types only a server sends: a client's CONNACK, SUBACK,
//! UNSUBACK, PINGRESP or AUTH never reaches it.

/// The packet types, by the number in the high nibble of the first byte.
pub(crate) mod kind {
    pub(crate) const CONNECT: u8 = 1;
    pub(crate) const PUBLISH: u8 = 3;
    pub(crate) const PUBACK: u8 = 4;
    pub(crate) const PUBREC: u8 = 5;
    pub(crate) const PUBREL: u8 = 6;
    pub(crate) const PUBCOMP: u8 = 7;
    pub(crate) const SUBSCRIBE: u8 = 8;
    pub(crate) const UNSUBSCRIBE: u8 = 10;
    pub(crate) const PINGREQ: u8 = 12;
    pub(crate) const DISCONNECT: u8 = 14;
}

/// The fixed header of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The first byte: type in the high nibble, flags in the low one.
    pub(crate) byte1: u8,
    /// Bytes of the fixed header (1 + the remaining length's 1–4 bytes).
    pub(crate) header_len: usize,
    pub(crate) remaining_len: usize,
}

impl Header {
    pub(crate) fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    pub(crate) fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Why the bytes at hand are not (yet) one acceptable packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// More bytes are needed.
    Incomplete,
    /// The remaining length uses more than four bytes.
    MalformedLength,
    /// The packet is larger than the limit (its remaining length is known).
    TooLarge(usize),
}

/// Reads a fixed header from the start of `bytes`, refusing a packet larger than
/// `max_packet` (counted, as MQTT 5's Maximum Packet Size is, over the whole packet)
/// before its body has arrived.
pub(crate) fn header(bytes: &[u8], max_packet: usize) -> Result<Header, FrameError> {
    let Some(&byte1) = bytes.first() else {
        return Err(FrameError::Incomplete);
    };
    let mut remaining_len = 0usize;
    for i in 0..4 {
        let Some(&b) = bytes.get(1 + i) else {
            return Err(FrameError::Incomplete);
        };
        remaining_len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let header = Header {
                byte1,
                header_len: 2 + i,
                remaining_len,
            };
            if header.frame_len() > max_packet {
                return Err(FrameError::TooLarge(header.frame_len()));
            }
            return Ok(header);
        }
    }
    Err(FrameError::MalformedLength)
}

/// Whether a client may send a packet of this type with these flags once connected
/// (MQTT 3.1.1 §2.2.2, MQTT 5 §2.1.3: reserved flags are fixed; SUBSCRIBE, UNSUBSCRIBE
/// and PUBREL carry 0b0010). AUTH is MQTT 5's enhanced authentication, which sluice does
/// not offer.
pub(crate) fn client_may_send(header: &Header) -> bool {
    let flags = header.byte1 & 0x0f;
    match header.kind() {
        // QoS 3 is left to the codec, which refuses it as malformed.
        kind::PUBLISH => true,
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => flags == 0b0010,
        kind::CONNECT | kind::PUBACK | kind::PUBREC | kind::PUBCOMP | kind::PINGREQ => flags == 0,
        kind::DISCONNECT => flags == 0,
        _ => false,
    }
}

/// The protocol a CONNECT asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// "MQTT", level 4.
    V311,
    /// "MQTT", level 5.
    V5,
    /// "MQIsdp", level 3 (MQTT 3.1), or "MQTT" at a level sluice does not speak: refused
    /// with return code 1 (3.1.1's framing, which 3.1 clients read too).
    Unsupported(u8),
    /// A level-5-or-later client asking for a level above 5: refused with reason 0x84.
    UnsupportedV5(u8),
    /// Not MQTT at all.
    NotMqtt,
}

/// Reads the protocol name and level of a whole CONNECT packet (`packet` starts at its
/// first byte).
pub(crate) fn connect_protocol(header: &Header, packet: &[u8]) -> Protocol {
    let body = &packet[header.header_len.min(packet.len())..];
    let Some(name_len) = body
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return Protocol::NotMqtt;
    };
    let (Some(name), Some(&level)) = (body.get(2..2 + name_len), body.get(2 + name_len)) else {
        return Protocol::NotMqtt;
    };
    match (name, level) {
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQTT", level) if level > 5 => Protocol::UnsupportedV5(level),
        (b"MQTT", level) | (b"MQIsdp", level) => Protocol::Unsupported(level),
        _ => Protocol::NotMqtt,
    }
}

/// The connect flags byte of a whole CONNECT packet (after the protocol name and level).
pub(crate) fn connect_flags(header: &Header, packet: &[u8]) -> Option<u8> {
    let body = &packet[header.header_len.min(packet.len())..];
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    body.get(2 + name_len + 1).copied()
}

/// Whether a whole SUBSCRIBE's subscription options keep their reserved bits at 0
/// (3.1.1: bits 2–7 [MQTT-3.8.3-4]; 5: bits 6–7 [MQTT-3.8.3-5]); rumqttd's codec does
/// not look. Anything it cannot walk is left to the codec.
pub(crate) fn subscribe_options_valid(header: &Header, packet: &[u8], v5: bool) -> bool {
    let Some(body) = packet.get(header.header_len..header.frame_len()) else {
        return true;
    };
    // Packet identifier, then (MQTT 5) the properties.
    let mut at = 2;
    if v5 {
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let Some(&b) = body.get(at) else {
                return true;
            };
            at += 1;
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 || shift > 21 {
                break;
            }
        }
        at += len;
    }
    let reserved = if v5 { 0xc0 } else { 0xfc };
    while at < body.len() {
        let Some(len) = body
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return true;
        };
        at += 2 + len;
        match body.get(at) {
            Some(options) if options & reserved != 0 => return false,
            Some(_) => at += 1,
            None => return true,
        }
    }
    true
}

/// QoS, DUP and RETAIN of a PUBLISH, from its first byte.
pub(crate) fn publish_flags(byte1: u8) -> (u8, bool, bool) {
    ((byte1 >> 1) & 0b11, byte1 & 0b1000 != 0, byte1 & 1 != 0)
}

/// The packet identifier of an encoded PUBLISH with QoS > 0 (`packet` is the whole
/// packet), or 0.
pub(crate) fn publish_pkid(header: &Header, packet: &[u8]) -> u16 {
    let (qos, ..) = publish_flags(header.byte1);
    if qos == 0 {
        return 0;
    }
    let body = &packet[header.header_len.min(packet.len())..];
    let Some(topic_len) = body
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return 0;
    };
    body.get(2 + topic_len..4 + topic_len)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
}

/// Whether `topic` may be published to: UTF-8 without U+0000 and no wildcard (MQTT
/// 3.1.1 §4.7.1, MQTT 5 §4.7.0). Emptiness is checked by the caller (MQTT 5 allows an
/// empty topic with a topic alias).
pub(crate) fn valid_topic_name(topic: &[u8]) -> bool {
    !topic.iter().any(|&b| b == b'+' || b == b'#' || b == 0) && std::str::from_utf8(topic).is_ok()
}

/// Whether `filter` is a well-formed topic filter: not empty, no U+0000, `#` alone and
/// last, `+` alone in its level; `$share/{name}/{filter}` with a name free of `/+#`.
pub(crate) fn valid_filter(filter: &str) -> bool {
    let filter = match shared_filter(filter) {
        Some((group, inner)) => {
            if group.is_empty() || group.contains(['+', '#']) {
                return false;
            }
            inner
        }
        None if filter.starts_with("$share/") || filter == "$share" => return false,
        None => filter,
    };
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

/// Splits `$share/{group}/{filter}` into the group and the filter.
pub(crate) fn shared_filter(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix("$share/")?.split_once('/')
}

/// Whether a topic name matches a filter (MQTT §4.7: `+` one level, `#` the rest
/// including the parent, wildcards at the start never match `$` topics).
pub(crate) fn topic_matches(topic: &str, filter: &str) -> bool {
    let filter = shared_filter(filter).map_or(filter, |(_, f)| f);
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topics = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topics.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    topics.next().is_none()
}

/// Whether some topic name could match both filters (used to tell whether a
/// subscription can see the telemetry topics).
pub(crate) fn filters_overlap(a: &str, b: &str) -> bool {
    let a = shared_filter(a).map_or(a, |(_, f)| f);
    let b = shared_filter(b).map_or(b, |(_, f)| f);
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            _ => return false,
        }
    }
}

/// Whether every topic name that matches `inner` also matches `outer` (an ACL's filter
/// granting a whole subscription). `$` topics are matched by a wildcard at the start of
/// neither, so one is covered only by a filter that names its first level.
pub(crate) fn filter_covers(outer: &str, inner: &str) -> bool {
    let outer = shared_filter(outer).map_or(outer, |(_, f)| f);
    let inner = shared_filter(inner).map_or(inner, |(_, f)| f);
    let (mut o, mut i) = (outer.split('/'), inner.split('/'));
    let mut first = true;
    loop {
        match (o.next(), i.next()) {
            // `#` covers the rest, the parent level included.
            (Some("#"), Some(level)) => return !(first && level.starts_with('$')),
            (Some("#"), None) => return true,
            (None, None) => return true,
            // An inner wildcard is covered by an outer wildcard only.
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(level)) if !(first && level.starts_with('$')) => {}
            (Some(p), Some(q)) if p == q && p != "+" => {}
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_covers_another_only_if_every_topic_of_the_other_matches_it() {
        for (outer, inner, covered) in [
            ("a/#", "a/#", true),
            ("a/#", "a", true),
            ("a/#", "a/b/+/c", true),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/+/c", true),
            ("a/+/c", "a/#", false),
            ("a/b", "a/+", false),
            ("a/b", "a/b/c", false),
            ("a/+", "a", false),
            ("a/b/#", "a/#", false),
            ("#", "x/y", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
        ] {
            assert_eq!(
                filter_covers(outer, inner),
                covered,
                "{outer} covers {inner}"
            );
        }
    }

    #[test]
    fn a_header_is_read_before_its_body_arrives_and_refused_if_too_large() {
        assert_eq!(header(&[], 100), Err(FrameError::Incomplete));
        assert_eq!(header(&[0x30], 100), Err(FrameError::Incomplete));
        assert_eq!(header(&[0x30, 0x80], 100), Err(FrameError::Incomplete));
        let h = header(&[0x30, 0x05], 100).unwrap();
        assert_eq!((h.kind(), h.header_len, h.remaining_len), (3, 2, 5));
        // 321 = 0xc1 0x02: the limit counts the whole packet (3 + 321 bytes).
        assert_eq!(
            header(&[0x30, 0xc1, 0x02], 323),
            Err(FrameError::TooLarge(324))
        );
        assert!(header(&[0x30, 0xc1, 0x02], 324).is_ok());
        assert_eq!(
            header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(FrameError::MalformedLength)
        );
    }

    #[test]
    fn packets_only_a_server_sends_are_refused() {
        let h = |byte1| Header {
            byte1,
            header_len: 2,
            remaining_len: 0,
        };
        for server_only in [0x20, 0x90, 0xb0, 0xd0, 0xf0, 0x00] {
            assert!(!client_may_send(&h(server_only)), "{server_only:#x}");
        }
        for ok in [0x30, 0x3b, 0x40, 0x50, 0x62, 0x70, 0x82, 0xa2, 0xc0, 0xe0] {
            assert!(client_may_send(&h(ok)), "{ok:#x}");
        }
        for bad_flags in [0x60, 0x80, 0xa0, 0xc1, 0xe1, 0x41] {
            assert!(!client_may_send(&h(bad_flags)), "{bad_flags:#x}");
        }
    }

    #[test]
    fn the_protocol_of_a_connect_is_read_from_its_name_and_level() {
        let connect = |name: &[u8], level: u8| {
            let mut p = vec![0x10, 0x00, 0x00, name.len() as u8];
            p.extend_from_slice(name);
            p.push(level);
            p[1] = (p.len() - 2) as u8;
            p
        };
        let protocol = |p: Vec<u8>| connect_protocol(&header(&p, 1000).unwrap(), &p);
        assert_eq!(protocol(connect(b"MQTT", 4)), Protocol::V311);
        assert_eq!(protocol(connect(b"MQTT", 5)), Protocol::V5);
        assert_eq!(protocol(connect(b"MQIsdp", 3)), Protocol::Unsupported(3));
        assert_eq!(protocol(connect(b"MQTT", 3)), Protocol::Unsupported(3));
        assert_eq!(protocol(connect(b"MQTT", 6)), Protocol::UnsupportedV5(6));
        assert_eq!(protocol(connect(b"HTTP", 4)), Protocol::NotMqtt);
        assert_eq!(protocol(vec![0x10, 0x01, 0x00]), Protocol::NotMqtt);
    }

    #[test]
    fn reserved_subscription_option_bits_are_found() {
        // pkid 1, filter "a", options; MQTT 5 with an empty property block.
        let v4 = |options: u8| vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', options];
        let v5 = |options: u8| vec![0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', options];
        let valid = |p: Vec<u8>, five| subscribe_options_valid(&header(&p, 100).unwrap(), &p, five);
        assert!(valid(v4(0x01), false));
        assert!(!valid(v4(0x05), false), "3.1.1 has no No Local");
        assert!(
            valid(v5(0x2d), true),
            "QoS 1, No Local, RAP, Retain Handling 2"
        );
        assert!(!valid(v5(0xc1), true));
        assert!(!valid(v5(0x41), true));
    }

    #[test]
    fn the_packet_id_of_a_publish_is_found_after_its_topic() {
        // QoS 1, topic "a/b", pkid 0x1234, payload "x".
        let p = [0x32, 0x08, 0x00, 0x03, b'a', b'/', b'b', 0x12, 0x34, b'x'];
        let h = header(&p, 100).unwrap();
        assert_eq!(publish_flags(h.byte1), (1, false, false));
        assert_eq!(publish_pkid(&h, &p), 0x1234);
        assert_eq!(publish_flags(0x3d), (2, true, true));
        let q0 = [0x30, 0x04, 0x00, 0x01, b'a', b'x'];
        assert_eq!(publish_pkid(&header(&q0, 100).unwrap(), &q0), 0);
    }

    #[test]
    fn topic_names_and_filters_follow_the_specification() {
        assert!(valid_topic_name(b"devices/d1/telemetry"));
        assert!(valid_topic_name("sport/ténnis".as_bytes()));
        assert!(!valid_topic_name(b"a/+/b"));
        assert!(!valid_topic_name(b"a/#"));
        assert!(!valid_topic_name(b"a\0b"));
        assert!(!valid_topic_name(&[0xff, 0xfe]));

        for ok in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "$SYS/#",
            "$share/g/a/#",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "a+/b",
            "a/++",
            "$share/g",
            "$share//a",
            "$share/+/a",
        ] {
            assert!(!valid_filter(bad), "{bad}");
        }

        assert!(topic_matches("sport/tennis/player1", "sport/#"));
        assert!(topic_matches("sport", "sport/#"));
        assert!(topic_matches("sport/", "sport/+"));
        assert!(!topic_matches("sport", "sport/+"));
        assert!(topic_matches("/finance", "+/+"));
        assert!(!topic_matches("/finance", "+"));
        assert!(!topic_matches("$SYS/x", "#"));
        assert!(!topic_matches("$SYS/x", "+/x"));
        assert!(topic_matches("$SYS/x", "$SYS/#"));
        assert!(topic_matches("a/b", "$share/g/a/+"));

        let telemetry = "devices/+/telemetry";
        for overlapping in [
            "#",
            "devices/#",
            "+/+/+",
            "devices/d1/telemetry",
            "+/+/#",
            "$share/g/#",
        ] {
            assert!(filters_overlap(overlapping, telemetry), "{overlapping}");
        }
        for apart in [
            "alerts/#",
            "devices/+",
            "devices/+/status",
            "+/+/+/+",
            "devices/d1/telemetry/x",
        ] {
            assert!(!filters_overlap(apart, telemetry), "{apart}");
        }
    }
}
