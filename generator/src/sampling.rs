//! Sampling parameters and the batched sampler.
//!
//! Definitions (the same for every request and every backend):
//! - Filters apply in this order to the temperature-scaled logits: `top_k` (keep the k most
//!   likely), `top_p` (keep the smallest most-likely set whose mass reaches p), `min_p` (drop
//!   tokens whose probability is below `min_p` × the top token's). Ties at a threshold are kept.
//! - The draw is inverse-CDF sampling over the filtered distribution in vocabulary order, with one
//!   uniform number per token derived from `(seed, draw key, sample index, position)` by a
//!   counter-based hash; so a sequence's tokens do not depend on what else is in the batch, nor
//!   on the request id (which only routes). The [`DrawKey`] says what the draw is for: the
//!   purpose (training rollout, evaluation, ...), the step, the round, the prompt.
//! - The returned log-prob of a sampled token is `log softmax(logits / temperature)[token]` over the
//!   full vocabulary, before any truncation: the quantity the trainer recomputes. For greedy
//!   decoding (`temperature = 0`) it is `log softmax(logits)[token]`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{GenError, Result};

/// How to sample the completions of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Completions per prompt (a GRPO group).
    pub n: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// 0 disables.
    pub top_k: i64,
    /// 0 disables.
    pub min_p: f64,
    pub max_tokens: usize,
    /// Stop token ids; `None` means the model's EOS ids (generation_config / config).
    pub stop_token_ids: Option<Vec<i64>>,
    /// Stop strings: generation ends once the decoded completion contains one.
    pub stop: Vec<String>,
    /// Seed of this request's draws (the engine seed when `None`).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_tokens: 256,
            stop_token_ids: None,
            stop: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        }
    }

    /// Checks ranges; `vocab` bounds stop token ids.
    pub fn validate(&self, vocab: i64) -> Result<()> {
        let bad = |m: String| Err(GenError::InvalidRequest(m));
        if self.n == 0 {
            return bad("`n` must be at least 1".into());
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "`temperature` must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("`top_p` must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < 0 {
            return bad(format!(
                "`top_k` must be >= 0 (0 disables), got {}",
                self.top_k
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("`min_p` must be in [0, 1], got {}", self.min_p));
        }
        if self.max_tokens == 0 {
            return bad("`max_tokens` must be at least 1".into());
        }
        if let Some(ids) = &self.stop_token_ids {
            if let Some(id) = ids.iter().find(|&&i| i < 0 || i >= vocab) {
                return bad(format!(
                    "stop token id {id} is outside the vocabulary (size {vocab})"
                ));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// SplitMix64 finalizer: a well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a generation is for: part of every draw's key, so that draws of different purposes
/// never coincide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    /// A request made outside a run's schedule (a notebook, `rlrun chat`, a benchmark).
    #[default]
    AdHoc,
    /// A training rollout.
    Train,
    /// Greedy evaluation.
    Eval,
    /// The sampled completions of pass@k evaluation.
    PassAtK,
    /// The weight-sync probe.
    Probe,
}

/// The typed key every random draw of a request derives from (with the seed, the sample index
/// and the position): `step` and `round` are the training step and its dynamic-sampling round
/// (for evaluations, the step evaluated at), `prompt` the prompt's index in its round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DrawKey {
    pub purpose: Purpose,
    pub step: u64,
    pub round: u64,
    pub prompt: u64,
}

impl DrawKey {
    /// A training rollout of `prompt` in `round` of `step`.
    pub fn train(step: u64, round: u64, prompt: u64) -> Self {
        DrawKey {
            purpose: Purpose::Train,
            step,
            round,
            prompt,
        }
    }

    /// The same key for another prompt.
    pub fn with_prompt(self, prompt: u64) -> Self {
        DrawKey { prompt, ..self }
    }

    /// The uniform number in [0, 1) of sample `sample`'s draw at `position`.
    pub fn uniform(&self, seed: u64, sample: u64, position: u64) -> f64 {
        let h = [
            self.purpose as u64,
            self.step,
            self.round,
            self.prompt,
            sample,
            position,
        ]
        .into_iter()
        .fold(mix(seed), |h, x| mix(h ^ x));
        (h >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Per-row sampling settings for one batched draw.
pub struct RowParams {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: i64,
    pub min_p: f64,
    pub uniform: f64,
}

/// Values per row in [`pack`]'s buffer.
pub const PACKED: i64 = 7;

/// The rows' settings as one host buffer, [`PACKED`] values per row (f64 holds each exactly):
/// the temperature to divide by (1 for greedy rows), the top-k index to compare with, whether
/// top-k is on, top-p, min-p, the uniform draw, whether the row is greedy. Sent to the device
/// in one copy.
pub fn pack(rows: &[RowParams], vocab: i64) -> Vec<f64> {
    let max_k = max_top_k(rows, vocab);
    let on = |b: bool| f64::from(u8::from(b));
    rows.iter()
        .flat_map(|p| {
            let k = if p.top_k > 0 {
                p.top_k.min(vocab) - 1
            } else {
                (max_k - 1).max(0)
            };
            let t = if p.temperature == 0.0 {
                1.0
            } else {
                p.temperature
            };
            [
                t,
                k as f64,
                on(p.top_k > 0),
                p.top_p,
                p.min_p,
                p.uniform,
                on(p.temperature == 0.0),
            ]
        })
        .collect()
}

/// The largest top-k of the rows (0: none), at most `vocab`.
fn max_top_k(rows: &[RowParams], vocab: i64) -> i64 {
    rows.iter()
        .map(|p| p.top_k)
        .filter(|&k| k > 0)
        .max()
        .unwrap_or(0)
        .min(vocab)
}

/// Samples one token per row of `logits` `(R, V)`; returns (tokens `(R,)` int64, log-probs `(R,)` f32).
pub fn sample(logits: &Tensor, rows: &[RowParams]) -> Result<(Tensor, Tensor)> {
    let packed = Tensor::from_slice(&pack(rows, logits.size()[1])).f_to_device(logits.device())?;
    sample_packed(logits, rows, &packed)
}

/// [`sample`] with the rows' settings already on the device (`packed`: [`pack`]'s buffer).
pub fn sample_packed(
    logits: &Tensor,
    rows: &[RowParams],
    packed: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let logits = logits.f_to_kind(Kind::Float)?;
    let r = rows.len() as i64;
    let vocab = logits.size()[1];
    let packed = packed.f_view([r, PACKED])?;
    // Column `i` as `(R, 1)`.
    let col = |i: i64| packed.f_select(1, i)?.f_unsqueeze(1);
    let temps = col(0)?.f_to_kind(Kind::Float)?;
    let scaled = logits.f_div(&temps)?; // (R, V)
    let logp = scaled.f_log_softmax(-1, Kind::Float)?;

    let all_greedy = rows.iter().all(|p| p.temperature == 0.0);
    let tokens = if all_greedy {
        scaled.f_argmax(-1, false)?
    } else {
        let mut masked = scaled.shallow_clone();
        // top-k: keep values >= the k-th largest of the row.
        let max_k = max_top_k(rows, vocab);
        if max_k > 0 {
            let (top, _) = masked.f_topk(max_k, -1, true, true)?; // (R, max_k) descending
            let kth = top.f_gather(1, &col(1)?.f_to_kind(Kind::Int64)?, false)?;
            let active = col(2)?.f_ne(0.0)?;
            let drop = masked.f_lt_tensor(&kth)?.f_logical_and(&active)?;
            masked = masked.f_masked_fill(&drop, f64::NEG_INFINITY)?;
        }
        // top-p: sort descending, keep tokens whose preceding mass is < p.
        if rows.iter().any(|p| p.top_p < 1.0) {
            let probs = masked.f_softmax(-1, Kind::Float)?;
            let (sorted, idx) = probs.f_sort(-1, true)?;
            let before = sorted.f_cumsum(-1, Kind::Float)?.f_sub(&sorted)?; // mass of strictly-better tokens
            let ps = col(3)?.f_to_kind(Kind::Float)?;
            let drop_sorted = before.f_ge_tensor(&ps)?;
            let drop = drop_sorted.f_scatter(1, &idx, &drop_sorted)?;
            masked = masked.f_masked_fill(&drop, f64::NEG_INFINITY)?;
        }
        // min-p: drop tokens with p < min_p * p_max.
        if rows.iter().any(|p| p.min_p > 0.0) {
            let probs = masked.f_softmax(-1, Kind::Float)?;
            let pmax = probs.f_amax(&[-1i64][..], true)?;
            let mps = col(4)?.f_to_kind(Kind::Float)?;
            let drop = probs.f_lt_tensor(&pmax.f_mul(&mps)?)?;
            masked = masked.f_masked_fill(&drop, f64::NEG_INFINITY)?;
        }
        // Inverse CDF in f64 over the filtered distribution, vocabulary order.
        let probs = masked.f_softmax(-1, Kind::Double)?;
        let cdf = probs.f_cumsum(-1, Kind::Double)?;
        let total = cdf.f_narrow(1, vocab - 1, 1)?;
        let us = col(5)?.f_mul(&total)?;
        let drawn = us
            .f_searchsorted(&cdf, false, true, "right", None::<Tensor>)?
            .f_squeeze_dim(1)?;
        // Guard against rounding past the end, and never pick a filtered-out token.
        let drawn = drawn.f_clamp_max(vocab - 1)?;
        let ok = probs
            .f_gather(1, &drawn.f_unsqueeze(1)?, false)?
            .f_squeeze_dim(1)?
            .f_gt(0.0)?;
        let fallback = masked.f_argmax(-1, false)?;
        let drawn = drawn.f_where_self(&ok, &fallback)?;
        if rows.iter().any(|p| p.temperature == 0.0) {
            let g = col(6)?.f_squeeze_dim(1)?.f_ne(0.0)?;
            scaled.f_argmax(-1, false)?.f_where_self(&g, &drawn)?
        } else {
            drawn
        }
    };
    let lp = logp
        .f_gather(1, &tokens.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?;
    debug_assert_eq!(tokens.size(), vec![r]);
    Ok((tokens, lp))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of mixed settings (greedy, top-k, top-p, min-p, plain) drawn together, with their
    /// settings in one packed buffer, give each row what it gives drawn alone.
    #[test]
    fn a_batch_of_mixed_rows_draws_what_each_row_draws_alone() {
        let vocab = 50;
        let logits = Tensor::randn([6, vocab], (Kind::Float, tch::Device::Cpu)) * 3.0;
        let row = |temperature, top_k, top_p, min_p, uniform| RowParams {
            temperature,
            top_p,
            top_k,
            min_p,
            uniform,
        };
        let rows = [
            row(0.0, 0, 1.0, 0.0, 0.3),
            row(1.0, 5, 1.0, 0.0, 0.7),
            row(0.7, 0, 0.8, 0.0, 0.2),
            row(1.3, 0, 1.0, 0.1, 0.9),
            row(1.0, 0, 1.0, 0.0, 0.5),
            row(0.9, 3, 0.9, 0.05, 0.99),
        ];
        let (tokens, lps) = sample(&logits, &rows).unwrap();
        for (i, r) in rows.iter().enumerate() {
            let one = [row(r.temperature, r.top_k, r.top_p, r.min_p, r.uniform)];
            let (t, lp) = sample(&logits.narrow(0, i as i64, 1), &one).unwrap();
            assert_eq!(
                t.int64_value(&[0]),
                tokens.int64_value(&[i as i64]),
                "row {i}"
            );
            assert_eq!(
                lp.double_value(&[0]),
                lps.double_value(&[i as i64]),
                "row {i}"
            );
        }
        // The greedy row took the argmax; the top-k rows a token among their k best.
        assert_eq!(
            tokens.int64_value(&[0]),
            logits.get(0).argmax(0, false).int64_value(&[])
        );
        let (_, best5) = logits.get(1).topk(5, 0, true, true);
        assert!(Vec::<i64>::try_from(&best5)
            .unwrap()
            .contains(&tokens.int64_value(&[1])));
    }

    #[test]
    fn uniform_is_deterministic_and_spread() {
        let k = DrawKey::train(2, 0, 3);
        assert_eq!(k.uniform(1, 3, 4), k.uniform(1, 3, 4));
        assert_ne!(k.uniform(1, 3, 4), k.uniform(1, 3, 5));
        let mean: f64 = (0..10_000).map(|i| k.uniform(7, 0, i)).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }

    #[test]
    fn every_field_of_the_draw_key_changes_the_draw() {
        let base = DrawKey::train(5, 1, 7);
        let u = base.uniform(42, 2, 9);
        let others = [
            DrawKey {
                purpose: Purpose::Eval,
                ..base
            },
            DrawKey { step: 6, ..base },
            DrawKey { round: 2, ..base },
            DrawKey { prompt: 8, ..base },
        ];
        for k in others {
            assert_ne!(k.uniform(42, 2, 9), u, "{k:?}");
        }
        assert_ne!(base.uniform(43, 2, 9), u);
        assert_ne!(base.uniform(42, 3, 9), u);
        // Fields are not interchangeable (no packing collisions): step 1 round 0 != step 0 round 1.
        assert_ne!(
            DrawKey::train(1, 0, 0).uniform(0, 0, 0),
            DrawKey::train(0, 1, 0).uniform(0, 0, 0)
        );
        // Pinned values: a change to how draws derive from the key shows here.
        assert_eq!(
            DrawKey::train(1, 0, 0).uniform(0, 0, 0).to_bits(),
            PINNED[0]
        );
        assert_eq!(base.uniform(42, 2, 9).to_bits(), PINNED[1]);
    }

    const PINNED: [u64; 2] = [4579494445103920320, 4602556196068089546];

    #[test]
    fn validation_rejects_bad_params() {
        let ok = SamplingParams::default();
        assert!(ok.validate(10).is_ok());
        for (p, word) in [
            (SamplingParams { n: 0, ..ok.clone() }, "`n`"),
            (
                SamplingParams {
                    temperature: -1.0,
                    ..ok.clone()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..ok.clone()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    stop_token_ids: Some(vec![10]),
                    ..ok.clone()
                },
                "stop token id 10",
            ),
        ] {
            let e = p.validate(10).unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
    }
}
