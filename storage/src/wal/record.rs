//! Write-ahead-log records as they lie in a segment file, and the scan that reads them
//! back, telling a torn tail (a crash cut the last record) from damage in the middle.
//!
//! A record is `[len: u32 LE][crc: u32 LE][body: len bytes]`, `crc` the CRC32C of the
//! body. The body holds what rebuilds a row or a reject through the same decoder:
//! `[received_at_ns: i64 LE][topic_len: u16 LE][topic][payload]`. A `topic_len` of 0
//! says flags follow, then the topic's length:
//! `[received_at_ns][0u16][flags: u8][topic_len: u16 LE][topic][payload]` (flag 1: the
//! message was [`denied`](Record::denied)); a record with flags or an empty topic (which
//! MQTT never sends) takes that form. Every other record keeps the first, so a log
//! written before flags existed reads the same.

/// The largest body a record may declare; a longer one is damage, not a record.
pub const MAX_BODY: usize = 16 << 20;
const HEADER: usize = 8;
const BODY_FIXED: usize = 10;
/// The flags and the real topic length of a record with flags.
const FLAGS_FIXED: usize = 3;
const FLAG_DENIED: u8 = 1;
const FLAG_READING: u8 = 2;

/// One message as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub received_at_ns: i64,
    pub topic: &'a [u8],
    pub payload: &'a [u8],
    /// The client was not allowed to publish to `topic`: it is replayed as a reject.
    pub denied: bool,
    /// `payload` is an accepted reading in the ingest stage's own encoding (its
    /// `journal` module), `topic` empty: replayed without decoding JSON again. Storage
    /// keeps the bytes and does not read them.
    pub reading: bool,
}

/// Why a record cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a topic of {0} bytes does not fit a WAL record (at most 65535)")]
    Topic(usize),
    #[error("a record of {0} bytes is larger than a WAL record may be ({MAX_BODY})")]
    TooLarge(usize),
}

/// How many bytes `record` takes in a segment, framing included.
pub fn framed_len(record: &Record<'_>) -> usize {
    HEADER + body_fixed(record) + record.topic.len() + record.payload.len()
}

fn body_fixed(record: &Record<'_>) -> usize {
    if with_flags(record) {
        BODY_FIXED + FLAGS_FIXED
    } else {
        BODY_FIXED
    }
}

fn with_flags(record: &Record<'_>) -> bool {
    record.denied || record.reading || record.topic.is_empty()
}

fn flags(record: &Record<'_>) -> u8 {
    let mut flags = 0;
    if record.denied {
        flags |= FLAG_DENIED;
    }
    if record.reading {
        flags |= FLAG_READING;
    }
    flags
}

/// Appends `record`, framed, to `out`.
pub fn encode(record: &Record<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let topic_len =
        u16::try_from(record.topic.len()).map_err(|_| EncodeError::Topic(record.topic.len()))?;
    let body_len = body_fixed(record) + record.topic.len() + record.payload.len();
    if body_len > MAX_BODY {
        return Err(EncodeError::TooLarge(body_len));
    }
    let start = out.len();
    out.reserve(HEADER + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&record.received_at_ns.to_le_bytes());
    if with_flags(record) {
        out.extend_from_slice(&[0, 0, flags(record)]);
    }
    out.extend_from_slice(&topic_len.to_le_bytes());
    out.extend_from_slice(record.topic);
    out.extend_from_slice(record.payload);
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// What a scan finds at an offset of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<'a> {
    Record {
        offset: usize,
        record: Record<'a>,
    },
    /// The bytes from `from` to the end hold no whole valid record: what a crash in the
    /// middle of a write leaves. The segment is truncated there.
    TornTail {
        from: usize,
    },
    /// The bytes `from..to` are damaged, and a valid record starts at `to`: they are
    /// moved aside and counted, and the scan goes on.
    Corrupt {
        from: usize,
        to: usize,
    },
}

/// Reads a segment's records in order. Each damaged range is reported once.
pub struct Scan<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    pub fn new(data: &'a [u8]) -> Scan<'a> {
        Scan { data, at: 0 }
    }

    /// The record at `at`, if one is there whole and intact.
    fn record_at(&self, at: usize) -> Option<(Record<'a>, usize)> {
        let header = self.data.get(at..at + HEADER)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if !(BODY_FIXED..=MAX_BODY).contains(&len) {
            return None;
        }
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let body = self.data.get(at + HEADER..at + HEADER + len)?;
        if crc32c::crc32c(body) != crc {
            return None;
        }
        let received_at_ns = i64::from_le_bytes(body[..8].try_into().ok()?);
        let mut topic_len = u16::from_le_bytes([body[8], body[9]]) as usize;
        let mut fixed = BODY_FIXED;
        let mut flags = 0;
        if topic_len == 0 {
            let more = body.get(BODY_FIXED..BODY_FIXED + FLAGS_FIXED)?;
            flags = more[0];
            topic_len = u16::from_le_bytes([more[1], more[2]]) as usize;
            fixed += FLAGS_FIXED;
            if flags & !(FLAG_DENIED | FLAG_READING) != 0 {
                // Written by a later version, or damage the CRC did not catch.
                return None;
            }
        }
        let topic = body.get(fixed..fixed + topic_len)?;
        let payload = &body[fixed + topic_len..];
        let record = Record {
            received_at_ns,
            topic,
            payload,
            denied: flags & FLAG_DENIED != 0,
            reading: flags & FLAG_READING != 0,
        };
        Some((record, at + HEADER + len))
    }
}

impl<'a> Iterator for Scan<'a> {
    type Item = Found<'a>;

    fn next(&mut self) -> Option<Found<'a>> {
        if self.at >= self.data.len() {
            return None;
        }
        let from = self.at;
        if let Some((record, end)) = self.record_at(from) {
            self.at = end;
            return Some(Found::Record {
                offset: from,
                record,
            });
        }
        // Damage: the next offset where an intact record starts ends it; none means the
        // rest is a torn tail. (A random match needs a plausible length and a CRC32C
        // match: about one chance in 2^32 per offset.)
        let resume = (from + 1..self.data.len()).find(|&at| self.record_at(at).is_some());
        Some(match resume {
            Some(to) => {
                self.at = to;
                Found::Corrupt { from, to }
            }
            None => {
                self.at = self.data.len();
                Found::TornTail { from }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: usize) -> Vec<(i64, Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|i| {
                (
                    1_705_314_600_000_000_000 + i as i64,
                    format!("devices/d{i}/telemetry").into_bytes(),
                    format!(r#"{{"deviceId":"d{i}","n":{}}}"#, "x".repeat(i % 7)).into_bytes(),
                )
            })
            .collect()
    }

    fn segment(records: &[(i64, Vec<u8>, Vec<u8>)]) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut offsets = Vec::new();
        for (at, topic, payload) in records {
            offsets.push(out.len());
            encode(
                &Record {
                    received_at_ns: *at,
                    topic,
                    payload,
                    denied: *at % 3 == 0,
                    reading: *at % 5 == 0,
                },
                &mut out,
            )
            .unwrap();
        }
        (out, offsets)
    }

    fn decoded(found: &[Found<'_>]) -> Vec<i64> {
        found
            .iter()
            .filter_map(|f| match f {
                Found::Record { record, .. } => Some(record.received_at_ns),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn records_come_back_as_written() {
        let written = records(50);
        let (data, offsets) = segment(&written);
        let found: Vec<_> = Scan::new(&data).collect();
        assert_eq!(found.len(), 50);
        for ((f, (at, topic, payload)), offset) in found.iter().zip(&written).zip(&offsets) {
            assert_eq!(
                *f,
                Found::Record {
                    offset: *offset,
                    record: Record {
                        received_at_ns: *at,
                        topic,
                        payload,
                        denied: *at % 3 == 0,
                        reading: *at % 5 == 0,
                    }
                }
            );
        }
        let empty = Record {
            received_at_ns: 0,
            topic: b"",
            payload: b"",
            denied: false,
            reading: false,
        };
        let mut out = Vec::new();
        encode(&empty, &mut out).unwrap();
        let found: Vec<_> = Scan::new(&out).collect();
        assert_eq!(
            found,
            [Found::Record {
                offset: 0,
                record: empty
            }]
        );
    }

    #[test]
    fn a_cut_anywhere_in_the_last_record_is_a_torn_tail_after_every_whole_record() {
        let written = records(5);
        let (data, offsets) = segment(&written);
        let last = offsets[4];
        for cut in last + 1..data.len() {
            let found: Vec<_> = Scan::new(&data[..cut]).collect();
            assert_eq!(
                decoded(&found),
                written[..4].iter().map(|r| r.0).collect::<Vec<_>>()
            );
            assert_eq!(
                found.last(),
                Some(&Found::TornTail { from: last }),
                "cut {cut}"
            );
        }
        assert_eq!(
            decoded(&Scan::new(&data[..last]).collect::<Vec<_>>()).len(),
            4
        );
    }

    #[test]
    fn a_flipped_byte_in_the_middle_loses_only_its_record() {
        let written = records(9);
        let (data, offsets) = segment(&written);
        for (i, byte) in [(4, offsets[4] + 13), (0, 2), (4, offsets[4] + 5)] {
            let mut damaged = data.clone();
            damaged[byte] ^= 0x40;
            let found: Vec<_> = Scan::new(&damaged).collect();
            let mut expected: Vec<i64> = written.iter().map(|r| r.0).collect();
            expected.remove(i);
            assert_eq!(decoded(&found), expected, "byte {byte}");
            assert!(
                found.contains(&Found::Corrupt {
                    from: offsets[i],
                    to: offsets[i + 1]
                }),
                "{found:?}"
            );
        }
    }

    #[test]
    fn what_cannot_be_a_record_is_refused_at_encoding() {
        let long = vec![b'a'; 70_000];
        let big = vec![0; MAX_BODY];
        let mut out = Vec::new();
        let topic = Record {
            received_at_ns: 0,
            topic: &long,
            payload: b"",
            denied: false,
            reading: false,
        };
        assert_eq!(encode(&topic, &mut out), Err(EncodeError::Topic(70_000)));
        let large = Record {
            received_at_ns: 0,
            topic: b"t",
            payload: &big,
            denied: false,
            reading: false,
        };
        assert!(matches!(
            encode(&large, &mut out),
            Err(EncodeError::TooLarge(_))
        ));
        assert!(out.is_empty(), "nothing half-written");
    }
}
