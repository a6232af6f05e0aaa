//! TensorBoard event files written directly: TFRecord framing around `Event` protobufs
//! (scalars, histograms, and text via the text plugin's string tensors), as TensorFlow's
//! `EventFileWriter` writes them. Messages are the subset of `tensorflow/core/util/event.proto`
//! and `summary.proto` that TensorBoard reads for these plugins.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "5")]
    histo: Option<HistogramProto>,
    #[prost(message, optional, tag = "8")]
    tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
}

#[derive(Clone, PartialEq, Message)]
struct HistogramProto {
    #[prost(double, tag = "1")]
    min: f64,
    #[prost(double, tag = "2")]
    max: f64,
    #[prost(double, tag = "3")]
    num: f64,
    #[prost(double, tag = "4")]
    sum: f64,
    #[prost(double, tag = "5")]
    sum_squares: f64,
    #[prost(double, repeated, tag = "6")]
    bucket_limit: Vec<f64>,
    #[prost(double, repeated, tag = "7")]
    bucket: Vec<f64>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    /// DataType enum; 7 = DT_STRING.
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShapeProto>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// An append-only TensorBoard event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// Creates `events.out.tfevents.<time>.<host>` in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now() as u64,
            std::process::id()
        ));
        let file = File::create(&path)?;
        let mut w = EventWriter { file, path };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        let data = e.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(&data);
        rec.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file.write_all(&rec)
    }

    fn summary(&mut self, step: u64, value: SummaryValue) -> std::io::Result<()> {
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value: vec![value] }),
        })
    }

    /// A scalar.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> std::io::Result<()> {
        self.summary(
            step,
            SummaryValue {
                tag: tag.into(),
                simple_value: Some(value as f32),
                ..Default::default()
            },
        )
    }

    /// A histogram of `values` (30 equal-width buckets between their min and max).
    pub fn histogram(&mut self, tag: &str, step: u64, values: &[f64]) -> std::io::Result<()> {
        let vals: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if vals.is_empty() {
            return Ok(());
        }
        let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let n = 30usize;
        let width = ((max - min) / n as f64).max(1e-12);
        let mut bucket = vec![0.0; n];
        for v in &vals {
            let i = (((v - min) / width) as usize).min(n - 1);
            bucket[i] += 1.0;
        }
        let bucket_limit: Vec<f64> = (1..=n)
            .map(|i| if i == n { max } else { min + width * i as f64 })
            .collect();
        self.summary(
            step,
            SummaryValue {
                tag: tag.into(),
                histo: Some(HistogramProto {
                    min,
                    max,
                    num: vals.len() as f64,
                    sum: vals.iter().sum(),
                    sum_squares: vals.iter().map(|v| v * v).sum(),
                    bucket_limit,
                    bucket,
                }),
                ..Default::default()
            },
        )
    }

    /// Text (markdown) for TensorBoard's text plugin.
    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> std::io::Result<()> {
        self.summary(
            step,
            SummaryValue {
                tag: tag.into(),
                tensor: Some(TensorProto {
                    dtype: 7,
                    tensor_shape: Some(TensorShapeProto {
                        dim: vec![Dim { size: 1 }],
                    }),
                    string_val: vec![text.as_bytes().to_vec()],
                }),
                metadata: Some(SummaryMetadata {
                    plugin_data: Some(PluginData {
                        plugin_name: "text".into(),
                        content: Vec::new(),
                    }),
                }),
                ..Default::default()
            },
        )
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_known_value() {
        // crc32c("123456789") = 0xE3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let m = masked_crc(b"123456789");
        assert_eq!(m, 0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }
}
