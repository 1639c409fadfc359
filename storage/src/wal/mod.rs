//! The write-ahead log (issue #14, being built): segment files under `<data_dir>/wal/`
//! of framed records. So far: the record format and the scan that recovers a segment
//! ([`record`]), the group-commit writer ([`writer`]) and the segment files with their
//! recovery at start ([`segments`]); wiring into PUBACKs, replay into the tables and
//! checkpoints come next.

pub mod record;
pub mod segments;
pub mod writer;
