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
//! | `k3` | `exp(log r) − 1 − log r` | unbiased, low variance, ≥ 0 (GRPO's KL; verl's `low_var_kl` clamps it: [`KL_LOG_RATIO_CLAMP`]) |
//!
//! The same function serves both uses of the KL: as a loss term (the policy loss adds
//! `coef × aggregate(kl)`, see [`crate::loss`]) and as a per-token reward penalty computed by the
//! controller (`reward_t −= β · kl_t`).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::loss::{check_same_shape, Result};

/// `log r` is clamped to `[−KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP]` before `exp` in `k3`, so a
/// token the reference finds impossible cannot overflow (verl's `kl_penalty_forward` clamps
/// `log r` the same way). Inactive for sane inputs. The `k3` value itself is not clamped: verl
/// also clamps it to `[−10, 10]`, which biases the estimate and gives no gradient beyond 10
/// (docs/verl.md).
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

/// The KL penalty as a per-token reward ([`kl_in_reward`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KlReward {
    /// `−coef · kl_t` per response token of each sequence.
    pub token_rewards: Vec<Vec<f32>>,
    /// Mean per-token KL over every token of the batch.
    pub mean_kl: f64,
}

/// KL in the reward (PPO-RLHF style, `reward_t −= β · kl_t`): per-token KL of the sampling
/// policy's log-probs against the reference's, with estimator `est`, scaled by `−coef`.
///
/// `logprobs[i]` and `ref_logprobs[i]` are the log-probs of sequence `i`'s response tokens under
/// the policy that sampled them and under the reference model; they must have equal lengths.
pub fn kl_in_reward(
    logprobs: &[Vec<f32>],
    ref_logprobs: &[Vec<f32>],
    est: KlEstimator,
    coef: f64,
) -> Result<KlReward> {
    if logprobs.len() != ref_logprobs.len() {
        return Err(crate::loss::LossError::Invalid(format!(
            "kl_in_reward: {} sequences of log-probs but {} of reference log-probs",
            logprobs.len(),
            ref_logprobs.len()
        )));
    }
    let (mut sum, mut n) = (0.0f64, 0usize);
    let mut token_rewards = Vec::with_capacity(logprobs.len());
    for (lp, r) in logprobs.iter().zip(ref_logprobs) {
        let kl = kl_penalty(
            &Tensor::from_slice(lp).f_unsqueeze(0)?,
            &Tensor::from_slice(r).f_unsqueeze(0)?,
            est,
        )?;
        let kl = Vec::<f32>::try_from(kl.f_squeeze_dim(0)?)?;
        sum += kl.iter().map(|&x| f64::from(x)).sum::<f64>();
        n += kl.len();
        token_rewards.push(kl.iter().map(|&x| -(coef as f32) * x).collect());
    }
    Ok(KlReward {
        token_rewards,
        mean_kl: sum / n.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_in_reward_is_minus_coef_times_the_estimator() {
        let lp = vec![vec![-1.0f32, -2.0], vec![-0.5]];
        let rf = vec![vec![-1.5f32, -1.0], vec![-0.5]];
        // log r = ref - lp: [-0.5, 1.0], [0.0]
        let k1 = kl_in_reward(&lp, &rf, KlEstimator::K1, 0.1).unwrap();
        // k1 = -log r = [0.5, -1.0], [0.0]; the reward is -0.1 k1.
        let expect = [vec![-0.05f32, 0.1], vec![0.0]];
        for (a, b) in k1
            .token_rewards
            .iter()
            .flatten()
            .zip(expect.iter().flatten())
        {
            assert!((a - b).abs() < 1e-7, "{a} vs {b}");
        }
        assert!((k1.mean_kl - (0.5 - 1.0 + 0.0) / 3.0).abs() < 1e-7);
        let k3 = kl_in_reward(&lp, &rf, KlEstimator::K3, 2.0).unwrap();
        let k3_of = |x: f64| x.exp() - 1.0 - x;
        let want = [k3_of(-0.5), k3_of(1.0), 0.0];
        for (a, w) in k3.token_rewards.iter().flatten().zip(want) {
            assert!(
                (f64::from(*a) + 2.0 * w).abs() < 1e-6,
                "{a} vs {}",
                -2.0 * w
            );
        }
        assert!((k3.mean_kl - want.iter().sum::<f64>() / 3.0).abs() < 1e-6);
    }

    #[test]
    fn kl_in_reward_rejects_mismatched_inputs() {
        let lp = vec![vec![-1.0f32, -2.0]];
        assert!(kl_in_reward(&lp, &[vec![-1.0]], KlEstimator::K3, 0.1).is_err());
        assert!(kl_in_reward(&lp, &[], KlEstimator::K3, 0.1).is_err());
    }
}
