//! Malformed messages, one kind per reject reason sluice records, so a load run can
//! check that every bad message lands in `rejects` and nothing else is lost.

use sluice_ingest::RejectReason;

/// The kinds, in the order they are cycled through: every reason a message's content
/// can earn (`not_authorized` is the broker's, for the topic).
pub const BAD_KINDS: [RejectReason; RejectReason::OF_CONTENT.len()] = RejectReason::OF_CONTENT;

/// Bytes of the `too_large` payload: over sluice's default 64 KiB message limit, under
/// its 2 MiB packet limit.
const TOO_LARGE_BYTES: usize = 70_000;

/// The topic and payload of a malformed message of kind `BAD_KINDS[kind % BAD_KINDS.len()]`, from
/// `device_id` at `timestamp`.
pub fn bad_message(kind: usize, device_id: &str, timestamp: &str) -> (String, Vec<u8>) {
    let topic = format!("devices/{device_id}/telemetry");
    let valid_prefix = format!(
        r#"{{"deviceId":"{device_id}","timestamp":"{timestamp}","type":"telemetry","payload":"#
    );
    let payload = match BAD_KINDS[kind % BAD_KINDS.len()] {
        RejectReason::InvalidJson => format!(r#"{{"deviceId":"{device_id}","timestamp":"#).into_bytes(),
        RejectReason::InvalidUtf8 => {
            let mut bytes = format!(r#"{{"deviceId":"{device_id}"#).into_bytes();
            bytes.push(0xff);
            bytes.extend_from_slice(br#""}"#);
            bytes
        }
        RejectReason::MissingField => format!(r#"{{"timestamp":"{timestamp}","type":"telemetry","payload":{{"temperature":1}}}}"#).into_bytes(),
        RejectReason::WrongType => format!(r#"{valid_prefix}{{"temperature":"hot"}}}}"#).into_bytes(),
        RejectReason::TopicMismatch => format!(r#"{{"deviceId":"not-{device_id}","timestamp":"{timestamp}","type":"telemetry","payload":{{}}}}"#).into_bytes(),
        RejectReason::InvalidTopic => {
            let payload = format!(r#"{valid_prefix}{{"temperature":1}}}}"#).into_bytes();
            return (format!("devices/{device_id}/status"), payload);
        }
        RejectReason::InvalidTimestamp => format!(r#"{{"deviceId":"{device_id}","timestamp":"yesterday","type":"telemetry","payload":{{}}}}"#).into_bytes(),
        RejectReason::NonFinite => format!(r#"{valid_prefix}{{"temperature":1e999}}}}"#).into_bytes(),
        RejectReason::TooLarge => {
            let mut bytes = format!(r#"{{"deviceId":"{device_id}","pad":""#).into_bytes();
            bytes.resize(TOO_LARGE_BYTES, b'x');
            bytes.extend_from_slice(br#""}"#);
            bytes
        }
        RejectReason::NotAuthorized => unreachable!("not a kind of content"),
    };
    (topic, payload)
}

#[cfg(test)]
mod tests {
    use sluice_ingest::{DecodeLimits, decode};

    use super::*;

    #[test]
    fn every_kind_is_rejected_by_sluice_for_its_own_reason() {
        let mut payloads = std::collections::HashSet::new();
        for (kind, reason) in BAD_KINDS.iter().enumerate() {
            let (topic, payload) = bad_message(kind, "device-000001", "2024-01-15T10:30:00.000Z");
            assert!(topic.starts_with("devices/device-000001/"));
            assert!(
                payloads.insert(payload.clone()),
                "kind {kind} repeats another"
            );
            let rejection = decode(topic.as_bytes(), &payload, &DecodeLimits::default())
                .err()
                .unwrap_or_else(|| panic!("{reason} was accepted"));
            assert_eq!(rejection.reason, *reason, "{}", rejection.detail);
        }
        assert_eq!(
            bad_message(BAD_KINDS.len(), "device-000001", "2024-01-15T10:30:00.000Z"),
            bad_message(0, "device-000001", "2024-01-15T10:30:00.000Z"),
            "kinds cycle"
        );
    }
}
