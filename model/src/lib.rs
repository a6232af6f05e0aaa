//! `rlrun-model`: decoder-only transformers of the Llama family on libtorch, shared by the
//! trainer and the generator.
//!
//! - [`config`]: Hugging Face `config.json` (Llama 2/3, Qwen2/2.5, Qwen3, SmolLM2).
//! - [`params`]: all weights as views into one flat buffer per model ([`Weights`]).
//! - [`loader`] / [`gguf`]: memory-mapped safetensors (single or sharded) and GGUF loading.
//! - [`llama`]: the model ([`Model`]) with an external [`KvCache`].
//! - [`tokenizer`] / [`chat`]: `tokenizer.json` and Jinja chat templates as transformers renders them.
//! - [`logprobs`]: log-probabilities of target tokens without full-vocab f32 logits for the batch.
//!
//! Open a model with [`ModelFiles::open`] (an HF directory or a `.gguf` file), then
//! [`ModelFiles::load`] it on a device.

pub mod chat;
pub mod config;
pub mod error;
pub mod gguf;
pub mod llama;
pub mod loader;
pub mod logprobs;
pub mod lora;
pub mod params;
pub mod profile;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Config, GenerationConfig};
pub use error::{ModelError, Result};
pub use llama::{CacheWrite, KvCache, Model, Pass, Routing};
pub use lora::{LoraConfig, Target};
pub use params::{ParamLayout, Weights};
pub use tch::{Device, Kind};
pub use tokenizer::Tokenizer;

use loader::{SafetensorsSource, TensorSource};

/// Everything a model path resolves to: config, weights source, tokenizer, chat template.
pub struct ModelFiles {
    /// The directory or `.gguf` file.
    pub path: PathBuf,
    pub config: Arc<Config>,
    pub generation: GenerationConfig,
    pub tokenizer: Tokenizer,
    pub source: Box<dyn TensorSource>,
    layout: Arc<ParamLayout>,
}

impl ModelFiles {
    /// Opens a Hugging Face model directory (`config.json`, safetensors, `tokenizer.json`, ...)
    /// or a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            return Self::open_gguf(path);
        }
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                hint: " (expected a model directory or a .gguf file)".into(),
            });
        }
        if !path.is_dir() {
            return Err(ModelError::Invalid(format!(
                "{}: expected a model directory or a .gguf file",
                path.display()
            )));
        }
        let config = Config::from_file(&path.join("config.json"))?;
        let gen_path = path.join("generation_config.json");
        let generation = if gen_path.exists() {
            GenerationConfig::from_file(&gen_path)?
        } else {
            GenerationConfig::default()
        };
        let tokenizer = Tokenizer::from_dir(path)?;
        let source = SafetensorsSource::open_dir(path)?;
        let layout = Arc::new(ParamLayout::for_config(&config));
        Ok(ModelFiles {
            path: path.to_path_buf(),
            config: Arc::new(config),
            generation,
            tokenizer,
            source: Box::new(source),
            layout,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let g = gguf::GgufModel::open(path)?;
        let tokenizer =
            Tokenizer::from_json(&g.tokenizer_json()?, g.tokenizer_config_json(), path)?;
        let layout = Arc::new(ParamLayout::for_config(&g.config));
        Ok(ModelFiles {
            path: path.to_path_buf(),
            config: Arc::new(g.config.clone()),
            generation: g.generation.clone(),
            tokenizer,
            layout,
            source: Box::new(g),
        })
    }

    pub fn layout(&self) -> &Arc<ParamLayout> {
        &self.layout
    }

    /// Reads the weights onto `device` in `kind`.
    pub fn load_weights(&self, kind: Kind, device: Device) -> Result<Weights> {
        let w = loader::load_weights(self.layout.clone(), self.source.as_ref(), kind, device);
        self.source.release_pages();
        w
    }

    /// The chat template, if the tokenizer has one.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        ChatTemplate::from_tokenizer(&self.tokenizer)
    }

    /// Token ids that end a generation: `generation_config.json`'s `eos_token_id`, else the config's.
    pub fn eos_ids(&self) -> Vec<i64> {
        let mut ids = self
            .generation
            .eos_token_id
            .as_ref()
            .map(config::TokenIds::to_vec)
            .unwrap_or_default();
        if ids.is_empty() {
            ids = self.config.eos_ids();
        }
        ids
    }
}

/// Builds the model over `weights` (views, no copy).
pub fn build_model(config: Arc<Config>, weights: &Weights) -> Result<Model> {
    let chunks = weights.layout.chunk_views(&weights.flat)?;
    Model::new(config, &weights.layout, &chunks)
}

/// Builds the model over `weights` with the LoRA `adapters` applied in its forward (views of
/// both, no copy).
pub fn build_model_with_lora(
    config: Arc<Config>,
    weights: &Weights,
    adapters: &Weights,
    scale: f64,
) -> Result<Model> {
    let chunks = adapters.layout.chunk_views(&adapters.flat)?;
    build_model(config, weights)?.with_lora(&adapters.layout, &chunks, scale)
}

/// Writes a Hugging Face directory (`config.json`, `generation_config.json`, `model.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json`) that transformers' `from_pretrained` loads.
/// Each file is written atomically.
pub fn save_hf_dir(
    dir: &Path,
    config: &Config,
    generation: &GenerationConfig,
    tokenizer: &Tokenizer,
    weights: &Weights,
    kind: Kind,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut cfg = config.clone();
    cfg.torch_dtype = Some(
        match kind {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        }
        .into(),
    );
    let mut cfg_json =
        serde_json::to_value(&cfg).map_err(|e| ModelError::Invalid(e.to_string()))?;
    cfg_json["architectures"] = serde_json::json!([match cfg.arch() {
        config::Architecture::Llama => "LlamaForCausalLM",
        config::Architecture::Qwen2 => "Qwen2ForCausalLM",
        config::Architecture::Qwen3 => "Qwen3ForCausalLM",
        config::Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
        config::Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
        config::Architecture::Gemma3 => "Gemma3ForCausalLM",
    }]);
    loader::write_json(&dir.join("config.json"), &cfg_json)?;
    loader::write_json(&dir.join("generation_config.json"), generation)?;
    let tensors: Vec<(String, tch::Tensor)> = weights
        .named_tensors()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.f_to_kind(kind)?)))
        .collect::<Result<_>>()?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    loader::write_safetensors(&dir.join("model.safetensors"), &tensors, &meta)?;
    let tok_json = tokenizer
        .inner()
        .to_string(true)
        .map_err(|e| ModelError::Invalid(format!("serializing the tokenizer: {e}")))?;
    let tok_path = dir.join("tokenizer.json");
    loader::atomic_write(&tok_path, |f| {
        std::io::Write::write_all(f, tok_json.as_bytes())
    })?;
    loader::write_json(&dir.join("tokenizer_config.json"), &tokenizer.config)?;
    Ok(())
}

/// `rlrun model import`: converts a GGUF file into a Hugging Face directory in `kind`.
pub fn import_gguf(gguf_path: &Path, out: &Path, kind: Kind) -> Result<()> {
    let files = ModelFiles::open_gguf(gguf_path)?;
    let weights = files.load_weights(Kind::Float, Device::Cpu)?;
    save_hf_dir(
        out,
        &files.config,
        &files.generation,
        &files.tokenizer,
        &weights,
        kind,
    )
}
