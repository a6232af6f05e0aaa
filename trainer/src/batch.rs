//! Training batches: sequences with per-token advantages, and their packing into micro-batches.

use rlrun_model::{Model, Pass, Routing};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::{Result, TrainError};

/// One rollout sequence for a training step (the optional fields default to absent).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainSequence {
    pub prompt: Vec<i64>,
    pub response: Vec<i64>,
    /// Per response token.
    pub advantages: Vec<f32>,
    /// The generator's log-probs of the response tokens (behaviour policy, for TIS).
    #[serde(default)]
    pub behavior_logprobs: Option<Vec<f32>>,
    /// Critic targets per response token (PPO with a critic).
    #[serde(default)]
    pub returns: Option<Vec<f32>>,
    /// Critic values at rollout time per response token (for value clipping).
    #[serde(default)]
    pub old_values: Option<Vec<f32>>,
    /// Reference-model log-probs per response token, when the caller already has them.
    #[serde(default)]
    pub ref_logprobs: Option<Vec<f32>>,
    /// Mixture-of-experts models: the generator's experts of each token of prompt + response but
    /// the last, flattened `(token, moe_layer, k)` (routing replay); empty if none.
    #[serde(default)]
    pub routes: Vec<i16>,
    /// Multi-turn rollouts: which response tokens carry loss (the model's own, 1) and which are
    /// context (tool or environment observations, 0); empty means every token carries loss.
    /// Masked tokens are still fed to the model, but count in neither the loss nor its
    /// normaliser.
    #[serde(default)]
    pub loss_mask: Vec<u8>,
}

/// A rollout batch for one trainer step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainBatch {
    pub sequences: Vec<TrainSequence>,
    /// The generation length limit (Dr.GRPO's constant normalizer).
    pub max_response_len: usize,
}

impl TrainSequence {
    /// Response tokens that carry loss (all of them without a `loss_mask`).
    pub fn loss_tokens(&self) -> usize {
        if self.loss_mask.is_empty() {
            self.response.len()
        } else {
            self.loss_mask.iter().filter(|&&m| m != 0).count()
        }
    }
}

impl TrainBatch {
    pub fn validate(&self) -> Result<()> {
        if self.sequences.is_empty() {
            return Err(TrainError::Invalid("empty training batch".into()));
        }
        for (i, s) in self.sequences.iter().enumerate() {
            let r = s.response.len();
            let bad = |what: &str, n: usize| {
                Err(TrainError::Invalid(format!(
                    "sequence {i}: {what} has {n} entries for {r} response tokens"
                )))
            };
            if r == 0 || s.prompt.is_empty() {
                return Err(TrainError::Invalid(format!(
                    "sequence {i}: empty prompt or response"
                )));
            }
            if s.advantages.len() != r {
                return bad("advantages", s.advantages.len());
            }
            if !s.loss_mask.is_empty() && s.loss_mask.len() != r {
                return bad("loss_mask", s.loss_mask.len());
            }
            if let Some(b) = &s.behavior_logprobs {
                if b.len() != r {
                    return bad("behavior_logprobs", b.len());
                }
            }
            if let Some(b) = &s.returns {
                if b.len() != r {
                    return bad("returns", b.len());
                }
            }
        }
        Ok(())
    }
}

/// Splits `indices` into micro-batches of at most `token_budget` computed (padded) tokens, so
/// the budget bounds a micro-batch's activation memory. Sequences that share a prompt (a GRPO
/// group) stay together when they fit, because a micro-batch runs each distinct prompt once (see
/// [`MicroBatch`]): its cost is `prompts × longest prompt + sequences × longest response` when
/// prompts are shared, `sequences × longest sequence` otherwise. A sequence over the budget on
/// its own gets a micro-batch of its own.
pub fn pack_micro_batches(
    seqs: &[TrainSequence],
    indices: &[usize],
    token_budget: usize,
) -> Vec<Vec<usize>> {
    // Groups of identical prompts, in first-appearance order.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_prompt: std::collections::HashMap<&[i64], usize> = std::collections::HashMap::new();
    for &i in indices {
        let g = *by_prompt
            .entry(seqs[i].prompt.as_slice())
            .or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
        groups[g].push(i);
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut shape = Padded::default();
    for g in groups {
        let mut new_prompt = true;
        for i in g {
            let (p, r) = (seqs[i].prompt.len(), seqs[i].response.len());
            if !cur.is_empty() && shape.with(p, r, new_prompt).cost() > token_budget {
                out.push(std::mem::take(&mut cur));
                shape = Padded::default();
                new_prompt = true;
            }
            shape = shape.with(p, r, new_prompt);
            cur.push(i);
            new_prompt = false;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The padded shape of a micro-batch being packed.
#[derive(Default, Clone, Copy)]
struct Padded {
    sequences: usize,
    prompts: usize,
    longest_prompt: usize,
    longest_response: usize,
    longest_sequence: usize,
}

impl Padded {
    /// This shape with one more sequence, of a prompt not yet in it when `new_prompt`.
    fn with(self, p: usize, r: usize, new_prompt: bool) -> Padded {
        Padded {
            sequences: self.sequences + 1,
            prompts: self.prompts + new_prompt as usize,
            longest_prompt: self.longest_prompt.max(p),
            longest_response: self.longest_response.max(r),
            longest_sequence: self.longest_sequence.max(p + r),
        }
    }

    /// Tokens the forward computes, padding included (see [`MicroBatch`]'s two layouts).
    fn cost(self) -> usize {
        if self.prompts < self.sequences {
            self.prompts * self.longest_prompt + self.sequences * self.longest_response
        } else {
            self.sequences * self.longest_sequence
        }
    }
}

/// Device tensors of one micro-batch. When sequences share prompts (GRPO groups) each distinct
/// prompt runs once and the responses continue it (`Model::forward_grouped`); otherwise the
/// sequences run whole with plain causal attention (`Model::forward`).
pub struct MicroBatch {
    layout: Layout,
    /// (M,) rows of the final hidden states (flattened as the layout describes) that predict the
    /// M response tokens.
    pub rows: Tensor,
    /// (M,) the response tokens.
    pub targets: Tensor,
    /// (M,) where each response token goes in the (N*L) padded layout.
    pub dest: Tensor,
    /// (N, L) 1.0 on response tokens.
    pub mask: Tensor,
    pub n: i64,
    /// Longest response.
    pub l: i64,
    /// The generator's expert choices per input of the layout, `(.., T, moe_layers * k)` int64
    /// (-1 where none), when every sequence carries them (mixture-of-experts models).
    routes: Option<Vec<Tensor>>,
    /// Replay `routes` in the forward (routing replay); else only count where the router
    /// differs from them.
    pub routing_replay: bool,
    /// Record the load-balancing loss statistics of a mixture-of-experts model
    /// ([`Forward::aux`]).
    pub load_balancing: bool,
    /// Valid (non-padding) tokens of each input of the layout, `(.., T)` bool.
    valid: Vec<Tensor>,
}

enum Layout {
    /// Hidden rows are `cat(prompt_hidden (G*P), cont_hidden (N*R))`; a response's first token is
    /// predicted at its prompt's last position, token j at continuation position j - 1.
    Grouped {
        prompts: Tensor,
        prompt_lens: Vec<i64>,
        conts: Tensor,
        groups: Vec<i64>,
    },
    /// Hidden rows are the (N*T) positions of the right-padded prompt + response sequences.
    Full { ids: Tensor, positions: Tensor },
}

impl MicroBatch {
    pub fn new(seqs: &[&TrainSequence], device: Device) -> Result<Self> {
        let n = seqs.len() as i64;
        let mut prompt_rows: Vec<&[i64]> = Vec::new();
        let mut index: std::collections::HashMap<&[i64], i64> = std::collections::HashMap::new();
        let groups: Vec<i64> = seqs
            .iter()
            .map(|s| {
                *index.entry(s.prompt.as_slice()).or_insert_with(|| {
                    prompt_rows.push(s.prompt.as_slice());
                    prompt_rows.len() as i64 - 1
                })
            })
            .collect();
        let g = prompt_rows.len() as i64;
        let l = seqs.iter().map(|s| s.response.len()).max().unwrap_or(1) as i64;
        let dev = |v: Tensor| v.f_to_device(device);
        let mut mask = vec![0f32; (n * l) as usize];
        let (mut rows, mut targets, mut dest) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in seqs.iter().enumerate() {
            for (j, &tok) in s.response.iter().enumerate() {
                targets.push(tok);
                dest.push(i as i64 * l + j as i64);
                mask[i * l as usize + j] = match s.loss_mask.get(j) {
                    Some(0) => 0.0,
                    _ => 1.0,
                };
            }
        }
        let layout = if g < n {
            let p = prompt_rows.iter().map(|x| x.len()).max().unwrap_or(1) as i64;
            let mut prompts = vec![0i64; (g * p) as usize];
            let mut prompt_lens = Vec::with_capacity(g as usize);
            for (k, pr) in prompt_rows.iter().enumerate() {
                prompts[k * p as usize..k * p as usize + pr.len()].copy_from_slice(pr);
                prompt_lens.push(pr.len() as i64);
            }
            let mut conts = vec![0i64; (n * l) as usize];
            for (i, s) in seqs.iter().enumerate() {
                let gi = groups[i];
                conts[i * l as usize..i * l as usize + s.response.len()]
                    .copy_from_slice(&s.response);
                for j in 0..s.response.len() as i64 {
                    rows.push(if j == 0 {
                        gi * p + prompt_lens[gi as usize] - 1
                    } else {
                        g * p + i as i64 * l + j - 1
                    });
                }
            }
            Layout::Grouped {
                prompts: dev(Tensor::from_slice(&prompts).f_view([g, p])?)?,
                prompt_lens,
                conts: dev(Tensor::from_slice(&conts).f_view([n, l])?)?,
                groups,
            }
        } else {
            let t = seqs
                .iter()
                .map(|s| s.prompt.len() + s.response.len())
                .max()
                .unwrap_or(1) as i64;
            let mut ids = vec![0i64; (n * t) as usize];
            for (i, s) in seqs.iter().enumerate() {
                let base = i * t as usize;
                let p = s.prompt.len();
                ids[base..base + p].copy_from_slice(&s.prompt);
                ids[base + p..base + p + s.response.len()].copy_from_slice(&s.response);
                for j in 0..s.response.len() {
                    rows.push((base + p - 1 + j) as i64);
                }
            }
            Layout::Full {
                ids: dev(Tensor::from_slice(&ids).f_view([n, t])?)?,
                positions: dev(Tensor::f_arange(t, (tch::Kind::Int64, Device::Cpu))?
                    .f_unsqueeze(0)?
                    .f_expand([n, t], false)?)?,
            }
        };
        let routes = replay_routes(seqs, &layout)?
            .map(|r| {
                r.into_iter()
                    .map(dev)
                    .collect::<std::result::Result<Vec<_>, _>>()
            })
            .transpose()?;
        let lens = |rows: &[usize], t: i64| -> Result<Tensor> {
            let v: Vec<bool> = rows
                .iter()
                .flat_map(|&len| (0..t as usize).map(move |j| j < len))
                .collect();
            Ok(Tensor::from_slice(&v).f_view([rows.len() as i64, t])?)
        };
        let valid = match &layout {
            Layout::Grouped {
                prompts,
                prompt_lens,
                conts,
                ..
            } => {
                let p: Vec<usize> = prompt_lens.iter().map(|&x| x as usize).collect();
                let r: Vec<usize> = seqs.iter().map(|s| s.response.len()).collect();
                vec![lens(&p, prompts.size()[1])?, lens(&r, conts.size()[1])?]
            }
            Layout::Full { ids, .. } => {
                let t: Vec<usize> = seqs
                    .iter()
                    .map(|s| s.prompt.len() + s.response.len())
                    .collect();
                vec![lens(&t, ids.size()[1])?]
            }
        };
        Ok(MicroBatch {
            valid: valid
                .into_iter()
                .map(dev)
                .collect::<std::result::Result<_, _>>()?,
            load_balancing: false,
            routes,
            routing_replay: true,
            layout,
            rows: dev(Tensor::from_slice(&rows))?,
            targets: dev(Tensor::from_slice(&targets))?,
            dest: dev(Tensor::from_slice(&dest))?,
            mask: dev(Tensor::from_slice(&mask).f_view([n, l])?)?,
            n,
            l,
        })
    }

    /// Whether the micro-batch runs each shared prompt once.
    pub fn is_grouped(&self) -> bool {
        matches!(self.layout, Layout::Grouped { .. })
    }

    /// Final hidden states `(M, hidden)` of the rows that predict the response tokens.
    pub fn hidden_rows(&self, model: &Model) -> Result<Tensor> {
        Ok(self.forward(model, false)?.rows)
    }

    /// The forward pass to the hidden rows, for a backward pass to follow
    /// (`Trainer`'s `FlatModel::backward`). With `checkpoint`, the layers run without autograd and only each
    /// layer's input is kept; the backward recomputes one layer at a time (activation
    /// checkpointing: the activations of one layer are alive at once instead of all of them).
    pub fn forward(&self, model: &Model, checkpoint: bool) -> Result<Forward> {
        let (pass, ids) = match &self.layout {
            Layout::Grouped {
                prompts,
                prompt_lens,
                conts,
                groups,
            } => (
                model.pass_grouped(prompts.size(), prompt_lens, conts.size(), groups)?,
                vec![prompts.shallow_clone(), conts.shallow_clone()],
            ),
            Layout::Full { ids, positions } => {
                (model.pass_full(positions, None)?, vec![ids.shallow_clone()])
            }
        };
        let mut pass = match (&self.routes, model.config().moe()) {
            (Some(routes), Some((_, k, _))) => {
                let per_layer = routes
                    .iter()
                    .map(|r| {
                        let mut shape = r.size();
                        let w = shape.pop().unwrap_or(0);
                        shape.extend([w / k, k]);
                        Ok(Some(r.f_view(shape.as_slice())?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                pass.with_routing(if self.routing_replay {
                    Routing::replay(per_layer)
                } else {
                    Routing::compare(per_layer)
                })
            }
            _ => pass,
        };
        if self.load_balancing && model.config().moe().is_some() {
            let routing = std::mem::take(&mut pass.routing);
            pass.routing =
                routing.with_load_balancing(self.valid.iter().map(Tensor::shallow_clone).collect());
        }
        let id_refs: Vec<&Tensor> = ids.iter().collect();
        if !checkpoint {
            let hidden = model.run_layers(&pass, model.embed(&id_refs)?)?;
            let rows = self.select_rows(&hidden)?;
            return Ok(Forward {
                rows,
                route_flips: pass.routing.flips(),
                aux: aux_of(&pass, true)?,
                saved: None,
            });
        }
        let mut inputs = Vec::with_capacity(model.num_layers());
        let mut state = {
            let _g = tch::no_grad_guard();
            model.embed(&id_refs)?
        };
        for i in 0..model.num_layers() {
            let _g = tch::no_grad_guard();
            let next = model.layer(i, &pass, &state)?;
            inputs.push(std::mem::replace(&mut state, next));
        }
        let last = state
            .iter()
            .map(|t| t.f_detach()?.f_set_requires_grad(true))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let rows = self.select_rows(&model.final_norm(&last)?)?;
        Ok(Forward {
            rows,
            route_flips: pass.routing.flips(),
            aux: aux_of(&pass, false)?,
            saved: Some(Saved {
                pass,
                ids,
                inputs,
                last,
            }),
        })
    }

    /// `(M, hidden)`: the rows of the final hidden states (as the layout lays them out) that
    /// predict the response tokens.
    fn select_rows(&self, hidden: &[Tensor]) -> Result<Tensor> {
        let flat = hidden
            .iter()
            .map(|h| {
                let width = h.size()[h.dim() - 1];
                h.f_reshape([-1, width])
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let all = if flat.len() == 1 {
            flat.into_iter().next().expect("one")
        } else {
            Tensor::f_cat(&flat, 0)?
        };
        Ok(all.f_index_select(0, &self.rows)?)
    }

    /// Scatters (M,) per-token values into an (N, L) padded tensor (differentiable).
    pub fn to_padded(&self, values: &Tensor) -> Result<Tensor> {
        let z = Tensor::f_zeros([self.n * self.l], (values.kind(), values.device()))?;
        Ok(z.f_index_put(&[Some(&self.dest)], values, false)?
            .f_view([self.n, self.l])?)
    }

    /// (N, L) tensor of per-token values, `row(k)` giving row k's values (None if any is missing).
    pub fn padded<'a>(&self, row: impl Fn(usize) -> Option<&'a [f32]>) -> Result<Option<Tensor>> {
        let mut v = vec![0f32; (self.n * self.l) as usize];
        for k in 0..self.n as usize {
            let Some(f) = row(k) else { return Ok(None) };
            v[k * self.l as usize..k * self.l as usize + f.len()].copy_from_slice(f);
        }
        Ok(Some(
            Tensor::from_slice(&v)
                .f_view([self.n, self.l])?
                .f_to_device(self.mask.device())?,
        ))
    }
}

/// A micro-batch's forward pass to its hidden rows ([`MicroBatch::forward`]).
pub struct Forward {
    /// `(M, hidden)` final hidden states predicting the response tokens, in the autograd graph.
    pub rows: Tensor,
    /// Routing replay: (tokens x MoE layers the router alone would have routed to other
    /// experts than the generator, tokens x MoE layers replayed).
    pub route_flips: (i64, i64),
    /// With [`MicroBatch::load_balancing`] on a mixture-of-experts model: the weights `g` of the
    /// load-balancing loss (`Σ_layers g · psum`, see `rlrun_model::Routing::aux_weights`), its
    /// value, and, without activation checkpointing, the loss in the autograd graph (with it,
    /// each layer's part is added as the backward recomputes the layer).
    pub aux: Option<(Tensor, f64, Option<Tensor>)>,
    /// With activation checkpointing: what the backward recomputes the layers from.
    pub saved: Option<Saved>,
}

/// The load-balancing loss of a pass that recorded its statistics: (weights, value, the loss in
/// the graph if `in_graph`).
fn aux_of(pass: &Pass, in_graph: bool) -> Result<Option<(Tensor, f64, Option<Tensor>)>> {
    let Some(g) = pass.routing.aux_weights()? else {
        return Ok(None);
    };
    let Some(loss) = pass.routing.aux_term(None, &g)? else {
        return Ok(None);
    };
    let value = loss.f_double_value(&[])?;
    Ok(Some((g, value, in_graph.then_some(loss))))
}

/// The sequences' routes laid out like `layout`'s inputs: `[(G, P, W), (N, L, W)]` for shared
/// prompts (a prompt's routes from its first sequence), `[(N, T, W)]` otherwise, -1 on padding
/// and on each sequence's last token (never fed to the generator). None unless every sequence
/// has routes of one width `W`.
fn replay_routes(seqs: &[&TrainSequence], layout: &Layout) -> Result<Option<Vec<Tensor>>> {
    let width = |s: &TrainSequence| {
        let fed = s.prompt.len() + s.response.len() - 1;
        (!s.routes.is_empty() && s.routes.len().is_multiple_of(fed)).then(|| s.routes.len() / fed)
    };
    let Some(w) = seqs.first().and_then(|s| width(s)) else {
        return Ok(None);
    };
    if seqs.iter().any(|s| width(s) != Some(w)) {
        return Ok(None);
    }
    // Rows of `t` positions; row i starts with `src[i]` (token-major routes).
    let fill = |rows: usize, t: usize, src: &[&[i16]]| -> Result<Tensor> {
        let mut v = vec![-1i64; rows * t * w];
        for (i, r) in src.iter().enumerate() {
            for (j, &x) in r.iter().enumerate() {
                v[i * t * w + j] = i64::from(x);
            }
        }
        Ok(Tensor::from_slice(&v).f_view([rows as i64, t as i64, w as i64])?)
    };
    Ok(Some(match layout {
        Layout::Grouped {
            prompts,
            prompt_lens,
            conts,
            groups,
        } => {
            let (g, p) = (prompts.size()[0] as usize, prompts.size()[1] as usize);
            let l = conts.size()[1] as usize;
            let mut firsts: Vec<Option<&TrainSequence>> = vec![None; g];
            for (s, &gi) in seqs.iter().zip(groups) {
                firsts[gi as usize].get_or_insert(s);
            }
            let prompt_src: Vec<&[i16]> = firsts
                .iter()
                .zip(prompt_lens)
                .map(|(s, &len)| s.map_or(&[][..], |s| &s.routes[..len as usize * w]))
                .collect();
            let cont_src: Vec<&[i16]> = seqs
                .iter()
                .map(|s| &s.routes[s.prompt.len() * w..])
                .collect();
            vec![fill(g, p, &prompt_src)?, fill(seqs.len(), l, &cont_src)?]
        }
        Layout::Full { ids, .. } => {
            let t = ids.size()[1] as usize;
            let src: Vec<&[i16]> = seqs.iter().map(|s| &s.routes[..]).collect();
            vec![fill(seqs.len(), t, &src)?]
        }
    }))
}

/// What activation checkpointing keeps of a forward pass.
pub struct Saved {
    pub pass: Pass,
    /// The token ids the pass embedded.
    pub ids: Vec<Tensor>,
    /// The state entering each layer (no autograd).
    pub inputs: Vec<Vec<Tensor>>,
    /// The final state as leaves: the graph of `rows` starts there.
    pub last: Vec<Tensor>,
}

/// The gradients accumulated in leaves (zeros where none arrived).
pub fn leaf_grads(leaves: &[Tensor]) -> Result<Vec<Tensor>> {
    leaves
        .iter()
        .map(|t| {
            let g = t.f_grad()?;
            Ok(if g.defined() { g } else { t.f_zeros_like()? })
        })
        .collect()
}

/// `sum_k sum(y_k * g_k)` in f32: back-propagating it sends `g_k` into `y_k`'s graph.
pub fn weighted_sum(ys: &[Tensor], grads: &[Tensor]) -> Result<Tensor> {
    let mut total = Tensor::f_zeros([], (tch::Kind::Float, ys[0].device()))?;
    for (y, g) in ys.iter().zip(grads) {
        total = total.f_add(&y.f_mul(g)?.f_sum(tch::Kind::Float)?)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(p: usize, r: usize) -> TrainSequence {
        TrainSequence {
            prompt: vec![1; p],
            response: vec![2; r],
            advantages: vec![0.0; r],
            ..Default::default()
        }
    }

    #[test]
    fn packing_respects_budget_and_keeps_every_sequence() {
        let seqs: Vec<TrainSequence> = [(3, 5), (10, 20), (2, 2), (8, 1), (4, 4)]
            .iter()
            .map(|&(p, r)| seq(p, r))
            .collect();
        let idx: Vec<usize> = (0..5).collect();
        let mbs = pack_micro_batches(&seqs, &idx, 30);
        let mut all: Vec<usize> = mbs.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, idx);
        for mb in &mbs {
            let m = mb
                .iter()
                .map(|&i| seqs[i].prompt.len() + seqs[i].response.len())
                .max()
                .unwrap();
            assert!(mb.len() == 1 || m * mb.len() <= 30, "{mbs:?}");
        }
        assert_eq!(pack_micro_batches(&seqs, &idx, 10_000).len(), 1);
    }

    /// The budget bounds the tokens a micro-batch's forward computes, padding included, in both
    /// layouts (measured on the tensors `MicroBatch` builds).
    #[test]
    fn budget_bounds_the_padded_tokens_of_each_micro_batch() {
        let mut seqs = Vec::new();
        for g in 0..6usize {
            for k in 0..4usize {
                seqs.push(TrainSequence {
                    prompt: vec![g as i64 + 1; 5 + 7 * g],
                    ..seq(0, 1 + (g * 13 + k * 29) % 40)
                });
            }
        }
        seqs.push(seq(90, 3)); // over the budget alone
        let idx: Vec<usize> = (0..seqs.len()).collect();
        for budget in [60, 97, 150, 400] {
            let mbs = pack_micro_batches(&seqs, &idx, budget);
            let mut all: Vec<usize> = mbs.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, idx);
            for mb in &mbs {
                let refs: Vec<&TrainSequence> = mb.iter().map(|&i| &seqs[i]).collect();
                let built = MicroBatch::new(&refs, Device::Cpu).unwrap();
                let computed = match &built.layout {
                    Layout::Grouped { prompts, conts, .. } => prompts.numel() + conts.numel(),
                    Layout::Full { ids, .. } => ids.numel(),
                };
                assert!(
                    mb.len() == 1 || computed <= budget,
                    "budget {budget}: {computed} tokens in {mb:?}"
                );
            }
        }
    }

    #[test]
    fn micro_batch_indexes_response_tokens() {
        let a = TrainSequence {
            prompt: vec![5, 6],
            response: vec![7, 8, 9],
            ..seq(0, 0)
        };
        let b = TrainSequence {
            prompt: vec![1, 2, 3],
            response: vec![4],
            ..seq(0, 0)
        };
        let c = TrainSequence {
            response: vec![6],
            ..a.clone()
        };
        let mb = MicroBatch::new(&[&a, &b, &c], Device::Cpu).unwrap();
        // Two distinct prompts (a and c share one) padded to 3: rows 0..6 are prompt positions;
        // continuations start at row 6 with 3 positions each.
        assert!(mb.is_grouped());
        assert_eq!(
            Vec::<i64>::try_from(&mb.rows).unwrap(),
            vec![1, 6, 7, 3 + 2, 1]
        );
        assert_eq!(
            Vec::<i64>::try_from(&mb.targets).unwrap(),
            vec![7, 8, 9, 4, 6]
        );
        assert_eq!(Vec::<i64>::try_from(&mb.dest).unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(mb.mask.size(), vec![3, 3]);
        // Without shared prompts: whole sequences (prompt + response) of length 5, right-padded.
        let mb = MicroBatch::new(&[&a, &b], Device::Cpu).unwrap();
        assert!(!mb.is_grouped());
        assert_eq!(
            Vec::<i64>::try_from(&mb.rows).unwrap(),
            vec![1, 2, 3, 5 + 2]
        );
        assert_eq!(Vec::<i64>::try_from(&mb.targets).unwrap(), vec![7, 8, 9, 4]);
    }
}
