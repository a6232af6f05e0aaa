//! Length-based rewards: DAPO's soft overlong penalty and a linear length penalty.

use serde::{Deserialize, Serialize};

use super::{Reward, RewardError, RewardFn};
use crate::error::{Error, Result};
use crate::sample::{Completion, FinishReason, Sample};

fn one() -> f32 {
    1.0
}

/// Parameters of [`OverlongPenalty`] (`name = "overlong-penalty"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlongPenaltyConfig {
    /// `L_cache`: the length of the soft-penalty zone before the limit, in tokens (> 0). DAPO uses
    /// 4096 with `L_max` = 20480.
    pub buffer_tokens: usize,
    /// `L_max`; default: the completion's own `max_tokens` (what the generator used).
    #[serde(default)]
    pub max_tokens: Option<usize>,
}

/// DAPO's soft overlong punishment (Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning
/// System at Scale", arXiv 2503.14476, eq. 13), added to the task reward:
///
/// ```text
///            ⎧ 0                              if |y| ≤ L_max − L_cache
/// R(y)   =   ⎨ ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
///            ⎩ −1                             if |y| > L_max
/// ```
///
/// `|y|` is the response length in tokens (`completion.token_ids.len()`). If the limit is
/// unknown (`max_tokens` neither configured nor set on the completion) the value is 0 and the
/// metric `unknown_limit` is 1. Scale it with a [`WeightedSum`](super::WeightedSum) weight.
///
/// Metrics: `in_buffer` (inside the penalty zone or past the limit), `truncated` (finish reason
/// `length`).
#[derive(Clone, Debug)]
pub struct OverlongPenalty {
    config: OverlongPenaltyConfig,
}

impl OverlongPenalty {
    /// Validates the parameters.
    pub fn new(config: OverlongPenaltyConfig) -> Result<Self> {
        let err = |message: String| Error::Config {
            what: "reward `overlong-penalty`".into(),
            message,
        };
        if config.buffer_tokens == 0 {
            return Err(err("buffer_tokens must be > 0".into()));
        }
        if let Some(max) = config.max_tokens {
            if config.buffer_tokens > max {
                return Err(err(format!(
                    "buffer_tokens ({}) must not exceed max_tokens ({max})",
                    config.buffer_tokens
                )));
            }
        }
        Ok(Self { config })
    }
}

impl RewardFn for OverlongPenalty {
    fn name(&self) -> &str {
        "overlong-penalty"
    }

    fn score(&self, _sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        Ok(self.reward_for(_sample, completion))
    }
}

impl OverlongPenalty {
    /// The reward of one completion (never fails).
    fn reward_for(&self, _sample: &Sample, completion: &Completion<'_>) -> Reward {
        let truncated = f32::from(u8::from(completion.finish_reason == FinishReason::Length));
        let max = self.config.max_tokens.unwrap_or(completion.max_tokens);
        if max == 0 {
            return Reward::new(0.0)
                .with_metric("unknown_limit", 1.0)
                .with_metric("truncated", truncated);
        }
        let len = completion.num_tokens();
        let buffer = self.config.buffer_tokens.min(max);
        let threshold = max - buffer;
        let value = if len <= threshold {
            0.0
        } else if len <= max {
            -((len - threshold) as f64 / buffer as f64) as f32
        } else {
            -1.0
        };
        Reward::new(value)
            .with_metric("in_buffer", f32::from(u8::from(len > threshold)))
            .with_metric("truncated", truncated)
    }
}

/// Parameters of [`LengthPenalty`] (`name = "length-penalty"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthPenaltyConfig {
    /// Penalty at (and past) the limit (default 1; the value is in `[-coef, 0]`).
    #[serde(default = "one")]
    pub coef: f32,
    /// Lengths up to this many tokens are free (default 0).
    #[serde(default)]
    pub target_tokens: usize,
    /// The length at which the full penalty applies; default: the completion's `max_tokens`.
    #[serde(default)]
    pub max_tokens: Option<usize>,
}

/// A linear length penalty: `−coef · clamp((|y| − target) / (max − target), 0, 1)`.
///
/// `|y|` is the response length in tokens. If `max ≤ target` (e.g. the limit is unknown) the
/// value is 0 and the metric `unknown_limit` is 1.
#[derive(Clone, Debug)]
pub struct LengthPenalty {
    config: LengthPenaltyConfig,
}

impl LengthPenalty {
    /// Validates the parameters.
    pub fn new(config: LengthPenaltyConfig) -> Result<Self> {
        let err = |message: String| Error::Config {
            what: "reward `length-penalty`".into(),
            message,
        };
        if !config.coef.is_finite() {
            return Err(err(format!("coef must be finite, got {}", config.coef)));
        }
        if let Some(max) = config.max_tokens {
            if max <= config.target_tokens {
                return Err(err(format!(
                    "max_tokens ({max}) must exceed target_tokens ({})",
                    config.target_tokens
                )));
            }
        }
        Ok(Self { config })
    }
}

impl RewardFn for LengthPenalty {
    fn name(&self) -> &str {
        "length-penalty"
    }

    fn score(&self, _sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        Ok(self.reward_for(_sample, completion))
    }
}

impl LengthPenalty {
    /// The reward of one completion (never fails).
    fn reward_for(&self, _sample: &Sample, completion: &Completion<'_>) -> Reward {
        let max = self.config.max_tokens.unwrap_or(completion.max_tokens);
        let target = self.config.target_tokens;
        if max <= target {
            return Reward::new(0.0).with_metric("unknown_limit", 1.0);
        }
        let over = completion.num_tokens().saturating_sub(target) as f64;
        let fraction = (over / (max - target) as f64).min(1.0) as f32;
        Reward::new(-self.config.coef * fraction).with_metric("over_fraction", fraction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Prompt;

    fn tokens(n: usize) -> Vec<u32> {
        vec![1; n]
    }

    #[test]
    fn overlong_matches_dapo_formula() {
        let p = OverlongPenalty::new(OverlongPenaltyConfig {
            buffer_tokens: 4,
            max_tokens: Some(20),
        })
        .unwrap();
        let s = Sample::new(0, Prompt::text(""));
        let v = |n: usize| {
            let ids = tokens(n);
            p.score(&s, &Completion::new("", &ids, FinishReason::Stop, 0))
                .unwrap()
                .value
        };
        assert_eq!(v(0), 0.0);
        assert_eq!(v(16), 0.0);
        assert_eq!(v(17), -0.25);
        assert_eq!(v(18), -0.5);
        assert_eq!(v(20), -1.0);
        assert_eq!(v(21), -1.0);
    }

    #[test]
    fn overlong_uses_completion_limit() {
        let p = OverlongPenalty::new(OverlongPenaltyConfig {
            buffer_tokens: 10,
            max_tokens: None,
        })
        .unwrap();
        let s = Sample::new(0, Prompt::text(""));
        let ids = tokens(95);
        let r = p
            .score(&s, &Completion::new("", &ids, FinishReason::Length, 100))
            .unwrap();
        assert_eq!(r.value, -0.5);
        assert_eq!(r.metrics["truncated"], 1.0);
        let r = p.score(&s, &Completion::from_text("x")).unwrap();
        assert_eq!(r.value, 0.0);
        assert_eq!(r.metrics["unknown_limit"], 1.0);
        assert!(OverlongPenalty::new(OverlongPenaltyConfig {
            buffer_tokens: 0,
            max_tokens: None
        })
        .is_err());
    }

    #[test]
    fn length_penalty_linear() {
        let p = LengthPenalty::new(LengthPenaltyConfig {
            coef: 0.5,
            target_tokens: 10,
            max_tokens: Some(30),
        })
        .unwrap();
        let s = Sample::new(0, Prompt::text(""));
        let v = |n: usize| {
            let ids = tokens(n);
            p.score(&s, &Completion::new("", &ids, FinishReason::Stop, 0))
                .unwrap()
                .value
        };
        assert_eq!(v(5), 0.0);
        assert_eq!(v(10), 0.0);
        assert_eq!(v(20), -0.25);
        assert_eq!(v(30), -0.5);
        assert_eq!(v(300), -0.5);
        assert!(LengthPenalty::new(LengthPenaltyConfig {
            coef: 1.0,
            target_tokens: 10,
            max_tokens: Some(10)
        })
        .is_err());
    }
}
