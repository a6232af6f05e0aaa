//! Numeric answer match (GSM8K, arithmetic).

use serde::{Deserialize, Serialize};

use super::extract::{answer_line, boxed_number, hash_answer, last_number, parse_number};
use super::{Reward, RewardError, RewardFn};
use crate::error::{Error, Result};
use crate::sample::{Completion, Sample};

/// Where a numeric answer is looked for in a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NumberFormat {
    /// GSM8K's lenient rule: `#### N` if present, else the last `\boxed{N}`, else `Answer: N`,
    /// else the last number in the text.
    Flexible,
    /// Only the last `\boxed{N}` counts.
    Boxed,
    /// Only `#### N` (GSM8K's gold format) counts.
    Hash,
    /// Only `Answer: N` (last occurrence, case-insensitive) counts.
    AnswerLine,
    /// The last number in the text.
    LastNumber,
}

impl NumberFormat {
    /// Extracts the answer from `text` according to this format.
    pub fn extract(self, text: &str) -> Option<f64> {
        match self {
            NumberFormat::Flexible => hash_answer(text)
                .or_else(|| boxed_number(text))
                .or_else(|| answer_line(text))
                .or_else(|| last_number(text)),
            NumberFormat::Boxed => boxed_number(text),
            NumberFormat::Hash => hash_answer(text),
            NumberFormat::AnswerLine => answer_line(text),
            NumberFormat::LastNumber => last_number(text),
        }
    }
}

pub(crate) fn default_tolerance() -> f64 {
    1e-6
}

fn default_flexible() -> NumberFormat {
    NumberFormat::Flexible
}

/// Parameters of [`NumberMatch`] (`name = "gsm8k"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumberMatchConfig {
    /// Where the answer is looked for (default `flexible`).
    #[serde(default = "default_flexible")]
    pub format: NumberFormat,
    /// Two numbers match if `|a - b| <= tolerance` (absolute; default `1e-6`). Answers are parsed
    /// exactly, so `1,450,000` and `1450000.0` are equal and `1450001` is not.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
}

impl Default for NumberMatchConfig {
    fn default() -> Self {
        Self {
            format: default_flexible(),
            tolerance: default_tolerance(),
        }
    }
}

/// 1 if the number extracted from the completion equals the ground truth, else 0.
///
/// The ground truth is parsed leniently too (`"1,000"`, `"$18"`, `"#### 72"` all work). Handles
/// commas, `$`, `\$`, `%`, trailing `.` and decimals (`18.00` equals `18`).
///
/// Metrics: `has_answer` (an answer was found in the expected format), `correct`, and
/// `no_ground_truth` (the sample has no parseable ground truth; the value is then 0).
#[derive(Clone, Debug)]
pub struct NumberMatch {
    name: String,
    config: NumberMatchConfig,
}

impl NumberMatch {
    /// A number-match reward named `name` (used as metric prefix).
    pub fn new(name: impl Into<String>, config: NumberMatchConfig) -> Result<Self> {
        if !(config.tolerance.is_finite() && config.tolerance >= 0.0) {
            return Err(Error::Config {
                what: "reward `gsm8k`/`number-match`".into(),
                message: format!(
                    "tolerance must be finite and >= 0, got {}",
                    config.tolerance
                ),
            });
        }
        Ok(Self {
            name: name.into(),
            config,
        })
    }

    /// GSM8K's lenient answer match (`format = flexible`).
    pub fn gsm8k() -> Self {
        Self {
            name: "gsm8k".into(),
            config: NumberMatchConfig::default(),
        }
    }
}

/// Parses a ground truth that may be a bare number or a GSM8K gold solution (`... #### 72`).
pub(crate) fn parse_ground_truth(gt: &str) -> Option<f64> {
    parse_number(gt)
        .or_else(|| hash_answer(gt))
        .or_else(|| boxed_number(gt))
}

impl RewardFn for NumberMatch {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        Ok(self.reward_for(sample, completion))
    }
}

impl NumberMatch {
    /// The reward of one completion (never fails).
    fn reward_for(&self, sample: &Sample, completion: &Completion<'_>) -> Reward {
        let Some(gold) = sample.ground_truth.as_deref().and_then(parse_ground_truth) else {
            return Reward::new(0.0)
                .with_metric("no_ground_truth", 1.0)
                .with_metric("has_answer", 0.0)
                .with_metric("correct", 0.0);
        };
        let predicted = self.config.format.extract(completion.text);
        let correct = predicted.is_some_and(|p| (p - gold).abs() <= self.config.tolerance);
        Reward::binary(correct)
            .with_metric("has_answer", f32::from(u8::from(predicted.is_some())))
            .with_metric("correct", f32::from(u8::from(correct)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Prompt;

    fn score(format: NumberFormat, gt: &str, text: &str) -> f32 {
        let r = NumberMatch::new(
            "t",
            NumberMatchConfig {
                format,
                tolerance: 1e-6,
            },
        )
        .unwrap();
        let s = Sample::new(0, Prompt::text("q")).with_ground_truth(gt);
        r.score(&s, &Completion::from_text(text)).unwrap().value
    }

    #[test]
    fn flexible_forms() {
        let f = NumberFormat::Flexible;
        assert_eq!(score(f, "18", "#### 18"), 1.0);
        assert_eq!(score(f, "18", "So she makes $18."), 1.0);
        assert_eq!(score(f, "1000", "The total is 1,000."), 1.0);
        assert_eq!(score(f, "18", r"\boxed{18} dollars, i.e. 9 * 2"), 1.0);
        assert_eq!(score(f, "18", "#### 18\nthen 5 more"), 1.0);
        assert_eq!(score(f, "18", "18.00"), 1.0);
        assert_eq!(score(f, "-5", "the change is -5"), 1.0);
        assert_eq!(score(f, "-10", "so the answer is - 10."), 1.0);
        assert_eq!(score(f, "5", "the change is 50-5"), 1.0);
        assert_eq!(score(f, "1450000", "#### 1450001"), 0.0);
        assert_eq!(score(f, "1450000", "#### 1,450,000"), 1.0);
        assert_eq!(score(f, "18", "17"), 0.0);
        assert_eq!(score(f, "18", ""), 0.0);
        assert_eq!(score(f, "18", "Answer: 18 apples, 3 pears"), 1.0);
    }

    #[test]
    fn strict_formats() {
        assert_eq!(score(NumberFormat::Boxed, "18", "the answer is 18"), 0.0);
        assert_eq!(score(NumberFormat::Boxed, "18", r"\boxed{18}"), 1.0);
        assert_eq!(score(NumberFormat::Hash, "18", r"\boxed{18}"), 0.0);
        assert_eq!(score(NumberFormat::AnswerLine, "18", "ANSWER: 18"), 1.0);
        assert_eq!(score(NumberFormat::AnswerLine, "18", "18"), 0.0);
        assert_eq!(score(NumberFormat::LastNumber, "3", "1 2 3"), 1.0);
    }

    #[test]
    fn ground_truth_in_gold_format_and_missing() {
        assert_eq!(score(NumberFormat::Flexible, "blah\n#### 72", "72"), 1.0);
        let r = NumberMatch::gsm8k();
        let s = Sample::new(0, Prompt::text("q"));
        let out = r.score(&s, &Completion::from_text("72")).unwrap();
        assert_eq!(out.value, 0.0);
        assert_eq!(out.metrics["no_ground_truth"], 1.0);
    }

    #[test]
    fn rejects_bad_tolerance() {
        let bad = NumberMatchConfig {
            format: NumberFormat::Flexible,
            tolerance: f64::NAN,
        };
        assert!(NumberMatch::new("x", bad).is_err());
    }
}
