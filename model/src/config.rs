//! Hugging Face `config.json` for the Llama family (Llama 2/3, Qwen2/2.5, Qwen3, SmolLM2).
//!
//! Field names are those of `config.json` as they are. Both the legacy rope keys (`rope_theta`,
//! `rope_scaling`) and the `rope_parameters` dict written by transformers 5 are read.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// `model_type` values this crate can build.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "qwen2", "qwen3"];

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
    pub rope_parameters: Option<RopeParameters>,
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
        if self.hidden_act != "silu" {
            return Err(err(format!(
                "`hidden_act` = \"{}\" is not supported (only \"silu\")",
                self.hidden_act
            )));
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
            Architecture::Llama | Architecture::Qwen3 => self.attention_bias.unwrap_or(false),
        }
    }

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        match self.arch() {
            Architecture::Qwen2 => false,
            Architecture::Llama | Architecture::Qwen3 => self.attention_bias.unwrap_or(false),
        }
    }

    /// Whether q and k get a per-head RMSNorm (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.arch() == Architecture::Qwen3
    }

    fn rope_params(&self) -> Option<&RopeParameters> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    /// RoPE base frequency.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// The validated rope scaling.
    pub fn rope_scaling_kind(&self) -> std::result::Result<RopeScaling, String> {
        let Some(p) = self.rope_params() else {
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

    /// End-of-sequence ids from the config (may be empty).
    pub fn eos_ids(&self) -> Vec<i64> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
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
            e.contains("gpt_neox") && e.contains("llama, qwen2, qwen3"),
            "{e}"
        );
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
