//! The parameter layout: every weight of a model is a view into one flat buffer.
//!
//! Parameters are laid out in a fixed order that keeps the tensors a layer uses together
//! contiguous, so fused projections are views too: q, k and v rows (and their biases) follow each
//! other, which makes the fused QKV matrix `[(n_heads + 2 n_kv) * head_dim, hidden]` one view;
//! gate and up rows likewise form the fused gate/up matrix. A *chunk* is such a unit the model
//! reads as one tensor; a *param* is one Hugging Face checkpoint tensor (`model.layers.0.self_attn.q_proj.weight`).
//!
//! One buffer means the optimizer step is a handful of element-wise kernels, gradient all-reduce is
//! one call and weight sync is one transfer, while names and HF layout stay intact for checkpoints.

use std::collections::HashMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::{Result, TorchContext};

/// One Hugging Face tensor inside the flat buffer.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: i64,
    pub numel: i64,
    /// Norm weights and biases: excluded from weight decay.
    pub no_decay: bool,
}

/// A contiguous run of params the model reads as one tensor.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: i64,
    pub numel: i64,
    /// Indices into [`ParamLayout::params`].
    pub params: std::ops::Range<usize>,
}

/// Where each parameter of a model lives in the flat buffer.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    params: Vec<ParamSpec>,
    chunks: Vec<Chunk>,
    chunk_index: HashMap<String, usize>,
    param_index: HashMap<String, usize>,
    numel: i64,
}

struct Builder {
    layout: ParamLayout,
}

impl Builder {
    fn new() -> Self {
        Builder {
            layout: ParamLayout {
                params: Vec::new(),
                chunks: Vec::new(),
                chunk_index: HashMap::new(),
                param_index: HashMap::new(),
                numel: 0,
            },
        }
    }

    /// Adds a chunk made of the given (name, shape) params concatenated along dim 0.
    fn chunk(&mut self, chunk_name: &str, members: &[(String, Vec<i64>)], no_decay: bool) {
        let l = &mut self.layout;
        let start_param = l.params.len();
        let start = l.numel;
        let mut rows = 0;
        for (name, shape) in members {
            let numel: i64 = shape.iter().product();
            l.param_index.insert(name.clone(), l.params.len());
            l.params.push(ParamSpec {
                name: name.clone(),
                shape: shape.clone(),
                offset: l.numel,
                numel,
                no_decay,
            });
            l.numel += numel;
            rows += shape[0];
        }
        let mut shape = members[0].1.clone();
        shape[0] = rows;
        l.chunk_index.insert(chunk_name.to_string(), l.chunks.len());
        l.chunks.push(Chunk {
            name: chunk_name.to_string(),
            shape,
            offset: start,
            numel: l.numel - start,
            params: start_param..l.params.len(),
        });
    }

    fn single(&mut self, name: String, shape: Vec<i64>, no_decay: bool) {
        let n = name.clone();
        self.chunk(&n, &[(name, shape)], no_decay);
    }
}

impl ParamLayout {
    /// The layout of a Llama-family model described by `cfg`.
    pub fn for_config(cfg: &Config) -> Self {
        let mut b = Builder::new();
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let ff = cfg.intermediate_size;
        b.single(
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, h],
            false,
        );
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            b.single(format!("{p}.input_layernorm.weight"), vec![h], true);
            let proj = |n: &str, rows: i64, suffix: &str, cols: Option<i64>| {
                let mut shape = vec![rows];
                shape.extend(cols);
                (format!("{p}.self_attn.{n}_proj.{suffix}"), shape)
            };
            b.chunk(
                &format!("{p}.self_attn.qkv_proj.weight"),
                &[
                    proj("q", nh * hd, "weight", Some(h)),
                    proj("k", nkv * hd, "weight", Some(h)),
                    proj("v", nkv * hd, "weight", Some(h)),
                ],
                false,
            );
            if cfg.qkv_bias() {
                b.chunk(
                    &format!("{p}.self_attn.qkv_proj.bias"),
                    &[
                        proj("q", nh * hd, "bias", None),
                        proj("k", nkv * hd, "bias", None),
                        proj("v", nkv * hd, "bias", None),
                    ],
                    true,
                );
            }
            if cfg.qk_norm() {
                b.single(format!("{p}.self_attn.q_norm.weight"), vec![hd], true);
                b.single(format!("{p}.self_attn.k_norm.weight"), vec![hd], true);
            }
            b.single(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, nh * hd],
                false,
            );
            if cfg.o_bias() {
                b.single(format!("{p}.self_attn.o_proj.bias"), vec![h], true);
            }
            b.single(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                true,
            );
            if cfg.sandwich_norms() {
                b.single(
                    format!("{p}.pre_feedforward_layernorm.weight"),
                    vec![h],
                    true,
                );
            }
            match cfg.moe().filter(|_| cfg.is_moe_layer(i)) {
                Some((experts, _, eff)) => {
                    // The router, then every expert's gate and up rows as one (E, 2 ff, H) view
                    // and their down projections as one (E, H, ff) view.
                    b.single(format!("{p}.mlp.gate.weight"), vec![experts, h], false);
                    let expert = |e: i64, n: &str, shape: Vec<i64>| {
                        (format!("{p}.mlp.experts.{e}.{n}.weight"), shape)
                    };
                    let gate_up: Vec<_> = (0..experts)
                        .flat_map(|e| {
                            [
                                expert(e, "gate_proj", vec![eff, h]),
                                expert(e, "up_proj", vec![eff, h]),
                            ]
                        })
                        .collect();
                    b.chunk(&format!("{p}.mlp.experts.gate_up_proj"), &gate_up, false);
                    let down: Vec<_> = (0..experts)
                        .map(|e| expert(e, "down_proj", vec![h, eff]))
                        .collect();
                    b.chunk(&format!("{p}.mlp.experts.down_proj"), &down, false);
                    if let Some(sff) = cfg.shared_expert() {
                        let s = format!("{p}.mlp.shared_expert");
                        b.chunk(
                            &format!("{s}.gate_up_proj.weight"),
                            &[
                                (format!("{s}.gate_proj.weight"), vec![sff, h]),
                                (format!("{s}.up_proj.weight"), vec![sff, h]),
                            ],
                            false,
                        );
                        b.single(format!("{s}.down_proj.weight"), vec![h, sff], false);
                        b.single(
                            format!("{p}.mlp.shared_expert_gate.weight"),
                            vec![1, h],
                            false,
                        );
                    }
                }
                None => {
                    b.chunk(
                        &format!("{p}.mlp.gate_up_proj.weight"),
                        &[
                            (format!("{p}.mlp.gate_proj.weight"), vec![ff, h]),
                            (format!("{p}.mlp.up_proj.weight"), vec![ff, h]),
                        ],
                        false,
                    );
                    b.single(format!("{p}.mlp.down_proj.weight"), vec![h, ff], false);
                }
            }
            if cfg.sandwich_norms() {
                b.single(
                    format!("{p}.post_feedforward_layernorm.weight"),
                    vec![h],
                    true,
                );
            }
        }
        b.single("model.norm.weight".into(), vec![h], true);
        if !cfg.tie_word_embeddings {
            b.single("lm_head.weight".into(), vec![cfg.vocab_size, h], false);
        }
        b.layout
    }

    /// The layout of LoRA adapters for `cfg`: for each layer and each of `targets` (in
    /// [`crate::lora::Target::ALL`] order), `A` `(rank, in)` then `B` `(out, rank)`, named as
    /// the module they adapt plus `.lora_A.weight` / `.lora_B.weight` (PEFT's names without its
    /// `base_model.model.` prefix). Every adapter tensor gets weight decay, as in PEFT + AdamW.
    pub fn for_lora(cfg: &Config, targets: &[crate::lora::Target], rank: i64) -> Self {
        let mut b = Builder::new();
        for i in 0..cfg.num_hidden_layers {
            for t in crate::lora::Target::ALL {
                // A mixture-of-experts layer has no single gate/up/down projection to adapt.
                if !targets.contains(&t) || (cfg.is_moe_layer(i) && t.is_mlp()) {
                    continue;
                }
                let (fan_in, fan_out) = t.dims(cfg);
                let m = format!("model.layers.{i}.{}", t.module());
                b.single(format!("{m}.lora_A.weight"), vec![rank, fan_in], false);
                b.single(format!("{m}.lora_B.weight"), vec![fan_out, rank], false);
            }
        }
        b.layout
    }

    /// Total number of elements.
    pub fn numel(&self) -> i64 {
        self.numel
    }
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }
    pub fn chunk_position(&self, name: &str) -> Option<usize> {
        self.chunk_index.get(name).copied()
    }
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.param_index.get(name).map(|&i| &self.params[i])
    }

    /// Splits a flat tensor (the weights, their gradients, optimizer state...) into chunk views.
    /// Autograd-friendly: one `split_with_sizes`, whose backward is one concatenation.
    pub fn chunk_views(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        let sizes: Vec<i64> = self.chunks.iter().map(|c| c.numel).collect();
        let parts = flat
            .f_split_with_sizes(&sizes, 0)
            .ctx(|| "splitting the flat parameter buffer".into())?;
        parts
            .iter()
            .zip(&self.chunks)
            .map(|(t, c)| {
                t.f_view(c.shape.as_slice())
                    .ctx(|| format!("view of {}", c.name))
            })
            .collect()
    }

    /// A view of one named HF tensor inside `flat` (no autograd split; for I/O and sync).
    pub fn param_view(&self, flat: &Tensor, spec: &ParamSpec) -> Result<Tensor> {
        flat.f_narrow(0, spec.offset, spec.numel)
            .and_then(|t| t.f_view(spec.shape.as_slice()))
            .ctx(|| format!("view of {}", spec.name))
    }

    /// Contiguous element ranges `(offset, len)` that get weight decay (all but norms and biases).
    pub fn decay_ranges(&self) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for p in self.params.iter().filter(|p| !p.no_decay) {
            match out.last_mut() {
                Some((off, len)) if *off + *len == p.offset => *len += p.numel,
                _ => out.push((p.offset, p.numel)),
            }
        }
        out
    }
}

/// A model's weights: one flat buffer and its layout.
pub struct Weights {
    pub layout: Arc<ParamLayout>,
    pub flat: Tensor,
}

impl Weights {
    /// Uninitialized weights of the given layout on `device` in `kind`.
    pub fn empty(layout: Arc<ParamLayout>, kind: Kind, device: Device) -> Result<Self> {
        let flat = Tensor::f_empty([layout.numel()], (kind, device))
            .ctx(|| format!("allocating {} parameters on {device:?}", layout.numel()))?;
        Ok(Weights { layout, flat })
    }

    pub fn kind(&self) -> Kind {
        self.flat.kind()
    }
    pub fn device(&self) -> Device {
        self.flat.device()
    }

    /// The HF-named tensors, as views of the flat buffer.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.layout
            .params()
            .iter()
            .map(|p| Ok((p.name.clone(), self.layout.param_view(&self.flat, p)?)))
            .collect()
    }

    /// The same buffer (no copy): for sharing frozen weights between a trainer and a generator.
    pub fn shallow_clone(&self) -> Self {
        Weights {
            layout: self.layout.clone(),
            flat: self.flat.shallow_clone(),
        }
    }

    /// A deep copy (on `device` in `kind`).
    pub fn to(&self, kind: Kind, device: Device) -> Result<Self> {
        let flat = self
            .flat
            .f_to_device(device)?
            .f_to_kind(kind)?
            .f_detach_copy()?;
        Ok(Weights {
            layout: self.layout.clone(),
            flat,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tie: bool, arch: &str) -> Config {
        serde_json::from_value(serde_json::json!({
            "model_type": arch, "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": tie
        }))
        .unwrap()
    }

    #[test]
    fn fused_chunks_are_contiguous_views_of_their_params() {
        let c = cfg(false, "qwen2");
        let l = ParamLayout::for_config(&c);
        let qkv = &l.chunks()[l
            .chunk_position("model.layers.1.self_attn.qkv_proj.weight")
            .unwrap()];
        assert_eq!(qkv.shape, vec![(4 + 2 * 2) * 2, 8]);
        let q = l.param("model.layers.1.self_attn.q_proj.weight").unwrap();
        let v = l.param("model.layers.1.self_attn.v_proj.weight").unwrap();
        assert_eq!(q.offset, qkv.offset);
        assert_eq!(v.offset + v.numel, qkv.offset + qkv.numel);
        assert!(
            l.param("model.layers.0.self_attn.k_proj.bias")
                .unwrap()
                .no_decay
        );
        assert!(l.param("lm_head.weight").is_some());
        let sum: i64 = l.params().iter().map(|p| p.numel).sum();
        assert_eq!(sum, l.numel());
    }

    #[test]
    fn tied_embeddings_have_no_lm_head_and_qwen3_has_qk_norm() {
        let l = ParamLayout::for_config(&cfg(true, "qwen3"));
        assert!(l.param("lm_head.weight").is_none());
        assert!(l.param("model.layers.0.self_attn.q_norm.weight").is_some());
        assert!(l.param("model.layers.0.self_attn.q_proj.bias").is_none());
    }

    #[test]
    fn chunk_views_share_storage_and_route_gradients() {
        let l = ParamLayout::for_config(&cfg(false, "llama"));
        let flat = Tensor::zeros([l.numel()], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let views = l.chunk_views(&flat).unwrap();
        let loss = views
            .iter()
            .map(|v| v.sum(Kind::Float))
            .fold(Tensor::from(0.0f32), |a, b| a + b);
        loss.backward();
        let g = flat.grad();
        assert_eq!(g.size(), vec![l.numel()]);
        assert_eq!(g.sum(Kind::Float).double_value(&[]), l.numel() as f64);
    }
}
