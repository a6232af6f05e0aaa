//! `rlrun model info` and `rlrun chat`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rlrun_generator::{Engine, EngineConfig, Request, SamplingParams};
use rlrun_model::{ChatMessage, ModelFiles};

pub fn info(path: &Path) -> anyhow::Result<()> {
    let files = ModelFiles::open(path)?;
    let c = &files.config;
    println!(
        "{}: {} layers, hidden {}, {} heads / {} kv heads, head_dim {}, vocab {}, tied embeddings: {}",
        c.model_type,
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.head_dim(),
        c.vocab_size,
        c.tie_word_embeddings
    );
    println!("parameters: {}", files.layout().numel());
    println!("eos ids: {:?}", files.eos_ids());
    Ok(())
}

pub fn chat(
    model: &Path,
    message: &str,
    max_tokens: usize,
    device: tch::Device,
) -> anyhow::Result<()> {
    let files = ModelFiles::open(model)?;
    let kind = if device.is_cuda() {
        tch::Kind::BFloat16
    } else {
        tch::Kind::Float
    };
    let weights = files.load_weights(kind, device)?;
    let template = files
        .chat_template()?
        .context("the model has no chat template")?;
    let text = template.render(&[ChatMessage::new("user", message)], true)?;
    let prompt: Vec<i64> = files
        .tokenizer
        .encode(&text, false)?
        .into_iter()
        .map(i64::from)
        .collect();
    let eos = files.eos_ids();
    let tokenizer = Arc::new(files.tokenizer);
    let mut engine = Engine::new(
        files.config.clone(),
        weights,
        eos,
        Some(tokenizer.clone()),
        EngineConfig {
            max_slots: 1,
            max_len: prompt.len() + max_tokens + 1,
            ..Default::default()
        },
    )?;
    engine.submit(Request {
        id: 0,
        prompt,
        params: SamplingParams::greedy(max_tokens),
        key: None,
    })?;
    let done = engine.run_to_completion()?;
    let c = done.first().context("no completion")?;
    let ids: Vec<u32> = c.token_ids.iter().map(|&t| t as u32).collect();
    println!("{}", tokenizer.decode(&ids, true)?);
    Ok(())
}
