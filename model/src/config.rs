//! Hugging Face `config.json` for the Llama family (Llama 2/3, Qwen2/2.5, Qwen3, SmolLM2) and
//! Gemma 3 (text).
//!
//! Field names are those of `config.json` as they are. Both the legacy rope keys (`rope_theta`,
//! `rope_scaling`, Gemma's `rope_local_base_freq`) and the `rope_parameters` dict written by
//! transformers 5 (one dict, or one per layer type for Gemma 3) are read.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// `model_type` values this crate can build.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma3_text",
];

/// The architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3 and SmolLM2 (optional `attention_bias` on q/k/v/o).
    Llama,
    /// Qwen2 / Qwen2.5: bias on q/k/v, none on o.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k before rotary embeddings.
    Qwen3,
    /// Qwen3-MoE: Qwen3 attention; the MLP of its sparse layers is a top-k mixture of experts.
    Qwen3Moe,
    /// Qwen2-MoE (Qwen1.5-MoE): Qwen2 attention (`qkv_bias`); top-k experts plus a shared expert
    /// scaled by a sigmoid gate.
    Qwen2Moe,
    /// Gemma 3 (text): q/k norms, norms before and after attention and MLP with `(1 + w)`
    /// weights, scaled embeddings, GELU-tanh MLP, local sliding-window layers with their own
    /// RoPE base between global ones.
    Gemma3,
}

/// One token id or several (`eos_token_id` may be a list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Rotary embedding parameters (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<i64>,
}

/// `rope_parameters`: one dict, or one per layer type (Gemma 3: `full_attention`,
/// `sliding_attention`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RopeParametersField {
    PerLayerType(std::collections::BTreeMap<String, RopeParameters>),
    One(RopeParameters),
}

/// The two kinds of attention layer Gemma 3 interleaves (`layer_types`).
pub const FULL_ATTENTION: &str = "full_attention";
pub const SLIDING_ATTENTION: &str = "sliding_attention";

/// The rotary-embedding variant, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
}

/// A model's `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParametersField>,
    /// Gemma 3's legacy key for the RoPE base of its sliding-window layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Gemma's name for the MLP activation (takes precedence over `hidden_act`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Gemma 3: attention scores are scaled by `query_pre_attn_scalar^-0.5` (default `head_dim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: keys more than `sliding_window - 1` positions back are invisible to a
    /// `sliding_attention` layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<i64>,
    /// Gemma 3: `full_attention` or `sliding_attention` per layer (default: every sixth global).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
    /// Mixture of experts (Qwen3-MoE): experts per sparse layer.
    #[serde(
        default,
        alias = "num_local_experts",
        skip_serializing_if = "Option::is_none"
    )]
    pub num_experts: Option<i64>,
    /// Experts each token is routed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<i64>,
    /// Hidden size of each expert's MLP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<i64>,
    /// Every `decoder_sparse_step`-th layer is sparse (default 1: all)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_sparse_step: Option<i64>,
    /// ... except these, which keep a dense MLP of `intermediate_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_only_layers: Option<Vec<i64>>,
    /// Renormalise the top-k routing weights to sum to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// Coefficient of the load-balancing loss in transformers (rlrun's is set in the recipe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_aux_loss_coef: Option<f64>,
    /// Qwen2-MoE: hidden size of the shared expert every token also goes through (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_intermediate_size: Option<i64>,
    /// Qwen2-MoE: bias on the q/k/v projections (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qkv_bias: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_position_embeddings() -> i64 {
    2048
}
fn default_hidden_act() -> String {
    "silu".into()
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: Config = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the fields this crate relies on; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        self.architecture(path)?;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
        ] {
            if v <= 0 {
                return Err(err(format!("`{name}` must be positive, got {v}")));
            }
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return Err(err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            )));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(err(format!(
                "`hidden_size` ({}) is not a multiple of `num_attention_heads` ({}) and no `head_dim` is given",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.head_dim() % 2 != 0 {
            return Err(err(format!(
                "`head_dim` must be even, got {}",
                self.head_dim()
            )));
        }
        let (act, supported) = match self.arch() {
            Architecture::Gemma3 => (self.activation(), "gelu_pytorch_tanh"),
            _ => (self.activation(), "silu"),
        };
        if act != supported {
            return Err(err(format!(
                "`hidden_act` = \"{act}\" is not supported for `{}` (only \"{supported}\")",
                self.model_type
            )));
        }
        if matches!(self.arch(), Architecture::Qwen3Moe | Architecture::Qwen2Moe) {
            let (e, k, ff) = self.moe().ok_or_else(|| {
                err(format!(
                    "`num_experts` and `num_experts_per_tok` are required for {}",
                    self.model_type
                ))
            })?;
            if k <= 0 || k > e || ff <= 0 {
                return Err(err(format!(
                    "`num_experts_per_tok` ({k}) must be in 1..={e} and `moe_intermediate_size` ({ff}) positive"
                )));
            }
        }
        if self.arch() == Architecture::Gemma3 {
            for (name, v) in [
                ("final_logit_softcapping", self.final_logit_softcapping),
                ("attn_logit_softcapping", self.attn_logit_softcapping),
            ] {
                if let Some(v) = v {
                    return Err(err(format!(
                        "`{name}` = {v} is not supported (Gemma 3 checkpoints set it to null)"
                    )));
                }
            }
            if self.use_bidirectional_attention == Some(true) {
                return Err(err(
                    "`use_bidirectional_attention` = true is not supported (causal LMs only)"
                        .into(),
                ));
            }
            if let Some(types) = &self.layer_types {
                if types.len() as i64 != self.num_hidden_layers {
                    return Err(err(format!(
                        "`layer_types` has {} entries for {} layers",
                        types.len(),
                        self.num_hidden_layers
                    )));
                }
                if let Some(bad) = types
                    .iter()
                    .find(|t| *t != FULL_ATTENTION && *t != SLIDING_ATTENTION)
                {
                    return Err(err(format!(
                        "`layer_types` entry `{bad}` is not supported ({FULL_ATTENTION}, {SLIDING_ATTENTION})"
                    )));
                }
            }
            if self.sliding_window.is_some_and(|w| w <= 0) {
                return Err(err("`sliding_window` must be positive".into()));
            }
            self.sliding_rope()
                .map_err(|m| err(format!("rope parameters of sliding_attention: {m}")))?;
        }
        if self.mlp_bias {
            return Err(err("`mlp_bias` = true is not supported".into()));
        }
        self.rope_scaling_kind()
            .map_err(|m| err(format!("rope parameters: {m}")))?;
        Ok(())
    }

    /// The architecture named by `model_type`.
    pub fn architecture(&self, path: &Path) -> Result<Architecture> {
        match self.model_type.as_str() {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            "qwen3" => Ok(Architecture::Qwen3),
            "qwen3_moe" => Ok(Architecture::Qwen3Moe),
            "qwen2_moe" => Ok(Architecture::Qwen2Moe),
            "gemma3_text" => Ok(Architecture::Gemma3),
            other => Err(ModelError::UnsupportedArchitecture {
                model_type: other.to_string(),
                path: path.to_path_buf(),
            }),
        }
    }

    /// The architecture; only call on a validated config.
    pub fn arch(&self) -> Architecture {
        self.architecture(Path::new("config.json"))
            .unwrap_or(Architecture::Llama)
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        match self.arch() {
            Architecture::Qwen2 => true,
            Architecture::Qwen2Moe => self.qkv_bias.unwrap_or(true),
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        match self.arch() {
            Architecture::Qwen2 | Architecture::Qwen2Moe => false,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Whether q and k get a per-head RMSNorm (Qwen3, Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(
            self.arch(),
            Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3
        )
    }

    /// The mixture of experts of sparse layers: (experts, experts per token, expert hidden size).
    pub fn moe(&self) -> Option<(i64, i64, i64)> {
        if !matches!(self.arch(), Architecture::Qwen3Moe | Architecture::Qwen2Moe) {
            return None;
        }
        match (self.num_experts, self.num_experts_per_tok) {
            (Some(e), Some(k)) if e > 0 => Some((
                e,
                k,
                self.moe_intermediate_size.unwrap_or(self.intermediate_size),
            )),
            _ => None,
        }
    }

    /// Hidden size of the shared expert of the MoE layers (Qwen2-MoE), if they have one.
    pub fn shared_expert(&self) -> Option<i64> {
        self.shared_expert_intermediate_size
            .filter(|&s| s > 0 && self.moe().is_some())
    }

    /// Whether decoder layer `i` has a mixture of experts instead of a dense MLP.
    pub fn is_moe_layer(&self, i: i64) -> bool {
        self.moe().is_some()
            && !self
                .mlp_only_layers
                .as_ref()
                .is_some_and(|l| l.contains(&i))
            && (i + 1) % self.decoder_sparse_step.unwrap_or(1).max(1) == 0
    }

    /// Gemma-style RMSNorm: weights stored as `w`, applied as `1 + w`, computed in f32.
    pub fn offset_norms(&self) -> bool {
        self.arch() == Architecture::Gemma3
    }

    /// Norms after attention and after the MLP too (Gemma 3's `post_attention_layernorm`,
    /// `pre_feedforward_layernorm`, `post_feedforward_layernorm`).
    pub fn sandwich_norms(&self) -> bool {
        self.arch() == Architecture::Gemma3
    }

    /// The MLP activation: `hidden_activation` (Gemma) or `hidden_act`.
    pub fn activation(&self) -> &str {
        self.hidden_activation
            .as_deref()
            .unwrap_or(&self.hidden_act)
    }

    /// Factor of the embeddings (Gemma: `sqrt(hidden_size)`, rounded to the model dtype).
    pub fn embed_scale(&self) -> Option<f64> {
        (self.arch() == Architecture::Gemma3).then(|| (self.hidden_size as f64).sqrt())
    }

    /// Scale of the attention scores.
    pub fn attention_scale(&self) -> f64 {
        match (self.arch(), self.query_pre_attn_scalar) {
            (Architecture::Gemma3, Some(s)) => 1.0 / s.sqrt(),
            _ => 1.0 / (self.head_dim() as f64).sqrt(),
        }
    }

    /// Whether decoder layer `i` is a sliding-window layer (Gemma 3's `layer_types`, by default
    /// five local layers per global one).
    pub fn is_sliding(&self, i: i64) -> bool {
        if self.arch() != Architecture::Gemma3 {
            return false;
        }
        match &self.layer_types {
            Some(t) => t.get(i as usize).is_some_and(|t| t == SLIDING_ATTENTION),
            None => (i + 1) % 6 != 0,
        }
    }

    /// The sliding window of the sliding layers (Gemma 3 default 4096).
    pub fn window(&self) -> Option<i64> {
        (self.arch() == Architecture::Gemma3).then(|| self.sliding_window.unwrap_or(4096))
    }

    /// The rope parameters of the global layers.
    fn rope_params(&self) -> Option<&RopeParameters> {
        match &self.rope_parameters {
            Some(RopeParametersField::One(p)) => Some(p),
            Some(RopeParametersField::PerLayerType(m)) => m.get(FULL_ATTENTION),
            None => self.rope_scaling.as_ref(),
        }
    }

    /// RoPE base frequency (of the global layers).
    pub fn rope_theta(&self) -> f64 {
        self.rope_params()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(match self.arch() {
                Architecture::Gemma3 => 1_000_000.0,
                _ => 10000.0,
            })
    }

    /// RoPE base and scaling of Gemma 3's sliding-window layers (`rope_parameters.sliding_attention`
    /// or the legacy `rope_local_base_freq`, default 10000).
    pub fn sliding_rope(&self) -> std::result::Result<(f64, RopeScaling), String> {
        let p = match &self.rope_parameters {
            Some(RopeParametersField::PerLayerType(m)) => m.get(SLIDING_ATTENTION),
            _ => None,
        };
        let theta = p
            .and_then(|p| p.rope_theta)
            .or(self.rope_local_base_freq)
            .unwrap_or(10000.0);
        Ok((theta, rope_scaling_of(p)?))
    }

    /// The validated rope scaling (of the global layers).
    pub fn rope_scaling_kind(&self) -> std::result::Result<RopeScaling, String> {
        rope_scaling_of(self.rope_params())
    }
    /// End-of-sequence ids from the config (may be empty).
    pub fn eos_ids(&self) -> Vec<i64> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
}

/// The validated rope scaling of one set of rope parameters (None: default).
fn rope_scaling_of(p: Option<&RopeParameters>) -> std::result::Result<RopeScaling, String> {
    let Some(p) = p else {
        return Ok(RopeScaling::Default);
    };
    let need = |v: Option<f64>, name: &str| v.ok_or_else(|| format!("`{name}` is required"));
    match p.rope_type.as_deref().unwrap_or("default") {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: need(p.factor, "factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need(p.factor, "factor")?,
            low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: p
                .original_max_position_embeddings
                .ok_or("`original_max_position_embeddings` is required")?,
        }),
        other => Err(format!(
            "rope_type `{other}` is not supported (supported: default, linear, llama3)"
        )),
    }
}

/// `generation_config.json` (only the fields rlrun uses).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1
        })
    }

    #[test]
    fn reads_legacy_and_v5_rope_keys() {
        let mut v = base();
        v["rope_theta"] = 500000.0.into();
        v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let c: Config = serde_json::from_value(v).unwrap();
        assert_eq!(c.rope_theta(), 500000.0);
        assert_eq!(
            c.rope_scaling_kind().unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        let mut v = base();
        v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e6});
        let c: Config = serde_json::from_value(v).unwrap();
        assert_eq!(c.rope_theta(), 1e6);
        assert_eq!(c.rope_scaling_kind().unwrap(), RopeScaling::Default);
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let mut v = base();
        v["model_type"] = "gpt_neox".into();
        let c: Config = serde_json::from_value(v).unwrap();
        let e = c
            .validate(Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gpt_neox") && e.contains(&SUPPORTED_MODEL_TYPES.join(", ")),
            "{e}"
        );
        assert!(e.contains("gemma3_text") && e.contains("qwen3_moe"), "{e}");
    }

    #[test]
    fn unsupported_rope_type_is_named() {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let c: Config = serde_json::from_value(v).unwrap();
        let e = c
            .validate(Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("yarn"), "{e}");
    }
}
