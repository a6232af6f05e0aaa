//! The Trainer: owns the policy (and optionally a frozen reference model and a critic) as flat
//! parameter buffers and runs PPO/GRPO-family updates on rollout batches.
//!
//! A step: (1) log-probs of the policy before the update ("old", only when a batch is reused for
//! several optimizer steps; otherwise the detached current log-probs are the same numbers) and of
//! the reference model (when the loss has a KL term); (2) for each PPO epoch and mini-batch, the
//! loss of each micro-batch (packed by a token budget, normalized by the mini-batch's global counts
//! so the split does not matter) is back-propagated into one flat gradient buffer; (3) one AdamW
//! step over the flat buffers. f32 master weights and optimizer state; the forward runs in the
//! compute dtype (bf16 on GPU), whose buffer is refreshed from the master after each step.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rlrun_model::logprobs::{token_logprobs, token_logprobs_backward};
use rlrun_model::{Config, Kind, LoraConfig, Model, ParamLayout, Weights};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::batch::{
    leaf_grads, pack_micro_batches, weighted_sum, Forward, MicroBatch, TrainBatch, TrainSequence,
};
use crate::error::{Result, TrainError};
use crate::loss::{LossInput, Normalizer, PolicyLoss, PolicyLossConfig};
use crate::optim::{AdamW, OptimConfig, ParamGroup, StepInfo};

/// Trainer settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    pub optim: OptimConfig,
    pub loss: PolicyLossConfig,
    /// Passes over each rollout batch.
    pub ppo_epochs: usize,
    /// Optimizer steps per epoch (the batch is split into this many mini-batches).
    pub mini_batches: usize,
    /// Padded tokens per micro-batch (gradient accumulation unit).
    pub micro_batch_tokens: usize,
    /// Rows of hidden states projected to the vocabulary at once when computing log-probs.
    pub logprob_chunk: i64,
    /// Sampling temperature of the rollouts: log-probs are of `softmax(logits / temperature)`.
    pub temperature: f64,
    /// Keep only each layer's input in the forward and recompute the layer in the backward:
    /// activations of one layer alive at a time instead of all of them, for one more forward of
    /// compute (measured on 2 CPU cores: +23% forward/backward time; ~6 GB less on a 4k-token
    /// micro-batch of SmolLM2-135M).
    pub activation_checkpointing: bool,
    /// Compute each response token's entropy for the `actor/entropy` metric (one more reduction
    /// over each logits chunk). The entropy bonus (`entropy_coef != 0`) computes it regardless.
    pub entropy_metric: bool,
    /// Mixture-of-experts models: replay the generator's expert choices in every forward (the
    /// routes each rollout carries), so a router that would flip on tiny numeric differences
    /// cannot change the log-probs. Off: the router chooses; `actor/routing_flip_frac` is logged
    /// either way.
    pub routing_replay: bool,
    /// Mixture-of-experts models: coefficient of the load-balancing loss (transformers'
    /// `load_balancing_loss_func`) added to the policy loss; 0 (the default) leaves it out.
    /// Logged as `actor/router_aux_loss` when on.
    pub router_aux_loss_coef: f64,
    pub critic: Option<CriticConfig>,
    /// LoRA: train adapters on the frozen base instead of the full weights (`[model.lora]`).
    pub lora: Option<LoraConfig>,
    /// Seed of the adapters' initialisation.
    pub seed: u64,
    /// This trainer is one rank of a data-parallel group (`None`: alone).
    pub data_parallel: Option<crate::dp::DataParallel>,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            optim: OptimConfig::default(),
            loss: PolicyLossConfig::default(),
            ppo_epochs: 1,
            mini_batches: 1,
            micro_batch_tokens: 4096,
            logprob_chunk: 1024,
            temperature: 1.0,
            activation_checkpointing: true,
            entropy_metric: true,
            routing_replay: true,
            router_aux_loss_coef: 0.0,
            critic: None,
            lora: None,
            seed: 0,
            data_parallel: None,
        }
    }
}

/// PPO critic settings: a value head on a copy of the policy's transformer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriticConfig {
    pub optim: OptimConfig,
    /// Value clipping range around the rollout-time values (PPO2); 0 disables clipping.
    pub cliprange_value: f64,
}

impl Default for CriticConfig {
    fn default() -> Self {
        CriticConfig {
            optim: OptimConfig {
                lr: 1e-5,
                ..OptimConfig::default()
            },
            cliprange_value: 0.5,
        }
    }
}

/// A model's parameters for training: f32 master + the compute buffer the forward reads.
/// With LoRA these are the adapters', and the model is the frozen `base` with them applied.
struct FlatModel {
    config: Arc<Config>,
    layout: Arc<ParamLayout>,
    group: ParamGroup,
    /// Leaf requiring grad; the master itself when the compute dtype is f32.
    compute: Tensor,
    separate: bool,
    /// With a 16-bit compute dtype: the f32 gradient accumulated over the micro-batches (as
    /// Megatron's `main_grad` and FSDP's f32 reduce dtype). Each micro-batch's backward writes the
    /// compute buffer's gradient, which is added here in f32 and zeroed, so the sum over many
    /// micro-batches is not rounded to bf16 at each addition.
    grad_acc: Option<Tensor>,
    base: Option<FrozenBase>,
}

/// The frozen base weights of a LoRA model (compute dtype, no gradient, shared by the policy,
/// the critic and the reference) and the adapters' scale.
struct FrozenBase {
    weights: Weights,
    scale: f64,
}

impl FrozenBase {
    fn model(&self, config: &Arc<Config>) -> Result<Model> {
        Ok(rlrun_model::build_model(config.clone(), &self.weights)?)
    }
}

impl FlatModel {
    fn new(config: Arc<Config>, weights: &Weights, compute_kind: Kind) -> Result<Self> {
        let _g = tch::no_grad_guard();
        let master = weights.flat.f_to_kind(Kind::Float)?.f_detach_copy()?;
        let decay = weights.layout.decay_ranges();
        let separate = compute_kind != Kind::Float;
        let compute = if separate {
            master.f_to_kind(compute_kind)?.f_set_requires_grad(true)?
        } else {
            master.f_set_requires_grad(true)?
        };
        let grad_acc = if separate {
            Some(master.f_zeros_like()?)
        } else {
            None
        };
        Ok(FlatModel {
            config,
            layout: weights.layout.clone(),
            group: ParamGroup::new(master.shallow_clone(), Some(decay))?,
            compute,
            separate,
            grad_acc,
            base: None,
        })
    }

    /// LoRA: `adapters` trained on the frozen `base`.
    fn lora(
        config: Arc<Config>,
        base: FrozenBase,
        adapters: &Weights,
        compute_kind: Kind,
    ) -> Result<Self> {
        let mut m = FlatModel::new(config, adapters, compute_kind)?;
        m.base = Some(base);
        Ok(m)
    }

    /// The model whose trainable chunks are `chunks` (views of the compute buffer).
    fn build(&self, chunks: &[Tensor]) -> Result<Model> {
        Ok(match &self.base {
            None => Model::new(self.config.clone(), &self.layout, chunks)?,
            Some(b) => b
                .model(&self.config)?
                .with_lora(&self.layout, chunks, b.scale)?,
        })
    }

    /// The model over autograd views of the compute buffer.
    fn model(&self) -> Result<Model> {
        self.build(&self.layout.chunk_views(&self.compute)?)
    }

    /// The model over plain views (no autograd), for scoring.
    fn model_nograd(&self) -> Result<Model> {
        self.build(&self.layout.chunk_views(&self.compute.f_detach()?)?)
    }

    /// The accumulated gradient as f32: the f32 accumulator with a 16-bit compute dtype, else
    /// the compute buffer's own gradient. Either is zeroed before the next accumulation, so no
    /// copy is made.
    fn take_grad(&self) -> Result<Tensor> {
        if let Some(acc) = &self.grad_acc {
            return Ok(acc.shallow_clone());
        }
        let g = self.compute.f_grad()?;
        if !g.defined() {
            return Ok(self.group.params.f_zeros_like()?);
        }
        Ok(g.f_detach()?)
    }

    /// With a 16-bit compute dtype, moves the compute buffer's gradient (one micro-batch) into
    /// the f32 accumulator.
    fn flush_grad(&self) -> Result<()> {
        let Some(acc) = &self.grad_acc else {
            return Ok(());
        };
        let mut g = self.compute.f_grad()?;
        if g.defined() {
            let _guard = tch::no_grad_guard();
            let _ = acc.shallow_clone().f_add_(&g)?;
            let _ = g.f_zero_()?;
        }
        Ok(())
    }

    fn zero_grad(&mut self) -> Result<()> {
        let mut g = self.compute.f_grad()?;
        if g.defined() {
            let _ = g.f_zero_()?;
        }
        if let Some(acc) = &self.grad_acc {
            let _ = acc.shallow_clone().f_zero_()?;
        }
        Ok(())
    }

    /// Refreshes the compute buffer from the master after an optimizer step.
    fn sync_compute(&mut self) -> Result<()> {
        if self.separate {
            let _g = tch::no_grad_guard();
            self.compute.f_copy_(&self.group.params)?;
        }
        Ok(())
    }

    fn weights(&self) -> Weights {
        Weights {
            layout: self.layout.clone(),
            flat: self.group.params.shallow_clone(),
        }
    }

    /// Back-propagates `objective` (computed from `fwd.rows` and the model's views) into the
    /// accumulated gradient (through the compute buffer's). With activation checkpointing the graph of `rows` ends at the
    /// last layer's output; the layers are then recomputed last to first, one at a time, each
    /// on a model whose only leaves are that layer's parameters (so a backward touches that
    /// layer's slice of the gradient, not the whole buffer), and the gradient of its output goes
    /// back into its parameters and its input. The embedding comes last.
    /// `aux`: the load-balancing weights `g` (scaled by the coefficient) whose layer terms
    /// `g · psum` are added as the recomputed layers go back (activation checkpointing; without
    /// it the loss is already in `objective`).
    fn backward(
        &self,
        model: &Model,
        fwd: Forward,
        objective: &Tensor,
        aux: Option<&Tensor>,
    ) -> Result<()> {
        self.backward_into_compute(model, fwd, objective, aux)?;
        self.flush_grad()
    }

    fn backward_into_compute(
        &self,
        model: &Model,
        fwd: Forward,
        objective: &Tensor,
        aux: Option<&Tensor>,
    ) -> Result<()> {
        objective.f_backward()?;
        let Some(mut saved) = fwd.saved else {
            return Ok(());
        };
        let mut grads = leaf_grads(&saved.last)?;
        for i in (0..model.num_layers()).rev() {
            let prefix = format!("model.layers.{i}.");
            let (layer_model, leaves) = self.model_with_leaves(|n| n.starts_with(&prefix))?;
            let x = saved
                .inputs
                .pop()
                .ok_or_else(|| TrainError::Invalid("checkpointed layer inputs missing".into()))?
                .into_iter()
                .map(|t| t.f_set_requires_grad(true))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let y = layer_model.layer(i, &saved.pass, &x)?;
            let mut obj = weighted_sum(&y, &grads)?;
            if let (Some(g), Some(m)) = (aux, model.moe_index(i)) {
                if let Some(t) = saved.pass.routing.aux_term(Some(m), g)? {
                    obj = obj.f_add(&t)?;
                }
            }
            obj.f_backward()?;
            self.add_leaf_grads(&leaves)?;
            grads = leaf_grads(&x)?;
        }
        let (embed_model, leaves) = self.model_with_leaves(|n| n == "model.embed_tokens.weight")?;
        if leaves.is_empty() {
            return Ok(()); // a frozen embedding (LoRA)
        }
        let ids: Vec<&Tensor> = saved.ids.iter().collect();
        weighted_sum(&embed_model.embed(&ids)?, &grads)?.f_backward()?;
        self.add_leaf_grads(&leaves)
    }

    /// A model over the compute buffer without autograd except for the chunks `leaf` selects,
    /// which are fresh leaves (returned with their offsets in the buffer).
    fn model_with_leaves(
        &self,
        leaf: impl Fn(&str) -> bool,
    ) -> Result<(Model, Vec<(i64, Tensor)>)> {
        let flat = self.compute.f_detach()?;
        let mut chunks = self.layout.chunk_views(&flat)?;
        let mut leaves = Vec::new();
        for (c, t) in self.layout.chunks().iter().zip(chunks.iter_mut()) {
            if leaf(&c.name) {
                *t = t.f_detach()?.f_set_requires_grad(true)?;
                leaves.push((c.offset, t.shallow_clone()));
            }
        }
        Ok((self.build(&chunks)?, leaves))
    }

    /// Adds the gradients of leaves from [`FlatModel::model_with_leaves`] into the compute
    /// buffer's gradient, at their offsets.
    fn add_leaf_grads(&self, leaves: &[(i64, Tensor)]) -> Result<()> {
        let mut grad = self.compute.f_grad()?;
        if !grad.defined() {
            // No backward has reached the buffer yet: give it a zero gradient to add into.
            self.compute
                .f_narrow(0, 0, 1)?
                .f_sum(Kind::Float)?
                .f_mul_scalar(0.0)?
                .f_backward()?;
            grad = self.compute.f_grad()?;
        }
        let _g = tch::no_grad_guard();
        for (offset, t) in leaves {
            let g = t.f_grad()?;
            if g.defined() {
                let _ = grad
                    .f_narrow(0, *offset, g.numel() as i64)?
                    .f_add_(&g.f_reshape([-1])?)?;
            }
        }
        Ok(())
    }
}

struct Critic {
    body: FlatModel,
    /// Value head `[w (hidden), b (1)]`, f32 leaf.
    head: ParamGroup,
    opt: AdamW,
    cfg: CriticConfig,
}

/// Metrics of one trainer step (means over masked tokens unless named otherwise).
pub type StepMetrics = BTreeMap<String, f64>;

#[derive(Default)]
struct MetricAcc {
    sums: BTreeMap<String, (f64, f64, Option<f64>)>,
}

impl MetricAcc {
    fn add(&mut self, name: &str, sum: f64, count: f64, max: Option<f64>) {
        let e = self
            .sums
            .entry(name.to_string())
            .or_insert((0.0, 0.0, None));
        e.0 += sum;
        e.1 += count;
        if let Some(m) = max {
            e.2 = Some(e.2.map_or(m, |x: f64| x.max(m)));
        }
    }
    /// Every rank's accumulations merged (sums and counts added, maxima taken, in rank order),
    /// the ranks' `tokens` summed, and the fewest tokens a rank processed.
    fn gathered(
        self,
        c: &mut crate::dp::Collective,
        tokens: usize,
    ) -> Result<(MetricAcc, usize, usize)> {
        let mine = serde_json::to_vec(&(tokens, &self.sums))
            .map_err(|e| TrainError::Invalid(format!("data parallel metrics: {e}")))?;
        let mut merged = MetricAcc::default();
        let (mut total, mut least) = (0, usize::MAX);
        for bytes in c.all_gather(&mine)? {
            let (t, sums): (usize, BTreeMap<String, (f64, f64, Option<f64>)>) =
                serde_json::from_slice(&bytes)
                    .map_err(|e| TrainError::Invalid(format!("data parallel metrics: {e}")))?;
            total += t;
            least = least.min(t);
            for (k, (s, n, m)) in sums {
                merged.add(&k, s, n, m);
            }
        }
        Ok((merged, total, least))
    }

    fn finish(self, out: &mut StepMetrics) {
        for (k, (s, c, m)) in self.sums {
            if c > 0.0 {
                out.insert(k.clone(), s / c);
            }
            if let Some(m) = m {
                out.insert(format!("{k}_max"), m);
            }
        }
    }
}

/// The trainer state. See the module docs.
pub struct Trainer {
    cfg: TrainerConfig,
    policy: FlatModel,
    reference: Option<Weights>,
    critic: Option<Critic>,
    opt: AdamW,
    loss: Box<dyn PolicyLoss>,
    version: u64,
    device: Device,
    lora: Option<LoraConfig>,
    /// Data parallel: the group, joined at the first step.
    collective: Option<crate::dp::Collective>,
}

/// Old and reference log-probs of a step's sequences, when computed by the trainer.
struct Refs<'a> {
    old: Option<&'a SeqValues>,
    reference: Option<&'a SeqValues>,
}

/// Per-sequence log-probs (host vectors, one per sequence).
pub type SeqValues = Vec<Vec<f32>>;

impl Trainer {
    /// A trainer for the policy `weights` (any dtype; copied to an f32 master on their device),
    /// computing in `compute_kind`. `reference`: frozen weights for KL (None if unused).
    pub fn new(
        config: Arc<Config>,
        weights: &Weights,
        compute_kind: Kind,
        reference: Option<Weights>,
        cfg: TrainerConfig,
    ) -> Result<Self> {
        if cfg.ppo_epochs == 0 || cfg.mini_batches == 0 || cfg.micro_batch_tokens == 0 {
            return Err(TrainError::Invalid(
                "ppo_epochs, mini_batches and micro_batch_tokens must be at least 1".into(),
            ));
        }
        if cfg.temperature <= 0.0 {
            return Err(TrainError::Invalid(
                "trainer temperature must be > 0".into(),
            ));
        }
        // LoRA: the settings (with those of an initial PEFT adapter) and the frozen base, in the
        // compute dtype (the same tensor when `weights` already are).
        let lora = match &cfg.lora {
            Some(l) => {
                l.validate()
                    .map_err(|m| TrainError::Invalid(format!("lora: {m}")))?;
                Some(l.resolved()?)
            }
            None => None,
        };
        let base_flat = match &lora {
            Some(_) => Some(weights.flat.f_detach()?.f_to_kind(compute_kind)?),
            None => None,
        };
        let base = |seed: u64| -> Result<Option<(FrozenBase, Weights)>> {
            let (Some(l), Some(flat)) = (&lora, &base_flat) else {
                return Ok(None);
            };
            let flat = flat.shallow_clone();
            let adapters = rlrun_model::lora::init_adapters(&config, l, seed, weights.device())?;
            Ok(Some((
                FrozenBase {
                    weights: Weights {
                        layout: weights.layout.clone(),
                        flat,
                    },
                    scale: l.scale(),
                },
                adapters,
            )))
        };
        let trainable = |seed: u64| -> Result<FlatModel> {
            match base(seed)? {
                Some((b, adapters)) => FlatModel::lora(config.clone(), b, &adapters, compute_kind),
                None => FlatModel::new(config.clone(), weights, compute_kind),
            }
        };
        let policy = trainable(cfg.seed)?;
        let critic = match &cfg.critic {
            None => None,
            Some(c) => {
                let body = trainable(cfg.seed.wrapping_add(1))?;
                let head =
                    Tensor::f_zeros([config.hidden_size + 1], (Kind::Float, weights.device()))?
                        .f_set_requires_grad(true)?;
                Some(Critic {
                    body,
                    head: ParamGroup::new(head, None)?,
                    opt: AdamW::new(c.optim.clone()),
                    cfg: c.clone(),
                })
            }
        };
        // With LoRA the reference is the base with the adapters off: no copy.
        let reference = match reference {
            Some(r) if lora.is_none() => Some(r.to(compute_kind, weights.device())?),
            _ => None,
        };
        Ok(Trainer {
            loss: cfg.loss.build(),
            opt: AdamW::new(cfg.optim.clone()),
            device: weights.device(),
            cfg,
            policy,
            reference,
            critic,
            version: 0,
            lora,
            collective: None,
        })
    }

    /// The LoRA settings (resolved against an initial adapter) when training adapters.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn has_critic(&self) -> bool {
        self.critic.is_some()
    }
    /// Optimizer steps taken.
    pub fn optimizer_steps(&self) -> u64 {
        self.opt.step
    }

    /// The f32 master weights (views; HF names via `named_tensors`).
    pub fn weights(&self) -> Weights {
        self.policy.weights()
    }

    /// The flat buffer generators should load (compute dtype), without autograd.
    pub fn sync_buffer(&self) -> Result<Tensor> {
        Ok(self.policy.compute.f_detach()?)
    }

    /// Padded `(N, L)` log-probs of a micro-batch's response tokens (scoring: no autograd).
    fn log_probs_of(&self, model: &Model, mb: &MicroBatch) -> Result<Tensor> {
        let rows = mb.hidden_rows(model)?; // (M, H)
        let (lp, _) = token_logprobs(
            &rows,
            model.lm_head_weight(),
            &mb.targets,
            self.cfg.temperature,
            self.cfg.logprob_chunk,
            false,
        )?;
        mb.to_padded(&lp)
    }

    /// A micro-batch of `seqs` on the trainer's device, replaying their routes if configured.
    fn micro_batch(&self, seqs: &[&TrainSequence]) -> Result<MicroBatch> {
        let mut mb = MicroBatch::new(seqs, self.device)?;
        mb.routing_replay = self.cfg.routing_replay;
        mb.load_balancing = self.cfg.router_aux_loss_coef != 0.0;
        Ok(mb)
    }

    fn score(&self, seqs: &[&TrainSequence], model: &Model) -> Result<SeqValues> {
        let _g = tch::no_grad_guard();
        let idx: Vec<usize> = (0..seqs.len()).collect();
        let owned: Vec<TrainSequence> = seqs.iter().map(|s| (*s).clone()).collect();
        let mut out = vec![Vec::new(); seqs.len()];
        for mb_idx in pack_micro_batches(&owned, &idx, self.cfg.micro_batch_tokens) {
            let mb_seqs: Vec<&TrainSequence> = mb_idx.iter().map(|&i| seqs[i]).collect();
            let mb = self.micro_batch(&mb_seqs)?;
            let lp = self.log_probs_of(model, &mb)?;
            let lp = lp.f_to_device(Device::Cpu)?;
            for (k, &i) in mb_idx.iter().enumerate() {
                let row = Vec::<f32>::try_from(lp.f_get(k as i64)?)?;
                out[i] = row[..seqs[i].response.len()].to_vec();
            }
        }
        Ok(out)
    }

    /// Log-probs of the response tokens under the current policy.
    pub fn compute_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        let refs: Vec<&TrainSequence> = seqs.iter().collect();
        self.score(&refs, &self.policy.model_nograd()?)
    }

    /// Log-probs of the response tokens under the reference model.
    pub fn compute_ref_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        let model = match (&self.policy.base, &self.reference) {
            (Some(base), _) => base.model(&self.policy.config)?,
            (None, Some(r)) => rlrun_model::build_model(self.policy.config.clone(), r)?,
            (None, None) => {
                return Err(TrainError::Invalid(
                    "no reference model (enable KL in the recipe)".into(),
                ))
            }
        };
        let refs: Vec<&TrainSequence> = seqs.iter().collect();
        self.score(&refs, &model)
    }

    /// Critic values at each response token's state (the position before it).
    pub fn compute_values(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        let c = self
            .critic
            .as_ref()
            .ok_or_else(|| TrainError::Invalid("no critic configured".into()))?;
        let _g = tch::no_grad_guard();
        let model = c.body.model_nograd()?;
        let idx: Vec<usize> = (0..seqs.len()).collect();
        let mut out = vec![Vec::new(); seqs.len()];
        for mb_idx in pack_micro_batches(seqs, &idx, self.cfg.micro_batch_tokens) {
            let mb_seqs: Vec<&TrainSequence> = mb_idx.iter().map(|&i| &seqs[i]).collect();
            let mb = self.micro_batch(&mb_seqs)?;
            let v =
                critic_values(&model, &c.head.params.f_detach()?, &mb)?.f_to_device(Device::Cpu)?;
            for (k, &i) in mb_idx.iter().enumerate() {
                let row = Vec::<f32>::try_from(v.f_get(k as i64)?)?;
                out[i] = row[..seqs[i].response.len()].to_vec();
            }
        }
        Ok(out)
    }

    /// One training step on a rollout batch; returns the step's metrics.
    pub fn train_step(&mut self, batch: &TrainBatch) -> Result<StepMetrics> {
        batch.validate()?;
        let t_start = Instant::now();
        let seqs = &batch.sequences;
        let n = seqs.len();
        let uses_ref = self.cfg.loss.kl.is_some();
        let reuse = self.cfg.ppo_epochs * self.cfg.mini_batches > 1;
        let mut metrics = StepMetrics::new();
        if let (Some(dp), None) = (&self.cfg.data_parallel, &self.collective) {
            self.collective = Some(crate::dp::Collective::join(dp, self.device)?);
        }

        // Old (pre-update) and reference log-probs, as per-sequence host vectors.
        let t0 = Instant::now();
        let old: Option<SeqValues> = if reuse {
            Some(self.compute_logprobs(seqs)?)
        } else {
            None
        };
        metrics.insert("time/old_logprobs_s".into(), t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let reference: Option<SeqValues> = if uses_ref {
            if seqs.iter().all(|s| s.ref_logprobs.is_some()) {
                None // provided by the caller
            } else {
                Some(self.compute_ref_logprobs(seqs)?)
            }
        } else {
            None
        };
        metrics.insert("time/ref_logprobs_s".into(), t0.elapsed().as_secs_f64());
        let mut acc = MetricAcc::default();
        let mut infos: Vec<StepInfo> = Vec::new();
        let mut critic_infos: Vec<StepInfo> = Vec::new();
        let t_train = Instant::now();
        let mut tokens_processed = 0usize;
        let (mut fwd_bwd_s, mut optim_s) = (0.0, 0.0);
        let order: Vec<usize> = (0..n).collect();
        let per_mb = n.div_ceil(self.cfg.mini_batches);
        for _epoch in 0..self.cfg.ppo_epochs {
            for mb_indices in order.chunks(per_mb) {
                let ctx = Refs {
                    old: old.as_ref(),
                    reference: reference.as_ref(),
                };
                let t = Instant::now();
                tokens_processed += self.accumulate(batch, mb_indices, &ctx, &mut acc)?;
                fwd_bwd_s += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let mut grad = self.policy.take_grad()?;
                if let Some(c) = self.collective.as_mut() {
                    c.all_reduce_sum(&mut grad)?;
                }
                infos.push(self.apply_gradients(grad)?);
                optim_s += t.elapsed().as_secs_f64();
                if let Some(c) = self.critic.as_mut() {
                    let head_grad = c.head.params.f_grad()?;
                    let head_grad = if head_grad.defined() {
                        head_grad.f_detach_copy()?
                    } else {
                        c.head.params.f_zeros_like()?
                    };
                    let mut grads = vec![c.body.take_grad()?, head_grad];
                    if let Some(col) = self.collective.as_mut() {
                        for g in grads.iter_mut() {
                            col.all_reduce_sum(g)?;
                        }
                    }
                    critic_infos.push(
                        c.opt
                            .step(&mut [&mut c.body.group, &mut c.head], &mut grads)?,
                    );
                    c.body.sync_compute()?;
                }
            }
        }
        self.policy.zero_grad()?;
        self.version += 1;
        let train_s = t_train.elapsed().as_secs_f64();
        if let Some(c) = self.collective.as_mut() {
            // Metrics over the whole batch: every rank's sums, counts and maxima, and tokens.
            let least;
            (acc, tokens_processed, least) = acc.gathered(c, tokens_processed)?;
            metrics.insert("dp/world_size".into(), c.world() as f64);
            metrics.insert("dp/min_rank_tokens".into(), least as f64);
        }
        acc.finish(&mut metrics);
        let last = infos.last().copied().unwrap_or_default();
        metrics.insert(
            "actor/grad_norm".into(),
            infos.iter().map(|i| i.grad_norm).sum::<f64>() / infos.len().max(1) as f64,
        );
        metrics.insert("actor/lr".into(), last.lr);
        metrics.insert(
            "actor/skipped_steps".into(),
            infos.iter().filter(|i| i.skipped).count() as f64,
        );
        metrics.insert("actor/optimizer_steps".into(), infos.len() as f64);
        if !critic_infos.is_empty() {
            metrics.insert(
                "critic/grad_norm".into(),
                critic_infos.iter().map(|i| i.grad_norm).sum::<f64>() / critic_infos.len() as f64,
            );
            metrics.insert(
                "critic/lr".into(),
                critic_infos.last().map(|i| i.lr).unwrap_or(0.0),
            );
        }
        metrics.insert("time/train_s".into(), train_s);
        metrics.insert("time/forward_backward_s".into(), fwd_bwd_s);
        metrics.insert("time/optimizer_s".into(), optim_s);
        metrics.insert(
            "time/trainer_step_s".into(),
            t_start.elapsed().as_secs_f64(),
        );
        metrics.insert(
            "perf/train_tokens_per_s".into(),
            tokens_processed as f64 / train_s.max(1e-9),
        );
        Ok(metrics)
    }

    /// Zeroes the gradients, then back-propagates the loss of the mini-batch `indices` (split into
    /// micro-batches) into them. Returns the tokens processed.
    fn accumulate(
        &mut self,
        batch: &TrainBatch,
        indices: &[usize],
        refs: &Refs,
        acc: &mut MetricAcc,
    ) -> Result<usize> {
        let seqs = &batch.sequences;
        let norm = Normalizer {
            tokens: indices
                .iter()
                .map(|&i| seqs[i].loss_tokens())
                .sum::<usize>() as f64,
            sequences: indices
                .iter()
                .filter(|&&i| seqs[i].loss_tokens() > 0)
                .count() as f64,
            max_response_len: batch.max_response_len.max(
                indices
                    .iter()
                    .map(|&i| seqs[i].response.len())
                    .max()
                    .unwrap_or(1),
            ) as f64,
        };
        self.policy.zero_grad()?;
        if let Some(c) = self.critic.as_mut() {
            c.body.zero_grad()?;
            let mut g = c.head.params.f_grad()?;
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }
        let mut tokens = 0;
        let mut micros = pack_micro_batches(seqs, indices, self.cfg.micro_batch_tokens);
        if let Some(c) = &self.collective {
            // This rank's share (by tokens); the normaliser above stays the whole mini-batch's.
            let cost: Vec<usize> = micros
                .iter()
                .map(|m| {
                    m.iter()
                        .map(|&i| seqs[i].prompt.len() + seqs[i].response.len())
                        .sum()
                })
                .collect();
            let mine = crate::dp::share(&cost, c.rank(), c.world());
            micros = mine
                .into_iter()
                .map(|i| std::mem::take(&mut micros[i]))
                .collect();
        }
        for micro in micros {
            let mseqs: Vec<&TrainSequence> = micro.iter().map(|&i| &seqs[i]).collect();
            tokens += mseqs
                .iter()
                .map(|s| s.prompt.len() + s.response.len())
                .sum::<usize>();
            let mb = self.micro_batch(&mseqs)?;
            self.policy_micro_step(&mseqs, &micro, &mb, refs.old, refs.reference, &norm, acc)?;
            if self.critic.is_some() {
                self.critic_micro_step(&mseqs, &mb, &norm, acc)?;
            }
        }
        Ok(tokens)
    }

    /// The policy gradient (flat, f32) of the whole batch as one mini-batch, without stepping.
    /// With [`Trainer::apply_gradients`] this is one `train_step` of a single-epoch, single
    /// mini-batch config; also the hook for reducing gradients across data-parallel ranks.
    pub fn gradients(&mut self, batch: &TrainBatch) -> Result<Tensor> {
        batch.validate()?;
        let reference = if self.cfg.loss.kl.is_some()
            && !batch.sequences.iter().all(|s| s.ref_logprobs.is_some())
        {
            Some(self.compute_ref_logprobs(&batch.sequences)?)
        } else {
            None
        };
        let all: Vec<usize> = (0..batch.sequences.len()).collect();
        let refs = Refs {
            old: None,
            reference: reference.as_ref(),
        };
        self.accumulate(batch, &all, &refs, &mut MetricAcc::default())?;
        let g = self.policy.take_grad()?.f_detach_copy()?;
        self.policy.zero_grad()?;
        Ok(g)
    }

    /// One AdamW step of the policy with the given flat f32 gradient (clipped per the config).
    pub fn apply_gradients(&mut self, grad: Tensor) -> Result<StepInfo> {
        let mut grads = vec![grad];
        let info = self.opt.step(&mut [&mut self.policy.group], &mut grads)?;
        self.policy.sync_compute()?;
        Ok(info)
    }

    /// Back-propagates one micro-batch's share of the policy loss. The log-probs (and entropies)
    /// are computed chunk by chunk without autograd; the loss is differentiated with respect to
    /// them; the head's backward then recomputes each chunk's logits
    /// ([`token_logprobs_backward`]), so no `(tokens, vocab)` logits are kept for backward.
    fn policy_micro_step(
        &self,
        mseqs: &[&TrainSequence],
        micro: &[usize],
        mb: &MicroBatch,
        old: Option<&SeqValues>,
        reference: Option<&SeqValues>,
        norm: &Normalizer,
        acc: &mut MetricAcc,
    ) -> Result<()> {
        let model = self.policy.model()?;
        let want_entropy = self.cfg.loss.entropy_coef != 0.0;
        let fwd = mb.forward(&model, self.cfg.activation_checkpointing)?;
        let (flipped, replayed) = fwd.route_flips;
        if replayed > 0 {
            acc.add(
                "actor/routing_flip_frac",
                flipped as f64,
                replayed as f64,
                None,
            );
        }
        let rows = fwd.rows.f_detach()?;
        let lm_head = model.lm_head_weight();
        let (lp_flat, ent_flat) = {
            let _g = tch::no_grad_guard();
            token_logprobs(
                &rows,
                lm_head,
                &mb.targets,
                self.cfg.temperature,
                self.cfg.logprob_chunk,
                want_entropy || self.cfg.entropy_metric,
            )?
        };
        let lp_leaf = lp_flat.f_set_requires_grad(true)?;
        let ent_leaf = match (&ent_flat, want_entropy) {
            (Some(e), true) => Some(e.f_detach()?.f_set_requires_grad(true)?),
            _ => None,
        };
        let lp = mb.to_padded(&lp_leaf)?;
        let ent = ent_leaf.as_ref().map(|e| mb.to_padded(e)).transpose()?;
        let field = |f: &dyn Fn(&TrainSequence) -> Option<&Vec<f32>>| {
            mb.padded(|k| f(mseqs[k]).map(Vec::as_slice))
        };
        let host = |vals: &SeqValues| -> Result<Tensor> {
            Ok(mb
                .padded(|k| Some(vals[micro[k]].as_slice()))?
                .expect("every row present"))
        };
        let old_lp = match old {
            Some(o) => host(o)?,
            None => lp.f_detach()?,
        };
        let ref_lp = match reference {
            Some(r) => Some(host(r)?),
            None => field(&|s| s.ref_logprobs.as_ref())?,
        };
        let advantages = field(&|s| Some(&s.advantages))?.expect("advantages");
        let behavior = field(&|s| s.behavior_logprobs.as_ref())?;
        let input = LossInput {
            logprobs: &lp,
            old_logprobs: &old_lp,
            advantages: &advantages,
            mask: &mb.mask,
            ref_logprobs: ref_lp.as_ref(),
            behavior_logprobs: behavior.as_ref(),
            entropy: ent.as_ref(),
            norm,
        };
        let out = self.loss.compute(&input)?;
        out.loss.f_backward()?;
        // The head: gradients of the loss with respect to the hidden rows and the output
        // projection, recomputing the logits a chunk at a time.
        let grad_lp = lp_leaf.f_grad()?;
        let grad_lp = if grad_lp.defined() {
            grad_lp
        } else {
            lp_leaf.f_zeros_like()?
        };
        let grad_ent = match &ent_leaf {
            Some(e) => Some(e.f_grad()?).filter(Tensor::defined),
            None => None,
        };
        let (grad_rows, grad_head) = token_logprobs_backward(
            &rows,
            lm_head,
            &mb.targets,
            self.cfg.temperature,
            self.cfg.logprob_chunk,
            &grad_lp,
            grad_ent.as_ref(),
            lm_head.requires_grad(), // frozen with LoRA
        )?;
        // Then the transformer (and the head's weight, a view of the same parameters).
        let mut objective = fwd.rows.f_mul(&grad_rows)?.f_sum(Kind::Float)?;
        if let Some(g) = grad_head {
            objective = objective.f_add(
                &lm_head
                    .f_to_kind(Kind::Float)?
                    .f_mul(&g)?
                    .f_sum(Kind::Float)?,
            )?;
        }
        // The load-balancing loss, weighted by the micro-batch's share of the response tokens.
        let mut aux_scaled = None;
        if let Some((g, value, loss)) = &fwd.aux {
            let share = mb.mask.f_sum(Kind::Double)?.f_double_value(&[])? / norm.tokens.max(1.0);
            let coef = self.cfg.router_aux_loss_coef;
            match loss {
                Some(l) => objective = objective.f_add(&l.f_mul_scalar(coef * share)?)?,
                None => aux_scaled = Some(g.f_mul_scalar(coef * share)?),
            }
            acc.add("actor/router_aux_loss", value * share, share, None);
        }
        self.policy
            .backward(&model, fwd, &objective, aux_scaled.as_ref())?;
        for (name, m) in out.metrics {
            acc.add(&format!("actor/{name}"), m.sum, m.count, m.max);
        }
        if let (Some(ent_flat), false) = (&ent_flat, want_entropy) {
            let s = mb
                .to_padded(ent_flat)?
                .f_mul(&mb.mask)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
            acc.add(
                "actor/entropy",
                s,
                mb.mask.f_sum(Kind::Double)?.f_double_value(&[])?,
                None,
            );
        }
        if let Some(b) = &behavior {
            // Generator vs trainer log-prob mismatch on the rollout tokens (before the update).
            let d = old_lp.f_sub(b)?.f_abs()?.f_mul(&mb.mask)?;
            acc.add(
                "actor/logprob_mismatch",
                d.f_sum(Kind::Double)?.f_double_value(&[])?,
                mb.mask.f_sum(Kind::Double)?.f_double_value(&[])?,
                Some(d.f_max()?.f_double_value(&[])?),
            );
        }
        Ok(())
    }

    fn critic_micro_step(
        &mut self,
        mseqs: &[&TrainSequence],
        mb: &MicroBatch,
        norm: &Normalizer,
        acc: &mut MetricAcc,
    ) -> Result<()> {
        let Some(c) = self.critic.as_ref() else {
            return Ok(());
        };
        let returns = mb.padded(|k| mseqs[k].returns.as_deref())?.ok_or_else(|| {
            TrainError::Invalid("PPO with a critic needs `returns` on every sequence".into())
        })?;
        let model = c.body.model()?;
        let fwd = mb.forward(&model, self.cfg.activation_checkpointing)?;
        let values = head_values(&fwd.rows, &c.head.params, mb)?;
        let err = values.f_sub(&returns)?.f_square()?;
        let per_token = match mb.padded(|k| mseqs[k].old_values.as_deref())? {
            Some(old) if c.cfg.cliprange_value > 0.0 => {
                let clipped = old.f_add(
                    &values
                        .f_sub(&old)?
                        .f_clamp(-c.cfg.cliprange_value, c.cfg.cliprange_value)?,
                )?;
                let err_c = clipped.f_sub(&returns)?.f_square()?;
                let frac = err_c
                    .f_gt_tensor(&err)?
                    .f_to_kind(Kind::Float)?
                    .f_mul(&mb.mask)?;
                acc.add(
                    "critic/vf_clipfrac",
                    frac.f_sum(Kind::Double)?.f_double_value(&[])?,
                    mb.mask.f_sum(Kind::Double)?.f_double_value(&[])?,
                    None,
                );
                err.f_maximum(&err_c)?
            }
            _ => err,
        };
        let loss = per_token
            .f_mul_scalar(0.5)?
            .f_mul(&mb.mask)?
            .f_sum(Kind::Float)?
            .f_div_scalar(norm.tokens)?;
        c.body.backward(&model, fwd, &loss, None)?;
        acc.add(
            "critic/vf_loss",
            loss.f_double_value(&[])? * norm.tokens,
            mb.mask.f_sum(Kind::Double)?.f_double_value(&[])?,
            None,
        );
        let v = values.f_detach()?.f_mul(&mb.mask)?;
        acc.add(
            "critic/values",
            v.f_sum(Kind::Double)?.f_double_value(&[])?,
            mb.mask.f_sum(Kind::Double)?.f_double_value(&[])?,
            None,
        );
        Ok(())
    }

    /// Writes the trainer's state into `dir` (which must exist): policy weights (HF names),
    /// optimizer moments, step counters, critic.
    pub fn save(&self, dir: &Path) -> Result<()> {
        use rlrun_model::loader::{write_json, write_safetensors};
        let meta = BTreeMap::new();
        write_safetensors(
            &dir.join("policy.safetensors"),
            &self.policy.weights().named_tensors()?,
            &meta,
        )?;
        let mut opt = vec![
            (
                "policy.exp_avg".to_string(),
                self.policy.group.exp_avg.shallow_clone(),
            ),
            (
                "policy.exp_avg_sq".to_string(),
                self.policy.group.exp_avg_sq.shallow_clone(),
            ),
        ];
        if let Some(c) = &self.critic {
            write_safetensors(
                &dir.join("critic.safetensors"),
                &c.body.weights().named_tensors()?,
                &meta,
            )?;
            opt.extend([
                (
                    "critic.exp_avg".to_string(),
                    c.body.group.exp_avg.shallow_clone(),
                ),
                (
                    "critic.exp_avg_sq".to_string(),
                    c.body.group.exp_avg_sq.shallow_clone(),
                ),
                ("critic_head.params".to_string(), c.head.params.f_detach()?),
                (
                    "critic_head.exp_avg".to_string(),
                    c.head.exp_avg.shallow_clone(),
                ),
                (
                    "critic_head.exp_avg_sq".to_string(),
                    c.head.exp_avg_sq.shallow_clone(),
                ),
            ]);
        }
        write_safetensors(&dir.join("optimizer.safetensors"), &opt, &meta)?;
        if let Some(l) = &self.lora {
            // The adapter in PEFT's format too (what `rlrun` exports and `peft` loads).
            rlrun_model::lora::save_peft(dir, l, &self.policy.weights(), "")?;
        }
        write_json(
            &dir.join("trainer_state.json"),
            &serde_json::json!({
                "optimizer_steps": self.opt.step,
                "critic_optimizer_steps": self.critic.as_ref().map(|c| c.opt.step),
                "version": self.version,
            }),
        )?;
        Ok(())
    }

    /// Restores what [`Trainer::save`] wrote. The trainer must have been built with the same
    /// model config and options.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let _g = tch::no_grad_guard();
        let ck = |message: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message,
        };
        let src = rlrun_model::loader::SafetensorsSource::open_files(
            dir.join("policy.safetensors"),
            &[dir.join("policy.safetensors")],
        )?;
        let w = rlrun_model::loader::load_weights(
            self.policy.layout.clone(),
            &src,
            Kind::Float,
            self.device,
        )?;
        self.policy.group.params.f_copy_(&w.flat)?;
        self.policy.sync_compute()?;
        let opt_path = dir.join("optimizer.safetensors");
        let opt: BTreeMap<String, Tensor> = Tensor::read_safetensors(&opt_path)
            .map_err(|e| ck(format!("optimizer.safetensors: {e}")))?
            .into_iter()
            .collect();
        let get = |k: &str| {
            opt.get(k)
                .ok_or_else(|| ck(format!("optimizer.safetensors has no `{k}`")))
        };
        self.policy.group.exp_avg.f_copy_(get("policy.exp_avg")?)?;
        self.policy
            .group
            .exp_avg_sq
            .f_copy_(get("policy.exp_avg_sq")?)?;
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path)
            .map_err(|e| ck(format!("trainer_state.json: {e}")))?;
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ck(format!("trainer_state.json: {e}")))?;
        self.opt.step = state["optimizer_steps"]
            .as_u64()
            .ok_or_else(|| ck("optimizer_steps missing".into()))?;
        self.version = state["version"].as_u64().unwrap_or(0);
        if let Some(c) = self.critic.as_mut() {
            let cp = dir.join("critic.safetensors");
            let src = rlrun_model::loader::SafetensorsSource::open_files(cp.clone(), &[cp])?;
            let w = rlrun_model::loader::load_weights(
                c.body.layout.clone(),
                &src,
                Kind::Float,
                self.device,
            )?;
            c.body.group.params.f_copy_(&w.flat)?;
            c.body.sync_compute()?;
            c.body.group.exp_avg.f_copy_(get("critic.exp_avg")?)?;
            c.body.group.exp_avg_sq.f_copy_(get("critic.exp_avg_sq")?)?;
            c.head.params.f_copy_(get("critic_head.params")?)?;
            c.head.exp_avg.f_copy_(get("critic_head.exp_avg")?)?;
            c.head.exp_avg_sq.f_copy_(get("critic_head.exp_avg_sq")?)?;
            c.opt.step = state["critic_optimizer_steps"].as_u64().unwrap_or(0);
        }
        Ok(())
    }
}

/// Values `(N, L)` of a critic body + head at the response positions.
fn critic_values(model: &Model, head: &Tensor, mb: &MicroBatch) -> Result<Tensor> {
    head_values(&mb.hidden_rows(model)?, head, mb)
}

/// Values `(N, L)` of the critic head on hidden rows `(M, H)`.
fn head_values(rows: &Tensor, head: &Tensor, mb: &MicroBatch) -> Result<Tensor> {
    let rows = rows.f_to_kind(Kind::Float)?; // (M, H)
    let hidden = rows.size()[1];
    let w = head.f_narrow(0, 0, hidden)?;
    let b = head.f_narrow(0, hidden, 1)?;
    let v = rows.f_matmul(&w)?.f_add(&b)?; // (M,)
    mb.to_padded(&v)
}
