//! Text rewards: exact match, regex match, format check.

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::extract::{last_boxed, last_tagged};
use super::{Reward, RewardError, RewardFn};
use crate::error::{Error, Result};
use crate::sample::{Completion, Sample};

/// Which part of a completion a text reward compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Extract {
    /// The whole completion.
    #[default]
    Whole,
    /// The content of the last `\boxed{}`.
    Boxed,
    /// The content of the last `<answer>…</answer>`.
    AnswerTag,
    /// The last non-empty line.
    LastLine,
}

impl Extract {
    /// Applies the extraction; `None` if the expected part is missing.
    pub fn apply(self, text: &str) -> Option<&str> {
        match self {
            Extract::Whole => Some(text),
            Extract::Boxed => last_boxed(text),
            Extract::AnswerTag => last_tagged(text, "answer"),
            Extract::LastLine => text.lines().rev().find(|l| !l.trim().is_empty()),
        }
    }
}

/// Parameters of [`ExactMatch`] (`name = "exact-match"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactMatchConfig {
    /// Which part of the completion to compare (default `whole`).
    #[serde(default)]
    pub extract: Extract,
    /// Compare case-insensitively (default `false`).
    #[serde(default)]
    pub ignore_case: bool,
}

/// 1 if the extracted part of the completion equals the ground truth (both trimmed), else 0.
///
/// Metrics: `has_answer` (the part to extract exists), `correct`.
#[derive(Clone, Debug)]
pub struct ExactMatch {
    config: ExactMatchConfig,
}

impl ExactMatch {
    /// The exact-match reward.
    pub fn new(config: ExactMatchConfig) -> Self {
        Self { config }
    }
}

impl RewardFn for ExactMatch {
    fn name(&self) -> &str {
        "exact-match"
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        Ok(self.reward_for(sample, completion))
    }
}

impl ExactMatch {
    /// The reward of one completion (never fails).
    fn reward_for(&self, sample: &Sample, completion: &Completion<'_>) -> Reward {
        let answer = self.config.extract.apply(completion.text).map(str::trim);
        let gold = sample.ground_truth.as_deref().map(str::trim);
        let correct = match (answer, gold) {
            (Some(a), Some(g)) if self.config.ignore_case => a.to_lowercase() == g.to_lowercase(),
            (Some(a), Some(g)) => a == g,
            _ => false,
        };
        Reward::binary(correct)
            .with_metric("has_answer", f32::from(u8::from(answer.is_some())))
            .with_metric("correct", f32::from(u8::from(correct)))
    }
}

/// What a [`RegexMatch`] rewards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegexMode {
    /// 1 if the pattern matches anywhere in the completion.
    #[default]
    Matches,
    /// 1 if the capture of the pattern's last match equals the ground truth (trimmed): the group
    /// named `answer` if the pattern has one, else group 1, else the whole match.
    CaptureEqualsGroundTruth,
}

/// Parameters of [`RegexMatch`] (`name = "regex-match"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexMatchConfig {
    /// The pattern (Rust `regex` syntax: linear-time, no look-around or backreferences).
    pub pattern: String,
    /// What is rewarded (default `matches`).
    #[serde(default)]
    pub mode: RegexMode,
}

/// Regex-based reward; see [`RegexMode`].
///
/// Metrics: `matched` (the pattern matched), `correct`.
#[derive(Clone, Debug)]
pub struct RegexMatch {
    regex: Regex,
    mode: RegexMode,
}

impl RegexMatch {
    /// Compiles the pattern.
    pub fn new(config: RegexMatchConfig) -> Result<Self> {
        let regex = compile("reward `regex-match`", &config.pattern)?;
        Ok(Self {
            regex,
            mode: config.mode,
        })
    }
}

fn compile(what: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|source| Error::Regex {
        what: what.into(),
        pattern: pattern.into(),
        source,
    })
}

impl RewardFn for RegexMatch {
    fn name(&self) -> &str {
        "regex-match"
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        Ok(self.reward_for(sample, completion))
    }
}

impl RegexMatch {
    /// The reward of one completion (never fails).
    fn reward_for(&self, sample: &Sample, completion: &Completion<'_>) -> Reward {
        let (matched, correct) = match self.mode {
            RegexMode::Matches => {
                let m = self.regex.is_match(completion.text);
                (m, m)
            }
            RegexMode::CaptureEqualsGroundTruth => {
                match self.regex.captures_iter(completion.text).last() {
                    None => (false, false),
                    Some(caps) => {
                        let captured = caps
                            .name("answer")
                            .or_else(|| caps.get(1))
                            .or_else(|| caps.get(0))
                            .map_or("", |m| m.as_str())
                            .trim();
                        let correct = sample
                            .ground_truth
                            .as_deref()
                            .is_some_and(|g| g.trim() == captured);
                        (true, correct)
                    }
                }
            }
        };
        Reward::binary(correct)
            .with_metric("matched", f32::from(u8::from(matched)))
            .with_metric("correct", f32::from(u8::from(correct)))
    }
}

/// The default [`FormatReward`] pattern: DeepSeek-R1's `<think>…</think>` then
/// `<answer>…</answer>`, nothing else around them.
pub const DEFAULT_FORMAT_PATTERN: &str = r"(?s)^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$";

fn default_format_pattern() -> String {
    DEFAULT_FORMAT_PATTERN.to_string()
}

/// Parameters of [`FormatReward`] (`name = "format"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatRewardConfig {
    /// The template as a regex that must match the completion (use `^…$` to anchor it). Default
    /// [`DEFAULT_FORMAT_PATTERN`]. For "reasoning then a boxed answer":
    /// `(?s)^<think>.*?</think>.*\\boxed\{.*\}`.
    #[serde(default = "default_format_pattern")]
    pub pattern: String,
}

impl Default for FormatRewardConfig {
    fn default() -> Self {
        Self {
            pattern: default_format_pattern(),
        }
    }
}

/// 1 if the completion has the configured shape, else 0. Usually a small-weight term of a
/// [`WeightedSum`](super::WeightedSum).
///
/// Metric: `matched`.
#[derive(Clone, Debug)]
pub struct FormatReward {
    regex: Regex,
}

impl FormatReward {
    /// Compiles the template.
    pub fn new(config: FormatRewardConfig) -> Result<Self> {
        Ok(Self {
            regex: compile("reward `format`", &config.pattern)?,
        })
    }
}

impl RewardFn for FormatReward {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&self, _sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        Ok(self.reward_for(_sample, completion))
    }
}

impl FormatReward {
    /// The reward of one completion (never fails).
    fn reward_for(&self, _sample: &Sample, completion: &Completion<'_>) -> Reward {
        let m = self.regex.is_match(completion.text);
        Reward::binary(m).with_metric("matched", f32::from(u8::from(m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Prompt;

    fn sample(gt: &str) -> Sample {
        Sample::new(0, Prompt::text("q")).with_ground_truth(gt)
    }

    #[test]
    fn exact_match_extracts() {
        let whole = ExactMatch::new(ExactMatchConfig::default());
        assert_eq!(
            whole
                .score(&sample("Paris"), &Completion::from_text(" Paris\n"))
                .unwrap()
                .value,
            1.0
        );
        assert_eq!(
            whole
                .score(&sample("Paris"), &Completion::from_text("paris"))
                .unwrap()
                .value,
            0.0
        );
        let tag = ExactMatch::new(ExactMatchConfig {
            extract: Extract::AnswerTag,
            ignore_case: true,
        });
        assert_eq!(
            tag.score(
                &sample("Paris"),
                &Completion::from_text("<answer>PARIS</answer>")
            )
            .unwrap()
            .value,
            1.0
        );
        assert_eq!(
            tag.score(&sample("Paris"), &Completion::from_text("Paris"))
                .unwrap()
                .value,
            0.0
        );
        let last = ExactMatch::new(ExactMatchConfig {
            extract: Extract::LastLine,
            ignore_case: false,
        });
        assert_eq!(
            last.score(&sample("B"), &Completion::from_text("think\nB\n\n"))
                .unwrap()
                .value,
            1.0
        );
    }

    #[test]
    fn regex_modes() {
        let m = RegexMatch::new(RegexMatchConfig {
            pattern: r"\bcat\b".into(),
            mode: RegexMode::Matches,
        })
        .unwrap();
        assert_eq!(
            m.score(&sample(""), &Completion::from_text("a cat"))
                .unwrap()
                .value,
            1.0
        );
        assert_eq!(
            m.score(&sample(""), &Completion::from_text("concat"))
                .unwrap()
                .value,
            0.0
        );
        let c = RegexMatch::new(RegexMatchConfig {
            pattern: r"Final: (?P<answer>\w+)".into(),
            mode: RegexMode::CaptureEqualsGroundTruth,
        })
        .unwrap();
        let s = sample("blue");
        assert_eq!(
            c.score(&s, &Completion::from_text("Final: red\nFinal: blue"))
                .unwrap()
                .value,
            1.0
        );
        assert_eq!(
            c.score(&s, &Completion::from_text("Final: blue\nFinal: red"))
                .unwrap()
                .value,
            0.0
        );
        assert!(RegexMatch::new(RegexMatchConfig {
            pattern: "(".into(),
            mode: RegexMode::Matches
        })
        .is_err());
    }

    #[test]
    fn format_default_is_r1_template() {
        let f = FormatReward::new(FormatRewardConfig::default()).unwrap();
        let s = sample("");
        let ok = "<think>\nlet me see\n</think>\n<answer>42</answer>";
        assert_eq!(f.score(&s, &Completion::from_text(ok)).unwrap().value, 1.0);
        for bad in [
            "<answer>42</answer>",
            "<think>x</think>",
            "<think>x</think><answer>42</answer> trailing",
            "",
        ] {
            assert_eq!(
                f.score(&s, &Completion::from_text(bad)).unwrap().value,
                0.0,
                "{bad}"
            );
        }
    }
}
