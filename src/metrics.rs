//! Step metrics: `metrics.jsonl` (one line per step and per evaluation), TensorBoard event files,
//! and a progress bar on a terminal (plain log lines otherwise).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::tensorboard::EventWriter;

/// Where a run's metrics go.
pub struct MetricsSink {
    jsonl: PathBuf,
    tb: Option<EventWriter>,
}

impl MetricsSink {
    /// Opens `<run>/metrics.jsonl` (appending when resuming) and `<run>/tensorboard/`.
    pub fn open(run_dir: &Path, tensorboard: bool, resuming: bool) -> Result<Self> {
        let jsonl = run_dir.join("metrics.jsonl");
        if !resuming {
            std::fs::write(&jsonl, "").at(&jsonl)?;
        }
        let tb = if tensorboard {
            let dir = run_dir.join("tensorboard");
            Some(EventWriter::create(&dir).at(dir)?)
        } else {
            None
        };
        Ok(MetricsSink { jsonl, tb })
    }

    /// Drops lines of steps after `step` (they will be recomputed after a resume).
    pub fn truncate_after(&mut self, step: u64) -> Result<()> {
        let text = std::fs::read_to_string(&self.jsonl).unwrap_or_default();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_none_or(|s| s <= step)
            })
            .collect();
        let mut out = kept.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        std::fs::write(&self.jsonl, out).at(&self.jsonl)?;
        Ok(())
    }

    fn append(&self, value: &serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.jsonl)
            .at(&self.jsonl)?;
        writeln!(f, "{value}").at(&self.jsonl)?;
        Ok(())
    }

    /// One training step: scalars, histograms and sample texts.
    pub fn step(
        &mut self,
        step: u64,
        m: &BTreeMap<String, f64>,
        hists: &[(&str, Vec<f64>)],
        samples: &[String],
    ) -> Result<()> {
        let mut line = serde_json::json!({ "step": step, "kind": "train" });
        for (k, v) in m {
            line[k] = serde_json::json!(if v.is_finite() { Some(*v) } else { None });
        }
        self.append(&line)?;
        if let Some(tb) = self.tb.as_mut() {
            for (k, v) in m {
                tb.scalar(k, step, *v).at(tb.path().to_path_buf())?;
            }
            for (name, values) in hists {
                tb.histogram(&format!("hist/{name}"), step, values)
                    .at(tb.path().to_path_buf())?;
            }
            for (i, s) in samples.iter().enumerate() {
                tb.text(&format!("samples/{i}"), step, s)
                    .at(tb.path().to_path_buf())?;
            }
            tb.flush().at(tb.path().to_path_buf())?;
        }
        Ok(())
    }

    /// An evaluation at `step`.
    pub fn eval(&mut self, step: u64, m: &BTreeMap<String, f64>) -> Result<()> {
        let mut line = serde_json::json!({ "step": step, "kind": "eval" });
        for (k, v) in m {
            line[k] = serde_json::json!(v);
        }
        self.append(&line)?;
        if let Some(tb) = self.tb.as_mut() {
            for (k, v) in m {
                tb.scalar(k, step, *v).at(tb.path().to_path_buf())?;
            }
            tb.flush().at(tb.path().to_path_buf())?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Some(tb) = self.tb.as_mut() {
            tb.flush().at(tb.path().to_path_buf())?;
        }
        Ok(())
    }
}

/// A progress bar with ETA and the latest reward on a terminal; log lines otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
}

impl Progress {
    pub fn new(total: u64, done: u64, enabled: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  ETA {eta}  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_position(done);
            b
        });
        Progress { bar, total }
    }

    pub fn update(&self, step: u64, m: &BTreeMap<String, f64>) {
        let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        let msg = format!(
            "reward {:.3}  acc {:.3}  len {:.1}  kl {:.4}  {:.1}s",
            get("reward/mean"),
            get("reward/accuracy"),
            get("response_length/mean"),
            get("actor/ppo_kl"),
            get("time/step_s")
        );
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                b.set_message(msg);
            }
            None => tracing::info!("step {step}/{}: {msg}", self.total),
        }
    }

    pub fn message(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => tracing::info!("{msg}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Starts a new peak-memory window for this process (Linux: resets `VmHWM` through
/// `/proc/self/clear_refs`; elsewhere nothing).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's peak resident memory (bytes) since the last [`reset_peak_rss`] (Linux).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
