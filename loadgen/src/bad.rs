//! Malformed messages, one kind per reject reason sluice records, so a load run can
//! check that every bad message lands in `rejects` and nothing else is lost.

/// The kinds, in the order they are cycled through; each name is the reject reason
/// sluice is expected to record.
pub const BAD_KINDS: [&str; 9] = [
    "invalid_json",
    "invalid_utf8",
    "missing_field",
    "wrong_type",
    "topic_mismatch",
    "invalid_topic",
    "invalid_timestamp",
    "non_finite",
    "too_large",
];

/// Bytes of the `too_large` payload: over sluice's default 64 KiB message limit, under
/// its 2 MiB packet limit.
const TOO_LARGE_BYTES: usize = 70_000;

/// The topic and payload of a malformed message of kind `BAD_KINDS[kind % 9]` from
/// `device_id` at `timestamp`.
pub fn bad_message(kind: usize, device_id: &str, timestamp: &str) -> (String, Vec<u8>) {
    let topic = format!("devices/{device_id}/telemetry");
    let valid_prefix = format!(
        r#"{{"deviceId":"{device_id}","timestamp":"{timestamp}","type":"telemetry","payload":"#
    );
    let payload = match BAD_KINDS[kind % BAD_KINDS.len()] {
        "invalid_json" => format!(r#"{{"deviceId":"{device_id}","timestamp":"#).into_bytes(),
        "invalid_utf8" => {
            let mut bytes = format!(r#"{{"deviceId":"{device_id}"#).into_bytes();
            bytes.push(0xff);
            bytes.extend_from_slice(br#""}"#);
            bytes
        }
        "missing_field" => format!(r#"{{"timestamp":"{timestamp}","type":"telemetry","payload":{{"temperature":1}}}}"#).into_bytes(),
        "wrong_type" => format!(r#"{valid_prefix}{{"temperature":"hot"}}}}"#).into_bytes(),
        "topic_mismatch" => format!(r#"{{"deviceId":"not-{device_id}","timestamp":"{timestamp}","type":"telemetry","payload":{{}}}}"#).into_bytes(),
        "invalid_topic" => {
            let payload = format!(r#"{valid_prefix}{{"temperature":1}}}}"#).into_bytes();
            return (format!("devices/{device_id}/status"), payload);
        }
        "invalid_timestamp" => format!(r#"{{"deviceId":"{device_id}","timestamp":"yesterday","type":"telemetry","payload":{{}}}}"#).into_bytes(),
        "non_finite" => format!(r#"{valid_prefix}{{"temperature":1e999}}}}"#).into_bytes(),
        _ => {
            let mut bytes = format!(r#"{{"deviceId":"{device_id}","pad":""#).into_bytes();
            bytes.resize(TOO_LARGE_BYTES, b'x');
            bytes.extend_from_slice(br#""}"#);
            bytes
        }
    };
    (topic, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_malformed_in_its_own_way() {
        let mut payloads = std::collections::HashSet::new();
        for (kind, name) in BAD_KINDS.iter().enumerate() {
            let (topic, payload) = bad_message(kind, "device-000001", "2024-01-15T10:30:00.000Z");
            assert!(topic.starts_with("devices/device-000001/"));
            assert!(
                payloads.insert(payload.clone()),
                "kind {kind} repeats another"
            );
            let json = std::str::from_utf8(&payload)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok());
            match *name {
                "invalid_json" | "invalid_utf8" => assert!(json.is_none()),
                "too_large" => assert!(payload.len() > 64 * 1024),
                "invalid_topic" => assert!(topic.ends_with("/status")),
                // 1e999 is valid JSON syntax that overflows f64; serde_json refuses it.
                "non_finite" => assert!(std::str::from_utf8(&payload).unwrap().contains("1e999")),
                _ => assert!(json.is_some(), "{name}"),
            }
        }
    }
}
