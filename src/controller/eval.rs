//! Evaluation: greedy accuracy (and pass@k) on the held-out set, and the sync probe that checks
//! the generator's log-probs against the trainer's.

use std::collections::BTreeMap;
use std::time::Instant;

use rlrun_generator::{DrawKey, Purpose, SamplingParams};
use serde::{Deserialize, Serialize};

use super::rollouts::{generate, sampling, score};
use super::Run;
use crate::error::{Error, Result};

/// Results of one evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    pub step: u64,
    pub problems: usize,
    /// Fraction of greedy completions whose reward reaches `eval.correct_threshold`.
    pub accuracy: f64,
    pub mean_reward: f64,
    pub mean_response_len: f64,
    /// pass@k with sampling, when `eval.pass_k > 0`.
    pub pass_at_k: Option<f64>,
    pub seconds: f64,
}

impl Run {
    /// Greedy evaluation on the held-out set.
    pub fn evaluate(&mut self) -> Result<EvalResult> {
        let c = &self.recipe.config;
        if self.eval_set.is_empty() {
            return Err(Error::Usage(
                "no evaluation set: add data.eval to the recipe".into(),
            ));
        }
        let t = Instant::now();
        let mut skipped = 0;
        let items = self.prompts.prepare(self.eval_set.clone(), &mut skipped)?;
        let max_tokens = c.eval.max_tokens.unwrap_or(c.rollout.max_tokens);
        let greedy = SamplingParams {
            n: 1,
            temperature: 0.0,
            max_tokens,
            stop: c.rollout.stop.clone(),
            ..SamplingParams::default()
        };
        let key = |purpose| DrawKey {
            purpose,
            step: self.step,
            ..DrawKey::default()
        };
        let generator = self.actors.generator.as_ref();
        let groups = generate(generator, &items, &greedy, key(Purpose::Eval))?;
        let scored = score(&self.rewards, &self.prompts, &items, &groups, max_tokens)?;
        self.last_eval = items
            .iter()
            .zip(&scored.texts)
            .zip(&scored.rewards)
            .map(|((it, t), &r)| Ok((self.prompts.decode(&it.ids)?, t.clone(), r)))
            .collect::<Result<_>>()?;
        let rewards = scored.rewards;
        let n = rewards.len().max(1) as f64;
        let correct = rewards
            .iter()
            .filter(|&&r| r >= c.eval.correct_threshold)
            .count() as f64;
        let mean_len = groups
            .iter()
            .flatten()
            .map(|c| c.token_ids.len())
            .sum::<usize>() as f64
            / n;
        let pass_at_k = if c.eval.pass_k > 0 {
            let params = SamplingParams {
                n: c.eval.pass_k,
                max_tokens,
                ..sampling(c)
            };
            let g = generate(generator, &items, &params, key(Purpose::PassAtK))?;
            let r = score(&self.rewards, &self.prompts, &items, &g, max_tokens)?.rewards;
            let solved = r
                .chunks(c.eval.pass_k)
                .filter(|ch| ch.iter().any(|&x| x >= c.eval.correct_threshold))
                .count();
            Some(solved as f64 / items.len().max(1) as f64)
        } else {
            None
        };
        let res = EvalResult {
            step: self.step,
            problems: rewards.len(),
            accuracy: correct / n,
            mean_reward: rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / n,
            mean_response_len: mean_len,
            pass_at_k,
            seconds: t.elapsed().as_secs_f64(),
        };
        let mut m = BTreeMap::new();
        m.insert("eval/accuracy".to_string(), res.accuracy);
        m.insert("eval/mean_reward".to_string(), res.mean_reward);
        m.insert("eval/response_length".to_string(), res.mean_response_len);
        m.insert("eval/problems".to_string(), res.problems as f64);
        m.insert("eval/seconds".to_string(), res.seconds);
        if let Some(p) = res.pass_at_k {
            m.insert(format!("eval/pass_at_{}", c.eval.pass_k), p);
        }
        self.sink.eval(self.step, &m)?;
        self.evals.push(res.clone());
        Ok(res)
    }

    /// The largest |generator - trainer| log-prob over one sampled completion of the first
    /// training prompt: zero up to rounding when the generator holds the trainer's weights.
    pub(crate) fn probe(&self, version: u64) -> Result<f64> {
        let sample = self
            .rollouts
            .stream
            .dataset()
            .get(0)
            .ok_or_else(|| Error::Usage("the sync probe needs a training prompt".into()))?;
        let mut skipped = 0;
        let items = self.prompts.prepare(vec![sample], &mut skipped)?;
        if items.is_empty() {
            return Err(Error::Usage(
                "the sync probe's prompt is longer than data.max_prompt_tokens".into(),
            ));
        }
        let params = SamplingParams {
            n: 1,
            ..sampling(&self.recipe.config)
        };
        let key = DrawKey {
            purpose: Purpose::Probe,
            step: version,
            ..DrawKey::default()
        };
        let c = generate(self.actors.generator.as_ref(), &items, &params, key)?
            .remove(0)
            .remove(0);
        if c.policy_version != version {
            return Err(Error::Usage(format!(
                "the sync probe ran on version {} of the weights, expected {version}",
                c.policy_version
            )));
        }
        let ours = self.logprobs(items[0].ids.clone(), c.token_ids.clone())?;
        Ok(ours
            .iter()
            .zip(&c.logprobs)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max))
    }
}
