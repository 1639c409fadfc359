//! Decoding and validation of one telemetry message.
//!
//! The contract with devices (README, "The message"): topic `devices/{deviceId}/telemetry`,
//! a UTF-8 JSON object with `deviceId` (equal to the topic's), an RFC 3339 `timestamp`,
//! `type` = `"telemetry"`, a `payload` object of finite numbers and an optional `metadata`.
//!
//! Decoding borrows from the message bytes: the common case allocates nothing but the
//! extra-metric names. Every failure maps to one [`RejectReason`] and a human detail.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Why a message was not accepted: a small fixed set, stored in the `rejects` table and
/// used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The payload is not valid UTF-8.
    InvalidUtf8,
    /// The payload is not a JSON object (syntax error, truncated, duplicate keys, NaN...).
    InvalidJson,
    /// A required field (`deviceId`, `timestamp`, `type`, `payload`) is absent.
    MissingField,
    /// A field has the wrong JSON type, or `type` is not `"telemetry"`.
    WrongType,
    /// `deviceId` differs from the topic's device id.
    TopicMismatch,
    /// The topic is not `devices/{deviceId}/telemetry` with a non-empty UTF-8 id.
    InvalidTopic,
    /// `timestamp` is not RFC 3339, or is outside the representable range.
    InvalidTimestamp,
    /// A numeric value overflows to infinity.
    NonFinite,
    /// The payload is larger than the configured limit.
    TooLarge,
    /// The client may not publish to this topic (the broker's ACL).
    NotAuthorized,
}

impl RejectReason {
    /// The reasons a message's own bytes can earn (all but `not_authorized`).
    pub const OF_CONTENT: [RejectReason; 9] = [
        RejectReason::InvalidUtf8,
        RejectReason::InvalidJson,
        RejectReason::MissingField,
        RejectReason::WrongType,
        RejectReason::TopicMismatch,
        RejectReason::InvalidTopic,
        RejectReason::InvalidTimestamp,
        RejectReason::NonFinite,
        RejectReason::TooLarge,
    ];

    /// Every reason, in a fixed order (for metrics and docs): those of
    /// [`OF_CONTENT`](Self::OF_CONTENT), then `not_authorized`.
    pub const ALL: [RejectReason; 10] = {
        let mut all = [RejectReason::NotAuthorized; 10];
        let mut i = 0;
        while i < Self::OF_CONTENT.len() {
            all[i] = Self::OF_CONTENT[i];
            i += 1;
        }
        all
    };

    /// The name stored in `rejects.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::MissingField => "missing_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::TopicMismatch => "topic_mismatch",
            RejectReason::InvalidTopic => "invalid_topic",
            RejectReason::InvalidTimestamp => "invalid_timestamp",
            RejectReason::NonFinite => "non_finite",
            RejectReason::TooLarge => "too_large",
            RejectReason::NotAuthorized => "not_authorized",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused message: the reason and a human-readable detail naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    /// `Ok` unless the reading's event time is more than `limits.max_clock_skew` ahead of
    /// `received_at_ns`, the time sluice received it.
    pub fn check_clock_skew(
        reading: &Reading<'_>,
        received_at_ns: i64,
        limits: &DecodeLimits,
    ) -> Result<(), Rejection> {
        let skew = i64::try_from(limits.max_clock_skew.as_nanos()).unwrap_or(i64::MAX);
        let ahead = reading.ts_ns.saturating_sub(received_at_ns);
        if ahead > skew {
            return Err(Rejection::new(
                RejectReason::InvalidTimestamp,
                format!(
                    "timestamp is {} ahead of the server clock (ingest.max_clock_skew is {})",
                    humantime::format_duration(Duration::from_secs(ahead as u64 / 1_000_000_000)),
                    humantime::format_duration(limits.max_clock_skew)
                ),
            ));
        }
        Ok(())
    }

    /// A message its client was not allowed to publish to its topic.
    pub fn not_authorized() -> Self {
        Rejection::new(
            RejectReason::NotAuthorized,
            "the client may not publish to this topic (mqtt.auth)",
        )
    }

    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Payloads larger than this are rejected as `too_large` without being parsed.
    pub max_payload_bytes: usize,
    /// Readings timestamped further than this ahead of their arrival are rejected as
    /// `invalid_timestamp` (a device clock gone wrong would hold windows open forever).
    pub max_clock_skew: Duration,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_payload_bytes: 64 * 1024,
            max_clock_skew: Duration::from_secs(5 * 60),
        }
    }
}

/// One accepted reading, borrowing its strings from the message where it can.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading<'a> {
    pub device_id: Cow<'a, str>,
    /// Event time from the payload, nanoseconds since the Unix epoch, UTC.
    pub ts_ns: i64,
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    pub battery: Option<f64>,
    pub signal_strength: Option<f64>,
    pub firmware_version: Option<Cow<'a, str>>,
    pub lat: Option<f64>,
    pub lng: Option<f64>,
    /// Numeric payload fields beyond the four known metrics, in message order.
    pub extra: Vec<(Cow<'a, str>, f64)>,
}

pub(crate) const TOPIC_PREFIX: &str = "devices/";
pub(crate) const TOPIC_SUFFIX: &str = "/telemetry";

/// The MQTT topic filter of telemetry topics.
pub const TELEMETRY_TOPIC_FILTER: &str = "devices/+/telemetry";

/// The device id in a `devices/{deviceId}/telemetry` topic.
pub fn device_id_from_topic(topic: &[u8]) -> Result<&str, Rejection> {
    let topic = std::str::from_utf8(topic)
        .map_err(|_| Rejection::new(RejectReason::InvalidTopic, "topic is not UTF-8"))?;
    topic
        .strip_prefix(TOPIC_PREFIX)
        .and_then(|rest| rest.strip_suffix(TOPIC_SUFFIX))
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .ok_or_else(|| {
            Rejection::new(
                RejectReason::InvalidTopic,
                format!("topic {topic:?} is not devices/{{deviceId}}/telemetry"),
            )
        })
}

/// Decodes and validates one message published on `topic`.
pub fn decode<'a>(
    topic: &'a [u8],
    payload: &'a [u8],
    limits: &DecodeLimits,
) -> Result<Reading<'a>, Rejection> {
    if payload.len() > limits.max_payload_bytes {
        return Err(Rejection::new(
            RejectReason::TooLarge,
            format!(
                "payload is {} bytes, the limit is {}",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let topic_device = device_id_from_topic(topic)?;
    // simdutf8 checks a valid payload several times faster; std says where a bad one
    // goes wrong.
    let text = simdutf8::basic::from_utf8(payload).or_else(|_| {
        std::str::from_utf8(payload).map_err(|e| {
            Rejection::new(
                RejectReason::InvalidUtf8,
                format!("payload is not UTF-8: {e}"),
            )
        })
    })?;
    let envelope = parse_envelope(text)?;

    let device_id = required(envelope.device_id, "deviceId")?;
    let device_id = json_str(device_id, "deviceId")?;
    if device_id != topic_device {
        return Err(Rejection::new(
            RejectReason::TopicMismatch,
            format!("deviceId {device_id:?} differs from the topic's {topic_device:?}"),
        ));
    }

    let kind = json_str(required(envelope.kind, "type")?, "type")?;
    if kind != "telemetry" {
        return Err(Rejection::new(
            RejectReason::WrongType,
            format!("type is {kind:?}, expected \"telemetry\""),
        ));
    }

    let timestamp = json_str(required(envelope.timestamp, "timestamp")?, "timestamp")?;
    let ts_ns = parse_timestamp(&timestamp)?;

    let mut reading = Reading {
        device_id,
        ts_ns,
        temperature: None,
        humidity: None,
        battery: None,
        signal_strength: None,
        firmware_version: None,
        lat: None,
        lng: None,
        extra: Vec::new(),
    };

    let metrics = Object::entries(envelope.payload, "payload")?
        .ok_or_else(|| Rejection::new(RejectReason::MissingField, "field `payload` is missing"))?;
    for (name, raw) in metrics {
        let Some(value) = json_number(raw, "payload", &name)? else {
            continue;
        };
        match name.as_ref() {
            "temperature" => reading.temperature = Some(value),
            "humidity" => reading.humidity = Some(value),
            "battery" => reading.battery = Some(value),
            "signalStrength" => reading.signal_strength = Some(value),
            _ => reading.extra.push((name, value)),
        }
    }

    for (name, raw) in Object::entries(envelope.metadata, "metadata")?.unwrap_or_default() {
        match name.as_ref() {
            "firmwareVersion" if !is_null(raw) => {
                reading.firmware_version = Some(json_str(raw, "metadata.firmwareVersion")?);
            }
            "location" if !is_null(raw) => {
                for (coord, raw) in json_object(raw, "metadata.location")? {
                    match coord.as_ref() {
                        "lat" => reading.lat = json_number(raw, "metadata.location", "lat")?,
                        "lng" => reading.lng = json_number(raw, "metadata.location", "lng")?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(reading)
}

/// The top-level fields we read: the scalars kept as raw JSON text so that a type error
/// can be told apart from a syntax error, the two objects read into their entries in the
/// same pass (their values raw).
#[derive(Default)]
struct Envelope<'a> {
    device_id: Option<&'a RawValue>,
    timestamp: Option<&'a RawValue>,
    kind: Option<&'a RawValue>,
    payload: Option<Object<'a>>,
    metadata: Option<Object<'a>>,
}

/// An object's entries, keys unescaped only when they need it, values raw.
type Fields<'a> = Vec<(Cow<'a, str>, &'a RawValue)>;

/// A value where an object is expected.
enum Object<'a> {
    /// Its entries, keys unescaped only when they need it.
    Entries(Fields<'a>),
    /// Not an object: what it is instead, as [`json_kind`] names it.
    Not(&'static str),
}

const NULL: &str = "null";

impl<'a> Object<'a> {
    /// The entries of `field`; `None` when it is absent or null.
    fn entries(object: Option<Object<'a>>, field: &str) -> Result<Option<Fields<'a>>, Rejection> {
        match object {
            Some(Object::Entries(entries)) => Ok(Some(entries)),
            Some(Object::Not(kind)) if kind != NULL => Err(wrong_type(field, "an object", kind)),
            _ => Ok(None),
        }
    }
}

/// Reads an [`Object`]; the field name is for a duplicate-key error.
struct ObjectSeed<'f>(&'f str);

impl<'de> de::DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Object<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Object<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = Object<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        entries(map, self.0).map(Object::Entries)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Object::Not("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Object::Not("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Object::Not("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Object::Not("a number"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Object::Not("a string"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Object::Not(NULL))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Object::Not("an array"))
    }
}

/// The entries of the object `map` (`field` names it in a duplicate-key error).
fn entries<'de, A: MapAccess<'de>>(mut map: A, field: &str) -> Result<Fields<'de>, A::Error> {
    let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
    while let Some(key) = map.next_key::<BorrowedKey<'de>>()? {
        let value = map.next_value::<&'de RawValue>()?;
        if entries.iter().any(|(k, _)| *k == key.0) {
            return Err(de::Error::custom(format_args!(
                "`{field}`: duplicate key `{}`",
                key.0
            )));
        }
        entries.push((key.0, value));
    }
    Ok(entries)
}

fn parse_envelope(text: &str) -> Result<Envelope<'_>, Rejection> {
    let mut de = serde_json::Deserializer::from_str(text);
    let envelope = de
        .deserialize_any(EnvelopeVisitor)
        .and_then(|envelope| de.end().map(|()| envelope))
        .map_err(|e| Rejection::new(RejectReason::InvalidJson, format!("invalid JSON: {e}")))?;
    envelope.ok_or_else(|| {
        Rejection::new(
            RejectReason::InvalidJson,
            "the message is valid JSON but not an object",
        )
    })
}

/// Visits the top-level value: `Some(envelope)` for an object, `None` for any other JSON value.
struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Option<Envelope<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut envelope = Envelope::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let duplicate = || de::Error::custom(format_args!("duplicate field `{key}`"));
            let (slot, object) = match key.as_ref() {
                "deviceId" => (&mut envelope.device_id, None),
                "timestamp" => (&mut envelope.timestamp, None),
                "type" => (&mut envelope.kind, None),
                "payload" => (&mut None, Some((&mut envelope.payload, "payload"))),
                "metadata" => (&mut None, Some((&mut envelope.metadata, "metadata"))),
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                    continue;
                }
            };
            match object {
                Some((object, _)) if object.is_some() => return Err(duplicate()),
                Some((object, field)) => {
                    *object = Some(map.next_value_seed(ObjectSeed(field))?);
                }
                None if slot.is_some() => return Err(duplicate()),
                None => *slot = Some(map.next_value::<&'de RawValue>()?),
            }
        }
        Ok(Some(envelope))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

fn required<'a>(raw: Option<&'a RawValue>, field: &str) -> Result<&'a RawValue, Rejection> {
    match raw {
        Some(raw) if !is_null(raw) => Ok(raw),
        _ => Err(Rejection::new(
            RejectReason::MissingField,
            format!("field `{field}` is missing"),
        )),
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// Names the JSON type of a raw value, for error details.
fn json_kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// `kind`: what the value is, as [`json_kind`] names it.
fn wrong_type(field: &str, expected: &str, kind: &str) -> Rejection {
    Rejection::new(
        RejectReason::WrongType,
        format!("`{field}` must be {expected}, got {kind}"),
    )
}

fn json_str<'a>(raw: &'a RawValue, field: &str) -> Result<Cow<'a, str>, Rejection> {
    if !raw.get().starts_with('"') {
        return Err(wrong_type(field, "a string", json_kind(raw)));
    }
    // Borrow when the string has no escapes; otherwise unescape into an owned string.
    if let Ok(s) = serde_json::from_str::<&'a str>(raw.get()) {
        return Ok(Cow::Borrowed(s));
    }
    serde_json::from_str::<String>(raw.get())
        .map(Cow::Owned)
        .map_err(|e| Rejection::new(RejectReason::InvalidJson, format!("`{field}`: {e}")))
}

/// A JSON number as f64, `None` for null. Numbers are parsed from their text with Rust's
/// correctly rounded parser, so a value printed with shortest round-trip formatting
/// comes back bit for bit, and an overflow is seen as infinity (`non_finite`).
fn json_number(raw: &RawValue, object: &str, name: &str) -> Result<Option<f64>, Rejection> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => {}
        Some(b'n') => return Ok(None),
        _ => {
            return Err(wrong_type(
                &format!("{object}.{name}"),
                "a number",
                json_kind(raw),
            ));
        }
    }
    let value: f64 = text.parse().map_err(|_| {
        Rejection::new(
            RejectReason::InvalidJson,
            format!("`{object}.{name}`: {text:?} is not a number"),
        )
    })?;
    if !value.is_finite() {
        return Err(Rejection::new(
            RejectReason::NonFinite,
            format!("`{object}.{name}` = {text} is not a finite 64-bit float"),
        ));
    }
    Ok(Some(value))
}

/// The entries of a JSON object, keys unescaped only when they need it.
fn json_object<'a>(raw: &'a RawValue, field: &str) -> Result<Fields<'a>, Rejection> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match de.deserialize_any(ObjectSeed(field)) {
        Ok(Object::Entries(entries)) => Ok(entries),
        Ok(Object::Not(kind)) => Err(wrong_type(field, "an object", kind)),
        Err(e) => Err(Rejection::new(
            RejectReason::InvalidJson,
            format!("invalid JSON: {e}"),
        )),
    }
}

/// A map key that borrows from the input when it has no escapes.
struct BorrowedKey<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for BorrowedKey<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = BorrowedKey<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedKey(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BorrowedKey(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// RFC 3339 with any offset, to nanoseconds since the epoch in UTC.
fn parse_timestamp(text: &str) -> Result<i64, Rejection> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidTimestamp,
            format!("timestamp {text:?} is not RFC 3339: {e}"),
        )
    })?;
    parsed.timestamp_nanos_opt().ok_or_else(|| {
        Rejection::new(
            RejectReason::InvalidTimestamp,
            format!("timestamp {text:?} is outside 1677-09-21..2262-04-11"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &[u8] = b"devices/device-123456/telemetry";
    const REFERENCE: &str = r#"{"deviceId":"device-123456","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"temperature":23.5,"humidity":45.2,"battery":87,"signalStrength":-65},"metadata":{"firmwareVersion":"2.1.0","location":{"lat":37.7749,"lng":-122.4194}}}"#;

    fn ok(topic: &[u8], payload: &str) -> Reading<'static> {
        let reading = decode(topic, payload.as_bytes(), &DecodeLimits::default())
            .unwrap_or_else(|r| panic!("expected a reading, got {r:?}"));
        into_owned(reading)
    }

    fn into_owned(r: Reading<'_>) -> Reading<'static> {
        Reading {
            device_id: Cow::Owned(r.device_id.into_owned()),
            firmware_version: r.firmware_version.map(|f| Cow::Owned(f.into_owned())),
            extra: r
                .extra
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k.into_owned()), v))
                .collect(),
            ..r
        }
    }

    fn reason(topic: &[u8], payload: &[u8]) -> RejectReason {
        match decode(topic, payload, &DecodeLimits::default()) {
            Ok(r) => panic!("expected a rejection, got {r:?}"),
            Err(rejection) => {
                assert!(!rejection.detail.is_empty());
                rejection.reason
            }
        }
    }

    #[test]
    fn reference_message_decodes_every_field() {
        let r = ok(TOPIC, REFERENCE);
        assert_eq!(r.device_id, "device-123456");
        assert_eq!(r.ts_ns, 1_705_314_600_000_000_000);
        assert_eq!(r.temperature, Some(23.5));
        assert_eq!(r.humidity, Some(45.2));
        assert_eq!(r.battery, Some(87.0));
        assert_eq!(r.signal_strength, Some(-65.0));
        assert_eq!(r.firmware_version.as_deref(), Some("2.1.0"));
        assert_eq!(r.lat, Some(37.7749));
        assert_eq!(r.lng, Some(-122.4194));
        assert!(r.extra.is_empty());
    }

    #[test]
    fn reference_message_borrows_its_strings() {
        let r = decode(TOPIC, REFERENCE.as_bytes(), &DecodeLimits::default()).unwrap();
        assert!(matches!(r.device_id, Cow::Borrowed(_)));
        assert!(matches!(r.firmware_version, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn offset_timestamps_are_stored_as_utc_with_full_precision() {
        let payload = r#"{"deviceId":"d","timestamp":"2024-01-15T12:30:00.123+02:00","type":"telemetry","payload":{}}"#;
        assert_eq!(
            ok(b"devices/d/telemetry", payload).ts_ns,
            1_705_314_600_123_000_000
        );
        let payload = r#"{"deviceId":"d","timestamp":"2024-01-15T10:30:00.000000001Z","type":"telemetry","payload":{}}"#;
        assert_eq!(
            ok(b"devices/d/telemetry", payload).ts_ns,
            1_705_314_600_000_000_001
        );
    }

    #[test]
    fn extra_metrics_are_kept_and_missing_known_ones_are_none() {
        let payload = r#"{"deviceId":"sensor-b","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"temperature":21.5,"co2":612,"pressure":1013.25}}"#;
        let r = ok(b"devices/sensor-b/telemetry", payload);
        assert_eq!(r.temperature, Some(21.5));
        assert_eq!(
            (r.humidity, r.battery, r.signal_strength),
            (None, None, None)
        );
        assert_eq!(
            r.extra,
            vec![(Cow::from("co2"), 612.0), (Cow::from("pressure"), 1013.25)]
        );
        assert_eq!((r.firmware_version, r.lat, r.lng), (None, None, None));
    }

    #[test]
    fn numbers_round_trip_bit_for_bit() {
        for value in [
            0.1 + 0.2,
            1e-7,
            -0.0,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            -123456.789012345,
        ] {
            let payload = format!(
                r#"{{"deviceId":"d","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{{"temperature":{}}}}}"#,
                serde_json::to_string(&value).unwrap()
            );
            let r = ok(b"devices/d/telemetry", &payload);
            assert_eq!(r.temperature.unwrap().to_bits(), value.to_bits(), "{value}");
        }
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let payload = r#"{"deviceId":"d\u0031","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"c\u006f2":1},"metadata":{"firmwareVersion":"v\"2\""}}"#;
        let r = ok(b"devices/d1/telemetry", payload);
        assert_eq!(r.device_id, "d1");
        assert_eq!(r.extra, vec![(Cow::from("co2"), 1.0)]);
        assert_eq!(r.firmware_version.as_deref(), Some("v\"2\""));
    }

    #[test]
    fn null_values_are_absent_values() {
        let payload = r#"{"deviceId":"d","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{"temperature":null,"co2":null,"humidity":1},"metadata":null}"#;
        let r = ok(b"devices/d/telemetry", payload);
        assert_eq!(r.temperature, None);
        assert_eq!(r.humidity, Some(1.0));
        assert!(r.extra.is_empty());
    }

    #[test]
    fn unknown_top_level_fields_are_ignored() {
        let payload = r#"{"deviceId":"d","seq":[1,{"a":2}],"timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{}}"#;
        ok(b"devices/d/telemetry", payload);
    }

    #[test]
    fn each_kind_of_bad_message_gets_its_reason() {
        use RejectReason::*;
        let t = b"devices/d1/telemetry";
        let ts = r#""timestamp":"2024-01-15T10:30:00Z""#;
        let cases: Vec<(String, RejectReason)> = vec![
            (r#"{"deviceId":"d1","timestamp":"#.into(), InvalidJson),
            ("not json at all".into(), InvalidJson),
            ("[1,2]".into(), InvalidJson),
            ("".into(), InvalidJson),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{}}}} x"#), InvalidJson),
            (format!(r#"{{"deviceId":"d1","deviceId":"d1",{ts},"type":"telemetry","payload":{{}}}}"#), InvalidJson),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{"temperature":NaN}}}}"#), InvalidJson),
            (format!(r#"{{{ts},"type":"telemetry","payload":{{"temperature":1}}}}"#), MissingField),
            (r#"{"deviceId":"d1","type":"telemetry","payload":{}}"#.into(), MissingField),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry"}}"#), MissingField),
            (format!(r#"{{"deviceId":"d1",{ts},"payload":{{}}}}"#), MissingField),
            (format!(r#"{{"deviceId":null,{ts},"type":"telemetry","payload":{{}}}}"#), MissingField),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{"temperature":"hot"}}}}"#), WrongType),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{"ok":true}}}}"#), WrongType),
            (format!(r#"{{"deviceId":42,{ts},"type":"telemetry","payload":{{}}}}"#), WrongType),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":[1,2,3]}}"#), WrongType),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"command","payload":{{}}}}"#), WrongType),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{}},"metadata":"x"}}"#), WrongType),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{}},"metadata":{{"firmwareVersion":2}}}}"#), WrongType),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{}},"metadata":{{"location":{{"lat":"north"}}}}}}"#), WrongType),
            (format!(r#"{{"deviceId":"d2",{ts},"type":"telemetry","payload":{{}}}}"#), TopicMismatch),
            (r#"{"deviceId":"d1","timestamp":"yesterday","type":"telemetry","payload":{}}"#.into(), InvalidTimestamp),
            (r#"{"deviceId":"d1","timestamp":"2024-13-45T10:30:00Z","type":"telemetry","payload":{}}"#.into(), InvalidTimestamp),
            (r#"{"deviceId":"d1","timestamp":"2024-01-15 10:30:00","type":"telemetry","payload":{}}"#.into(), InvalidTimestamp),
            (r#"{"deviceId":"d1","timestamp":"9999-01-15T10:30:00Z","type":"telemetry","payload":{}}"#.into(), InvalidTimestamp),
            (r#"{"deviceId":"d1","timestamp":1705314600,"type":"telemetry","payload":{}}"#.into(), WrongType),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{"temperature":1e999}}}}"#), NonFinite),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{"temperature":-1e999}}}}"#), NonFinite),
            (format!(r#"{{"deviceId":"d1",{ts},"type":"telemetry","payload":{{}},"metadata":{{"location":{{"lat":1e400}}}}}}"#), NonFinite),
        ];
        for (payload, expected) in cases {
            assert_eq!(reason(t, payload.as_bytes()), expected, "{payload}");
        }
    }

    #[test]
    fn invalid_utf8_is_its_own_reason() {
        let payload = b"{\"deviceId\":\"\xffd1\"}";
        assert_eq!(
            reason(b"devices/d1/telemetry", payload),
            RejectReason::InvalidUtf8
        );
    }

    #[test]
    fn readings_from_too_far_in_the_future_are_invalid_timestamps() {
        let limits = DecodeLimits::default(); // 5 minutes of skew allowed
        let message = br#"{"deviceId":"d","timestamp":"2024-01-15T10:30:00Z","type":"telemetry","payload":{}}"#;
        let reading = decode(b"devices/d/telemetry", message, &limits).unwrap();
        let at = |h: i64, m: i64| reading.ts_ns - (h * 3600 + m * 60) * 1_000_000_000;
        assert!(Rejection::check_clock_skew(&reading, at(0, 5), &limits).is_ok());
        assert!(
            Rejection::check_clock_skew(&reading, at(-1, 0), &limits).is_ok(),
            "past"
        );
        let rejection = Rejection::check_clock_skew(&reading, at(3, 0), &limits).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::InvalidTimestamp);
        assert_eq!(
            rejection.detail,
            "timestamp is 3h ahead of the server clock (ingest.max_clock_skew is 5m)"
        );
    }

    #[test]
    fn oversized_payloads_are_rejected_before_parsing() {
        let limits = DecodeLimits {
            max_payload_bytes: 100,
            ..DecodeLimits::default()
        };
        let big = vec![b' '; 101];
        let rejection = decode(b"devices/d/telemetry", &big, &limits).unwrap_err();
        assert_eq!(rejection.reason, RejectReason::TooLarge);
        assert!(
            decode(b"devices/d/telemetry", &big[..100], &limits)
                .is_err_and(|r| r.reason == RejectReason::InvalidJson)
        );
    }

    #[test]
    fn topics_must_have_the_telemetry_shape() {
        for topic in [
            &b"devices//telemetry"[..],
            b"devices/d1/status",
            b"other/d1/telemetry",
            b"devices/a/b/telemetry",
            b"devices/\xff/telemetry",
        ] {
            assert_eq!(
                reason(topic, REFERENCE.as_bytes()),
                RejectReason::InvalidTopic
            );
        }
        assert_eq!(
            device_id_from_topic(b"devices/x y/telemetry").unwrap(),
            "x y"
        );
    }

    #[test]
    fn reason_names_are_stable() {
        let names: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "invalid_utf8",
                "invalid_json",
                "missing_field",
                "wrong_type",
                "topic_mismatch",
                "invalid_topic",
                "invalid_timestamp",
                "non_finite",
                "too_large",
                "not_authorized"
            ]
        );
    }
}
