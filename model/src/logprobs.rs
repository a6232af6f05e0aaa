//! Log-probabilities of target tokens from hidden states, a chunk of rows at a time.
//!
//! Only the rows asked for are projected to the vocabulary, `chunk` rows at once, in f32; the
//! full `(B, T, vocab)` f32 logits are never materialized. The definition used everywhere in
//! rlrun (generator and trainer alike): `log softmax(logits / temperature)[target]`, with
//! `temperature = 1` for greedy decoding.

use tch::{Kind, Tensor};

use crate::error::Result;

/// Per-row log-probabilities (and optionally entropies) of `targets`.
///
/// `hidden` `(N, hidden)`, `lm_head` `(vocab, hidden)`, `targets` `(N,)` int64. Returns `(N,)`
/// f32 log-probs and, if `entropy`, `(N,)` f32 entropies of the temperature-scaled distribution.
/// Differentiable with respect to `hidden` and `lm_head`.
pub fn token_logprobs(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: i64,
    entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let n = hidden.size()[0];
    let chunk = chunk.max(1);
    // f32 projection (see `Model::logits`): the generator samples from these same numbers.
    let w = lm_head.f_to_kind(Kind::Float)?;
    let mut lps = Vec::new();
    let mut ents = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let h = hidden.f_narrow(0, start, len)?.f_to_kind(Kind::Float)?;
        let mut logits = h.f_linear::<Tensor>(&w, None)?; // (c, V)
        if temperature != 1.0 {
            logits = logits.f_div_scalar(temperature)?;
        }
        let lse = logits.f_logsumexp([-1], false)?; // (c,)
        let tgt = targets.f_narrow(0, start, len)?.f_unsqueeze(1)?;
        let picked = logits.f_gather(1, &tgt, false)?.f_squeeze_dim(1)?;
        lps.push(picked.f_sub(&lse)?);
        if entropy {
            let p = logits.f_sub(&lse.f_unsqueeze(1)?)?.f_exp()?;
            let mean_logit =
                p.f_mul(&logits)?
                    .f_sum_dim_intlist(&[-1i64][..], false, Kind::Float)?;
            ents.push(lse.f_sub(&mean_logit)?);
        }
        start += len;
    }
    let lp = Tensor::f_cat(&lps, 0)?;
    let ent = if entropy {
        Some(Tensor::f_cat(&ents, 0)?)
    } else {
        None
    };
    Ok((lp, ent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_equals_log_softmax_gather() {
        tch::manual_seed(0);
        let h = Tensor::randn([7, 5], (Kind::Float, tch::Device::Cpu));
        let w = Tensor::randn([11, 5], (Kind::Float, tch::Device::Cpu));
        let t = Tensor::from_slice(&[0i64, 3, 10, 2, 2, 9, 1]);
        let (lp, ent) = token_logprobs(&h, &w, &t, 0.7, 3, true).unwrap();
        let logits = h.matmul(&w.tr()) / 0.7;
        let full = logits.log_softmax(-1, Kind::Float);
        let want = full.gather(1, &t.unsqueeze(1), false).squeeze_dim(1);
        assert!((lp - want).abs().max().double_value(&[]) < 1e-6);
        let p = full.exp();
        let want_ent = -(p * full).sum_dim_intlist(&[-1i64][..], false, Kind::Float);
        assert!((ent.unwrap() - want_ent).abs().max().double_value(&[]) < 1e-5);
    }
}
