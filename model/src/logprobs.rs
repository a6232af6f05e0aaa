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

/// The gradients of `sum(grad_lp * lp) + sum(grad_ent * ent)`, with `lp` and `ent` the outputs
/// of [`token_logprobs`] on the same inputs, with respect to `hidden` and `lm_head`: the backward
/// pass of [`token_logprobs`], recomputing each chunk's logits from `hidden` instead of keeping
/// them. So a training step holds one chunk of `(chunk, vocab)` f32 logits at a time, in the
/// forward and in the backward, never all of them.
///
/// `grad_lp` `(N,)` (and `grad_ent` `(N,)`) are f32. Returns `(N, hidden)` in `hidden`'s dtype and
/// `(vocab, hidden)` in f32. Needs grad mode (not inside `no_grad`).
pub fn token_logprobs_backward(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: i64,
    grad_lp: &Tensor,
    grad_ent: Option<&Tensor>,
    weight_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let n = hidden.size()[0];
    let chunk = chunk.max(1);
    let w = lm_head
        .f_detach()?
        .f_to_kind(Kind::Float)?
        .f_set_requires_grad(weight_grad)?;
    let mut grad_w = if weight_grad {
        Some(w.f_zeros_like()?)
    } else {
        None
    };
    let mut grad_h = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let h = hidden
            .f_narrow(0, start, len)?
            .f_detach()?
            .f_to_kind(Kind::Float)?
            .f_set_requires_grad(true)?;
        let (lp, ent) = token_logprobs(
            &h,
            &w,
            &targets.f_narrow(0, start, len)?,
            temperature,
            len,
            grad_ent.is_some(),
        )?;
        let mut objective = lp
            .f_mul(&grad_lp.f_narrow(0, start, len)?)?
            .f_sum(Kind::Float)?;
        if let (Some(ent), Some(g)) = (ent, grad_ent) {
            objective =
                objective.f_add(&ent.f_mul(&g.f_narrow(0, start, len)?)?.f_sum(Kind::Float)?)?;
        }
        let inputs: Vec<&Tensor> = if weight_grad { vec![&h, &w] } else { vec![&h] };
        let mut grads = Tensor::f_run_backward(&[objective], &inputs, false, false)?;
        if let Some(gw_sum) = grad_w.as_mut() {
            let _ = gw_sum.f_add_(&grads.pop().expect("two inputs"))?;
        }
        grad_h.push(grads.pop().expect("one input").f_to_kind(hidden.kind())?);
        start += len;
    }
    let grad_h = if grad_h.is_empty() {
        hidden.f_zeros_like()?
    } else {
        Tensor::f_cat(&grad_h, 0)?
    };
    Ok((grad_h, grad_w))
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

    #[test]
    fn recomputed_backward_equals_autograd_through_the_whole_logits() {
        tch::manual_seed(1);
        let h = Tensor::randn([9, 6], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let w = Tensor::randn([13, 6], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let t = Tensor::from_slice(&[0i64, 3, 12, 2, 2, 9, 1, 5, 7]);
        let g_lp = Tensor::randn([9], (Kind::Float, tch::Device::Cpu));
        let g_ent = Tensor::randn([9], (Kind::Float, tch::Device::Cpu));
        for with_entropy in [false, true] {
            // Reference: autograd over the full log-softmax.
            let full = (h.matmul(&w.tr()) / 0.8).log_softmax(-1, Kind::Float);
            let lp = full.gather(1, &t.unsqueeze(1), false).squeeze_dim(1);
            let mut obj = (&lp * &g_lp).sum(Kind::Float);
            if with_entropy {
                let ent = -(full.exp() * &full).sum_dim_intlist(&[-1i64][..], false, Kind::Float);
                obj += (ent * &g_ent).sum(Kind::Float);
            }
            let want = Tensor::run_backward(&[obj], &[&h, &w], false, false);
            let ent = with_entropy.then_some(&g_ent);
            let (gh, gw) = token_logprobs_backward(&h, &w, &t, 0.8, 4, &g_lp, ent, true).unwrap();
            // Without the weight's gradient (a frozen head): the same gradient of the rows.
            let (gh_only, none) =
                token_logprobs_backward(&h, &w, &t, 0.8, 4, &g_lp, ent, false).unwrap();
            assert!(none.is_none());
            assert_eq!((&gh_only - &gh).abs().max().double_value(&[]), 0.0);
            // f32 sums in another order: equal to within 1e-5 of the largest value.
            for (got, want) in [(gh, &want[0]), (gw.unwrap(), &want[1])] {
                let scale = want.abs().max().double_value(&[]).max(1.0);
                let d = (got - want).abs().max().double_value(&[]) / scale;
                assert!(d < 1e-5, "entropy {with_entropy}: relative difference {d}");
            }
        }
    }
}
