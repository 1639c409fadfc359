//! A message once decoded: what the decoders take and the journal (the write-ahead log)
//! keeps.
//!
//! A message is decoded where it is handed over ([`IngestHandle::send`](crate::IngestHandle::send)),
//! before it is journaled: an accepted reading is journaled as its decoded fields in a
//! compact binary form ([postcard](https://postcard.jamesmunns.com/wire-format), ~90
//! bytes against ~250 of JSON), so a replay after a crash hands it to the decoders
//! without parsing JSON again; a message that is a reject is journaled as it came (a
//! replay decodes it again, which gives the same reject). The decoders take both forms
//! the same way, live and replayed: deduplication, batches, windows.
//!
//! The encoding is an on-disk format: [`JournaledReading`]'s fields, their order and their
//! types are fixed. A change needs a new record flag in the WAL, with this one still
//! read (`an_encoded_reading_is_pinned` holds its bytes).

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::decode::{DecodeLimits, Reading, Rejection, TOPIC_PREFIX, TOPIC_SUFFIX, decode};
use crate::pipeline::Message;

/// A message as the decoders take it.
#[derive(Debug, Clone)]
pub enum Entry {
    /// An accepted reading, encoded (see [`Entry::reading`]).
    Reading {
        /// When sluice read the message, ns since the epoch (UTC).
        received_at_ns: i64,
        encoded: Bytes,
    },
    /// A message that is a reject, as it came, and why.
    Reject {
        message: Message,
        rejection: Rejection,
    },
}

impl Entry {
    /// Decodes and validates `message` (against `limits`; the clock skew is measured
    /// from its arrival).
    pub fn of(message: Message, limits: &DecodeLimits) -> Entry {
        Entry::all_of(vec![message], limits)
            .pop()
            .expect("one entry per message")
    }

    /// A reading as the journal kept it (the bytes an [`Entry::Reading`] holds).
    pub fn reading(received_at_ns: i64, encoded: Bytes) -> Entry {
        Entry::Reading {
            received_at_ns,
            encoded,
        }
    }

    /// When sluice read the message, ns since the epoch (UTC).
    pub fn received_at_ns(&self) -> i64 {
        match self {
            Entry::Reading { received_at_ns, .. } => *received_at_ns,
            Entry::Reject { message, .. } => message.received_at_ns,
        }
    }

    /// Decodes `messages` in order; the readings' encodings share one buffer.
    pub(crate) fn all_of(messages: Vec<Message>, limits: &DecodeLimits) -> Vec<Entry> {
        let mut buffer = Vec::with_capacity(messages.len() * 96);
        let outcomes: Vec<Result<(usize, usize), Rejection>> = messages
            .iter()
            .map(|message| {
                let start = buffer.len();
                encode_message(message, limits, &mut buffer).map(|()| (start, buffer.len()))
            })
            .collect();
        let buffer = Bytes::from(buffer);
        messages
            .into_iter()
            .zip(outcomes)
            .map(|(message, outcome)| match outcome {
                Ok((start, end)) => Entry::Reading {
                    received_at_ns: message.received_at_ns,
                    encoded: buffer.slice(start..end),
                },
                Err(rejection) => Entry::Reject { message, rejection },
            })
            .collect()
    }

    /// What its decoder is chosen by: the device id (a reading's, or the one its topic
    /// names), else the whole topic.
    pub(crate) fn route(&self) -> &[u8] {
        match self {
            Entry::Reading { encoded, .. } => device_of(encoded).unwrap_or_default().as_bytes(),
            Entry::Reject { message, .. } => message
                .topic
                .strip_prefix(TOPIC_PREFIX.as_bytes())
                .and_then(|rest| rest.strip_suffix(TOPIC_SUFFIX.as_bytes()))
                .unwrap_or(&message.topic),
        }
    }
}

/// Decodes `message`; an accepted reading is appended to `out`, encoded.
fn encode_message(
    message: &Message,
    limits: &DecodeLimits,
    out: &mut Vec<u8>,
) -> Result<(), Rejection> {
    if message.denied {
        return Err(Rejection::not_authorized());
    }
    let reading = decode(&message.topic, &message.payload, limits)?;
    Rejection::check_clock_skew(&reading, message.received_at_ns, limits)?;
    encode(&reading, out);
    Ok(())
}

/// A reading as the journal keeps it (the field order is the encoding's: `device_id`
/// first, so that a decoder is chosen without decoding the rest).
#[derive(Serialize, Deserialize)]
struct JournaledReading<'a> {
    device_id: &'a str,
    ts_ns: i64,
    known: [Option<f64>; 4],
    firmware_version: Option<&'a str>,
    lat: Option<f64>,
    lng: Option<f64>,
    extra: Vec<(&'a str, f64)>,
}

/// Appends `reading`'s encoding to `out`.
pub(crate) fn encode(reading: &Reading<'_>, out: &mut Vec<u8>) {
    let journaled = JournaledReading {
        device_id: &reading.device_id,
        ts_ns: reading.ts_ns,
        known: [
            reading.temperature,
            reading.humidity,
            reading.battery,
            reading.signal_strength,
        ],
        firmware_version: reading.firmware_version.as_deref(),
        lat: reading.lat,
        lng: reading.lng,
        extra: reading.extra.iter().map(|(n, v)| (&**n, *v)).collect(),
    };
    let written = std::mem::take(out);
    *out = postcard::to_extend(&journaled, written)
        .expect("encoding into a Vec cannot fail: every field is serializable");
}

/// The reading `encoded` holds, borrowing its strings.
pub(crate) fn decode_reading(encoded: &[u8]) -> Result<Reading<'_>, postcard::Error> {
    let r: JournaledReading<'_> = postcard::from_bytes(encoded)?;
    let [temperature, humidity, battery, signal_strength] = r.known;
    Ok(Reading {
        device_id: Cow::Borrowed(r.device_id),
        ts_ns: r.ts_ns,
        temperature,
        humidity,
        battery,
        signal_strength,
        firmware_version: r.firmware_version.map(Cow::Borrowed),
        lat: r.lat,
        lng: r.lng,
        extra: r
            .extra
            .into_iter()
            .map(|(n, v)| (Cow::Borrowed(n), v))
            .collect(),
    })
}

/// The device id an encoded reading starts with.
fn device_of(encoded: &[u8]) -> Option<&str> {
    postcard::take_from_bytes::<&str>(encoded)
        .ok()
        .map(|(device, _)| device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &str) -> Message {
        Message {
            topic: Bytes::from_static(b"devices/device-123456/telemetry"),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            received_at_ns: 1_705_314_600_000_000_000,
            denied: false,
        }
    }

    const FULL: &str = r#"{"deviceId":"device-123456","timestamp":"2024-01-15T10:30:00Z","type":"telemetry",
        "payload":{"temperature":23.5,"humidity":45.2,"battery":87,"signalStrength":-65,"co2":412.25,"x\u00e9":-0.0},
        "metadata":{"firmwareVersion":"2.1.0","location":{"lat":37.7749,"lng":-122.4194}}}"#;

    #[test]
    fn a_reading_comes_back_from_its_encoding_as_decoded() {
        for payload in [
            FULL,
            r#"{"deviceId":"device-123456","timestamp":"2024-01-15T10:30:00.123456789+02:00","type":"telemetry","payload":{}}"#,
            r#"{"deviceId":"device-123456","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"battery":1e308,"humidity":5e-324}}"#,
        ] {
            let m = message(payload);
            let decoded = decode(&m.topic, &m.payload, &DecodeLimits::default()).unwrap();
            let Entry::Reading { encoded, .. } = Entry::of(m.clone(), &DecodeLimits::default())
            else {
                panic!("{payload} is accepted")
            };
            let back = decode_reading(&encoded).unwrap();
            assert_eq!(back, decoded);
            assert_eq!(
                back.extra
                    .iter()
                    .map(|(_, v)| v.to_bits())
                    .collect::<Vec<_>>(),
                decoded
                    .extra
                    .iter()
                    .map(|(_, v)| v.to_bits())
                    .collect::<Vec<_>>(),
                "-0.0 stays negative"
            );
            assert_eq!(device_of(&encoded), Some("device-123456"));
            assert!(encoded.len() < m.payload.len() / 2, "{}", encoded.len());
        }
    }

    #[test]
    fn an_encoded_reading_is_pinned() {
        // The journal's on-disk form: a change here is a change of the WAL's format.
        let m = Message {
            topic: Bytes::from_static(b"devices/d/telemetry"),
            ..message(
                r#"{"deviceId":"d","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"temperature":1.5,"x":2},"metadata":{"firmwareVersion":"v"}}"#,
            )
        };
        let encoded = match Entry::of(m, &DecodeLimits::default()) {
            Entry::Reading { encoded, .. } => encoded,
            Entry::Reject { rejection, .. } => panic!("{rejection:?}"),
        };
        let mut expected = vec![1, b'd'];
        // 2024-01-15T10:30:00Z in ns, zigzag varint.
        expected.extend([0x80, 0xc0, 0xcc, 0xb4, 0xfe, 0xa5, 0xbf, 0xaa, 0x2f]);
        expected.push(1);
        expected.extend(1.5f64.to_le_bytes());
        expected.extend([0, 0, 0]);
        expected.extend([1, 1, b'v', 0, 0]);
        expected.extend([1, 1, b'x']);
        expected.extend(2f64.to_le_bytes());
        assert_eq!(&encoded[..], &expected[..]);
    }

    #[test]
    fn a_reject_keeps_the_message_and_its_reason_and_routes_by_its_topic() {
        let limits = DecodeLimits::default();
        let bad = message(
            r#"{"deviceId":"device-123456","timestamp":"nope","type":"telemetry","payload":{}}"#,
        );
        let Entry::Reject {
            message: kept,
            rejection,
        } = Entry::of(bad.clone(), &limits)
        else {
            panic!("rejected")
        };
        assert_eq!(kept.payload, bad.payload);
        assert_eq!(rejection.reason, crate::RejectReason::InvalidTimestamp);
        let denied = Message {
            denied: true,
            ..message(FULL)
        };
        let entry = Entry::of(denied, &limits);
        assert!(
            matches!(&entry, Entry::Reject { rejection, .. } if rejection.reason == crate::RejectReason::NotAuthorized)
        );
        assert_eq!(entry.route(), b"device-123456");
        let Entry::Reject { .. } = Entry::of(
            Message {
                topic: Bytes::from_static(b"elsewhere"),
                ..message(FULL)
            },
            &limits,
        ) else {
            panic!("rejected")
        };
        assert_eq!(
            Entry::of(
                Message {
                    topic: Bytes::from_static(b"elsewhere"),
                    ..message(FULL)
                },
                &limits
            )
            .route(),
            b"elsewhere"
        );
        assert_eq!(Entry::of(message(FULL), &limits).route(), b"device-123456");
    }

    #[test]
    fn many_messages_share_one_buffer_and_keep_their_order() {
        let limits = DecodeLimits::default();
        let messages: Vec<Message> = (0..10)
            .map(|i| {
                if i % 3 == 0 {
                    message("not json")
                } else {
                    message(FULL)
                }
            })
            .collect();
        let entries = Entry::all_of(messages, &limits);
        assert_eq!(entries.len(), 10);
        for (i, entry) in entries.iter().enumerate() {
            match entry {
                Entry::Reject { .. } => assert_eq!(i % 3, 0),
                Entry::Reading { encoded, .. } => {
                    assert_ne!(i % 3, 0);
                    assert_eq!(decode_reading(encoded).unwrap().device_id, "device-123456");
                }
            }
        }
    }

    #[test]
    fn bytes_that_are_not_an_encoding_are_an_error_not_a_panic() {
        let Entry::Reading { encoded, .. } = Entry::of(message(FULL), &DecodeLimits::default())
        else {
            panic!("accepted")
        };
        for cut in 0..encoded.len() {
            assert!(decode_reading(&encoded[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_reading(&[0xff; 40]).is_err());
    }
}
