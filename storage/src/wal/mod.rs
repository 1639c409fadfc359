//! The write-ahead log (issue #14, being built): segment files under `<data_dir>/wal/`
//! of framed records. So far: the record format and the scan that recovers a segment
//! ([`record`]), and the group-commit writer ([`writer`]); segments, replay and
//! checkpoints come next.

pub mod record;
pub mod writer;
