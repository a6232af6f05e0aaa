//! Policy losses: PPO (clip-higher, dual-clip), GSPO and plain policy gradient, with one
//! aggregation function, an optional KL-to-reference term, an entropy bonus and the decoupled
//! off-policy correction (TIS or MIS, per token or per sequence) between the generator and the
//! trainer.
//!
//! Pure functions of tensors, like verl's `core_algos`: no model, no I/O. Shapes, for a
//! micro-batch of `N` sequences padded to `L` response tokens ([`LossInput`]):
//!
//! | tensor | shape | meaning |
//! |---|---|---|
//! | `logprobs` | `(N, L)` | `log π_θ(y_t)` under the current policy (requires grad) |
//! | `old_logprobs` | `(N, L)` | `log π_old(y_t)`, the policy before this update (detached) |
//! | `advantages` | `(N, L)` | per-token advantages `A_t` |
//! | `mask` | `(N, L)` | 1.0 on response tokens, 0.0 on padding |
//! | `ref_logprobs` (opt.) | `(N, L)` | reference model, for the KL term |
//! | `behavior_logprobs` (opt.) | `(N, L)` | the generator's log-probs (behaviour policy `μ`) |
//! | `entropy` (opt.) | `(N, L)` | per-token entropy of π_θ (requires grad), for the bonus |
//!
//! The total loss is
//!
//! ```text
//! loss = agg(w_t · ℓ_t)  +  kl.coef · agg(kl_t)  −  entropy_coef · agg(H_t)
//! ```
//!
//! where `ℓ_t` is the per-token surrogate of the configured loss, `w_t` the off-policy weight
//! ([`OffPolicyConfig`]; 1 without a correction), `kl_t` = [`kl_penalty`] and `agg` = [`aggregate`] with the configured [`Aggregation`].
//! Every `agg` divides by the *global* counts of the mini-batch ([`Normalizer`]), so the losses of
//! a mini-batch's micro-batches sum to the mini-batch loss however it was split.
//!
//! Built from the recipe by [`PolicyLossConfig::build`] (`[algorithm.loss]`):
//!
//! ```toml
//! [algorithm.loss]
//! name = "ppo"                  # "ppo" | "gspo" | "pg"
//! clip_low = 0.2                # ppo, gspo
//! clip_high = 0.28              # ppo, gspo (DAPO clip-higher when != clip_low)
//! dual_clip = 3.0               # ppo only, optional
//! aggregation = "token-mean"    # | "seq-mean-token-sum" | "seq-mean-token-mean" | "seq-mean-token-sum-norm"
//! entropy_coef = 0.0
//! off_policy = { correction = "truncate", level = "token", cap = 2.0 }  # default when needed
//! kl = { estimator = "k3", coef = 0.001 }   # optional
//! ```

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

pub use crate::kl::{kl_in_reward, kl_penalty, KlEstimator, KlReward};

/// Errors of the policy losses.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LossError {
    /// A libtorch operation failed (device, dtype, out of memory).
    #[error("libtorch error in the policy loss: {0}")]
    Torch(#[from] tch::TchError),
    /// Inconsistent inputs (shapes, missing tensors) or an out-of-range config value.
    #[error("invalid policy loss input or config: {0}")]
    Invalid(String),
}

/// Shorthand for `Result<T, LossError>`.
pub type Result<T, E = LossError> = std::result::Result<T, E>;

/// `log(π_θ/π_old)` is clamped to `[−20, 20]` before `exp` in PPO and the plain-PG metrics (as in
/// verl), so one wild token cannot overflow. Inactive for sane inputs.
pub const LOG_RATIO_CLAMP: f64 = 20.0;
/// GSPO's token-level `log s_{i,t}` is clamped to at most 10 before `exp` (as in verl).
pub const GSPO_LOG_RATIO_MAX: f64 = 10.0;

// ---------------------------------------------------------------------------------------------
// Aggregation
// ---------------------------------------------------------------------------------------------

/// Global counts of the mini-batch a micro-batch belongs to, so that losses are invariant to how
/// the mini-batch is split into micro-batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalizer {
    /// Response tokens (mask sum) in the whole mini-batch.
    pub tokens: f64,
    /// Sequences with at least one response token in the whole mini-batch.
    pub sequences: f64,
    /// The constant of Dr.GRPO's `seq-mean-token-sum-norm`: the generation budget (max response
    /// tokens), the same for every micro-batch.
    pub max_response_len: f64,
}

impl Normalizer {
    /// Counts of a whole mini-batch from its `(N, L)` mask (one host sync).
    pub fn from_mask(mask: &Tensor, max_response_len: f64) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        if mask.dim() != 2 {
            return Err(LossError::Invalid(format!(
                "mask must be (N, L), got {:?}",
                mask.size()
            )));
        }
        let m = mask.f_to_kind(Kind::Double)?;
        let tokens = m.f_sum(Kind::Double)?;
        let sequences = m
            .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?
            .f_gt(0.0)?
            .f_sum(Kind::Double)?;
        let v = Vec::<f64>::try_from(&Tensor::f_stack(&[tokens, sequences], 0)?)?;
        Ok(Self {
            tokens: v[0],
            sequences: v[1],
            max_response_len,
        })
    }
}

/// How per-token losses are reduced to a scalar. Serde: kebab-case names.
///
/// With `m` the mask, `ℓ` the per-token loss and `n` the [`Normalizer`] (global counts):
///
/// | mode | value |
/// |---|---|
/// | `token-mean` | `Σ_{i,t} ℓ·m / n.tokens` |
/// | `seq-mean-token-sum` | `Σ_{i,t} ℓ·m / n.sequences` |
/// | `seq-mean-token-mean` | `Σ_i [Σ_t ℓ·m / max(1, Σ_t m_i)] / n.sequences` (GRPO, GSPO) |
/// | `seq-mean-token-sum-norm` | `Σ_{i,t} ℓ·m / (n.sequences · n.max_response_len)` (Dr.GRPO, arXiv 2503.20783) |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Mean over all response tokens of the mini-batch (DAPO's token-level loss).
    #[default]
    TokenMean,
    /// Sum over each sequence's tokens, mean over sequences.
    SeqMeanTokenSum,
    /// Mean over each sequence's tokens, mean over sequences.
    SeqMeanTokenMean,
    /// Sum over tokens divided by `sequences × max_response_len` (Dr.GRPO).
    SeqMeanTokenSumNorm,
}

impl Aggregation {
    /// Every mode, for tests and docs.
    pub const ALL: [Aggregation; 4] = [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSumNorm,
    ];

    /// The serde name.
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::TokenMean => "token-mean",
            Aggregation::SeqMeanTokenSum => "seq-mean-token-sum",
            Aggregation::SeqMeanTokenMean => "seq-mean-token-mean",
            Aggregation::SeqMeanTokenSumNorm => "seq-mean-token-sum-norm",
        }
    }
}

/// Reduces a `(N, L)` per-token quantity to a scalar with `mode`, normalized by the mini-batch's
/// global counts `norm` (see [`Aggregation`]). The one aggregation used by every loss term.
pub fn aggregate(
    per_token: &Tensor,
    mask: &Tensor,
    mode: Aggregation,
    norm: &Normalizer,
) -> Result<Tensor> {
    check_same_shape(("per-token loss", per_token), ("mask", mask))?;
    let kind = per_token.kind();
    let masked = per_token.f_mul(mask)?; // (N, L)
    Ok(match mode {
        Aggregation::TokenMean => masked
            .f_sum(kind)?
            .f_div_scalar(positive(norm.tokens, "normalizer tokens")?)?,
        Aggregation::SeqMeanTokenSum => masked
            .f_sum(kind)?
            .f_div_scalar(positive(norm.sequences, "normalizer sequences")?)?,
        Aggregation::SeqMeanTokenMean => {
            let dim = [1i64];
            let seq_sum = masked.f_sum_dim_intlist(dim.as_slice(), false, kind)?; // (N,)
            let seq_len = mask
                .f_sum_dim_intlist(dim.as_slice(), false, kind)?
                .f_clamp_min(1.0)?; // (N,)
            seq_sum
                .f_div(&seq_len)?
                .f_sum(kind)?
                .f_div_scalar(positive(norm.sequences, "normalizer sequences")?)?
        }
        Aggregation::SeqMeanTokenSumNorm => {
            let denom = positive(norm.sequences, "normalizer sequences")?
                * positive(norm.max_response_len, "normalizer max_response_len")?;
            masked.f_sum(kind)?.f_div_scalar(denom)?
        }
    })
}

fn positive(x: f64, what: &str) -> Result<f64> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(LossError::Invalid(format!(
            "{what} must be positive and finite, got {x}"
        )))
    }
}

pub(crate) fn check_same_shape(a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<()> {
    let (sa, sb) = (a.1.size(), b.1.size());
    if sa.len() != 2 || sa != sb {
        return Err(LossError::Invalid(format!(
            "`{}` {:?} and `{}` {:?} must both be (N, L)",
            a.0, sa, b.0, sb
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inputs, outputs, metrics
// ---------------------------------------------------------------------------------------------

/// The tensors of one micro-batch; see the [module docs](self) for shapes.
#[derive(Clone, Copy, Debug)]
pub struct LossInput<'a> {
    /// `(N, L)` current policy log-probs of the response tokens (requires grad).
    pub logprobs: &'a Tensor,
    /// `(N, L)` log-probs of the policy before this update (detached).
    pub old_logprobs: &'a Tensor,
    /// `(N, L)` per-token advantages.
    pub advantages: &'a Tensor,
    /// `(N, L)` 1.0 on response tokens, 0.0 on padding.
    pub mask: &'a Tensor,
    /// `(N, L)` reference-model log-probs: the KL loss term (and the `kl` metric).
    pub ref_logprobs: Option<&'a Tensor>,
    /// `(N, L)` the generator's log-probs (behaviour policy): the off-policy correction.
    pub behavior_logprobs: Option<&'a Tensor>,
    /// `(N, L)` per-token entropy of the current policy (requires grad): the entropy bonus.
    pub entropy: Option<&'a Tensor>,
    /// Global counts of the mini-batch this micro-batch belongs to.
    pub norm: &'a Normalizer,
}

impl<'a> LossInput<'a> {
    /// The required inputs; add the optional ones with the `with_*` methods.
    pub fn new(
        logprobs: &'a Tensor,
        old_logprobs: &'a Tensor,
        advantages: &'a Tensor,
        mask: &'a Tensor,
        norm: &'a Normalizer,
    ) -> Self {
        Self {
            logprobs,
            old_logprobs,
            advantages,
            mask,
            ref_logprobs: None,
            behavior_logprobs: None,
            entropy: None,
            norm,
        }
    }

    /// Adds reference-model log-probs.
    pub fn with_ref(mut self, ref_logprobs: &'a Tensor) -> Self {
        self.ref_logprobs = Some(ref_logprobs);
        self
    }

    /// Adds the generator's log-probs.
    pub fn with_behavior(mut self, behavior_logprobs: &'a Tensor) -> Self {
        self.behavior_logprobs = Some(behavior_logprobs);
        self
    }

    /// Adds per-token entropy.
    pub fn with_entropy(mut self, entropy: &'a Tensor) -> Self {
        self.entropy = Some(entropy);
        self
    }

    fn validate(&self) -> Result<()> {
        let m = ("mask", self.mask);
        check_same_shape(("logprobs", self.logprobs), m)?;
        check_same_shape(("old_logprobs", self.old_logprobs), m)?;
        check_same_shape(("advantages", self.advantages), m)?;
        let optional = [
            ("ref_logprobs", self.ref_logprobs),
            ("behavior_logprobs", self.behavior_logprobs),
            ("entropy", self.entropy),
        ];
        for (name, t) in optional {
            if let Some(t) = t {
                check_same_shape((name, t), m)?;
            }
        }
        Ok(())
    }
}

/// One metric of a micro-batch, in a form that merges exactly across micro-batches: the mean is
/// `Σ sum / Σ count` and the max is the max of maxes ([`Metric::merge`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metric {
    /// Sum of the values.
    pub sum: f64,
    /// Number (or weight) of the values.
    pub count: f64,
    /// The maximum, for metrics that report one (`−∞` when the micro-batch has no response token).
    pub max: Option<f64>,
}

impl Metric {
    /// A metric reported as `sum / count`.
    pub fn mean(sum: f64, count: f64) -> Self {
        Self {
            sum,
            count,
            max: None,
        }
    }

    /// Folds `other` (the same metric of another micro-batch) into `self`.
    pub fn merge(&mut self, other: &Metric) {
        self.sum += other.sum;
        self.count += other.count;
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// `sum / count` (NaN when `count` is 0).
    pub fn value(&self) -> f64 {
        self.sum / self.count
    }
}

/// Merges a micro-batch's metrics into an accumulator (by name, keeping first-seen order).
pub fn merge_metrics(acc: &mut Vec<(String, Metric)>, new: &[(String, Metric)]) {
    for (name, m) in new {
        match acc.iter_mut().find(|(n, _)| n == name) {
            Some((_, a)) => a.merge(m),
            None => acc.push((name.clone(), *m)),
        }
    }
}

/// What a [`PolicyLoss`] returns for one micro-batch.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar loss; summing it over the micro-batches of a mini-batch gives the mini-batch loss.
    pub loss: Tensor,
    /// Metrics, all exact sums/counts over masked tokens (see [`PolicyLoss`] for the names).
    pub metrics: Vec<(String, Metric)>,
}

/// A policy loss: one micro-batch's tensors → scalar loss + metrics.
///
/// Metrics (means over the mini-batch's response tokens unless noted):
///
/// | name | value |
/// |---|---|
/// | `pg_loss` | the aggregated policy-gradient term (after the off-policy weights); `count` is the micro-batch's share of the [`Normalizer`], so over a full mini-batch the mean is the mini-batch's term |
/// | `pg_clipfrac_low` | ppo, gspo: fraction with `A < 0` and `ratio < 1 − clip_low` (lower clip active) |
/// | `pg_clipfrac_high` | ppo, gspo: fraction with `A > 0` and `ratio > 1 + clip_high` (upper clip active) |
/// | `pg_clipfrac_dual` | ppo with `dual_clip = c`: fraction with `A < 0` and `ratio > c` (dual clip active) |
/// | `ppo_kl` | mean of `old_logprobs − logprobs` |
/// | `ratio` | mean and `max` of the importance ratio (gspo: `s_i` on each token; pg: `π_θ/π_old`) |
/// | `entropy` | if `entropy` is given |
/// | `kl` | if `ref_logprobs` is given: the configured estimator, else `k3` |
/// | `behavior_kl` | if `behavior_logprobs` is given: k3 estimate of `KL(μ ‖ π_old)` |
/// | `is_ratio` | with an off-policy correction: mean and `max` of `ρ = π_old/μ` (per token or per sequence) |
/// | `is_weight_mean` | with an off-policy correction: mean of the applied weights |
/// | `is_capped_frac` | with an off-policy correction: fraction of tokens with `ρ > cap` (truncated or masked) |
pub trait PolicyLoss: Send + Sync {
    /// The recipe name (`"ppo"`, `"gspo"`, `"pg"`).
    fn name(&self) -> &str;
    /// Loss and metrics of one micro-batch.
    fn compute(&self, input: &LossInput) -> Result<LossOutput>;
}

/// Collects metric tensors on the device and copies them to the host with one sync.
struct MetricSet {
    /// `(N, L)` f64 mask, detached.
    mask: Tensor,
    /// 0-d f64 token count.
    tokens: Tensor,
    names: Vec<(String, bool)>, // (name, has a max)
    values: Vec<Tensor>,        // 0-d f64: sum, count[, max] per metric
}

impl MetricSet {
    fn new(mask: &Tensor) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let mask = mask.f_detach()?.f_to_kind(Kind::Double)?;
        let tokens = mask.f_sum(Kind::Double)?;
        Ok(Self {
            mask,
            tokens,
            names: Vec::new(),
            values: Vec::new(),
        })
    }

    fn mean_of(&mut self, name: &str, sum: Tensor, count: Tensor) {
        self.names.push((name.to_owned(), false));
        self.values.push(sum);
        self.values.push(count);
    }

    /// Mean of `(N, L)` `x` over masked tokens.
    fn token_mean(&mut self, name: &str, x: &Tensor) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let sum = x
            .f_detach()?
            .f_to_kind(Kind::Double)?
            .f_mul(&self.mask)?
            .f_sum(Kind::Double)?;
        let count = self.tokens.shallow_clone();
        self.mean_of(name, sum, count);
        Ok(())
    }

    /// Mean and max of `(N, L)` `x` over masked tokens.
    fn token_mean_max(&mut self, name: &str, x: &Tensor) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let x = x.f_detach()?.f_to_kind(Kind::Double)?;
        let sum = x.f_mul(&self.mask)?.f_sum(Kind::Double)?;
        let max = x
            .f_masked_fill(&self.mask.f_eq(0.0)?, f64::NEG_INFINITY)?
            .f_max()?;
        self.names.push((name.to_owned(), true));
        self.values.push(sum);
        self.values.push(self.tokens.shallow_clone());
        self.values.push(max);
        Ok(())
    }

    /// Ratio metrics and `ppo_kl`, shared by every loss.
    fn ratio(&mut self, ratio: &Tensor, logprobs: &Tensor, old_logprobs: &Tensor) -> Result<()> {
        self.token_mean("ppo_kl", &old_logprobs.f_sub(&logprobs.f_detach()?)?)?;
        self.token_mean_max("ratio", ratio)
    }

    /// `pg_clipfrac_low` / `pg_clipfrac_high` of a clipped ratio.
    fn clip_fractions(
        &mut self,
        ratio: &Tensor,
        advantages: &Tensor,
        clip_low: f64,
        clip_high: f64,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let low = advantages
            .f_lt(0.0)?
            .f_logical_and(&ratio.f_lt(1.0 - clip_low)?)?;
        let high = advantages
            .f_gt(0.0)?
            .f_logical_and(&ratio.f_gt(1.0 + clip_high)?)?;
        self.token_mean("pg_clipfrac_low", &low)?;
        self.token_mean("pg_clipfrac_high", &high)
    }

    fn finish(self) -> Result<Vec<(String, Metric)>> {
        if self.values.is_empty() {
            return Ok(Vec::new());
        }
        let v = Vec::<f64>::try_from(&Tensor::f_stack(&self.values, 0)?.f_to_device(Device::Cpu)?)?;
        let mut out = Vec::with_capacity(self.names.len());
        let mut i = 0;
        for (name, has_max) in self.names {
            let mut m = Metric::mean(v[i], v[i + 1]);
            i += 2;
            if has_max {
                m.max = Some(v[i]);
                i += 1;
            }
            out.push((name, m));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Surrogates: the per-token part that differs between losses
// ---------------------------------------------------------------------------------------------

/// The per-token policy-gradient loss `ℓ_t` of one algorithm, `(N, L)`, unmasked.
trait Surrogate: Send + Sync {
    fn per_token(&self, input: &LossInput, metrics: &mut MetricSet) -> Result<Tensor>;
}

/// `max(−A·r, −A·clip(r, 1 − low, 1 + high))`, `(N, L)`.
fn clipped_objective(
    ratio: &Tensor,
    adv: &Tensor,
    clip_low: f64,
    clip_high: f64,
) -> Result<Tensor> {
    let neg_adv = adv.f_neg()?;
    let unclipped = neg_adv.f_mul(ratio)?;
    let clipped = neg_adv.f_mul(&ratio.f_clamp(1.0 - clip_low, 1.0 + clip_high)?)?;
    Ok(unclipped.f_maximum(&clipped)?)
}

/// PPO's clipped surrogate (Schulman et al., arXiv 1707.06347), with DAPO's decoupled clip range
/// ("clip-higher", arXiv 2503.14476: `clip_high > clip_low`) and optional dual clip (Ye et al.,
/// arXiv 1912.09729):
///
/// ```text
/// r_t  = exp(clamp(logprobs − old_logprobs, ±20))
/// ℓ_t  = max(−A_t r_t, −A_t clip(r_t, 1 − clip_low, 1 + clip_high))
/// ℓ_t  = min(ℓ_t, −A_t c)        for A_t < 0, with dual_clip = c > 1
/// ```
struct Ppo {
    clip_low: f64,
    clip_high: f64,
    dual_clip: Option<f64>,
}

impl Surrogate for Ppo {
    fn per_token(&self, input: &LossInput, metrics: &mut MetricSet) -> Result<Tensor> {
        let adv = input.advantages;
        let ratio = input
            .logprobs
            .f_sub(input.old_logprobs)?
            .f_clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)?
            .f_exp()?; // (N, L)
        let mut loss = clipped_objective(&ratio, adv, self.clip_low, self.clip_high)?;
        let ratio_d = ratio.f_detach()?;
        metrics.ratio(&ratio_d, input.logprobs, input.old_logprobs)?;
        metrics.clip_fractions(&ratio_d, adv, self.clip_low, self.clip_high)?;
        if let Some(c) = self.dual_clip {
            let negative = adv.f_lt(0.0)?;
            let dual = loss.f_minimum(&adv.f_mul_scalar(-c)?)?;
            loss = dual.f_where_self(&negative, &loss)?;
            let _guard = tch::no_grad_guard();
            metrics.token_mean(
                "pg_clipfrac_dual",
                &negative.f_logical_and(&ratio_d.f_gt(c)?)?,
            )?;
        }
        Ok(loss)
    }
}

/// GSPO (Zheng et al., arXiv 2507.18071): a sequence-level importance ratio, clipped per
/// sequence. With `M_i` the masked tokens of sequence `i`:
///
/// ```text
/// s_i    = exp( Σ_{t∈M_i} (logprobs − old_logprobs) / max(1, |M_i|) )
/// s_i,t  = sg(s_i) · exp(logprobs_t − sg(logprobs_t))      (value s_i; gradient s_i ∇logprobs_t)
/// ℓ_t    = max(−A_t s_i,t, −A_t clip(s_i,t, 1 − clip_low, 1 + clip_high))
/// ```
///
/// (`log s_i,t` clamped to ≤ 10, as verl does.) The paper aggregates with `seq-mean-token-mean`;
/// here the configured aggregation is used.
struct Gspo {
    clip_low: f64,
    clip_high: f64,
}

impl Surrogate for Gspo {
    fn per_token(&self, input: &LossInput, metrics: &mut MetricSet) -> Result<Tensor> {
        let (lp, mask) = (input.logprobs, input.mask);
        let dim = [1i64];
        let kind = lp.kind();
        let log_ratio = lp.f_sub(input.old_logprobs)?; // (N, L)
        let seq_len = mask
            .f_sum_dim_intlist(dim.as_slice(), false, kind)?
            .f_clamp_min(1.0)?; // (N,)
        let seq_log_ratio = log_ratio
            .f_mul(mask)?
            .f_sum_dim_intlist(dim.as_slice(), false, kind)?
            .f_div(&seq_len)?; // (N,)
        let log_s = lp
            .f_sub(&lp.f_detach()?)?
            .f_add(&seq_log_ratio.f_detach()?.f_unsqueeze(1)?)? // (N, L)
            .f_clamp_max(GSPO_LOG_RATIO_MAX)?;
        let s = log_s.f_exp()?; // (N, L)
        let loss = clipped_objective(&s, input.advantages, self.clip_low, self.clip_high)?;
        let s_d = s.f_detach()?;
        metrics.ratio(&s_d, lp, input.old_logprobs)?;
        metrics.clip_fractions(&s_d, input.advantages, self.clip_low, self.clip_high)?;
        Ok(loss)
    }
}

/// On-policy policy gradient (REINFORCE, Williams 1992): `ℓ_t = −A_t · logprobs_t`. No ratio
/// enters the loss; `ratio_*` and `ppo_kl` still report how far π_θ is from π_old.
struct Pg;

impl Surrogate for Pg {
    fn per_token(&self, input: &LossInput, metrics: &mut MetricSet) -> Result<Tensor> {
        let ratio = {
            let _guard = tch::no_grad_guard();
            input
                .logprobs
                .f_detach()?
                .f_sub(input.old_logprobs)?
                .f_clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)?
                .f_exp()?
        };
        metrics.ratio(&ratio, input.logprobs, input.old_logprobs)?;
        Ok(input.advantages.f_neg()?.f_mul(input.logprobs)?)
    }
}

/// `(N, L)` importance ratios `ρ = π_old/μ` between the trainer before this update (the proximal
/// policy, `old_logprobs`) and the generator that sampled the tokens (the behaviour policy `μ`,
/// `behavior_logprobs`), detached, with the log clamped to `±20`:
/// - `token`: `ρ_t = exp(old_t − behavior_t)`;
/// - `sequence`: `ρ_i = exp(Σ_t m_t (old_t − behavior_t))` (the whole sequence's likelihood ratio),
///   on every token of the sequence.
pub fn importance_ratios(
    old_logprobs: &Tensor,
    behavior_logprobs: &Tensor,
    mask: &Tensor,
    level: IsLevel,
) -> Result<Tensor> {
    check_same_shape(
        ("old_logprobs", old_logprobs),
        ("behavior_logprobs", behavior_logprobs),
    )?;
    check_same_shape(("old_logprobs", old_logprobs), ("mask", mask))?;
    let _guard = tch::no_grad_guard();
    let log_ratio = old_logprobs.f_detach()?.f_sub(behavior_logprobs)?; // (N, L)
    let log_ratio = match level {
        IsLevel::Token => log_ratio,
        IsLevel::Sequence => log_ratio
            .f_mul(mask)?
            .f_sum_dim_intlist([1i64].as_slice(), true, log_ratio.kind())? // (N, 1)
            .f_expand_as(&log_ratio)?,
    };
    Ok(log_ratio
        .f_clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)?
        .f_exp()?)
}

/// The weights of the decoupled objective, `(N, L)`, detached, from the ratios `ρ` of
/// [`importance_ratios`]: `truncate` (TIS) `min(ρ, cap)`; `mask` (MIS) `ρ` where `ρ ≤ cap`, else 0.
/// `off` is never passed here.
pub fn importance_weights(ratios: &Tensor, correction: Correction, cap: f64) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    Ok(match correction {
        Correction::Truncate | Correction::Off => ratios.f_clamp_max(cap)?,
        Correction::Mask => ratios.f_mul(&ratios.f_le(cap)?.f_to_kind(ratios.kind())?)?,
    })
}

// ---------------------------------------------------------------------------------------------
// The full loss: surrogate + off-policy weights + aggregation + KL + entropy
// ---------------------------------------------------------------------------------------------

struct Composed<S> {
    name: &'static str,
    surrogate: S,
    aggregation: Aggregation,
    kl: Option<KlLossConfig>,
    entropy_coef: f64,
    off_policy: Option<OffPolicyConfig>,
}

impl<S: Surrogate> PolicyLoss for Composed<S> {
    fn name(&self) -> &str {
        self.name
    }

    fn compute(&self, input: &LossInput) -> Result<LossOutput> {
        input.validate()?;
        let (mask, norm, agg) = (input.mask, input.norm, self.aggregation);
        let mut metrics = MetricSet::new(mask)?;

        let mut per_token = self.surrogate.per_token(input, &mut metrics)?; // (N, L)
        if let Some(behavior) = input.behavior_logprobs {
            let _guard = tch::no_grad_guard();
            let k3 = kl_penalty(behavior, input.old_logprobs, KlEstimator::K3)?;
            metrics.token_mean("behavior_kl", &k3)?;
        }
        match (self.off_policy, input.behavior_logprobs) {
            (Some(op), Some(behavior)) => {
                let rho = importance_ratios(input.old_logprobs, behavior, mask, op.level)?;
                let w = importance_weights(&rho, op.correction, op.cap)?; // (N, L)
                metrics.token_mean_max("is_ratio", &rho)?;
                metrics.token_mean("is_weight_mean", &w)?;
                metrics.token_mean("is_capped_frac", &rho.f_gt(op.cap)?)?;
                per_token = per_token.f_mul(&w)?;
            }
            (Some(op), None) => {
                return Err(LossError::Invalid(format!(
                "off_policy correction `{}` needs the generator's log-probs (behavior_logprobs)",
                op.correction.as_str()
            )))
            }
            (None, _) => {}
        }
        let pg_loss = aggregate(&per_token, mask, agg, norm)?;
        {
            let _guard = tch::no_grad_guard();
            let share = match agg {
                Aggregation::TokenMean => metrics.tokens.f_div_scalar(norm.tokens)?,
                _ => metrics
                    .mask
                    .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?
                    .f_gt(0.0)?
                    .f_sum(Kind::Double)?
                    .f_div_scalar(norm.sequences)?,
            };
            let sum = pg_loss.f_detach()?.f_to_kind(Kind::Double)?;
            metrics.mean_of("pg_loss", sum, share);
        }
        let mut loss = pg_loss;

        match (&self.kl, input.ref_logprobs) {
            (Some(kl), Some(ref_lp)) => {
                let kl_t = kl_penalty(input.logprobs, ref_lp, kl.estimator)?;
                metrics.token_mean("kl", &kl_t)?;
                let term = aggregate(&kl_t, mask, agg, norm)?.f_mul_scalar(kl.coef)?;
                loss = loss.f_add(&term)?;
            }
            (Some(_), None) => {
                return Err(LossError::Invalid(
                    "the loss has a `kl` term but no ref_logprobs were given".into(),
                ))
            }
            (None, Some(ref_lp)) => {
                let _guard = tch::no_grad_guard();
                let kl_t = kl_penalty(input.logprobs, ref_lp, KlEstimator::K3)?;
                metrics.token_mean("kl", &kl_t)?;
            }
            (None, None) => {}
        }

        match input.entropy {
            Some(entropy) => {
                metrics.token_mean("entropy", entropy)?;
                if self.entropy_coef != 0.0 {
                    let bonus =
                        aggregate(entropy, mask, agg, norm)?.f_mul_scalar(self.entropy_coef)?;
                    loss = loss.f_sub(&bonus)?;
                }
            }
            None if self.entropy_coef != 0.0 => {
                return Err(LossError::Invalid(format!(
                    "entropy_coef = {} but no entropy was given",
                    self.entropy_coef
                )))
            }
            None => {}
        }

        Ok(LossOutput {
            loss,
            metrics: metrics.finish()?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

fn default_ppo_clip() -> f64 {
    0.2
}
fn default_gspo_clip_low() -> f64 {
    3e-4
}
fn default_gspo_clip_high() -> f64 {
    4e-4
}

/// Which policy-gradient surrogate, with its own options; the `name` key of `[algorithm.loss]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum LossConfig {
    /// PPO clipped surrogate; DAPO clip-higher when `clip_high != clip_low`; dual clip `c > 1`.
    Ppo {
        /// `ε_low`: the ratio is clipped below at `1 − clip_low`. Default 0.2.
        #[serde(default = "default_ppo_clip")]
        clip_low: f64,
        /// `ε_high`: the ratio is clipped above at `1 + clip_high`. Default 0.2 (DAPO: 0.28).
        #[serde(default = "default_ppo_clip")]
        clip_high: f64,
        /// Dual-clip constant `c > 1` (negative advantages), e.g. 3.0. Default: off.
        #[serde(default)]
        dual_clip: Option<f64>,
    },
    /// GSPO: sequence-level ratio. Default clip range `[1 − 3e-4, 1 + 4e-4]` (the paper's).
    Gspo {
        /// Default 3e-4.
        #[serde(default = "default_gspo_clip_low")]
        clip_low: f64,
        /// Default 4e-4.
        #[serde(default = "default_gspo_clip_high")]
        clip_high: f64,
    },
    /// On-policy policy gradient (REINFORCE): `−A · logprobs`.
    Pg {},
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig::Ppo {
            clip_low: default_ppo_clip(),
            clip_high: default_ppo_clip(),
            dual_clip: None,
        }
    }
}

impl LossConfig {
    /// The recipe name.
    pub fn name(&self) -> &'static str {
        match self {
            LossConfig::Ppo { .. } => "ppo",
            LossConfig::Gspo { .. } => "gspo",
            LossConfig::Pg {} => "pg",
        }
    }
}

/// The KL-to-reference loss term: `coef × aggregate(kl_penalty(estimator))`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlLossConfig {
    /// Default `k3`.
    #[serde(default)]
    pub estimator: KlEstimator,
    /// Coefficient `β ≥ 0`.
    pub coef: f64,
}

/// `[algorithm.loss]`: the surrogate (`name` + its options) and the options every loss shares.
///
/// Unknown keys are rejected (by [`LossConfig`], which receives every key not named here).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyLossConfig {
    /// The surrogate: `name = "ppo" | "gspo" | "pg"` and its options.
    #[serde(flatten)]
    pub loss: LossConfig,
    /// Default `token-mean`.
    #[serde(default)]
    pub aggregation: Aggregation,
    /// KL to the reference model as a loss term. Leave it out when the controller subtracts the
    /// KL from the reward instead.
    #[serde(default)]
    pub kl: Option<KlLossConfig>,
    /// Entropy bonus coefficient (the loss gets `− entropy_coef × aggregate(entropy)`). Default 0.
    #[serde(default)]
    pub entropy_coef: f64,
    /// `[algorithm.loss.off_policy]`: the correction for rollouts sampled by a policy other than
    /// the trainer's (see [`OffPolicyConfig`]). `None`: the run decides — on with the defaults
    /// whenever the generator's policy can differ from the trainer's (staleness > 0, a 16-bit
    /// dtype, generators in other processes or on another device), else off
    /// ([`PolicyLossConfig::resolve_off_policy`]). A loss built with `None` applies none.
    #[serde(default)]
    pub off_policy: Option<OffPolicyConfig>,
}

/// How the importance weight between the proximal and the behaviour policy is bounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Correction {
    /// Truncated importance sampling (TIS): `w = min(ρ, cap)`.
    #[default]
    Truncate,
    /// Masked importance sampling (MIS): `w = ρ` where `ρ ≤ cap`, else the token (or the whole
    /// sequence) is dropped from the policy-gradient term.
    Mask,
    /// No correction: the update treats the rollouts as the trainer's own.
    Off,
}

impl Correction {
    /// The recipe name.
    pub fn as_str(self) -> &'static str {
        match self {
            Correction::Truncate => "truncate",
            Correction::Mask => "mask",
            Correction::Off => "off",
        }
    }
}

/// Whether the importance ratio is taken per token or per sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsLevel {
    /// `ρ_t = π_old(y_t)/μ(y_t)`, each token on its own.
    #[default]
    Token,
    /// `ρ_i = Π_t π_old(y_t)/μ(y_t)`, one ratio for the whole sequence.
    Sequence,
}

impl IsLevel {
    /// The recipe name.
    pub fn as_str(self) -> &'static str {
        match self {
            IsLevel::Token => "token",
            IsLevel::Sequence => "sequence",
        }
    }
}

fn default_is_cap() -> f64 {
    2.0
}

/// `[algorithm.loss.off_policy]`: the decoupled PPO objective (Hilton et al., arXiv 2110.00641;
/// AReaL, arXiv 2505.24298). The surrogate clips the ratio to the *proximal* policy (the trainer
/// before this update, `old_logprobs`) and each token's term is weighted by `w` =
/// `ρ = π_old/μ` bounded by `correction` at `cap`, `μ` being the generator that sampled the
/// tokens (the behaviour policy, whose log-probs every rollout carries). Token-level truncation is
/// TIS (Yao et al. 2025), masking is MIS; sequence level takes one ratio per sequence.
///
/// ```toml
/// [algorithm.loss.off_policy]
/// correction = "truncate"   # | "mask" | "off"
/// level = "token"           # | "sequence"
/// cap = 2.0
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffPolicyConfig {
    /// Default `truncate`.
    #[serde(default)]
    pub correction: Correction,
    /// Default `token`.
    #[serde(default)]
    pub level: IsLevel,
    /// Default 2.0; at least 1.
    #[serde(default = "default_is_cap")]
    pub cap: f64,
}

impl Default for OffPolicyConfig {
    fn default() -> Self {
        Self {
            correction: Correction::default(),
            level: IsLevel::default(),
            cap: default_is_cap(),
        }
    }
}

impl std::fmt::Display for OffPolicyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.correction {
            Correction::Off => write!(f, "off"),
            c => write!(
                f,
                "{} at {} level, cap {}",
                c.as_str(),
                self.level.as_str(),
                self.cap
            ),
        }
    }
}

impl PolicyLossConfig {
    /// Checks the values' ranges (call it when the recipe is parsed): `0 ≤ clip_low < 1`,
    /// `clip_high ≥ 0`, `dual_clip > 1`, `kl.coef ≥ 0`, `off_policy.cap ≥ 1`, finite `entropy_coef`.
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(LossError::Invalid(format!("[algorithm.loss] {msg}")));
        let name = self.loss.name();
        if !self.entropy_coef.is_finite() {
            return invalid(format!(
                "entropy_coef must be finite, got {}",
                self.entropy_coef
            ));
        }
        if let Some(kl) = &self.kl {
            if !(kl.coef.is_finite() && kl.coef >= 0.0) {
                return invalid(format!("kl.coef must be >= 0, got {}", kl.coef));
            }
        }
        if let Some(op) = &self.off_policy {
            if !(op.cap.is_finite() && op.cap >= 1.0) {
                return invalid(format!(
                    "off_policy.cap must be >= 1 (a weight cap below 1 would shrink on-policy tokens too), got {}",
                    op.cap
                ));
            }
        }
        let (clip_low, clip_high) = match self.loss {
            LossConfig::Ppo {
                clip_low,
                clip_high,
                dual_clip,
            } => {
                if let Some(c) = dual_clip {
                    if !(c.is_finite() && c > 1.0) {
                        return invalid(format!("ppo: dual_clip must be > 1, got {c}"));
                    }
                }
                (clip_low, clip_high)
            }
            LossConfig::Gspo {
                clip_low,
                clip_high,
            } => (clip_low, clip_high),
            LossConfig::Pg {} => return Ok(()),
        };
        if !((0.0..1.0).contains(&clip_low) && clip_high.is_finite() && clip_high >= 0.0) {
            return invalid(format!(
                "{name}: need 0 <= clip_low < 1 and clip_high >= 0, got clip_low = {clip_low}, clip_high = {clip_high}"
            ));
        }
        Ok(())
    }

    /// Builds the loss; the one place a recipe's loss name is matched. A config that fails
    /// [`validate`](Self::validate) builds a loss whose `compute` returns that error.
    pub fn build(&self) -> Box<dyn PolicyLoss> {
        if let Err(e) = self.validate() {
            return Box::new(InvalidLoss {
                name: self.loss.name(),
                message: e.to_string(),
            });
        }
        match self.loss {
            LossConfig::Ppo {
                clip_low,
                clip_high,
                dual_clip,
            } => self.compose(Ppo {
                clip_low,
                clip_high,
                dual_clip,
            }),
            LossConfig::Gspo {
                clip_low,
                clip_high,
            } => self.compose(Gspo {
                clip_low,
                clip_high,
            }),
            LossConfig::Pg {} => self.compose(Pg),
        }
    }

    fn compose<S: Surrogate + 'static>(&self, surrogate: S) -> Box<dyn PolicyLoss> {
        Box::new(Composed {
            name: self.loss.name(),
            surrogate,
            aggregation: self.aggregation,
            kl: self.kl,
            entropy_coef: self.entropy_coef,
            off_policy: self
                .off_policy
                .filter(|op| op.correction != Correction::Off),
        })
    }

    /// The off-policy correction a run applies, given whether the generator's policy can differ
    /// from the trainer's (`may_differ`): the recipe's choice if it made one, else the default
    /// ([`OffPolicyConfig::default`], TIS at 2.0) when `may_differ`, else none. The second value
    /// is a warning for the log when the recipe turned the correction off although it may matter.
    pub fn resolve_off_policy(&self, may_differ: bool) -> (Self, Option<String>) {
        let mut out = self.clone();
        let mut warning = None;
        match self.off_policy {
            None if may_differ => out.off_policy = Some(OffPolicyConfig::default()),
            None => {}
            Some(op) if op.correction == Correction::Off && may_differ => {
                warning = Some(
                    "[algorithm.loss.off_policy] correction = \"off\" although the generator's policy can differ from the trainer's: the update uses the rollouts uncorrected (remove the key for truncated importance sampling at cap 2)".to_string(),
                )
            }
            Some(_) => {}
        }
        (out, warning)
    }
}

/// What [`PolicyLossConfig::build`] returns for an out-of-range config: never computes silently.
struct InvalidLoss {
    name: &'static str,
    message: String,
}

impl PolicyLoss for InvalidLoss {
    fn name(&self) -> &str {
        self.name
    }

    fn compute(&self, _input: &LossInput) -> Result<LossOutput> {
        Err(LossError::Invalid(self.message.clone()))
    }
}
