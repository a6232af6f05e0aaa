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
    /// Whether each problem's greedy completion was correct, in the evaluation set's order (for
    /// intervals and paired comparisons between evaluations).
    #[serde(default)]
    pub correct: Vec<bool>,
    /// Multi-turn episodes: tool calls per episode (with an environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls_per_episode: Option<f64>,
}

impl EvalResult {
    /// Wilson score interval (95%) of the accuracy.
    pub fn accuracy_interval(&self) -> (f64, f64) {
        wilson(
            self.correct.iter().filter(|&&c| c).count(),
            self.correct.len(),
        )
    }
}

/// z of a two-sided 95% normal interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Wilson score interval (95%) of `k` successes out of `n`.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (n, p) = (n as f64, k as f64 / n as f64);
    let z2 = Z95 * Z95;
    let center = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    (center - half, center + half)
}

/// The accuracy gain from `before` to `after` on the same problems, and its 95% interval from the
/// per-problem differences (paired: a problem both get right or both get wrong adds no noise).
/// None when the evaluations are not of the same problems.
pub fn paired_gain(before: &EvalResult, after: &EvalResult) -> Option<(f64, f64, f64)> {
    let n = before.correct.len();
    if n < 2 || after.correct.len() != n {
        return None;
    }
    let d: Vec<f64> = before
        .correct
        .iter()
        .zip(&after.correct)
        .map(|(&b, &a)| f64::from(u8::from(a)) - f64::from(u8::from(b)))
        .collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
    let half = Z95 * (var / n as f64).sqrt();
    Some((mean, mean - half, mean + half))
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
        if let Some(ep) = &self.episodes {
            let batch = ep.run(
                generator,
                &self.prompts,
                &self.eval_set,
                1,
                &greedy,
                key(Purpose::Eval),
            )?;
            let g = &batch.groups;
            self.last_eval = g
                .iter()
                .map(|g| (g.prompt_text.clone(), g.texts[0].clone(), g.rewards[0]))
                .collect();
            let rewards: Vec<f32> = g.iter().map(|g| g.rewards[0]).collect();
            let lengths: Vec<usize> = g.iter().map(|g| g.completions[0].token_ids.len()).collect();
            let mut extra: Vec<(String, f64)> = batch.stats.metrics("eval/env");
            let tool_calls = batch.stats.tool_calls as f64 / batch.stats.episodes.max(1) as f64;
            extra.push(("eval/tool_calls_per_episode".into(), tool_calls));
            return self.finish_eval(t, &rewards, &lengths, None, Some(tool_calls), extra);
        }
        let mut skipped = 0;
        let items = self.prompts.prepare(self.eval_set.clone(), &mut skipped)?;
        let groups = generate(generator, &items, &greedy, key(Purpose::Eval))?;
        let rewards_runner = self
            .rewards
            .as_ref()
            .ok_or_else(|| Error::Usage("this run has no [reward]".into()))?;
        let scored = score(rewards_runner, &self.prompts, &items, &groups, max_tokens)?;
        self.last_eval = items
            .iter()
            .zip(&scored.texts)
            .zip(&scored.rewards)
            .map(|((it, t), &r)| Ok((self.prompts.decode(&it.ids)?, t.clone(), r)))
            .collect::<Result<_>>()?;
        let rewards = scored.rewards;
        let lengths: Vec<usize> = groups.iter().flatten().map(|c| c.token_ids.len()).collect();
        let pass_at_k = if c.eval.pass_k > 0 {
            let params = SamplingParams {
                n: c.eval.pass_k,
                max_tokens,
                ..sampling(c)
            };
            let g = generate(generator, &items, &params, key(Purpose::PassAtK))?;
            let r = score(rewards_runner, &self.prompts, &items, &g, max_tokens)?.rewards;
            let solved = r
                .chunks(c.eval.pass_k)
                .filter(|ch| ch.iter().any(|&x| x >= c.eval.correct_threshold))
                .count();
            Some(solved as f64 / items.len().max(1) as f64)
        } else {
            None
        };
        self.finish_eval(t, &rewards, &lengths, pass_at_k, None, Vec::new())
    }

    /// The result of an evaluation with these greedy rewards and lengths, logged and kept.
    fn finish_eval(
        &mut self,
        t: Instant,
        rewards: &[f32],
        lengths: &[usize],
        pass_at_k: Option<f64>,
        tool_calls_per_episode: Option<f64>,
        extra: Vec<(String, f64)>,
    ) -> Result<EvalResult> {
        let c = &self.recipe.config;
        let n = rewards.len().max(1) as f64;
        let correct: Vec<bool> = rewards
            .iter()
            .map(|&r| r >= c.eval.correct_threshold)
            .collect();
        let res = EvalResult {
            step: self.step,
            problems: rewards.len(),
            accuracy: correct.iter().filter(|&&x| x).count() as f64 / n,
            mean_reward: rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / n,
            mean_response_len: lengths.iter().sum::<usize>() as f64 / n,
            pass_at_k,
            seconds: t.elapsed().as_secs_f64(),
            correct,
            tool_calls_per_episode,
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
        m.extend(extra);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn result(correct: &[bool]) -> EvalResult {
        EvalResult {
            step: 0,
            problems: correct.len(),
            accuracy: 0.0,
            mean_reward: 0.0,
            mean_response_len: 0.0,
            pass_at_k: None,
            seconds: 0.0,
            correct: correct.to_vec(),
            tool_calls_per_episode: None,
        }
    }

    #[test]
    fn wilson_interval_matches_the_textbook_values() {
        // Wilson (1927) / Newcombe (1998), table I: 81 of 263 -> 0.2553 .. 0.3662.
        let (lo, hi) = wilson(81, 263);
        assert!(
            (lo - 0.2553).abs() < 5e-5 && (hi - 0.3662).abs() < 5e-5,
            "{lo} {hi}"
        );
        // 0 of 10: the lower end is 0, the upper one 0.2775.
        let (lo, hi) = wilson(0, 10);
        assert!(lo.abs() < 1e-12 && (hi - 0.2775).abs() < 5e-5, "{lo} {hi}");
    }

    #[test]
    fn paired_gain_uses_the_per_problem_differences() {
        // 10 problems: 4 gained, 1 lost, 5 unchanged -> mean +0.3.
        let before = result(&[
            false, false, false, false, true, true, true, false, true, false,
        ]);
        let after = result(&[
            true, true, true, true, false, true, true, false, true, false,
        ]);
        let (gain, lo, hi) = paired_gain(&before, &after).unwrap();
        assert!((gain - 0.3).abs() < 1e-12);
        // d = [1,1,1,1,-1,0,0,0,0,0]: sample variance (5 - 10 * 0.09) / 9.
        let half = Z95 * ((5.0 - 0.9) / 9.0 / 10.0f64).sqrt();
        assert!((lo - (0.3 - half)).abs() < 1e-12 && (hi - (0.3 + half)).abs() < 1e-12);
        // Unchanged results: a zero-width interval at 0; different problem sets: none.
        assert_eq!(paired_gain(&before, &before), Some((0.0, 0.0, 0.0)));
        assert!(paired_gain(&before, &result(&[true])).is_none());
    }
}
