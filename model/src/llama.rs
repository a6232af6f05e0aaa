//! Llama-family decoder-only transformer: Llama 2/3 (incl. `llama3` rope scaling), Qwen2/Qwen2.5
//! (q/k/v bias), Qwen3 (per-head q/k RMSNorm), SmolLM2 (a Llama), and Gemma 3 (text): `(1 + w)`
//! RMSNorms in f32 before and after attention and MLP, q/k norms, embeddings scaled by
//! `sqrt(hidden)`, GELU-tanh MLP, scores scaled by `query_pre_attn_scalar^-0.5`, and local layers
//! that see only the last `sliding_window` positions with their own RoPE base. Grouped-query
//! attention, tied or untied embeddings, explicit `head_dim`.
//!
//! Checkpoints: Hugging Face `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
//! `Gemma3ForCausalLM` (see `transformers/models/{llama,qwen2,qwen3,gemma3}/modeling_*.py`), and
//! GGUF files of those architectures via [`crate::gguf`].
//!
//! The model holds views into a flat parameter buffer ([`crate::params`]), so the trainer can
//! rebuild it around fresh autograd views every step and the generator shares the same code.
//! The KV cache lives outside the model ([`KvCache`]).

use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::config::{Config, RopeScaling};
use crate::error::{ModelError, Result};
use crate::lora::Target;
use crate::params::ParamLayout;

struct Layer {
    /// The norm before attention (`input_layernorm`).
    attn_norm: Tensor,
    qkv_w: Tensor,
    qkv_b: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o_w: Tensor,
    o_b: Option<Tensor>,
    /// Gemma: the norm of the attention output (its `post_attention_layernorm`).
    attn_out_norm: Option<Tensor>,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    mlp_norm: Tensor,
    /// Dense MLP: fused gate/up `(2 ff, H)` and down `(H, ff)`; for a mixture-of-experts layer
    /// the experts' `(E, 2 ff, H)` and `(E, H, ff)`.
    gate_up: Tensor,
    down: Tensor,
    /// The router `(E, H)` of a mixture-of-experts layer and the layer's index among those.
    router: Option<(Tensor, usize)>,
    /// Qwen2-MoE's shared expert: fused gate/up `(2 sff, H)`, down `(H, sff)`, and its sigmoid
    /// gate `(1, H)`.
    shared: Option<(Tensor, Tensor, Tensor)>,
    /// Gemma: the norm of the MLP output (`post_feedforward_layernorm`).
    mlp_out_norm: Option<Tensor>,
    /// A local (sliding-window) attention layer.
    sliding: bool,
    /// LoRA `(A, B)` of each [`Target`], indexed by [`Target::index`].
    lora: [Option<(Tensor, Tensor)>; 7],
}

/// A Llama-family causal language model over a set of weight views.
pub struct Model {
    cfg: Arc<Config>,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Tensor,
    attention_scaling: f64,
    n_heads: i64,
    n_kv: i64,
    head_dim: i64,
    eps: f64,
    /// The factor `s` of the LoRA update `s · B A` (see [`Model::with_lora`]).
    lora_scale: f64,
    /// Scale of the attention scores.
    attn_scale: f64,
    /// Gemma: norms apply `1 + w` in f32.
    offset_norms: bool,
    /// Gemma: embeddings are multiplied by this (`sqrt(hidden)` rounded to the model dtype).
    embed_scale: Option<f64>,
    /// GELU (tanh approximation) instead of SiLU in the MLP.
    gelu: bool,
    /// Inverse frequencies of the sliding-window layers and their window, if the model has any.
    local: Option<(Tensor, i64)>,
    /// Mixture of experts: experts per token, and whether their weights are renormalised.
    top_k: i64,
    norm_topk: bool,
}

/// Expert routing of one pass through a mixture-of-experts model (Qwen3-MoE), per input of the
/// pass (`[ids]` for a full pass, `[prompts, continuations]` for a grouped one):
/// - `replay`: the experts to use, `(.., T, moe_layers, k)` int64, -1 where the router chooses
///   (routing replay: the trainer uses the generator's choices, so a router that would flip on
///   tiny numeric differences cannot change the tokens' log-probs);
/// - the choices made, recorded per layer, and how many replayed tokens the router alone would
///   have routed differently.
#[derive(Default)]
pub struct Routing {
    replay: Vec<Option<Tensor>>,
    /// Use the replayed experts (else only count where the router differs from them).
    enforce: bool,
    /// Valid tokens per input, `(.., T)` bool: set to record the load-balancing statistics.
    valid: Vec<Tensor>,
    /// Per (input, MoE layer): assignments per expert `(E,)` over valid tokens (no grad), the
    /// router probabilities summed over valid tokens `(E,)` (in the graph when grad is on), and
    /// the number of valid tokens.
    load: std::cell::RefCell<std::collections::BTreeMap<(usize, usize), (Tensor, Tensor, i64)>>,
    recorded: std::cell::RefCell<std::collections::BTreeMap<(usize, usize), Tensor>>,
    flips: std::cell::RefCell<std::collections::BTreeMap<(usize, usize), (i64, i64)>>,
}

impl Routing {
    /// Replays `replay[i]` (`(.., T, moe_layers, k)`, -1 = the router chooses) for input `i`.
    pub fn replay(replay: Vec<Option<Tensor>>) -> Self {
        Routing {
            replay,
            enforce: true,
            ..Default::default()
        }
    }

    /// Lets the router choose, counting where it differs from `replay` ([`Routing::flips`]).
    pub fn compare(replay: Vec<Option<Tensor>>) -> Self {
        Routing {
            replay,
            ..Default::default()
        }
    }

    /// The experts used for input `i`, `(.., T, moe_layers, k)` int64 (None before a pass ran
    /// or without experts).
    pub fn recorded(&self, input: usize) -> Result<Option<Tensor>> {
        let rec = self.recorded.borrow();
        let layers: Vec<&Tensor> = rec
            .iter()
            .filter(|((i, _), _)| *i == input)
            .map(|(_, t)| t)
            .collect();
        if layers.is_empty() {
            return Ok(None);
        }
        let d = layers[0].dim() as i64 - 1;
        Ok(Some(Tensor::f_stack(&layers, d)?))
    }

    /// Records the statistics of the load-balancing loss ([`Routing::aux_weights`]) over the
    /// tokens `valid[i]` marks in input `i`.
    pub fn with_load_balancing(mut self, valid: Vec<Tensor>) -> Self {
        self.valid = valid;
        self
    }

    /// The load-balancing loss of transformers' `load_balancing_loss_func` (Switch Transformer),
    /// over all MoE layers and valid tokens of the pass: `E · Σ_e f_e · P_e`, with `f_e` the
    /// fraction of the `L·N` token-layer rows routed to expert e (counting each of the top-k)
    /// and `P_e` the mean router probability of e. As `f` carries no gradient, the loss is
    /// linear in the summed probabilities: it equals `Σ_layers g · psum_layer` with the weights
    /// `g = E · f / (L·N)` returned here (None without statistics).
    pub fn aux_weights(&self) -> Result<Option<Tensor>> {
        let load = self.load.borrow();
        let Some(((_, _), (c0, _, _))) = load.iter().next() else {
            return Ok(None);
        };
        let mut counts = c0.f_zeros_like()?;
        let mut rows = 0i64;
        for (c, _, n) in load.values() {
            counts = counts.f_add(c)?;
            rows += n;
        }
        let e = counts.size()[0] as f64;
        let rows = rows.max(1) as f64;
        Ok(Some(
            counts
                .f_to_kind(Kind::Float)?
                .f_mul_scalar(e / (rows * rows))?,
        ))
    }

    /// `Σ g · psum` over the recorded layers (only MoE layer `layer` if given): the
    /// load-balancing loss, or one layer's part of it, in the graph of the pass that recorded it.
    pub fn aux_term(&self, layer: Option<usize>, g: &Tensor) -> Result<Option<Tensor>> {
        let load = self.load.borrow();
        let mut total: Option<Tensor> = None;
        for ((_, m), (_, psum, _)) in load.iter() {
            if layer.is_some_and(|l| l != *m) {
                continue;
            }
            let t = psum.f_mul(g)?.f_sum(Kind::Float)?;
            total = Some(match total {
                Some(x) => x.f_add(&t)?,
                None => t,
            });
        }
        Ok(total)
    }

    /// (replayed tokens the router would have routed to a different set of experts, replayed
    /// tokens), summed over layers.
    pub fn flips(&self) -> (i64, i64) {
        self.flips
            .borrow()
            .values()
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    }
}

/// A key/value cache of `slots` sequences of up to `max_len` positions each, per layer
/// `(slots, n_kv_heads, max_len, head_dim)`. Owned by the caller (generator), not the model;
/// it can start empty and grow in both slots and positions ([`KvCache::reserve`]).
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    slots: i64,
    max_len: i64,
}

impl KvCache {
    /// Allocates a zeroed cache for `cfg` on the device/dtype of `like`.
    pub fn new(
        cfg: &Config,
        slots: i64,
        max_len: i64,
        kind: Kind,
        device: tch::Device,
    ) -> Result<Self> {
        let shape = [slots, cfg.num_kv_heads(), max_len, cfg.head_dim()];
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..cfg.num_hidden_layers {
            k.push(Tensor::f_zeros(shape, (kind, device)).map_err(|e| alloc_err(e, &shape))?);
            v.push(Tensor::f_zeros(shape, (kind, device)).map_err(|e| alloc_err(e, &shape))?);
        }
        Ok(KvCache {
            k,
            v,
            slots,
            max_len,
        })
    }

    pub fn slots(&self) -> i64 {
        self.slots
    }
    pub fn max_len(&self) -> i64 {
        self.max_len
    }
    /// Bytes held by the cache.
    pub fn bytes(&self) -> i64 {
        self.k
            .iter()
            .chain(&self.v)
            .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
            .sum()
    }

    /// Grows the cache to at least `slots` slots of at least `len` positions, in one
    /// reallocation (content kept; new slots and positions zero).
    pub fn reserve(&mut self, slots: i64, len: i64) -> Result<()> {
        let (slots, len) = (slots.max(self.slots), len.max(self.max_len));
        if slots == self.slots && len == self.max_len {
            return Ok(());
        }
        for cache in self.k.iter_mut().chain(self.v.iter_mut()) {
            let mut shape = cache.size();
            shape[0] = slots;
            shape[2] = len;
            let grown = Tensor::f_zeros(shape.as_slice(), (cache.kind(), cache.device()))
                .map_err(|e| alloc_err(e, &shape))?;
            if self.slots > 0 && self.max_len > 0 {
                grown
                    .f_narrow(0, 0, self.slots)?
                    .f_narrow(2, 0, self.max_len)?
                    .f_copy_(cache)?;
            }
            *cache = grown;
        }
        self.slots = slots;
        self.max_len = len;
        Ok(())
    }

    /// Bytes of one position of one slot (keys and values of every layer).
    pub fn bytes_per_position(&self) -> i64 {
        self.k
            .iter()
            .chain(&self.v)
            .map(|t| {
                let s = t.size();
                s[1] * s[3] * t.kind().elt_size_in_bytes() as i64
            })
            .sum()
    }

    /// A copy of the first `len` positions of slot `slot`: keys then values of each layer, each
    /// `(n_kv, len, head_dim)` (for [`KvCache::import_prefix`]).
    pub fn export_prefix(&self, slot: i64, len: i64) -> Result<Vec<Tensor>> {
        self.k
            .iter()
            .chain(&self.v)
            .map(|c| Ok(c.f_select(0, slot)?.f_narrow(1, 0, len)?.copy()))
            .collect()
    }

    /// Writes a prefix from [`KvCache::export_prefix`] into positions `0..len` of slot `slot`.
    pub fn import_prefix(&mut self, slot: i64, prefix: &[Tensor]) -> Result<()> {
        if prefix.len() != self.k.len() * 2 {
            return Err(ModelError::Invalid(format!(
                "a KV prefix of {} tensors for a cache of {} layers",
                prefix.len(),
                self.k.len()
            )));
        }
        for (c, p) in self.k.iter_mut().chain(self.v.iter_mut()).zip(prefix) {
            let len = p.size()[1];
            c.f_select(0, slot)?.f_narrow(1, 0, len)?.f_copy_(p)?;
        }
        Ok(())
    }

    /// Copies the first `len` positions of slot `src` into each slot of `dst` (shared prompts).
    pub fn copy_prefix(&mut self, src: i64, dst: &[i64], len: i64) -> Result<()> {
        if dst.is_empty() || len == 0 {
            return Ok(());
        }
        let device = self.k[0].device();
        let idx = Tensor::from_slice(dst).to_device(device);
        for cache in self.k.iter_mut().chain(self.v.iter_mut()) {
            let prefix = cache.f_narrow(0, src, 1)?.f_narrow(2, 0, len)?; // (1, n_kv, len, hd)
            let n = dst.len() as i64;
            let expanded = prefix.f_expand([n, -1, -1, -1], false)?;
            let mut target = cache.f_narrow(2, 0, len)?;
            let _ = target.f_index_copy_(0, &idx, &expanded)?;
        }
        Ok(())
    }
}

fn alloc_err(e: tch::TchError, shape: &[i64]) -> ModelError {
    ModelError::Torch {
        context: format!("allocating a KV cache block of shape {shape:?}"),
        source: e,
    }
}

/// Where the tokens of a [`Model::forward_cached`] call go in the cache.
pub struct CacheWrite<'a> {
    /// Cache slot of each row, `(B,)` int64 on the model's device.
    pub slots: &'a Tensor,
    /// Slot of each row on the host (same values).
    pub slots_host: &'a [i64],
    /// Tokens already in the cache for each row (the position of the row's first token).
    pub start: &'a [i64],
    /// Number of valid (non-padding) tokens in each row; rows are right-padded.
    pub lens: &'a [i64],
}

/// The per-pass inputs of the layers (rotary tables, masks) of a [`Model::forward`]
/// ([`Model::pass_full`]) or [`Model::forward_grouped`] ([`Model::pass_grouped`]) pass, for
/// running the model one layer at a time ([`Model::layer`]). `local` holds the sliding-window
/// layers' tables and masks (Gemma 3), the others' when None; `routing` the expert routing
/// (replayed or recorded) of a mixture-of-experts model.
pub struct Pass {
    kind: PassKind,
    pub routing: Routing,
}

impl Pass {
    /// The pass with experts chosen by `routing` (see [`Routing::replay`]).
    pub fn with_routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }
}

enum PassKind {
    Full {
        tables: FullTables,
        local: Option<FullTables>,
    },
    Grouped {
        tables: GroupedTables,
        local: Option<GroupedTables>,
        /// `(N,)` the prompt of each continuation.
        gidx: Tensor,
    },
}

/// Rotary tables and mask of a [`Pass::Full`] for one kind of layer (mask None: causal).
pub struct FullTables {
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

/// Rotary tables and masks of a [`Pass::Grouped`] for one kind of layer.
pub struct GroupedTables {
    cos_p: Tensor,
    sin_p: Tensor,
    cos_c: Tensor,
    sin_c: Tensor,
    /// `(G, 1, P, P)` keys each prompt token sees (None: causal).
    mask_p: Option<Tensor>,
    /// `(N, 1, R, P + R)` keys each continuation token sees.
    mask: Tensor,
}

impl Model {
    /// Builds the model over `chunks`, the views returned by [`ParamLayout::chunk_views`].
    pub fn new(cfg: Arc<Config>, layout: &ParamLayout, chunks: &[Tensor]) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            layout
                .chunk_position(name)
                .map(|i| chunks[i].shallow_clone())
                .ok_or_else(|| {
                    ModelError::Invalid(format!("parameter chunk `{name}` missing from layout"))
                })
        };
        let opt = |name: &str| {
            layout
                .chunk_position(name)
                .map(|i| chunks[i].shallow_clone())
        };
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let sandwich = cfg.sandwich_norms();
            let (attn_out_norm, mlp_norm, mlp_out_norm) = if sandwich {
                (
                    Some(get(&format!("{p}.post_attention_layernorm.weight"))?),
                    get(&format!("{p}.pre_feedforward_layernorm.weight"))?,
                    Some(get(&format!("{p}.post_feedforward_layernorm.weight"))?),
                )
            } else {
                (
                    None,
                    get(&format!("{p}.post_attention_layernorm.weight"))?,
                    None,
                )
            };
            let moe_layers = layers
                .iter()
                .filter(|l: &&Layer| l.router.is_some())
                .count();
            let (gate_up, down, router) = match cfg.moe().filter(|_| cfg.is_moe_layer(i)) {
                Some((e, _, eff)) => (
                    get(&format!("{p}.mlp.experts.gate_up_proj"))?.f_view([
                        e,
                        2 * eff,
                        cfg.hidden_size,
                    ])?,
                    get(&format!("{p}.mlp.experts.down_proj"))?.f_view([
                        e,
                        cfg.hidden_size,
                        eff,
                    ])?,
                    Some((get(&format!("{p}.mlp.gate.weight"))?, moe_layers)),
                ),
                None => (
                    get(&format!("{p}.mlp.gate_up_proj.weight"))?,
                    get(&format!("{p}.mlp.down_proj.weight"))?,
                    None,
                ),
            };
            let shared = match cfg.shared_expert().filter(|_| router.is_some()) {
                Some(_) => Some((
                    get(&format!("{p}.mlp.shared_expert.gate_up_proj.weight"))?,
                    get(&format!("{p}.mlp.shared_expert.down_proj.weight"))?,
                    get(&format!("{p}.mlp.shared_expert_gate.weight"))?,
                )),
                None => None,
            };
            layers.push(Layer {
                shared,
                attn_norm: get(&format!("{p}.input_layernorm.weight"))?,
                qkv_w: get(&format!("{p}.self_attn.qkv_proj.weight"))?,
                qkv_b: opt(&format!("{p}.self_attn.qkv_proj.bias")),
                q_norm: opt(&format!("{p}.self_attn.q_norm.weight")),
                k_norm: opt(&format!("{p}.self_attn.k_norm.weight")),
                o_w: get(&format!("{p}.self_attn.o_proj.weight"))?,
                o_b: opt(&format!("{p}.self_attn.o_proj.bias")),
                attn_out_norm,
                mlp_norm,
                gate_up,
                down,
                router,
                mlp_out_norm,
                sliding: cfg.is_sliding(i),
                lora: Default::default(),
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = opt("lm_head.weight").unwrap_or_else(|| embed.shallow_clone());
        let (inv_freq, attention_scaling) = rope_inv_freq(&cfg)?;
        let inv_freq = inv_freq.f_to_device(embed.device())?;
        let local = match cfg.window() {
            Some(window) if layers.iter().any(|l| l.sliding) => {
                let (base, scaling) = cfg
                    .sliding_rope()
                    .map_err(|m| ModelError::Invalid(format!("rope parameters: {m}")))?;
                let (f, _) = inv_freq_for(cfg.head_dim(), base, &scaling)?;
                Some((f.f_to_device(embed.device())?, window))
            }
            _ => None,
        };
        // The embedding factor in the weights' dtype, as transformers multiplies by it.
        let embed_scale = match cfg.embed_scale() {
            Some(s) => Some(
                Tensor::f_from_slice(&[s])?
                    .f_to_kind(embed.kind())?
                    .f_double_value(&[0])?,
            ),
            None => None,
        };
        Ok(Model {
            n_heads: cfg.num_attention_heads,
            n_kv: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
            eps: cfg.rms_norm_eps,
            embed,
            layers,
            norm: get("model.norm.weight")?,
            lm_head,
            inv_freq,
            attention_scaling,
            attn_scale: cfg.attention_scale(),
            offset_norms: cfg.offset_norms(),
            embed_scale,
            gelu: cfg.activation() == "gelu_pytorch_tanh",
            local,
            top_k: cfg.moe().map_or(0, |(_, k, _)| k),
            norm_topk: cfg.norm_topk_prob.unwrap_or(false),
            cfg,
            lora_scale: 0.0,
        })
    }

    /// The model with LoRA adapters applied in its forward: `chunks` are the views of an adapter
    /// buffer of `layout` ([`ParamLayout::for_lora`]), `scale` the factor `s` of `W + s · B A`.
    pub fn with_lora(
        mut self,
        layout: &ParamLayout,
        chunks: &[Tensor],
        scale: f64,
    ) -> Result<Self> {
        let view = |name: &str| {
            layout
                .chunk_position(name)
                .map(|i| chunks[i].shallow_clone())
        };
        let mut found = 0;
        for (i, l) in self.layers.iter_mut().enumerate() {
            for t in Target::ALL {
                let m = format!("model.layers.{i}.{}", t.module());
                if let (Some(a), Some(b)) = (
                    view(&format!("{m}.lora_A.weight")),
                    view(&format!("{m}.lora_B.weight")),
                ) {
                    l.lora[t.index()] = Some((a, b));
                    found += 1;
                }
            }
        }
        if let Some(i) = self.layers.iter().position(|l| {
            l.router.is_some()
                && Target::ALL
                    .iter()
                    .any(|t| t.is_mlp() && l.lora[t.index()].is_some())
        }) {
            return Err(ModelError::Invalid(format!(
                "layer {i} is a mixture of experts: LoRA targets gate_proj/up_proj/down_proj are \
                 not supported there (adapt the attention projections)"
            )));
        }
        if found * 2 != layout.chunks().len() {
            return Err(ModelError::Invalid(format!(
                "adapter layout has {} tensors, {} of which match this model's layers",
                layout.chunks().len(),
                found * 2
            )));
        }
        self.lora_scale = scale;
        Ok(self)
    }

    /// `s · (x Aᵀ) Bᵀ` of the adapter on `t`, if the layer has one.
    fn lora_delta(&self, l: &Layer, t: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((a, b)) = &l.lora[t.index()] else {
            return Ok(None);
        };
        Ok(Some(
            x.f_linear::<Tensor>(a, None)?
                .f_linear::<Tensor>(b, None)?
                .f_mul_scalar(self.lora_scale)?,
        ))
    }

    /// `y` plus the adapter update of `t` on input `x`, if any.
    fn plus_lora(&self, l: &Layer, t: Target, x: &Tensor, y: Tensor) -> Result<Tensor> {
        Ok(match self.lora_delta(l, t, x)? {
            Some(d) => y.f_add(&d)?,
            None => y,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn device(&self) -> tch::Device {
        self.embed.device()
    }
    pub fn kind(&self) -> Kind {
        self.embed.kind()
    }
    /// The output projection `(vocab, hidden)` (the embedding matrix when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// (cos, sin) of shape `(B, T, 1, head_dim)` for integer `positions` `(B, T)`, computed in f32
    /// as transformers does, then cast to the model dtype.
    fn rope(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        self.rope_with(&self.inv_freq, positions)
    }

    /// [`Model::rope`] with the sliding-window layers' frequencies.
    fn rope_local(&self, positions: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        match &self.local {
            Some((f, _)) => Ok(Some(self.rope_with(f, positions)?)),
            None => Ok(None),
        }
    }

    fn rope_with(&self, inv_freq: &Tensor, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = positions.f_to_kind(Kind::Float)?;
        let freqs = pos.f_unsqueeze(-1)?.f_mul(inv_freq)?; // (B, T, hd/2)
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(2)?; // (B, T, 1, hd)
        let mut cos = emb.f_cos()?;
        let mut sin = emb.f_sin()?;
        if self.attention_scaling != 1.0 {
            cos = cos.f_mul_scalar(self.attention_scaling)?;
            sin = sin.f_mul_scalar(self.attention_scaling)?;
        }
        Ok((cos.f_to_kind(self.kind())?, sin.f_to_kind(self.kind())?))
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let n = *x.size().last().unwrap_or(&1);
        if self.offset_norms {
            // Gemma: `x / rms(x) * (1 + w)` in f32, then back to the input dtype.
            let w = w.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?;
            return Ok(x
                .f_to_kind(Kind::Float)?
                .f_rms_norm([n], Some(&w), Some(self.eps))?
                .f_to_kind(x.kind())?);
        }
        Ok(x.f_rms_norm([n], Some(w), Some(self.eps))?)
    }

    /// Projects to q, k (with rope) and v, each `(B, heads, T, head_dim)`.
    fn qkv(
        &self,
        l: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let mut qkv = x.f_linear(&l.qkv_w, l.qkv_b.as_ref())?; // (B, T, (nh + 2 nkv) hd)
        if [Target::Q, Target::K, Target::V]
            .iter()
            .any(|t| l.lora[t.index()].is_some())
        {
            let deltas = [(Target::Q, nh), (Target::K, nkv), (Target::V, nkv)]
                .into_iter()
                .map(|(target, heads)| match self.lora_delta(l, target, x)? {
                    Some(d) => Ok(d),
                    None => Ok(Tensor::f_zeros([b, t, heads * hd], (x.kind(), x.device()))?),
                })
                .collect::<Result<Vec<_>>>()?;
            qkv = qkv.f_add(&Tensor::f_cat(&deltas, 2)?)?;
        }
        let qkv = qkv.f_view([b, t, nh + 2 * nkv, hd])?; // (B, T, heads, hd)
        let v = qkv.f_narrow(2, nh + nkv, nkv)?; // (B, T, nkv, hd)
        let qk = match (&l.q_norm, &l.k_norm) {
            (Some(qn), Some(kn)) => {
                let q = self.rms_norm(&qkv.f_narrow(2, 0, nh)?, qn)?;
                let k = self.rms_norm(&qkv.f_narrow(2, nh, nkv)?, kn)?;
                Tensor::f_cat(&[q, k], 2)?
            }
            _ => qkv.f_narrow(2, 0, nh + nkv)?,
        };
        // Rotary embedding on q and k at once: x * cos + rotate_half(x) * sin.
        let half = hd / 2;
        let x1 = qk.f_narrow(3, 0, half)?;
        let x2 = qk.f_narrow(3, half, half)?;
        let rotated = Tensor::f_cat(&[x2.f_neg()?, x1], 3)?;
        let qk = qk.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?; // (B, T, nh + nkv, hd)
        let q = qk.f_narrow(2, 0, nh)?.f_transpose(1, 2)?; // (B, nh, T, hd)
        let k = qk.f_narrow(2, nh, nkv)?.f_transpose(1, 2)?; // (B, nkv, T, hd)
        Ok((q, k, v.f_transpose(1, 2)?))
    }

    /// Attention with an explicit boolean mask, or causal when `mask` is None.
    ///
    /// Grouped-query attention takes one of three routes: a few queries against a cache
    /// (decoding) use grouped matmuls that read each key/value head once for all the query heads
    /// sharing it; on CUDA, longer inputs expand the key/value heads so SDPA's fused kernels
    /// apply (flash for causal, memory-efficient with a mask); on the CPU, SDPA's `enable_gqa`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = (q.size()[0], q.size()[2]);
        let out = match mask {
            Some(mask) if t <= DECODE_QUERIES => self.attend_grouped(q, k, v, mask)?,
            _ => {
                let causal = mask.is_none();
                if self.n_kv != self.n_heads && q.device().is_cuda() && !native_gqa() {
                    let (k, v) = (self.expand_kv(k)?, self.expand_kv(v)?);
                    Tensor::f_scaled_dot_product_attention(
                        q,
                        &k,
                        &v,
                        mask,
                        0.0,
                        causal,
                        Some(self.attn_scale),
                        false,
                    )?
                } else {
                    Tensor::f_scaled_dot_product_attention(
                        q,
                        k,
                        v,
                        mask,
                        0.0,
                        causal,
                        Some(self.attn_scale),
                        true,
                    )?
                }
            }
        };
        // (B, nh, T, hd) -> (B, T, nh * hd)
        Ok(out
            .f_transpose(1, 2)?
            .f_reshape([b, t, self.n_heads * self.head_dim])?)
    }

    /// (B, nkv, L, hd) -> (B, nh, L, hd), each key/value head repeated for its query group.
    fn expand_kv(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.size();
        let rep = self.n_heads / self.n_kv;
        Ok(x.f_unsqueeze(2)?
            .f_expand([s[0], self.n_kv, rep, s[2], s[3]], false)?
            .f_reshape([s[0], self.n_heads, s[2], s[3]])?)
    }

    /// Softmax attention as grouped matmuls: q (B, nh, T, hd) viewed as (B, nkv, rep*T, hd)
    /// against k, v (B, nkv, L, hd) (strided views of the cache are fine); mask (B, 1, T, L).
    /// Scores and softmax in f32.
    fn attend_grouped(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, hd) = (q.size()[0], q.size()[2], self.head_dim);
        let rep = self.n_heads / self.n_kv;
        let l = k.size()[2];
        // Batched matmuls over (B nkv): a view even for strided cache slices, and faster than
        // the 4-d `matmul` on the CPU for these small per-sequence products.
        let qg = q.f_reshape([b * self.n_kv, rep * t, hd])?;
        let kg = k.f_reshape([b * self.n_kv, l, hd])?;
        let vg = v.f_reshape([b * self.n_kv, l, hd])?;
        let scores = qg
            .f_bmm(&kg.f_transpose(1, 2)?)?
            .f_to_kind(Kind::Float)?
            .f_mul_scalar(self.attn_scale)?
            .f_view([b, self.n_kv, rep, t, l])?;
        // The mask as an additive bias (0 or -inf) broadcast over the heads: the same scores as a
        // masked fill, without materializing the mask for every head.
        let bias = Tensor::f_zeros([b, 1, 1, t, l], (Kind::Float, q.device()))?
            .f_masked_fill(&mask.f_unsqueeze(1)?.f_logical_not()?, f64::NEG_INFINITY)?;
        let probs = scores
            .f_add(&bias)?
            .f_softmax(-1, Kind::Float)?
            .f_to_kind(v.kind())?
            .f_view([b * self.n_kv, rep * t, l])?;
        let out = probs.f_bmm(&vg)?; // (B nkv, rep*T, hd)
        Ok(out.f_reshape([b, self.n_heads, t, hd])?)
    }

    fn mlp_block(&self, l: &Layer, h: &Tensor, routing: &Routing, input: usize) -> Result<Tensor> {
        let x = self.rms_norm(h, &l.mlp_norm)?;
        if let Some((router, m)) = &l.router {
            let replay = match routing.replay.get(input) {
                Some(Some(r)) => Some(r.f_select(r.dim() as i64 - 2, *m as i64)?),
                _ => None,
            };
            let (mut y, idx, flips) = self.experts(l, router, &x, replay, routing.enforce)?;
            if let Some((gate_up, down, gate)) = &l.shared {
                let ff = gate_up.size()[0] / 2;
                let g = x.f_linear::<Tensor>(&gate_up.f_narrow(0, 0, ff)?, None)?;
                let u = x.f_linear::<Tensor>(&gate_up.f_narrow(0, ff, ff)?, None)?;
                let s = g.f_silu()?.f_mul(&u)?.f_linear::<Tensor>(down, None)?;
                let w = x.f_linear::<Tensor>(gate, None)?.f_sigmoid()?;
                y = y.f_add(&w.f_mul(&s)?)?;
            }
            if let Some(valid) = routing.valid.get(input) {
                let (e, k) = (router.size()[0], self.top_k);
                let probs = x
                    .f_reshape([-1, *x.size().last().unwrap_or(&1)])?
                    .f_linear::<Tensor>(router, None)?
                    .f_softmax(-1, Kind::Float)?; // (N, E), in the graph
                let v = valid.f_reshape([-1])?.f_to_device(probs.device())?;
                let vf = v.f_to_kind(Kind::Float)?.f_unsqueeze(1)?;
                let psum = probs.f_mul(&vf)?.f_sum_dim_intlist(0, false, Kind::Float)?;
                let chosen = idx
                    .f_reshape([-1, k])?
                    .f_index_select(0, &v.f_nonzero()?.f_squeeze_dim(1)?)?
                    .f_reshape([-1])?;
                let counts = chosen.f_bincount::<Tensor>(None, e)?;
                let n = v.f_sum(Kind::Int64)?.f_int64_value(&[])?;
                routing
                    .load
                    .borrow_mut()
                    .insert((input, *m), (counts, psum, n));
            }
            routing.recorded.borrow_mut().insert((input, *m), idx);
            if let Some(f) = flips {
                routing.flips.borrow_mut().insert((input, *m), f);
            }
            return Ok(h.f_add(&y)?);
        }
        // Gate and up as two products with row blocks of the fused weight (contiguous views): on
        // the CPU this is ~8% faster than one product of twice the width followed by strided
        // element-wise ops on its halves.
        let ff = l.gate_up.size()[0] / 2;
        let gate = x.f_linear::<Tensor>(&l.gate_up.f_narrow(0, 0, ff)?, None)?; // (B, T, ff)
        let gate = self.plus_lora(l, Target::Gate, &x, gate)?;
        let up = x.f_linear::<Tensor>(&l.gate_up.f_narrow(0, ff, ff)?, None)?;
        let up = self.plus_lora(l, Target::Up, &x, up)?;
        let act = if self.gelu {
            gate.f_gelu("tanh")?
        } else {
            gate.f_silu()?
        }
        .f_mul(&up)?;
        let down = act.f_linear::<Tensor>(&l.down, None)?;
        let mut y = self.plus_lora(l, Target::Down, &act, down)?;
        if let Some(n) = &l.mlp_out_norm {
            y = self.rms_norm(&y, n)?;
        }
        Ok(h.f_add(&y)?)
    }

    /// A mixture-of-experts MLP on `x` `(.., H)`: the router's softmax (f32) picks the top-k
    /// experts of each token (or `replay` `(.., k)` does, where >= 0), their weights are the
    /// router probabilities (renormalised with `norm_topk_prob`), and each expert runs once on
    /// all the tokens routed to it (assignments sorted by expert). Returns the output, the
    /// experts used `(.., k)`, and with `replay` the (flipped, replayed) token counts.
    #[allow(clippy::type_complexity)]
    fn experts(
        &self,
        l: &Layer,
        router: &Tensor,
        x: &Tensor,
        replay: Option<Tensor>,
        enforce: bool,
    ) -> Result<(Tensor, Tensor, Option<(i64, i64)>)> {
        let shape = x.size();
        let hdim = *shape.last().unwrap_or(&1);
        let k = self.top_k;
        let flat = x.f_reshape([-1, hdim])?; // (N, H)
        let n = flat.size()[0];
        let experts = router.size()[0];
        let probs = flat
            .f_linear::<Tensor>(router, None)?
            .f_softmax(-1, Kind::Float)?; // (N, E)
        let (_, own) = probs.f_topk(k, -1, true, true)?; // (N, k)
        let (idx, flips) = match replay {
            Some(r) => {
                let r = r.f_reshape([-1, k])?.f_to_device(flat.device())?;
                let given = r.f_ge(0)?;
                let idx = if enforce {
                    r.f_where_self(&given, &own)?
                } else {
                    own.shallow_clone()
                };
                let replayed = given.f_all_dim(1, false)?;
                let (sr, _) = r.f_sort(1, false)?;
                let (so, _) = own.f_sort(1, false)?;
                let flipped = sr
                    .f_ne_tensor(&so)?
                    .f_any_dim(1, false)?
                    .f_logical_and(&replayed)?;
                let count =
                    |t: &Tensor| -> Result<i64> { Ok(t.f_sum(Kind::Int64)?.f_int64_value(&[])?) };
                (idx, Some((count(&flipped)?, count(&replayed)?)))
            }
            None => (own, None),
        };
        let mut w = probs.f_gather(1, &idx, false)?; // (N, k) f32
        if self.norm_topk {
            w = w.f_div(&w.f_sum_dim_intlist(-1, true, Kind::Float)?)?;
        }
        let w = w.f_to_kind(x.kind())?;
        // Assignments grouped by expert: one product per expert over all of its tokens.
        let assigned = idx.f_reshape([-1])?; // (N k)
        let order = assigned.f_argsort_stable(true, 0, false)?;
        let counts = Vec::<i64>::try_from(
            assigned
                .f_bincount::<Tensor>(None, experts)?
                .f_to_device(tch::Device::Cpu)?,
        )
        .map_err(|e| ModelError::Invalid(format!("expert counts: {e}")))?;
        let token = Tensor::f_arange(n, (Kind::Int64, flat.device()))?
            .f_repeat_interleave_self_int(k, 0, None)?
            .f_index_select(0, &order)?; // (N k) token of each sorted assignment
        let xs = flat.f_index_select(0, &token)?;
        let ff = l.gate_up.size()[1] / 2;
        let mut outs = Vec::new();
        let mut off = 0;
        for (e, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let seg = xs.f_narrow(0, off, c)?;
            let gu = l.gate_up.f_select(0, e as i64)?; // (2 ff, H)
            let gate = seg.f_linear::<Tensor>(&gu.f_narrow(0, 0, ff)?, None)?;
            let up = seg.f_linear::<Tensor>(&gu.f_narrow(0, ff, ff)?, None)?;
            let act = gate.f_silu()?.f_mul(&up)?;
            outs.push(act.f_linear::<Tensor>(&l.down.f_select(0, e as i64)?, None)?);
            off += c;
        }
        let ws = w
            .f_reshape([-1])?
            .f_index_select(0, &order)?
            .f_unsqueeze(1)?;
        let ys = Tensor::f_cat(&outs, 0)?.f_mul(&ws)?;
        let out = flat.f_zeros_like()?.f_index_add(0, &token, &ys)?;
        let mut idx_shape = shape[..shape.len() - 1].to_vec();
        idx_shape.push(k);
        Ok((
            out.f_view(shape.as_slice())?,
            idx.f_view(idx_shape.as_slice())?,
            flips,
        ))
    }

    /// `h` plus the layer's attention output `attn` projected (and normalised, for Gemma).
    fn attn_residual(&self, l: &Layer, h: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let y = attn.f_linear(&l.o_w, l.o_b.as_ref())?;
        let mut y = self.plus_lora(l, Target::O, attn, y)?;
        if let Some(n) = &l.attn_out_norm {
            y = self.rms_norm(&y, n)?;
        }
        Ok(h.f_add(&y)?)
    }

    /// Full forward without a cache: hidden states `(B, T, hidden)` after the final norm.
    ///
    /// `ids` `(B, T)` int64; `positions` `(B, T)` rotary positions (for left padding pass
    /// `cumsum(mask) - 1`); `valid` `(B, T)` bool marks real tokens (None: all real). Attention is
    /// causal and ignores padded keys; padded queries attend to themselves only and their outputs
    /// are meaningless but finite. Without `valid` (no padding, or right padding whose pad
    /// positions are ignored) attention is plain causal SDPA.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        valid: Option<&Tensor>,
    ) -> Result<Tensor> {
        let pass = self.pass_full(positions, valid)?;
        let mut out = self.run_layers(&pass, self.embed(&[ids])?)?;
        Ok(out.remove(0))
    }

    /// Every layer, then the final norm, of a pass whose first state is `state` (from
    /// [`Model::embed`]).
    pub fn run_layers(&self, pass: &Pass, mut state: Vec<Tensor>) -> Result<Vec<Tensor>> {
        for i in 0..self.layers.len() {
            state = self.layer(i, pass, &state)?;
        }
        self.final_norm(&state)
    }

    /// What every layer of a [`Model::forward`] pass needs besides its input state `[h]`: the
    /// rotary tables and the attention mask. No parameters are involved.
    pub fn pass_full(&self, positions: &Tensor, valid: Option<&Tensor>) -> Result<Pass> {
        let t = positions.size()[1];
        let device = positions.device();
        // Causal (and, for local layers, within the window of index distance < w, as
        // transformers' sliding mask), ignoring padded keys; None when plain causal will do.
        let mask_for = |window: Option<i64>| -> Result<Option<Tensor>> {
            let window = window.filter(|&w| t > w);
            if valid.is_none() && window.is_none() {
                return Ok(None);
            }
            let mut causal = Tensor::f_ones([t, t], (Kind::Bool, device))?.f_tril(0)?; // (T, T)
            if let Some(w) = window {
                causal = causal
                    .f_logical_and(&Tensor::f_ones([t, t], (Kind::Bool, device))?.f_triu(1 - w)?)?;
            }
            Ok(Some(match valid {
                Some(valid) => {
                    let keys = valid.f_to_kind(Kind::Bool)?.f_unsqueeze(1)?; // (B, 1, T)
                    let eye = Tensor::f_eye(t, (Kind::Bool, device))?;
                    causal
                        .f_logical_and(&keys)?
                        .f_logical_or(&eye)?
                        .f_unsqueeze(1)? // (B, 1, T, T)
                }
                None => causal.f_view([1, 1, t, t])?,
            }))
        };
        let (cos, sin) = self.rope(positions)?;
        let tables = FullTables {
            cos,
            sin,
            mask: mask_for(None)?,
        };
        let local = match (&self.local, self.rope_local(positions)?) {
            (Some((_, w)), Some((cos, sin))) => Some(FullTables {
                cos,
                sin,
                mask: mask_for(Some(*w))?,
            }),
            _ => None,
        };
        Ok(Pass {
            kind: PassKind::Full { tables, local },
            routing: Routing::default(),
        })
    }

    /// The first state of a pass: the embeddings of each of its inputs (`[ids]` for a
    /// [`Model::pass_full`] pass, `[prompts, conts]` for a [`Model::pass_grouped`] one).
    pub fn embed(&self, ids: &[&Tensor]) -> Result<Vec<Tensor>> {
        ids.iter()
            .map(|x| {
                let e = Tensor::f_embedding(&self.embed, x, -1, false, false)?;
                Ok(match self.embed_scale {
                    Some(s) => e.f_mul_scalar(s)?,
                    None => e,
                })
            })
            .collect()
    }

    /// The index of decoder layer `i` among the mixture-of-experts layers, if it is one.
    pub fn moe_index(&self, i: usize) -> Option<usize> {
        self.layers.get(i)?.router.as_ref().map(|(_, m)| *m)
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layer `i` of a pass: the state after it. Layer by layer with [`Model::embed`] and
    /// [`Model::final_norm`] this is exactly [`Model::forward`] / [`Model::forward_grouped`];
    /// the trainer uses it to recompute one layer at a time (activation checkpointing).
    pub fn layer(&self, i: usize, pass: &Pass, state: &[Tensor]) -> Result<Vec<Tensor>> {
        let l = self.layers.get(i).ok_or_else(|| {
            ModelError::Invalid(format!("layer {i} of a {}-layer model", self.layers.len()))
        })?;
        // A sliding-window layer reads the local tables when the pass has them.
        fn pick<'a, T>(l: &Layer, tables: &'a T, local: &'a Option<T>) -> &'a T {
            match local {
                Some(t) if l.sliding => t,
                _ => tables,
            }
        }
        let r = &pass.routing;
        match (&pass.kind, state) {
            (PassKind::Full { tables, local }, [h]) => {
                let tb = pick(l, tables, local);
                let x = self.rms_norm(h, &l.attn_norm)?;
                let (q, k, v) = self.qkv(l, &x, &tb.cos, &tb.sin)?;
                let attn = self.attend(&q, &k, &v, tb.mask.as_ref())?;
                Ok(vec![self.mlp_block(
                    l,
                    &self.attn_residual(l, h, &attn)?,
                    r,
                    0,
                )?])
            }
            (
                PassKind::Grouped {
                    tables,
                    local,
                    gidx,
                },
                [hp, hc],
            ) => {
                let tb = pick(l, tables, local);
                let xp = self.rms_norm(hp, &l.attn_norm)?;
                let (qp, kp, vp) = self.qkv(l, &xp, &tb.cos_p, &tb.sin_p)?; // (G, heads, P, hd)
                let ap = self.attend(&qp, &kp, &vp, tb.mask_p.as_ref())?;
                let xc = self.rms_norm(hc, &l.attn_norm)?;
                let (qc, kc, vc) = self.qkv(l, &xc, &tb.cos_c, &tb.sin_c)?; // (N, heads, R, hd)
                let keys = Tensor::f_cat(&[kp.f_index_select(0, gidx)?, kc], 2)?; // (N, nkv, P + R, hd)
                let values = Tensor::f_cat(&[vp.f_index_select(0, gidx)?, vc], 2)?;
                let ac = self.attend(&qc, &keys, &values, Some(&tb.mask))?;
                Ok(vec![
                    self.mlp_block(l, &self.attn_residual(l, hp, &ap)?, r, 0)?,
                    self.mlp_block(l, &self.attn_residual(l, hc, &ac)?, r, 1)?,
                ])
            }
            _ => Err(ModelError::Invalid(format!(
                "layer {i}: a state of {} tensors does not fit this pass",
                state.len()
            ))),
        }
    }

    /// The final norm of each tensor of the last state: the hidden states the head reads.
    pub fn final_norm(&self, state: &[Tensor]) -> Result<Vec<Tensor>> {
        state.iter().map(|h| self.rms_norm(h, &self.norm)).collect()
    }

    /// Forward through a KV cache: writes the keys/values of the valid tokens of each row into
    /// its slot at positions `start[b]..start[b] + lens[b]` and attends over the slot's cached
    /// prefix plus the new tokens. Returns hidden states `(B, T, hidden)` after the final norm.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        w: &CacheWrite,
    ) -> Result<Tensor> {
        self.forward_cached_routed(ids, cache, w, &Routing::default())
    }

    /// [`Model::forward_cached`] that records the experts each token was routed to in `routing`
    /// (input 0, `(B, T, moe_layers, k)`), for routing replay in the trainer.
    pub fn forward_cached_routed(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        w: &CacheWrite,
        routing: &Routing,
    ) -> Result<Tensor> {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let device = ids.device();
        if w.lens.len() as i64 != b || w.start.len() as i64 != b || w.slots_host.len() as i64 != b {
            return Err(ModelError::Invalid(
                "forward_cached: slots/start/lens must have one entry per row".into(),
            ));
        }
        let key_len = w
            .start
            .iter()
            .zip(w.lens)
            .map(|(s, l)| s + l)
            .max()
            .unwrap_or(0);
        if key_len > cache.max_len {
            return Err(ModelError::Invalid(format!(
                "sequence of {key_len} tokens exceeds the KV cache length {}",
                cache.max_len
            )));
        }
        let start = Tensor::from_slice(w.start).f_to_device(device)?; // (B,)
        let steps = Tensor::f_arange(t, (Kind::Int64, device))?;
        let positions = start.f_unsqueeze(1)?.f_add(&steps.f_unsqueeze(0)?)?; // (B, T)
                                                                              // A prefill from position 0 attends only to its own tokens.
        let fresh = w.start.iter().all(|&s| s == 0);
        // Otherwise key j is visible to query t of row b iff j <= start[b] + t.
        let mask = if fresh {
            None
        } else {
            let keys = Tensor::f_arange(key_len, (Kind::Int64, device))?;
            let visible = keys
                .f_view([1, 1, key_len])?
                .f_le_tensor(&positions.f_unsqueeze(2)?)?;
            Some(visible.f_unsqueeze(1)?) // (B, 1, T, key_len)
        };
        // Cache coordinates of the valid tokens.
        let all_valid = w.lens.iter().all(|&l| l == t);
        let (slot_idx, pos_idx, row_idx) = if all_valid {
            let slot_idx = w
                .slots
                .f_unsqueeze(1)?
                .f_expand([b, t], false)?
                .f_reshape([-1])?;
            (slot_idx, positions.f_reshape([-1])?, None)
        } else {
            let mut rows = Vec::new();
            let mut slots = Vec::new();
            let mut pos = Vec::new();
            for (r, ((&s, &st), &len)) in w.slots_host.iter().zip(w.start).zip(w.lens).enumerate() {
                for j in 0..len {
                    rows.push(r as i64 * t + j);
                    slots.push(s);
                    pos.push(st + j);
                }
            }
            (
                Tensor::from_slice(&slots).f_to_device(device)?,
                Tensor::from_slice(&pos).f_to_device(device)?,
                Some(Tensor::from_slice(&rows).f_to_device(device)?),
            )
        };
        // Whether rows are exactly the slots 0..B in order, so the cache can be read as a view.
        let identity = w.slots_host.iter().enumerate().all(|(i, &s)| s == i as i64);
        let (cos, sin) = self.rope(&positions)?;
        let local_rope = self.rope_local(&positions)?;
        // Sliding-window layers: key j is visible to the query at position p iff
        // p - window < j <= p; only needed once the keys span more than the window.
        let span = if fresh { t } else { key_len };
        let local_mask = match &self.local {
            Some((_, window)) if span > *window => {
                let keys = Tensor::f_arange(span, (Kind::Int64, device))?.f_view([1, 1, span])?;
                let pos = positions.f_unsqueeze(2)?; // (B, T, 1)
                let visible = keys
                    .f_le_tensor(&pos)?
                    .f_logical_and(&pos.f_sub(&keys)?.f_lt(*window)?)?;
                Some(visible.f_unsqueeze(1)?) // (B, 1, T, span)
            }
            _ => None,
        };
        let mut h = self.embed(&[ids])?.remove(0);
        crate::profile::mark(device, "forward/setup");
        for (i, l) in self.layers.iter().enumerate() {
            let x = self.rms_norm(&h, &l.attn_norm)?;
            let (cos, sin) = match (&local_rope, l.sliding) {
                (Some((c, s)), true) => (c, s),
                _ => (&cos, &sin),
            };
            let lmask = if l.sliding { local_mask.as_ref() } else { None };
            let (q, k, v) = self.qkv(l, &x, cos, sin)?;
            crate::profile::mark(device, "forward/qkv_rope");
            for (new, store) in [(&k, &mut cache.k[i]), (&v, &mut cache.v[i])] {
                let flat = new
                    .f_transpose(1, 2)?
                    .f_reshape([b * t, self.n_kv, self.head_dim])?; // (B T, nkv, hd)
                let vals = match &row_idx {
                    Some(rows) => flat.f_index_select(0, rows)?,
                    None => flat,
                };
                let _ =
                    store.f_index_put_(&[Some(&slot_idx), None, Some(&pos_idx)], &vals, false)?;
            }
            crate::profile::mark(device, "forward/cache_write");
            let attn = if fresh {
                // Nothing cached before these tokens: causal attention over them alone (right
                // padding only follows the valid tokens, so causality keeps pads out).
                self.attend(&q, &k, &v, lmask)?
            } else {
                let (kc, vc) = if identity {
                    (
                        cache.k[i].f_narrow(0, 0, b)?.f_narrow(2, 0, key_len)?,
                        cache.v[i].f_narrow(0, 0, b)?.f_narrow(2, 0, key_len)?,
                    )
                } else {
                    (
                        cache.k[i]
                            .f_narrow(2, 0, key_len)?
                            .f_index_select(0, w.slots)?,
                        cache.v[i]
                            .f_narrow(2, 0, key_len)?
                            .f_index_select(0, w.slots)?,
                    )
                }; // (B, nkv, key_len, hd)
                self.attend(&q, &kc, &vc, lmask.or(mask.as_ref()))?
            };
            crate::profile::mark(device, "forward/attention");
            h = self.attn_residual(l, &h, &attn)?;
            h = self.mlp_block(l, &h, routing, 0)?;
            crate::profile::mark(device, "forward/o_proj_mlp");
        }
        self.rms_norm(&h, &self.norm)
    }

    /// Forward of prompts shared by groups of continuations, for training on GRPO groups: each
    /// prompt runs once and every continuation attends to its group's prompt keys/values, so a
    /// group of `n` samples costs one prompt plus `n` responses instead of `n` full sequences.
    /// Numerically it is the full forward of each prompt + continuation (same positions, same
    /// masks), and gradients flow through the shared prompt to every continuation.
    ///
    /// `prompts` `(G, P)` right-padded with `prompt_lens[g]` valid tokens; `conts` `(N, R)`
    /// right-padded continuation tokens, row `i` continuing prompt `groups[i]`. Returns the final
    /// hidden states of both, `(G, P, hidden)` and `(N, R, hidden)`.
    pub fn forward_grouped(
        &self,
        prompts: &Tensor,
        prompt_lens: &[i64],
        conts: &Tensor,
        groups: &[i64],
    ) -> Result<(Tensor, Tensor)> {
        let pass = self.pass_grouped(prompts.size(), prompt_lens, conts.size(), groups)?;
        let mut out = self.run_layers(&pass, self.embed(&[prompts, conts])?)?;
        let hc = out.remove(1);
        Ok((out.remove(0), hc))
    }

    /// The pass of [`Model::forward_grouped`] for prompts of shape `(G, P)` and continuations
    /// of shape `(N, R)`: rotary tables of both, each continuation's group, and the mask by which
    /// a continuation sees its prompt's valid keys and its own earlier tokens. Its states are
    /// `[prompt hidden (G, P, H), continuation hidden (N, R, H)]`.
    pub fn pass_grouped(
        &self,
        prompts_shape: Vec<i64>,
        prompt_lens: &[i64],
        conts_shape: Vec<i64>,
        groups: &[i64],
    ) -> Result<Pass> {
        let (g, p) = (prompts_shape[0], prompts_shape[1]);
        let (n, r) = (conts_shape[0], conts_shape[1]);
        let device = self.device();
        if prompt_lens.len() as i64 != g
            || groups.len() as i64 != n
            || groups.iter().any(|&x| x < 0 || x >= g)
        {
            return Err(ModelError::Invalid(
                "forward_grouped: one length per prompt and a valid group per continuation".into(),
            ));
        }
        let pos_p = Tensor::f_arange(p, (Kind::Int64, device))?
            .f_unsqueeze(0)?
            .f_expand([g, p], false)?;
        let starts: Vec<i64> = groups.iter().map(|&x| prompt_lens[x as usize]).collect();
        let starts = Tensor::from_slice(&starts).f_to_device(device)?; // (N,)
        let pos_c = starts
            .f_unsqueeze(1)?
            .f_add(&Tensor::f_arange(r, (Kind::Int64, device))?.f_unsqueeze(0)?)?; // (N, R)
        let gidx = Tensor::from_slice(groups).f_to_device(device)?;
        // Continuation row i sees its prompt's valid keys and its own earlier tokens; with a
        // window w (local layers) only those less than w positions back.
        let masks = |window: Option<i64>| -> Result<(Option<Tensor>, Tensor)> {
            let window = window.filter(|&w| p + r > w);
            let keys = Tensor::f_arange(p, (Kind::Int64, device))?.f_view([1, 1, p])?;
            let mut prompt_keys = keys
                .f_lt_tensor(&starts.f_view([n, 1, 1])?)?
                .f_expand([n, r, p], false)?; // (N, R, P)
            let mut own = Tensor::f_ones([r, r], (Kind::Bool, device))?.f_tril(0)?; // (R, R)
            let mut mask_p = None;
            if let Some(w) = window {
                let query = pos_c.f_unsqueeze(2)?; // (N, R, 1)
                prompt_keys = prompt_keys.f_logical_and(&query.f_sub(&keys)?.f_lt(w)?)?;
                own = own
                    .f_logical_and(&Tensor::f_ones([r, r], (Kind::Bool, device))?.f_triu(1 - w)?)?;
                if p > w {
                    mask_p = Some(
                        Tensor::f_ones([p, p], (Kind::Bool, device))?
                            .f_tril(0)?
                            .f_triu(1 - w)?
                            .f_view([1, 1, p, p])?,
                    );
                }
            }
            let own = own.f_expand([n, r, r], false)?;
            let mask = Tensor::f_cat(&[prompt_keys, own], 2)?.f_unsqueeze(1)?; // (N, 1, R, P + R)
            Ok((mask_p, mask))
        };
        let tables = |f: &Tensor, window: Option<i64>| -> Result<GroupedTables> {
            let (cos_p, sin_p) = self.rope_with(f, &pos_p)?;
            let (cos_c, sin_c) = self.rope_with(f, &pos_c)?;
            let (mask_p, mask) = masks(window)?;
            Ok(GroupedTables {
                cos_p,
                sin_p,
                cos_c,
                sin_c,
                mask_p,
                mask,
            })
        };
        Ok(Pass {
            kind: PassKind::Grouped {
                tables: tables(&self.inv_freq, None)?,
                local: match &self.local {
                    Some((f, w)) => Some(tables(f, Some(*w))?),
                    None => None,
                },
                gidx,
            },
            routing: Routing::default(),
        })
    }

    /// Logits `(..., vocab)` of hidden states, in the model dtype.
    /// Logits `(..., vocab)` in f32. With bf16/f16 weights the projection is computed in f32
    /// (hidden states and weights upcast): logits rounded to bf16 would be off by up to a
    /// sixteenth at typical magnitudes, and the generator and trainer must see the same numbers.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.lm_head.f_to_kind(Kind::Float)?;
        Ok(hidden
            .f_to_kind(Kind::Float)?
            .f_linear::<Tensor>(&w, None)?)
    }
}

/// Queries per row up to which masked attention uses [`Model::attend_grouped`] (decoding).
const DECODE_QUERIES: i64 = 4;

/// `RLRUN_ATTENTION_GQA=native` makes CUDA use SDPA's `enable_gqa` instead of expanded heads
/// (for comparing kernels).
fn native_gqa() -> bool {
    static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NATIVE.get_or_init(|| std::env::var("RLRUN_ATTENTION_GQA").is_ok_and(|v| v == "native"))
}

/// Inverse rotary frequencies `(head_dim / 2,)` f32 and the attention scaling, as transformers
/// computes them (`modeling_rope_utils.py`): f32 arithmetic on CPU, then adjusted by rope type.
pub fn rope_inv_freq(cfg: &Config) -> Result<(Tensor, f64)> {
    let scaling = cfg
        .rope_scaling_kind()
        .map_err(|m| ModelError::Invalid(format!("rope parameters: {m}")))?;
    inv_freq_for(cfg.head_dim(), cfg.rope_theta(), &scaling)
}

/// Inverse rotary frequencies of `dim` with base `base` and `scaling`.
fn inv_freq_for(dim: i64, base: f64, scaling: &RopeScaling) -> Result<(Tensor, f64)> {
    let exponents = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, tch::Device::Cpu))?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(dim as f64)?;
    let inv_freq = Tensor::f_full([], base, (Kind::Float, tch::Device::Cpu))?
        .f_pow(&exponents)?
        .f_reciprocal()?;
    let inv_freq = match *scaling {
        RopeScaling::Default => inv_freq,
        RopeScaling::Linear { factor } => inv_freq.f_div_scalar(factor)?,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            let wavelen = inv_freq
                .f_reciprocal()?
                .f_mul_scalar(2.0 * std::f64::consts::PI)?;
            let scaled = inv_freq.f_div_scalar(factor)?;
            let llama = scaled.f_where_self(&wavelen.f_gt(low_freq_wavelen)?, &inv_freq)?;
            let smooth = wavelen
                .f_reciprocal()?
                .f_mul_scalar(old)?
                .f_sub_scalar(low_freq_factor)?
                .f_div_scalar(high_freq_factor - low_freq_factor)?;
            let smoothed = smooth
                .f_neg()?
                .f_add_scalar(1.0)?
                .f_mul(&llama)?
                .f_div_scalar(factor)?
                .f_add(&smooth.f_mul(&llama)?)?;
            let is_medium = wavelen
                .f_lt(high_freq_wavelen)?
                .f_logical_not()?
                .f_logical_and(&wavelen.f_gt(low_freq_wavelen)?.f_logical_not()?)?;
            smoothed.f_where_self(&is_medium, &llama)?
        }
    };
    Ok((inv_freq, 1.0))
}
