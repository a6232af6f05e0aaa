//! Reward functions: the [`RewardFn`] trait, the built-in verifiers, and [`RewardConfig`], the
//! recipe's closed set of them.
//!
//! A reward looks at one [`Sample`] (prompt, ground truth, metadata) and one [`Completion`] and
//! returns a [`Reward`]: a scalar `value` and named per-sample `metrics` (averaged per batch by the
//! [`RewardRunner`](crate::RewardRunner)). Rewards must be pure functions of their inputs; they may
//! be called from any thread, concurrently.
//!
//! | built-in | recipe `name` | value |
//! |---|---|---|
//! | [`NumberMatch`] | `gsm8k`, `number-match` | 1 if the extracted number equals the ground truth |
//! | [`MathMatch`] | `math` | 1 if the last `\boxed{}` is equivalent to the ground truth |
//! | [`CountdownReward`] | `countdown` | 1 if the expression uses the given numbers and hits the target |
//! | [`ExactMatch`] | `exact-match` | 1 if the (extracted) text equals the ground truth |
//! | [`RegexMatch`] | `regex-match` | 1 if a regex matches (or its capture equals the ground truth) |
//! | [`FormatReward`] | `format` | 1 if the completion has the configured shape |
//! | [`OverlongPenalty`] | `overlong-penalty` | DAPO's soft overlong penalty, in `[-1, 0]` |
//! | [`LengthPenalty`] | `length-penalty` | linear penalty on tokens past a target, in `[-coef, 0]` |
//! | [`WeightedSum`] | `weighted-sum` | `Σ wᵢ·rᵢ` of any of the above |

mod combine;
mod countdown;
pub mod extract;
mod length;
pub mod math;
mod number;
mod text;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::sample::{Completion, Sample};

pub use combine::{WeightedSum, WeightedTerm};
pub use countdown::{
    evaluate_arithmetic, evaluate_countdown, CountdownConfig, CountdownError, CountdownEval,
    CountdownReward,
};
pub use length::{LengthPenalty, LengthPenaltyConfig, OverlongPenalty, OverlongPenaltyConfig};
pub use math::{MathMatch, MathMatchConfig};
pub use number::{NumberFormat, NumberMatch, NumberMatchConfig};
pub use text::{
    ExactMatch, ExactMatchConfig, Extract, FormatReward, FormatRewardConfig, RegexMatch,
    RegexMatchConfig, RegexMode, DEFAULT_FORMAT_PATTERN,
};

/// The result of scoring one completion.
///
/// ```
/// use rlrun_rollout::Reward;
/// let r = Reward::new(1.0).with_metric("has_answer", 1.0);
/// assert_eq!(r.metrics["has_answer"], 1.0);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Reward {
    /// The scalar reward used for advantages.
    pub value: f32,
    /// Per-sample diagnostics (e.g. `has_boxed = 1`), averaged over the batch by the runner and
    /// logged as `reward/<name>`. Keys should be short `snake_case` names.
    pub metrics: BTreeMap<String, f32>,
}

impl Reward {
    /// A reward with a value and no metrics.
    pub fn new(value: f32) -> Self {
        Self {
            value,
            metrics: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) a metric.
    pub fn with_metric(mut self, name: impl Into<String>, value: f32) -> Self {
        self.metrics.insert(name.into(), value);
        self
    }

    /// `1.0` if `correct`, else `0.0`.
    pub fn binary(correct: bool) -> Self {
        Self::new(if correct { 1.0 } else { 0.0 })
    }
}

/// A reward function: scores a completion of a sample.
///
/// Object-safe, `Send + Sync`: the runner shares one instance across worker threads
/// (`Arc<dyn RewardFn>`). Implement it in your own crate:
///
/// ```
/// use rlrun_rollout::{Completion, Prompt, Reward, RewardError, RewardFn, Sample};
///
/// /// 1 if the completion mentions the ground truth, minus a little per character.
/// struct MentionsAnswer;
///
/// impl RewardFn for MentionsAnswer {
///     fn name(&self) -> &str {
///         "mentions-answer"
///     }
///     fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
///         let hit = sample.ground_truth.as_deref().is_some_and(|gt| completion.text.contains(gt));
///         let brevity = -0.001 * completion.text.chars().count() as f32;
///         Ok(Reward::new(f32::from(u8::from(hit)) + brevity).with_metric("hit", f32::from(u8::from(hit))))
///     }
/// }
///
/// let sample = Sample::new(0, Prompt::user("What is 6 * 7?")).with_ground_truth("42");
/// let r = MentionsAnswer.score(&sample, &Completion::from_text("It is 42.")).unwrap();
/// assert!((r.value - (1.0 - 0.009)).abs() < 1e-6);
/// ```
///
/// Contract: `score` should be deterministic, must not assume it runs on any particular thread,
/// and should return a finite value. An error, a panic, a non-finite value or a call that exceeds
/// the runner's time limit is replaced by the runner's failure score and counted; it never stops
/// a run.
pub trait RewardFn: Send + Sync {
    /// A short name for logs and metric keys (e.g. `math`).
    fn name(&self) -> &str;

    /// Scores one completion of one sample. An error scores the runner's failure score and is
    /// counted in `reward/errors`; it never stops a run.
    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError>;
}

/// Why a reward function could not score a completion (a Python reward that raised, a
/// verifier that could not run): the sample scores the failure score, and the error is counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RewardError(pub String);

impl RewardError {
    pub fn new(message: impl Into<String>) -> Self {
        RewardError(message.into())
    }
}

impl<R: RewardFn + ?Sized> RewardFn for Arc<R> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        (**self).score(sample, completion)
    }
}

impl<R: RewardFn + ?Sized> RewardFn for Box<R> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        (**self).score(sample, completion)
    }
}

/// The recipe's choice of reward: one built-in with its parameters, or a weighted sum of several.
///
/// Internally tagged by `name` (kebab-case); unknown fields are rejected. In TOML:
///
/// ```
/// # use rlrun_rollout::RewardConfig;
/// let cfg: RewardConfig = toml::from_str(r#"
///     name = "weighted-sum"
///     [[terms]]
///     weight = 1.0
///     reward = { name = "math" }
///     [[terms]]
///     weight = 0.2
///     reward = { name = "format", pattern = '(?s)^<think>.*</think>.*\\boxed\{.*\}' }
///     [[terms]]
///     weight = 1.0
///     reward = { name = "overlong-penalty", buffer_tokens = 256 }
/// "#).unwrap();
/// let reward = cfg.build().unwrap();
/// assert_eq!(reward.name(), "weighted-sum");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum RewardConfig {
    /// GSM8K-style numeric answer ([`NumberMatch`]); `format` defaults to `flexible`.
    Gsm8k(NumberMatchConfig),
    /// Numeric answer with a strict format ([`NumberMatch`]), e.g. for the arithmetic task;
    /// `format` defaults to `boxed`.
    NumberMatch(StrictNumberMatchConfig),
    /// MATH answer equivalence ([`MathMatch`]).
    Math(MathMatchConfig),
    /// Countdown equation check ([`CountdownReward`]).
    Countdown(CountdownConfig),
    /// Exact string match ([`ExactMatch`]).
    ExactMatch(ExactMatchConfig),
    /// Regex match ([`RegexMatch`]).
    RegexMatch(RegexMatchConfig),
    /// Output format check ([`FormatReward`]).
    Format(FormatRewardConfig),
    /// DAPO soft overlong penalty ([`OverlongPenalty`]).
    OverlongPenalty(OverlongPenaltyConfig),
    /// Linear length penalty ([`LengthPenalty`]).
    LengthPenalty(LengthPenaltyConfig),
    /// Weighted sum of other rewards ([`WeightedSum`]).
    WeightedSum(WeightedSumConfig),
    /// A reward registered at run time under a name with [`registry::register`] (e.g. a Python
    /// function decorated with `@rlrun.reward("name")`): `{ name = "registered", function = "name" }`.
    Registered(RegisteredConfig),
}

/// Parameters of `name = "registered"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisteredConfig {
    /// The name the reward was registered under.
    pub function: String,
}

/// Rewards registered by name in this process, for recipes to use (`name = "registered"`).
pub mod registry {
    use std::sync::Arc;

    use super::RewardFn;
    use crate::named::Named;

    static TABLE: Named<dyn RewardFn> = Named::new();

    /// Registers (or replaces) a reward under `name`.
    pub fn register(name: &str, reward: Arc<dyn RewardFn>) {
        TABLE.register(name, reward);
    }

    /// The reward registered under `name`.
    pub fn get(name: &str) -> Option<Arc<dyn RewardFn>> {
        TABLE.get(name)
    }

    /// Registered names, sorted.
    pub fn names() -> Vec<String> {
        TABLE.names()
    }
}

/// Parameters of `name = "number-match"`: like [`NumberMatchConfig`], but `format` defaults to
/// [`NumberFormat::Boxed`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrictNumberMatchConfig {
    /// Where the answer must appear (default `boxed`).
    #[serde(default = "default_strict_format")]
    pub format: NumberFormat,
    /// Absolute tolerance for the comparison (default `1e-6`).
    #[serde(default = "number::default_tolerance")]
    pub tolerance: f64,
}

fn default_strict_format() -> NumberFormat {
    NumberFormat::Boxed
}

impl Default for StrictNumberMatchConfig {
    fn default() -> Self {
        Self {
            format: default_strict_format(),
            tolerance: number::default_tolerance(),
        }
    }
}

/// Parameters of `name = "weighted-sum"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedSumConfig {
    /// The terms; at least one.
    pub terms: Vec<WeightedTermConfig>,
}

/// One term of a weighted sum: `weight · reward`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedTermConfig {
    /// The weight (any finite number; negative weights turn a reward into a penalty).
    pub weight: f32,
    /// The reward.
    pub reward: RewardConfig,
}

impl RewardConfig {
    /// Builds the reward this config describes. Fails on invalid parameters (a regex that does not
    /// compile, a non-finite weight, an empty sum, ...).
    pub fn build(&self) -> Result<Arc<dyn RewardFn>> {
        Ok(match self {
            RewardConfig::Gsm8k(c) => Arc::new(NumberMatch::new("gsm8k", c.clone())?),
            RewardConfig::NumberMatch(c) => Arc::new(NumberMatch::new(
                "number-match",
                NumberMatchConfig {
                    format: c.format,
                    tolerance: c.tolerance,
                },
            )?),
            RewardConfig::Math(c) => Arc::new(MathMatch::new(c.clone())),
            RewardConfig::Countdown(c) => Arc::new(CountdownReward::new(c.clone())?),
            RewardConfig::ExactMatch(c) => Arc::new(ExactMatch::new(c.clone())),
            RewardConfig::RegexMatch(c) => Arc::new(RegexMatch::new(c.clone())?),
            RewardConfig::Format(c) => Arc::new(FormatReward::new(c.clone())?),
            RewardConfig::OverlongPenalty(c) => Arc::new(OverlongPenalty::new(c.clone())?),
            RewardConfig::LengthPenalty(c) => Arc::new(LengthPenalty::new(c.clone())?),
            RewardConfig::WeightedSum(c) => {
                let terms = c
                    .terms
                    .iter()
                    .map(|t| Ok(WeightedTerm::new(t.weight, t.reward.build()?)))
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(WeightedSum::new(terms)?)
            }
            RewardConfig::Registered(c) => {
                return registry::get(&c.function).ok_or_else(|| crate::Error::Config {
                    what: "reward `registered`".into(),
                    message: format!(
                        "no reward registered as `{}` in this process (registered: {})",
                        c.function,
                        registry::names().join(", ")
                    ),
                });
            }
        })
    }
}
