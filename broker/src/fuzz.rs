//! Fuzzing of what a client's bytes meet first: sluice's framing (`frame.rs`) and
//! rumqttd's codec behind it, in both versions, with random bytes and with valid
//! packets of every kind a client sends, mutated (bits flipped, bytes set, inserted,
//! deleted, lengths rewritten, packets cut and joined) and fed whole or in random
//! pieces, as a socket delivers them. Each case must end in packets, a refusal or a
//! wait for more bytes: no panic escapes, and the read buffer never grows ahead of the
//! bytes that arrived (a remaining length of 256 MiB allocates nothing before its
//! bytes come).
//!
//! `cargo test -p sluice-broker fuzz` runs 500,000 cases; more with
//! `SLUICE_FUZZ_CASES=10000000 cargo test --release -p sluice-broker fuzz -- --nocapture`
//! (`SLUICE_FUZZ_SEED` picks another sequence).

use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rumqttd::protocol::{
    ConnAck, Connect, ConnectProperties, Disconnect, DisconnectProperties, DisconnectReasonCode,
    Filter, LastWill, LastWillProperties, Login, Packet, PingReq, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, QoS, RetainForwardRule, Subscribe,
    SubscribeProperties, Unsubscribe, UnsubscribeProperties,
};

use crate::codec::{Codec, ReadError, Version};
use crate::frame;

/// The largest packet the fuzzed codecs accept (sluice's default).
const MAX_PACKET: usize = 2 << 20;

/// Valid packets of every kind a client sends, encoded by `codec`.
fn corpus(codec: &Codec) -> Vec<Vec<u8>> {
    let v5 = codec.version == Version::V5;
    let packets = vec![
        Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: "device-123456".into(),
                clean_session: true,
            },
            v5.then(|| ConnectProperties {
                session_expiry_interval: Some(60),
                receive_maximum: Some(10),
                max_packet_size: Some(1 << 20),
                topic_alias_max: Some(5),
                request_response_info: Some(1),
                request_problem_info: Some(1),
                user_properties: vec![("k".into(), "v".into())],
                authentication_method: None,
                authentication_data: None,
            }),
            Some(LastWill {
                topic: Bytes::from_static(b"devices/device-123456/status"),
                message: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: true,
            }),
            v5.then(|| LastWillProperties {
                delay_interval: Some(5),
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("text/plain".into()),
                response_topic: None,
                correlation_data: None,
                user_properties: vec![],
            }),
            Some(Login {
                username: "device-123456".into(),
                password: "secret".into(),
            }),
        ),
        Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            v5.then(|| DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: Some("bye".into()),
                user_properties: vec![],
                server_reference: None,
            }),
        ),
        Packet::PingReq(PingReq),
        Packet::Subscribe(
            Subscribe {
                pkid: 7,
                filters: vec![
                    Filter {
                        path: "devices/+/telemetry".into(),
                        qos: QoS::AtLeastOnce,
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                    },
                    Filter {
                        path: "$share/g/alerts/#".into(),
                        qos: QoS::AtMostOnce,
                        nolocal: false,
                        preserve_retain: true,
                        retain_forward_rule: RetainForwardRule::Never,
                    },
                ],
            },
            v5.then(|| SubscribeProperties {
                id: Some(3),
                user_properties: vec![("a".into(), "b".into())],
            }),
        ),
        Packet::Unsubscribe(
            Unsubscribe {
                pkid: 8,
                filters: vec!["devices/+/telemetry".into()],
            },
            v5.then(|| UnsubscribeProperties {
                user_properties: vec![],
            }),
        ),
        Packet::PubAck(
            PubAck {
                pkid: 9,
                reason: PubAckReason::Success,
            },
            None,
        ),
        Packet::PubRec(
            PubRec {
                pkid: 10,
                reason: PubRecReason::Success,
            },
            None,
        ),
        Packet::PubRel(
            PubRel {
                pkid: 10,
                reason: PubRelReason::Success,
            },
            None,
        ),
        Packet::PubComp(
            PubComp {
                pkid: 11,
                reason: PubCompReason::Success,
            },
            None,
        ),
        // Not one a client sends: refused by the framing.
        Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: rumqttd::protocol::ConnectReturnCode::Success,
            },
            None,
        ),
    ];
    let mut corpus: Vec<Vec<u8>> = packets
        .into_iter()
        .map(|p| {
            let mut buf = BytesMut::new();
            codec.write(p, &mut buf).expect("the corpus encodes");
            buf.to_vec()
        })
        .collect();
    // rumqttd makes QoS 0 publishes only; these are written by hand.
    for qos in 0..=2 {
        corpus.push(publish(v5, qos));
    }
    corpus
}

/// A PUBLISH of a reading at `qos` (MQTT 5: with properties).
fn publish(v5: bool, qos: u8) -> Vec<u8> {
    let topic = b"devices/device-123456/telemetry";
    let payload = br#"{"deviceId":"device-123456","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"temperature":23.5}}"#;
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    if qos > 0 {
        body.extend_from_slice(&12u16.to_be_bytes());
    }
    if v5 {
        // Payload format indicator, message expiry, topic alias, content type, a user
        // property.
        let mut props = vec![0x01, 1, 0x02, 0, 0, 0, 30, 0x23, 0, 2, 0x03, 0, 16];
        props.extend_from_slice(b"application/json");
        props.extend_from_slice(&[0x26, 0, 1, b'u', 0, 1, b'p']);
        body.extend(varint(props.len() as u32));
        body.extend(props);
    }
    body.extend_from_slice(payload);
    let mut packet = vec![0x30 | (qos << 1)];
    packet.extend(varint(body.len() as u32));
    packet.extend(body);
    packet
}

/// MQTT's variable byte integer.
fn varint(mut x: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            b |= 0x80;
        }
        out.push(b);
        if x == 0 {
            return out;
        }
    }
}

/// One case: a few packets of the corpus (or random bytes), mutated.
fn case(rng: &mut ChaCha8Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    if rng.random_ratio(1, 10) {
        let len = rng.random_range(0..64);
        return (0..len).map(|_| rng.random()).collect();
    }
    let mut bytes = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        bytes.extend_from_slice(&corpus[rng.random_range(0..corpus.len())]);
    }
    for _ in 0..rng.random_range(0..=4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..7) {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes[at] = rng.random(),
            2 => bytes.insert(at, rng.random()),
            3 => {
                let end = (at + rng.random_range(1..8)).min(bytes.len());
                bytes.drain(at..end);
            }
            4 => bytes.truncate(at),
            5 => {
                // A remaining length rewritten: up to 256 MiB, the most four bytes say.
                let len: u32 = match rng.random_range(0..3) {
                    0 => rng.random_range(0..128),
                    1 => rng.random_range(0..1 << 16),
                    _ => rng.random_range(0..1 << 28),
                };
                let end = (at + 1 + rng.random_range(0..4)).min(bytes.len());
                bytes.splice(at..end, varint(len));
            }
            _ => {
                let end = (at + rng.random_range(1..16)).min(bytes.len());
                let chunk = bytes[at..end].to_vec();
                let to = rng.random_range(0..=bytes.len());
                bytes.splice(to..to, chunk);
            }
        }
    }
    bytes
}

/// Feeds `bytes` to `codec` as a socket would, whole or in pieces, until it waits for
/// more or refuses: the buffer never holds much more than what arrived.
fn feed(rng: &mut ChaCha8Rng, codec: &Codec, bytes: &[u8]) -> Outcome {
    let _ = frame::header(bytes, MAX_PACKET).map(|h| {
        (
            frame::connect_protocol(&h, bytes),
            frame::connect_flags(&h, bytes),
        )
    });
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut outcome = Outcome::default();
    while at < bytes.len() {
        let piece = if rng.random_bool(0.5) {
            bytes.len() - at
        } else {
            rng.random_range(1..=bytes.len() - at)
        };
        buf.extend_from_slice(&bytes[at..at + piece]);
        at += piece;
        loop {
            let read = codec.read(&mut buf, MAX_PACKET);
            assert!(
                buf.capacity() <= at + (64 << 10),
                "{} bytes of buffer for {at} bytes read: {bytes:?}",
                buf.capacity()
            );
            match read {
                Ok(Some(_)) => outcome.packets += 1,
                Ok(None) => break,
                Err(ReadError::Malformed(why)) if why.contains("could not decode") => {
                    outcome.caught += 1;
                    return outcome;
                }
                Err(_) => {
                    outcome.refused += 1;
                    return outcome;
                }
            }
        }
    }
    outcome
}

#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    packets: u64,
    refused: u64,
    /// A panic of rumqttd's codec, caught (the connection would be closed).
    caught: u64,
}

#[test]
fn random_and_mutated_packets_end_in_packets_refusals_or_waits() {
    let cases: u64 = std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let seed: u64 = std::env::var("SLUICE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let codecs = [Codec::new(Version::V311), Codec::new(Version::V5)];
    let corpora = codecs.map(|c| corpus(&c));
    let mut total = Outcome::default();
    let started = std::time::Instant::now();
    for n in 0..cases {
        let which = (n % 2) as usize;
        let bytes = case(&mut rng, &corpora[which]);
        let outcome = feed(&mut rng, &codecs[which], &bytes);
        total.packets += outcome.packets;
        total.refused += outcome.refused;
        total.caught += outcome.caught;
    }
    println!(
        "{cases} cases (seed {seed}) in {:.1} s: {} packets decoded, {} refusals, {} codec panics caught",
        started.elapsed().as_secs_f64(),
        total.packets,
        total.refused,
        total.caught
    );
    assert!(
        total.packets > cases / 4,
        "the mutations leave many packets whole"
    );
    assert!(total.refused > cases / 20, "and break many");
}

#[test]
fn a_huge_remaining_length_allocates_nothing_before_its_bytes() {
    for (max_packet, want_refused) in [(MAX_PACKET, true), (usize::MAX, false)] {
        let codec = Codec::new(Version::V5);
        // PUBLISH with a remaining length of 256 MiB - 1 (four bytes), then 10 bytes.
        let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0x7f, 0, 1, b't', 0, 0][..]);
        let read = codec.read(&mut buf, max_packet);
        if want_refused {
            assert!(
                matches!(read, Err(ReadError::TooLarge(_))),
                "{}",
                read.is_ok()
            );
        } else {
            assert!(matches!(read, Ok(None)), "waits for the bytes");
            assert!(
                buf.capacity() <= buf.len() + (64 << 10),
                "{} bytes reserved",
                buf.capacity()
            );
        }
    }
}
