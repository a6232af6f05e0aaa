//! LoRA adapters: low-rank updates `W + s · B A` of the attention and MLP projections.
//!
//! The adapters of a model are one flat buffer with their own [`ParamLayout`]
//! ([`ParamLayout::for_lora`]), so the trainer optimizes, clips, checkpoints and syncs them
//! exactly like full weights, only megabytes instead of gigabytes. [`crate::Model::with_lora`]
//! applies them in the forward (`y = x Wᵀ + s · (x Aᵀ) Bᵀ`, PEFT's order); [`merge`] folds them
//! into the base weights (PEFT's `merge_and_unload`).
//!
//! PEFT's format is the exchange format: [`save_peft`] writes `adapter_config.json` +
//! `adapter_model.safetensors` that `PeftModel.from_pretrained` loads, and [`load_peft`] reads
//! such a directory (to initialise a run from an adapter trained elsewhere).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::loader::{self, SafetensorsSource, TensorSource};
use crate::params::{ParamLayout, Weights};

/// A projection an adapter can target (PEFT's module names in recipes and adapter configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Target {
    /// Every target, in layout order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module path inside a decoder layer (`self_attn.q_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// PEFT's name (`q_proj`).
    pub fn name(self) -> &'static str {
        self.module().rsplit('.').next().unwrap_or_default()
    }

    fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// `(in_features, out_features)` of the projection.
    pub fn dims(self, cfg: &Config) -> (i64, i64) {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let ff = cfg.intermediate_size;
        match self {
            Target::Q => (h, nh * hd),
            Target::K | Target::V => (h, nkv * hd),
            Target::O => (nh * hd, h),
            Target::Gate | Target::Up => (h, ff),
            Target::Down => (ff, h),
        }
    }

    /// Whether the target is an MLP projection (gate, up or down).
    pub fn is_mlp(self) -> bool {
        matches!(self, Target::Gate | Target::Up | Target::Down)
    }

    /// Index in [`Target::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// `[model.lora]` in a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank `r` of each adapter.
    pub rank: i64,
    /// `lora_alpha`: the update is scaled by `alpha / rank` (`alpha / sqrt(rank)` with `rslora`).
    pub alpha: f64,
    /// Dropout on the adapter's input. Only 0 is supported: with dropout the trainer's
    /// log-probs would not be the generator's, and every importance ratio would be noise.
    pub dropout: f64,
    /// Projections to adapt (PEFT module names); default all seven.
    pub targets: Vec<Target>,
    /// Rank-stabilised scaling `alpha / sqrt(rank)` (PEFT's `use_rslora`).
    pub rslora: bool,
    /// A PEFT adapter directory to start from (`adapter_config.json` + `adapter_model.safetensors`);
    /// its rank, alpha, targets and scaling replace the ones above. None: PEFT's initialisation
    /// (`A` Kaiming-uniform, `B` zero, so the run starts at the base model).
    pub init: Option<PathBuf>,
    /// Generators merge the adapters into a copy of the base at each sync (`W + s · B A`,
    /// recomputed from the base so nothing drifts) instead of applying them in every forward:
    /// plain projections while decoding, for one more copy of the base in the generator.
    pub merge: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            rslora: false,
            init: None,
            merge: false,
        }
    }
}

impl LoraConfig {
    /// The factor `s` of `W + s · B A`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Checks the settings; the message names the offending key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rank < 1 {
            return Err(format!("rank must be at least 1 (got {})", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("alpha must be > 0 (got {})", self.alpha));
        }
        if self.dropout != 0.0 {
            return Err(format!(
                "dropout {} is not supported: only 0 (with dropout the trainer's log-probs \
                 differ from the generator's at random, so the importance ratios would be noise)",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return Err(
                "targets is empty: name at least one of q_proj, k_proj, v_proj, o_proj, \
                        gate_proj, up_proj, down_proj"
                    .into(),
            );
        }
        Ok(())
    }

    /// The adapters' layout for a model.
    pub fn layout(&self, cfg: &Config) -> Arc<ParamLayout> {
        Arc::new(ParamLayout::for_lora(cfg, &self.targets, self.rank))
    }

    /// The settings with those of the adapter in `self.init` (rank, alpha, targets, rslora), if
    /// any; the adapter's weights are read by [`init_adapters`].
    pub fn resolved(&self) -> Result<LoraConfig> {
        match &self.init {
            None => Ok(self.clone()),
            Some(dir) => {
                let mut c = read_peft_config(dir)?;
                c.init = self.init.clone();
                c.merge = self.merge;
                Ok(c)
            }
        }
    }
}

/// Fresh adapters for `cfg` as PEFT initialises them (`A ~ U(-1/√in, 1/√in)`, i.e. Kaiming-uniform
/// with `a = √5`; `B = 0`), drawn from torch's generator seeded with `seed`; or the adapter of
/// `lora.init`. In f32 on `device`.
pub fn init_adapters(
    cfg: &Config,
    lora: &LoraConfig,
    seed: u64,
    device: Device,
) -> Result<Weights> {
    let lora = lora.resolved()?;
    if let Some(dir) = &lora.init {
        return load_peft(dir, cfg).and_then(|(_, w)| w.to(Kind::Float, device));
    }
    let _g = tch::no_grad_guard();
    let layout = lora.layout(cfg);
    // Drawn on the CPU: the same numbers whatever the device.
    let w = Weights::empty(layout.clone(), Kind::Float, Device::Cpu)?;
    tch::manual_seed(seed as i64);
    for p in layout.params() {
        let mut v = layout.param_view(&w.flat, p)?;
        if p.name.ends_with("lora_A.weight") {
            let bound = 1.0 / (p.shape[1] as f64).sqrt();
            let _ = v.f_uniform_(-bound, bound)?;
        } else {
            let _ = v.f_zero_()?;
        }
    }
    w.to(Kind::Float, device)
}

/// `dst.W = base.W + s · B A` for every adapted projection `W` (computed in f32, stored in
/// `dst`'s dtype); `dst` and `base` may be the same weights (merging in place). Recomputed from
/// `base` each time, so merging new adapters again and again does not drift.
pub fn merge(dst: &Weights, base: &Weights, adapters: &Weights, scale: f64) -> Result<()> {
    let _g = tch::no_grad_guard();
    for p in adapters.layout.params() {
        let Some(module) = p.name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let get = |name: &str| {
            adapters
                .layout
                .param(name)
                .ok_or_else(|| ModelError::Invalid(format!("adapter tensor `{name}` missing")))
        };
        let a = adapters.layout.param_view(&adapters.flat, p)?;
        let b = adapters
            .layout
            .param_view(&adapters.flat, get(&format!("{module}.lora_B.weight"))?)?;
        let spec = base
            .layout
            .param(&format!("{module}.weight"))
            .ok_or_else(|| ModelError::Invalid(format!("base model has no `{module}.weight`")))?;
        let w = base.layout.param_view(&base.flat, spec)?;
        let delta = b
            .f_to_kind(Kind::Float)?
            .f_matmul(&a.f_to_kind(Kind::Float)?)?
            .f_mul_scalar(scale)?;
        let merged = w.f_to_kind(Kind::Float)?.f_add(&delta)?;
        dst.layout.param_view(&dst.flat, spec)?.f_copy_(&merged)?;
    }
    Ok(())
}

/// PEFT's key prefix in `adapter_model.safetensors`.
const PEFT_PREFIX: &str = "base_model.model.";

/// Writes `adapters` as a PEFT LoRA adapter directory (`adapter_config.json`,
/// `adapter_model.safetensors`, each atomically). `base_model` is recorded as
/// `base_model_name_or_path`.
pub fn save_peft(
    dir: &Path,
    lora: &LoraConfig,
    adapters: &Weights,
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let targets: Vec<&str> = lora.targets.iter().map(|t| t.name()).collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
    });
    loader::write_json(&dir.join("adapter_config.json"), &config)?;
    let tensors: Vec<(String, Tensor)> = adapters
        .named_tensors()?
        .into_iter()
        .map(|(n, t)| Ok((format!("{PEFT_PREFIX}{n}"), t.f_to_kind(Kind::Float)?)))
        .collect::<Result<_>>()?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    loader::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, &meta)
}

/// The settings of a PEFT adapter directory; anything rlrun cannot apply exactly (DoRA, per-module
/// ranks, a subset of layers, trained biases, extra modules) is an error naming the field.
pub fn read_peft_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    let bad = |field: &str, what: String| ModelError::Config {
        path: path.clone(),
        message: format!("`{field}`: {what}"),
    };
    if v["peft_type"].as_str() != Some("LORA") {
        return Err(bad("peft_type", format!("{} (only LORA)", v["peft_type"])));
    }
    let empty = |x: &serde_json::Value| {
        x.is_null()
            || x.as_object().is_some_and(|o| o.is_empty())
            || x.as_array().is_some_and(|a| a.is_empty())
    };
    for field in [
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "modules_to_save",
    ] {
        if !empty(&v[field]) {
            return Err(bad(field, format!("{} is not supported", v[field])));
        }
    }
    for field in ["use_dora", "fan_in_fan_out"] {
        if v[field].as_bool() == Some(true) {
            return Err(bad(field, "true is not supported".into()));
        }
    }
    if let Some(b) = v["bias"].as_str().filter(|b| *b != "none") {
        return Err(bad("bias", format!("`{b}` is not supported (only `none`)")));
    }
    let rank = v["r"]
        .as_i64()
        .ok_or_else(|| bad("r", "missing or not an integer".into()))?;
    let alpha = v["lora_alpha"]
        .as_f64()
        .ok_or_else(|| bad("lora_alpha", "missing or not a number".into()))?;
    let targets = match &v["target_modules"] {
        serde_json::Value::String(s) if s == "all-linear" => Target::ALL.to_vec(),
        serde_json::Value::Array(list) => list
            .iter()
            .map(|x| {
                x.as_str().and_then(Target::from_name).ok_or_else(|| {
                    bad(
                        "target_modules",
                        format!("{x} is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?,
        other => {
            return Err(bad(
                "target_modules",
                format!("{other}: expected a list of module names or \"all-linear\""),
            ))
        }
    };
    // In layout order, without duplicates.
    let targets = Target::ALL
        .into_iter()
        .filter(|t| targets.contains(t))
        .collect();
    let lora = LoraConfig {
        rank,
        alpha,
        dropout: 0.0, // dropout is a training-time choice of the run that wrote the adapter
        targets,
        rslora: v["use_rslora"].as_bool().unwrap_or(false),
        init: None,
        merge: false,
    };
    lora.validate().map_err(|m| bad("r", m))?;
    Ok(lora)
}

/// Reads a PEFT LoRA adapter directory for the model `cfg`: its settings and its weights (f32,
/// CPU). A missing or mis-shaped tensor names the file and the tensor.
pub fn load_peft(dir: &Path, cfg: &Config) -> Result<(LoraConfig, Weights)> {
    let lora = read_peft_config(dir)?;
    let file = dir.join("adapter_model.safetensors");
    if !file.exists() {
        return Err(ModelError::MissingFile {
            path: file,
            hint: " (a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors)"
                .into(),
        });
    }
    let src = Prefixed {
        inner: SafetensorsSource::open_files(file.clone(), &[file])?,
    };
    let w = loader::load_weights(lora.layout(cfg), &src, Kind::Float, Device::Cpu)?;
    Ok((lora, w))
}

/// A safetensors file whose keys carry PEFT's prefix.
struct Prefixed {
    inner: SafetensorsSource,
}

impl TensorSource for Prefixed {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn file_of(&self, name: &str) -> PathBuf {
        self.inner.file_of(&format!("{PEFT_PREFIX}{name}"))
    }
    fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.inner.shape(&format!("{PEFT_PREFIX}{name}"))
    }
    fn load_into(&self, name: &str, dst: &mut Tensor) -> Result<()> {
        self.inner.load_into(&format!("{PEFT_PREFIX}{name}"), dst)
    }
}
