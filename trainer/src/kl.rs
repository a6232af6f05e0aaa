//! Per-token KL divergence between the current policy and the reference model.
//!
//! Estimators from J. Schulman, "Approximating KL divergence" (2020,
//! <http://joschu.net/blog/kl-approx.html>), for samples drawn from the current policy π_θ and
//! `log r = log π_ref(y) − log π_θ(y)`:
//!
//! | estimator | per token | note |
//! |---|---|---|
//! | `k1` | `−log r` | unbiased, high variance, can be negative |
//! | `k2` | `½ (log r)²` | biased, low variance, ≥ 0 |
//! | `k3` | `exp(log r) − 1 − log r` | unbiased, low variance, ≥ 0 (verl's `low_var_kl`, GRPO's KL) |
//!
//! The same function serves both uses of the KL: as a loss term (the policy loss adds
//! `coef × aggregate(kl)`, see [`crate::loss`]) and as a per-token reward penalty computed by the
//! controller (`reward_t −= β · kl_t`).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::loss::{check_same_shape, Result};

/// `log r` is clamped to `[−LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]` before `exp` in `k3`, so a token
/// the reference finds impossible cannot overflow (as verl does). Inactive for sane inputs.
pub const KL_LOG_RATIO_CLAMP: f64 = 20.0;

/// Which KL estimator to use; see the [module docs](self). Serde: `"k1"`, `"k2"`, `"k3"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `−log r`.
    K1,
    /// `½ (log r)²`.
    K2,
    /// `exp(log r) − 1 − log r` (low variance, non-negative). The default.
    #[default]
    K3,
}

impl KlEstimator {
    /// The serde name (`"k1"`, `"k2"`, `"k3"`).
    pub fn as_str(self) -> &'static str {
        match self {
            KlEstimator::K1 => "k1",
            KlEstimator::K2 => "k2",
            KlEstimator::K3 => "k3",
        }
    }
}

/// Per-token KL estimate of `KL(π_θ ‖ π_ref)`.
///
/// - `logprobs`: `(N, L)` log-probs of the sampled response tokens under the current policy;
///   gradients flow through it.
/// - `ref_logprobs`: `(N, L)` the same tokens under the reference model; detached here.
///
/// Returns `(N, L)`, unmasked: padding positions hold whatever their inputs give, so mask or
/// [`aggregate`](crate::loss::aggregate) the result.
pub fn kl_penalty(logprobs: &Tensor, ref_logprobs: &Tensor, est: KlEstimator) -> Result<Tensor> {
    check_same_shape(("logprobs", logprobs), ("ref_logprobs", ref_logprobs))?;
    let log_r = ref_logprobs.f_detach()?.f_sub(logprobs)?; // (N, L)
    Ok(match est {
        KlEstimator::K1 => log_r.f_neg()?,
        KlEstimator::K2 => log_r.f_square()?.f_mul_scalar(0.5)?,
        KlEstimator::K3 => {
            let log_r = log_r.f_clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)?;
            log_r.f_exp()?.f_sub_scalar(1.0)?.f_sub(&log_r)?
        }
    })
}
