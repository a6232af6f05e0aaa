//! Weighted sum of rewards.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Reward, RewardError, RewardFn};
use crate::error::{Error, Result};
use crate::sample::{Completion, Sample};

/// One term of a [`WeightedSum`].
#[derive(Clone)]
pub struct WeightedTerm {
    weight: f32,
    reward: Arc<dyn RewardFn>,
}

impl WeightedTerm {
    /// `weight · reward`.
    pub fn new(weight: f32, reward: Arc<dyn RewardFn>) -> Self {
        Self { weight, reward }
    }
}

impl std::fmt::Debug for WeightedTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightedTerm")
            .field("weight", &self.weight)
            .field("reward", &self.reward.name())
            .finish()
    }
}

/// `Σ wᵢ · rᵢ` over its terms.
///
/// Metrics: for each term `<name>` its unweighted value as `<name>` and its own metrics as
/// `<name>/<metric>`; a name used twice becomes `<name>#2`, `<name>#3`, ...
///
/// Terms run one after the other in the calling thread; the runner's panic and time-limit
/// isolation applies to the sum as a whole.
#[derive(Debug)]
pub struct WeightedSum {
    terms: Vec<WeightedTerm>,
    keys: Vec<String>,
}

impl WeightedSum {
    /// Checks that there is at least one term and that the weights are finite.
    pub fn new(terms: Vec<WeightedTerm>) -> Result<Self> {
        let err = |message: String| Error::Config {
            what: "reward `weighted-sum`".into(),
            message,
        };
        if terms.is_empty() {
            return Err(err("needs at least one term".into()));
        }
        if let Some(t) = terms.iter().find(|t| !t.weight.is_finite()) {
            return Err(err(format!(
                "weight of `{}` must be finite, got {}",
                t.reward.name(),
                t.weight
            )));
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        let keys = terms
            .iter()
            .map(|t| {
                let n = seen.entry(t.reward.name()).or_insert(0);
                *n += 1;
                if *n == 1 {
                    t.reward.name().to_string()
                } else {
                    format!("{}#{n}", t.reward.name())
                }
            })
            .collect();
        Ok(Self { terms, keys })
    }
}

impl RewardFn for WeightedSum {
    fn name(&self) -> &str {
        "weighted-sum"
    }

    /// Fails when a term fails: a sum with a missing term is no score.
    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        let mut total = Reward::new(0.0);
        for (term, key) in self.terms.iter().zip(&self.keys) {
            let r = term.reward.score(sample, completion)?;
            total.value += term.weight * r.value;
            total.metrics.insert(key.clone(), r.value);
            for (name, v) in r.metrics {
                total.metrics.insert(format!("{key}/{name}"), v);
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::{FormatReward, FormatRewardConfig, NumberMatch};
    use crate::sample::Prompt;

    #[test]
    fn sums_with_weights_and_prefixes_metrics() {
        let sum = WeightedSum::new(vec![
            WeightedTerm::new(1.0, Arc::new(NumberMatch::gsm8k())),
            WeightedTerm::new(
                0.5,
                Arc::new(FormatReward::new(FormatRewardConfig::default()).unwrap()),
            ),
            WeightedTerm::new(-2.0, Arc::new(NumberMatch::gsm8k())),
        ])
        .unwrap();
        let s = Sample::new(0, Prompt::text("q")).with_ground_truth("4");
        let r = sum
            .score(
                &s,
                &Completion::from_text("<think>2+2</think><answer>4</answer>"),
            )
            .unwrap();
        assert_eq!(r.value, 1.0 + 0.5 - 2.0);
        assert_eq!(r.metrics["gsm8k"], 1.0);
        assert_eq!(r.metrics["gsm8k#2"], 1.0);
        assert_eq!(r.metrics["format"], 1.0);
        assert_eq!(r.metrics["gsm8k/has_answer"], 1.0);
        assert!(WeightedSum::new(vec![]).is_err());
        assert!(WeightedSum::new(vec![WeightedTerm::new(
            f32::NAN,
            Arc::new(NumberMatch::gsm8k())
        )])
        .is_err());
    }
}
