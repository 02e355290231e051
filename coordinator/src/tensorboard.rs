//! TensorBoard event files: scalars written the way TensorBoard's own writer writes them, so
//! that `tensorboard --logdir <output.dir>/tensorboard` (or its `EventAccumulator`) reads them.
//!
//! A file `events.out.tfevents.<unix seconds>.<host>.<pid>` is a sequence of TFRecords, each
//!
//! ```text
//! u64 length (little-endian) | u32 masked CRC-32C of the length | data | u32 masked CRC-32C of data
//! ```
//!
//! whose data is a serialised `tensorflow.Event` protobuf: the first says `file_version:
//! "brain.Event:2"`, the others carry a `Summary` of `simple_value` scalars at a step. When the
//! job restarts from a checkpoint, a `SessionLog` START at that step tells TensorBoard to drop
//! what it shows past the step (the replayed steps then replace it). Only the fields used here
//! are declared (tensorflow/core/util/event.proto, framework/summary.proto).

use prost::Message;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    session_log: Option<SessionLog>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    /// 1: START.
    #[prost(int32, tag = "1")]
    status: i32,
    #[prost(string, tag = "2")]
    checkpoint_path: String,
    #[prost(string, tag = "3")]
    msg: String,
}

/// Appends events to one event file. Write errors are logged once, not raised: a full disk
/// must not stop training.
pub struct EventWriter {
    path: PathBuf,
    file: File,
    failed: bool,
}

impl EventWriter {
    /// A new event file in `dir` (made if missing).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", now.as_secs(), std::process::id()));
        let file = std::fs::OpenOptions::new().create_new(true).append(true).open(&path)?;
        let mut w = EventWriter { path, file, failed: false };
        w.write(&Event { wall_time: wall_time(), file_version: Some("brain.Event:2".into()), ..Event::default() });
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars `(tag, value)` at `step`, as one event.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue { tag: (*tag).to_string(), simple_value: Some(*v as f32) })
            .collect();
        self.write(&Event {
            wall_time: wall_time(),
            step: step as i64,
            summary: Some(Summary { value }),
            ..Event::default()
        });
    }

    /// The job (re)starts from `checkpoint`, written after `step`: TensorBoard drops the
    /// points it has past that step (a START at step s purges every step >= s).
    pub fn session_start(&mut self, step: u64, checkpoint: &str) {
        self.write(&Event {
            wall_time: wall_time(),
            step: step as i64 + 1,
            session_log: Some(SessionLog {
                status: 1,
                checkpoint_path: checkpoint.to_string(),
                msg: format!("restarted from {checkpoint}"),
            }),
            ..Event::default()
        });
    }

    fn write(&mut self, e: &Event) {
        let record = tfrecord(&e.encode_to_vec());
        if let Err(err) = self.file.write_all(&record) {
            if !self.failed {
                tracing::warn!(path = %self.path.display(), error = %err, "cannot write the TensorBoard event file");
            }
            self.failed = true;
        }
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One TFRecord around `data`.
fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// TFRecord's checksum: CRC-32C, rotated right by 15 bits plus a constant (so that a CRC of
/// data that holds CRCs is not itself trivial).
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The check value of CRC-32C (RFC 3720, appendix B.4).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn records_frame_their_data_with_checksums() {
        let r = tfrecord(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(r.len(), 19);
        assert_eq!(u32::from_le_bytes(r[15..19].try_into().unwrap()), masked_crc32c(b"abc"));
    }
}
