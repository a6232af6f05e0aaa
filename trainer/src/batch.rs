//! Training batches: sequences with per-token advantages, and their packing into micro-batches.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// One rollout sequence for a training step.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

/// A rollout batch for one trainer step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainBatch {
    pub sequences: Vec<TrainSequence>,
    /// The generation length limit (Dr.GRPO's constant normalizer).
    pub max_response_len: usize,
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

/// Splits `indices` into micro-batches whose padded size (count × longest sequence) stays within
/// `token_budget`, packing sequences of similar length together (sorted by length).
pub fn pack_micro_batches(
    seqs: &[TrainSequence],
    indices: &[usize],
    token_budget: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = indices.to_vec();
    let len = |i: usize| seqs[i].prompt.len() + seqs[i].response.len();
    order.sort_by_key(|&i| std::cmp::Reverse(len(i)));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_max = 0;
    for i in order {
        let m = cur_max.max(len(i));
        if !cur.is_empty() && m * (cur.len() + 1) > token_budget {
            out.push(std::mem::take(&mut cur));
            cur_max = 0;
        }
        cur_max = cur_max.max(len(i));
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Device tensors of one micro-batch: right-padded ids, and where the response tokens are.
pub struct MicroBatch {
    /// (N, T) token ids, right-padded with 0.
    pub ids: Tensor,
    /// (N, T) positions 0..T.
    pub positions: Tensor,
    /// (M,) rows of the flattened (N*T) hidden states that predict the M response tokens.
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
}

impl MicroBatch {
    pub fn new(seqs: &[&TrainSequence], device: Device) -> Result<Self> {
        let n = seqs.len() as i64;
        let t = seqs
            .iter()
            .map(|s| s.prompt.len() + s.response.len())
            .max()
            .unwrap_or(1) as i64;
        let l = seqs.iter().map(|s| s.response.len()).max().unwrap_or(1) as i64;
        let mut ids = vec![0i64; (n * t) as usize];
        let mut mask = vec![0f32; (n * l) as usize];
        let (mut rows, mut targets, mut dest) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in seqs.iter().enumerate() {
            let base = i * t as usize;
            let p = s.prompt.len();
            ids[base..base + p].copy_from_slice(&s.prompt);
            ids[base + p..base + p + s.response.len()].copy_from_slice(&s.response);
            for (j, &tok) in s.response.iter().enumerate() {
                rows.push((base + p - 1 + j) as i64);
                targets.push(tok);
                dest.push(i as i64 * l + j as i64);
                mask[i * l as usize + j] = 1.0;
            }
        }
        let dev = |v: Tensor| v.f_to_device(device);
        Ok(MicroBatch {
            ids: dev(Tensor::from_slice(&ids).f_view([n, t])?)?,
            positions: dev(Tensor::f_arange(t, (Kind::Int64, Device::Cpu))?
                .f_unsqueeze(0)?
                .f_expand([n, t], false)?)?,
            rows: dev(Tensor::from_slice(&rows))?,
            targets: dev(Tensor::from_slice(&targets))?,
            dest: dev(Tensor::from_slice(&dest))?,
            mask: dev(Tensor::from_slice(&mask).f_view([n, l])?)?,
            n,
            l,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(p: usize, r: usize) -> TrainSequence {
        TrainSequence {
            prompt: vec![1; p],
            response: vec![2; r],
            advantages: vec![0.0; r],
            behavior_logprobs: None,
            returns: None,
            old_values: None,
            ref_logprobs: None,
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
        let mb = MicroBatch::new(&[&a, &b], Device::Cpu).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(&mb.rows).unwrap(),
            vec![1, 2, 3, 5 + 2]
        );
        assert_eq!(Vec::<i64>::try_from(&mb.targets).unwrap(), vec![7, 8, 9, 4]);
        assert_eq!(Vec::<i64>::try_from(&mb.dest).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(mb.mask.size(), vec![2, 3]);
    }
}
