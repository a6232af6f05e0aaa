//! Advantage estimators: rewards (and critic values) of a rollout batch → per-token advantages.
//!
//! Every estimator is a pure function of plain numbers: no model, no I/O. Shapes, for a batch of
//! `N` sequences (responses) where sequence `i` has `Lᵢ = response_lengths[i]` response tokens:
//!
//! | input | shape | meaning |
//! |---|---|---|
//! | `rewards` | `[N]` | sequence-level (outcome) reward, e.g. from a [`RewardFn`](crate::RewardFn) |
//! | `group_ids` | `[N]` | sequences with the same id answer the same prompt (a GRPO group); groups may differ in size and need not be contiguous |
//! | `response_lengths` | `[N]` | `Lᵢ` |
//! | `token_rewards` (optional) | `N × [Lᵢ]` | per-token rewards added to the outcome reward, e.g. `−β·KLₜ` |
//! | `values` (optional; GAE) | `N × [Lᵢ]` | critic values `V(sₜ)` |
//! | `response_mask` (optional) | `N × [Lᵢ]` | `false` for tokens that are not the policy's (tool output); they get advantage 0 and are left out of statistics |
//!
//! The per-token reward of sequence `i` is `rₜ = token_rewards[i][t]`, plus `rewards[i]` on its
//! last unmasked token; its *score* is `sᵢ = Σₜ rₜ` over unmasked tokens plus `rewards[i]` (so
//! `sᵢ = rewards[i]` without token rewards). Outcome estimators (GRPO, Dr.GRPO, RLOO,
//! REINFORCE++-baseline) turn scores into one advantage per sequence and broadcast it over the
//! sequence's unmasked tokens ([`broadcast_to_tokens`]).
//!
//! Output ([`AdvantageOutput`]): `advantages` and `returns`, both `N × [Lᵢ]`, plus metrics.
//!
//! Group filtering for DAPO's dynamic sampling lives in [`filter`].

pub mod filter;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The inputs of an [`AdvantageEstimator`]; see the [module docs](self) for shapes.
///
/// ```
/// use rlrun_rollout::AdvantageInput;
/// let rewards = [1.0, 0.0];
/// let groups = [7, 7];
/// let lengths = [3, 2];
/// let input = AdvantageInput::new(&rewards, &groups, &lengths);
/// assert_eq!(input.num_sequences(), 2);
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct AdvantageInput<'a> {
    /// Sequence-level rewards, `[N]`.
    pub rewards: &'a [f32],
    /// Group (prompt) of each sequence, `[N]`.
    pub group_ids: &'a [u64],
    /// Response length in tokens of each sequence, `[N]`.
    pub response_lengths: &'a [usize],
    /// Optional per-token rewards, `N × [Lᵢ]`.
    pub token_rewards: Option<&'a [Vec<f32>]>,
    /// Optional per-token critic values, `N × [Lᵢ]` (required by GAE).
    pub values: Option<&'a [Vec<f32>]>,
    /// Optional per-token response mask, `N × [Lᵢ]` (`true` = the policy's token).
    pub response_mask: Option<&'a [Vec<bool>]>,
}

impl<'a> AdvantageInput<'a> {
    /// Inputs with sequence rewards only.
    pub fn new(rewards: &'a [f32], group_ids: &'a [u64], response_lengths: &'a [usize]) -> Self {
        Self {
            rewards,
            group_ids,
            response_lengths,
            token_rewards: None,
            values: None,
            response_mask: None,
        }
    }

    /// Adds per-token rewards.
    pub fn with_token_rewards(mut self, token_rewards: &'a [Vec<f32>]) -> Self {
        self.token_rewards = Some(token_rewards);
        self
    }

    /// Adds critic values.
    pub fn with_values(mut self, values: &'a [Vec<f32>]) -> Self {
        self.values = Some(values);
        self
    }

    /// Adds a response mask.
    pub fn with_response_mask(mut self, mask: &'a [Vec<bool>]) -> Self {
        self.response_mask = Some(mask);
        self
    }

    /// `N`.
    pub fn num_sequences(&self) -> usize {
        self.rewards.len()
    }

    fn valid(&self, i: usize, t: usize) -> bool {
        self.response_mask.is_none_or(|m| m[i][t])
    }

    /// Checks lengths and finiteness.
    fn validate(&self, estimator: &str, needs_values: bool) -> Result<()> {
        let err = |message: String| {
            Err(Error::AdvantageInput {
                estimator: estimator.to_string(),
                message,
            })
        };
        let n = self.rewards.len();
        if self.group_ids.len() != n || self.response_lengths.len() != n {
            return err(format!(
                "rewards ({n}), group_ids ({}) and response_lengths ({}) must have the same length",
                self.group_ids.len(),
                self.response_lengths.len()
            ));
        }
        if let Some(i) = self.rewards.iter().position(|r| !r.is_finite()) {
            return err(format!(
                "reward of sequence {i} is not finite ({})",
                self.rewards[i]
            ));
        }
        if needs_values && self.values.is_none() {
            return err("critic values are required".into());
        }
        fn check<T>(
            what: &str,
            per_token: Option<&[Vec<T>]>,
            lengths: &[usize],
        ) -> std::result::Result<(), String> {
            let Some(per_token) = per_token else {
                return Ok(());
            };
            if per_token.len() != lengths.len() {
                return Err(format!(
                    "{what} has {} sequences, expected {}",
                    per_token.len(),
                    lengths.len()
                ));
            }
            for (i, (row, &len)) in per_token.iter().zip(lengths).enumerate() {
                if row.len() != len {
                    return Err(format!(
                        "{what} of sequence {i} has {} tokens, response length is {len}",
                        row.len()
                    ));
                }
            }
            Ok(())
        }
        for result in [
            check("token_rewards", self.token_rewards, self.response_lengths),
            check("values", self.values, self.response_lengths),
            check("response_mask", self.response_mask, self.response_lengths),
        ] {
            if let Err(message) = result {
                return err(message);
            }
        }
        for (what, rows) in [
            ("token_rewards", self.token_rewards),
            ("values", self.values),
        ] {
            if let Some(rows) = rows {
                for (i, row) in rows.iter().enumerate() {
                    if let Some(t) = row.iter().position(|x| !x.is_finite()) {
                        return err(format!("{what}[{i}][{t}] is not finite"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Per-token rewards `rₜ` of sequence `i` (outcome reward on the last unmasked token).
    fn token_reward_row(&self, i: usize) -> Vec<f64> {
        let len = self.response_lengths[i];
        let mut row: Vec<f64> = match self.token_rewards {
            Some(t) => t[i].iter().map(|&x| f64::from(x)).collect(),
            None => vec![0.0; len],
        };
        if let Some(last) = (0..len).rev().find(|&t| self.valid(i, t)) {
            row[last] += f64::from(self.rewards[i]);
        }
        row
    }

    /// Sequence scores `sᵢ`.
    fn scores(&self) -> Vec<f64> {
        (0..self.num_sequences())
            .map(|i| {
                let extra: f64 = match self.token_rewards {
                    Some(t) => (0..self.response_lengths[i])
                        .filter(|&k| self.valid(i, k))
                        .map(|k| f64::from(t[i][k]))
                        .sum(),
                    None => 0.0,
                };
                f64::from(self.rewards[i]) + extra
            })
            .collect()
    }
}

/// The outputs of an [`AdvantageEstimator`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AdvantageOutput {
    /// Per-token advantages, `N × [Lᵢ]` (0 at masked tokens).
    pub advantages: Vec<Vec<f32>>,
    /// Per-token returns, `N × [Lᵢ]`: the critic's regression target for GAE (`A + V`), the
    /// discounted return `Gₜ` for REINFORCE++, the sequence score broadcast for outcome
    /// estimators.
    pub returns: Vec<Vec<f32>>,
    /// Diagnostics: `advantage/{mean,std,min,max}` over unmasked tokens, and per estimator
    /// `groups`, `zero_variance_groups`, `score/mean`, `returns/mean`.
    pub metrics: BTreeMap<String, f32>,
}

/// Turns rollout rewards into per-token advantages. Object-safe, `Send + Sync`.
pub trait AdvantageEstimator: Send + Sync {
    /// Short name (`grpo`, `gae`, ...).
    fn name(&self) -> &str;

    /// Whether [`AdvantageInput::values`] is required (a critic is needed).
    fn needs_values(&self) -> bool {
        false
    }

    /// Computes advantages; fails only on inconsistent inputs (lengths, missing values, NaN).
    fn compute(&self, input: &AdvantageInput<'_>) -> Result<AdvantageOutput>;
}

/// Repeats one value per sequence over that sequence's tokens: `out[i][t] = values[i]` where the
/// mask (if any) is `true`, else 0. Lengths come from `response_lengths`.
///
/// ```
/// use rlrun_rollout::advantage::broadcast_to_tokens;
/// let out = broadcast_to_tokens(&[0.5, -1.0], &[2, 3], Some(&[vec![true, true], vec![true, false, true]]));
/// assert_eq!(out, vec![vec![0.5, 0.5], vec![-1.0, 0.0, -1.0]]);
/// ```
pub fn broadcast_to_tokens(
    values: &[f32],
    response_lengths: &[usize],
    response_mask: Option<&[Vec<bool>]>,
) -> Vec<Vec<f32>> {
    values
        .iter()
        .zip(response_lengths)
        .enumerate()
        .map(|(i, (&v, &len))| {
            (0..len)
                .map(|t| {
                    let on = response_mask
                        .and_then(|m| m.get(i))
                        .and_then(|row| row.get(t))
                        .copied()
                        .unwrap_or(true);
                    if on {
                        v
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// Per-group statistics of the scores, computed in one pass over the batch.
struct Groups {
    /// Dense group index of each sequence.
    of: Vec<usize>,
    count: Vec<usize>,
    mean: Vec<f64>,
    /// Unbiased (n − 1) standard deviation; 0 for groups of one.
    std: Vec<f64>,
}

impl Groups {
    fn new(scores: &[f64], group_ids: &[u64]) -> Self {
        let mut index: HashMap<u64, usize> = HashMap::new();
        let of: Vec<usize> = group_ids
            .iter()
            .map(|g| {
                let next = index.len();
                *index.entry(*g).or_insert(next)
            })
            .collect();
        let k = index.len();
        let mut count = vec![0usize; k];
        let mut sum = vec![0.0f64; k];
        for (&g, &s) in of.iter().zip(scores) {
            count[g] += 1;
            sum[g] += s;
        }
        let mean: Vec<f64> = sum.iter().zip(&count).map(|(s, &c)| s / c as f64).collect();
        let mut sq = vec![0.0f64; k];
        for (&g, &s) in of.iter().zip(scores) {
            sq[g] += (s - mean[g]).powi(2);
        }
        let std = sq
            .iter()
            .zip(&count)
            .map(|(q, &c)| {
                if c > 1 {
                    (q / (c - 1) as f64).sqrt()
                } else {
                    0.0
                }
            })
            .collect();
        Self {
            of,
            count,
            mean,
            std,
        }
    }

    fn zero_variance(&self) -> usize {
        self.std.iter().filter(|&&s| s == 0.0).count()
    }
}

/// Summary metrics over unmasked tokens.
fn token_metrics(
    input: &AdvantageInput<'_>,
    advantages: &[Vec<f32>],
    metrics: &mut BTreeMap<String, f32>,
) {
    let mut n = 0usize;
    let (mut sum, mut sq) = (0.0f64, 0.0f64);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for (i, row) in advantages.iter().enumerate() {
        for (t, &a) in row.iter().enumerate() {
            if input.valid(i, t) {
                let a = f64::from(a);
                n += 1;
                sum += a;
                sq += a * a;
                min = min.min(a);
                max = max.max(a);
            }
        }
    }
    if n > 0 {
        let mean = sum / n as f64;
        metrics.insert("advantage/mean".into(), mean as f32);
        metrics.insert(
            "advantage/std".into(),
            (sq / n as f64 - mean * mean).max(0.0).sqrt() as f32,
        );
        metrics.insert("advantage/min".into(), min as f32);
        metrics.insert("advantage/max".into(), max as f32);
    }
}

/// Shared tail of the outcome estimators: broadcast, returns, metrics.
fn outcome_output(
    input: &AdvantageInput<'_>,
    per_sequence: &[f64],
    scores: &[f64],
    groups: Option<&Groups>,
) -> AdvantageOutput {
    let adv32: Vec<f32> = per_sequence.iter().map(|&a| a as f32).collect();
    let scores32: Vec<f32> = scores.iter().map(|&s| s as f32).collect();
    let advantages = broadcast_to_tokens(&adv32, input.response_lengths, input.response_mask);
    let returns = broadcast_to_tokens(&scores32, input.response_lengths, input.response_mask);
    let mut metrics = BTreeMap::new();
    token_metrics(input, &advantages, &mut metrics);
    if !scores.is_empty() {
        metrics.insert(
            "score/mean".into(),
            (scores.iter().sum::<f64>() / scores.len() as f64) as f32,
        );
    }
    if let Some(g) = groups {
        metrics.insert("groups".into(), g.count.len() as f32);
        metrics.insert("zero_variance_groups".into(), g.zero_variance() as f32);
    }
    AdvantageOutput {
        advantages,
        returns,
        metrics,
    }
}

/// Whitens per-token values over all unmasked tokens of the batch: `(x − μ) / √(σ² + 1e-8)` with
/// the unbiased variance (as verl's `masked_whiten`). Masked tokens are set to 0.
fn whiten(input: &AdvantageInput<'_>, rows: &mut [Vec<f64>]) {
    let mut n = 0usize;
    let mut sum = 0.0f64;
    for (i, row) in rows.iter().enumerate() {
        for (t, &x) in row.iter().enumerate() {
            if input.valid(i, t) {
                n += 1;
                sum += x;
            }
        }
    }
    if n == 0 {
        return;
    }
    let mean = sum / n as f64;
    let mut sq = 0.0f64;
    for (i, row) in rows.iter().enumerate() {
        for (t, &x) in row.iter().enumerate() {
            if input.valid(i, t) {
                sq += (x - mean).powi(2);
            }
        }
    }
    let var = if n > 1 { sq / (n - 1) as f64 } else { 0.0 };
    let scale = 1.0 / (var + 1e-8).sqrt();
    for (i, row) in rows.iter_mut().enumerate() {
        for (t, x) in row.iter_mut().enumerate() {
            *x = if input.valid(i, t) {
                (*x - mean) * scale
            } else {
                0.0
            };
        }
    }
}

fn to_f32(rows: Vec<Vec<f64>>) -> Vec<Vec<f32>> {
    rows.into_iter()
        .map(|r| r.into_iter().map(|x| x as f32).collect())
        .collect()
}

fn default_epsilon() -> f32 {
    1e-6
}

fn one() -> f32 {
    1.0
}

fn yes() -> bool {
    true
}

/// GRPO: group-normalized outcome advantage `Aᵢ = (sᵢ − mean_g) / (std_g + ε)`.
///
/// Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
/// Models", arXiv 2402.03300, §4.1.2 (outcome supervision). `std_g` is the unbiased (n − 1)
/// standard deviation of the group's scores, as in verl and TRL. A group of one sequence has
/// advantage 0: there is no other output to compare with (recipes reject `rollout.n < 2`). verl's
/// `compute_grpo_outcome_advantage` instead uses mean 0, std 1 there: the raw score divided by
/// `1 + ε` (docs/verl.md). A group whose scores are all equal has advantage 0. Within a group
/// the advantages sum to 0 and have unbiased standard deviation `std_g / (std_g + ε)` ≈ 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grpo {
    /// `ε` in the denominator (default `1e-6`).
    #[serde(default = "default_epsilon")]
    pub epsilon: f32,
}

impl Default for Grpo {
    fn default() -> Self {
        Self {
            epsilon: default_epsilon(),
        }
    }
}

impl AdvantageEstimator for Grpo {
    fn name(&self) -> &str {
        "grpo"
    }

    fn compute(&self, input: &AdvantageInput<'_>) -> Result<AdvantageOutput> {
        input.validate(self.name(), false)?;
        let scores = input.scores();
        let g = Groups::new(&scores, input.group_ids);
        let eps = f64::from(self.epsilon);
        let adv: Vec<f64> = scores
            .iter()
            .zip(&g.of)
            .map(|(&s, &k)| {
                if g.count[k] < 2 {
                    0.0
                } else {
                    (s - g.mean[k]) / (g.std[k] + eps)
                }
            })
            .collect();
        Ok(outcome_output(input, &adv, &scores, Some(&g)))
    }
}

/// Dr. GRPO ("GRPO done right"): `Aᵢ = sᵢ − mean_g`, without the std normalization that biases
/// GRPO towards too-easy and too-hard questions.
///
/// Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783,
/// §3.2. (Its other change, summing token losses without per-sequence length normalization, is
/// the policy loss's aggregation mode, not part of the advantage.) A group of one sequence has
/// advantage 0; verl (`grpo` with `norm_adv_by_std_in_grpo = false`) gives it its raw score.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrGrpo {}

impl AdvantageEstimator for DrGrpo {
    fn name(&self) -> &str {
        "dr-grpo"
    }

    fn compute(&self, input: &AdvantageInput<'_>) -> Result<AdvantageOutput> {
        input.validate(self.name(), false)?;
        let scores = input.scores();
        let g = Groups::new(&scores, input.group_ids);
        let adv: Vec<f64> = scores
            .iter()
            .zip(&g.of)
            .map(|(&s, &k)| s - g.mean[k])
            .collect();
        Ok(outcome_output(input, &adv, &scores, Some(&g)))
    }
}

/// RLOO: leave-one-out baseline, `Aᵢ = sᵢ − (1 / (n − 1)) Σ_{j≠i} sⱼ = n / (n − 1) · (sᵢ −
/// mean_g)`.
///
/// Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
/// Human Feedback in LLMs", arXiv 2402.14740, §3.2 (after Kool et al., 2019). A group of one
/// sequence has no baseline: advantage 0 (verl's `compute_rloo_outcome_advantage` leaves it its raw
/// score).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rloo {}

impl AdvantageEstimator for Rloo {
    fn name(&self) -> &str {
        "rloo"
    }

    fn compute(&self, input: &AdvantageInput<'_>) -> Result<AdvantageOutput> {
        input.validate(self.name(), false)?;
        let scores = input.scores();
        let g = Groups::new(&scores, input.group_ids);
        let adv: Vec<f64> = scores
            .iter()
            .zip(&g.of)
            .map(|(&s, &k)| {
                let n = g.count[k] as f64;
                if g.count[k] < 2 {
                    0.0
                } else {
                    let others = (g.mean[k] * n - s) / (n - 1.0);
                    s - others
                }
            })
            .collect();
        Ok(outcome_output(input, &adv, &scores, Some(&g)))
    }
}

/// REINFORCE++: per-token discounted returns `Gₜ = Σ_{k≥t} γ^{k−t} r_k`, whitened over all
/// unmasked tokens of the batch (global batch normalization, no critic, no group baseline).
///
/// Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
/// arXiv 2501.03262, §3. The per-token KL penalty the paper folds into `rₜ` is passed as
/// `token_rewards`. `returns` are the un-whitened `Gₜ`. Masked tokens are skipped and the return
/// carries across them; verl's `compute_reinforce_plus_plus_outcome_advantage` resets it to 0 at
/// every masked token, so there tokens before a tool output do not see later rewards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReinforcePp {
    /// Discount `γ` in `[0, 1]` (default 1).
    #[serde(default = "one")]
    pub gamma: f32,
}

impl Default for ReinforcePp {
    fn default() -> Self {
        Self { gamma: 1.0 }
    }
}

impl AdvantageEstimator for ReinforcePp {
    fn name(&self) -> &str {
        "reinforce-pp"
    }

    fn compute(&self, input: &AdvantageInput<'_>) -> Result<AdvantageOutput> {
        input.validate(self.name(), false)?;
        let gamma = f64::from(self.gamma);
        let returns: Vec<Vec<f64>> = (0..input.num_sequences())
            .map(|i| {
                let r = input.token_reward_row(i);
                let mut g = vec![0.0; r.len()];
                let mut running = 0.0;
                for t in (0..r.len()).rev() {
                    if input.valid(i, t) {
                        running = r[t] + gamma * running;
                        g[t] = running;
                    }
                }
                g
            })
            .collect();
        let mut adv = returns.clone();
        whiten(input, &mut adv);
        let advantages = to_f32(adv);
        let mut metrics = BTreeMap::new();
        token_metrics(input, &advantages, &mut metrics);
        let returns = to_f32(returns);
        insert_returns_mean(input, &returns, &mut metrics);
        Ok(AdvantageOutput {
            advantages,
            returns,
            metrics,
        })
    }
}

/// REINFORCE++ with a group baseline: `Aᵢ = sᵢ − mean_g`, broadcast over tokens, then whitened
/// over all unmasked tokens of the batch.
///
/// Hu, "REINFORCE++", arXiv 2501.03262 (the "REINFORCE++-baseline" variant for multi-sample
/// prompts; as verl's `compute_reinforce_plus_plus_baseline_outcome_advantage`, except for a group
/// of one sequence: 0 before whitening here, its raw score in verl). Note: after the batch
/// whitening a group whose scores are all equal gets `−μ/σ` of the batch, not 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReinforcePpBaseline {}

impl AdvantageEstimator for ReinforcePpBaseline {
    fn name(&self) -> &str {
        "reinforce-pp-baseline"
    }

    fn compute(&self, input: &AdvantageInput<'_>) -> Result<AdvantageOutput> {
        input.validate(self.name(), false)?;
        let scores = input.scores();
        let g = Groups::new(&scores, input.group_ids);
        let mut rows: Vec<Vec<f64>> = scores
            .iter()
            .zip(&g.of)
            .enumerate()
            .map(|(i, (&s, &k))| vec![s - g.mean[k]; input.response_lengths[i]])
            .collect();
        whiten(input, &mut rows);
        let advantages = to_f32(rows);
        let scores32: Vec<f32> = scores.iter().map(|&s| s as f32).collect();
        let returns = broadcast_to_tokens(&scores32, input.response_lengths, input.response_mask);
        let mut metrics = BTreeMap::new();
        token_metrics(input, &advantages, &mut metrics);
        metrics.insert("groups".into(), g.count.len() as f32);
        metrics.insert("zero_variance_groups".into(), g.zero_variance() as f32);
        Ok(AdvantageOutput {
            advantages,
            returns,
            metrics,
        })
    }
}

/// GAE: `δₜ = rₜ + γ V(sₜ₊₁) − V(sₜ)`, `Aₜ = δₜ + γλ Aₜ₊₁`, with `V = 0` after the last token;
/// `returns = A + V` (the critic's target). Optionally whitened over the batch (PPO practice).
///
/// Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
/// arXiv 1506.02438, eq. 16. Masked tokens are skipped by the recursion (the next *unmasked*
/// token's value is used) and get advantage 0, as verl's `compute_gae_advantage_return` skips
/// them (verl leaves a carried value at masked tokens, which its loss masks out). With
/// `γ = λ = 1` and no whitening, `Aₜ = Σ_{k≥t} r_k − V(sₜ)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gae {
    /// Discount `γ` in `[0, 1]` (default 1).
    #[serde(default = "one")]
    pub gamma: f32,
    /// GAE `λ` in `[0, 1]` (default 1, as verl's `algorithm.lam`).
    #[serde(default = "one")]
    pub lambda: f32,
    /// Whiten advantages over the batch (default `true`; verl's GAE always whitens).
    #[serde(default = "yes")]
    pub whiten: bool,
}

impl Default for Gae {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            lambda: 1.0,
            whiten: true,
        }
    }
}

fn insert_returns_mean(
    input: &AdvantageInput<'_>,
    returns: &[Vec<f32>],
    metrics: &mut BTreeMap<String, f32>,
) {
    let (mut n, mut sum) = (0usize, 0.0f64);
    for (i, row) in returns.iter().enumerate() {
        for (t, &x) in row.iter().enumerate() {
            if input.valid(i, t) {
                n += 1;
                sum += f64::from(x);
            }
        }
    }
    if n > 0 {
        metrics.insert("returns/mean".into(), (sum / n as f64) as f32);
    }
}

impl AdvantageEstimator for Gae {
    fn name(&self) -> &str {
        "gae"
    }

    fn needs_values(&self) -> bool {
        true
    }

    fn compute(&self, input: &AdvantageInput<'_>) -> Result<AdvantageOutput> {
        input.validate(self.name(), true)?;
        let Some(values) = input.values else {
            return Err(Error::AdvantageInput {
                estimator: self.name().into(),
                message: "critic values are required".into(),
            });
        };
        let (gamma, lambda) = (f64::from(self.gamma), f64::from(self.lambda));
        let mut adv: Vec<Vec<f64>> = Vec::with_capacity(input.num_sequences());
        let mut returns: Vec<Vec<f32>> = Vec::with_capacity(input.num_sequences());
        for (i, v) in values.iter().enumerate() {
            let r = input.token_reward_row(i);
            let len = r.len();
            let mut a = vec![0.0f64; len];
            let mut ret = vec![0.0f32; len];
            let (mut next_value, mut last_gae) = (0.0f64, 0.0f64);
            for t in (0..len).rev() {
                if !input.valid(i, t) {
                    continue;
                }
                let vt = f64::from(v[t]);
                let delta = r[t] + gamma * next_value - vt;
                last_gae = delta + gamma * lambda * last_gae;
                a[t] = last_gae;
                ret[t] = (last_gae + vt) as f32;
                next_value = vt;
            }
            adv.push(a);
            returns.push(ret);
        }
        if self.whiten {
            whiten(input, &mut adv);
        }
        let advantages = to_f32(adv);
        let mut metrics = BTreeMap::new();
        token_metrics(input, &advantages, &mut metrics);
        insert_returns_mean(input, &returns, &mut metrics);
        Ok(AdvantageOutput {
            advantages,
            returns,
            metrics,
        })
    }
}

/// The recipe's choice of advantage estimator (`advantage = { name = "grpo", ... }`).
///
/// Internally tagged by `name` (kebab-case); unknown fields are rejected.
///
/// ```
/// # use rlrun_rollout::AdvantageConfig;
/// let cfg: AdvantageConfig = toml::from_str(r#"
///     name = "gae"
///     gamma = 1.0
///     lambda = 0.95
/// "#).unwrap();
/// let est = cfg.build().unwrap();
/// assert_eq!(est.name(), "gae");
/// assert!(est.needs_values());
/// assert!(toml::from_str::<AdvantageConfig>("name = \"grpo\"\nlambda = 0.9").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum AdvantageConfig {
    /// [`Grpo`].
    Grpo(Grpo),
    /// [`DrGrpo`].
    DrGrpo(DrGrpo),
    /// [`Rloo`].
    Rloo(Rloo),
    /// [`ReinforcePp`].
    ReinforcePp(ReinforcePp),
    /// [`ReinforcePpBaseline`].
    ReinforcePpBaseline(ReinforcePpBaseline),
    /// [`Gae`].
    Gae(Gae),
}

impl AdvantageConfig {
    /// Validates the parameters and builds the estimator.
    pub fn build(&self) -> Result<Box<dyn AdvantageEstimator>> {
        let unit = |what: &str, name: &str, x: f32| {
            if (0.0..=1.0).contains(&x) {
                Ok(())
            } else {
                Err(Error::Config {
                    what: format!("advantage `{what}`"),
                    message: format!("{name} must be in [0, 1], got {x}"),
                })
            }
        };
        Ok(match self {
            AdvantageConfig::Grpo(c) => {
                if !(c.epsilon.is_finite() && c.epsilon > 0.0) {
                    return Err(Error::Config {
                        what: "advantage `grpo`".into(),
                        message: format!("epsilon must be finite and > 0, got {}", c.epsilon),
                    });
                }
                Box::new(c.clone())
            }
            AdvantageConfig::DrGrpo(c) => Box::new(c.clone()),
            AdvantageConfig::Rloo(c) => Box::new(c.clone()),
            AdvantageConfig::ReinforcePp(c) => {
                unit("reinforce-pp", "gamma", c.gamma)?;
                Box::new(c.clone())
            }
            AdvantageConfig::ReinforcePpBaseline(c) => Box::new(c.clone()),
            AdvantageConfig::Gae(c) => {
                unit("gae", "gamma", c.gamma)?;
                unit("gae", "lambda", c.lambda)?;
                Box::new(c.clone())
            }
        })
    }
}
