//! `rlrun bench memory` and `rlrun bench lora-large`: what frugal training costs and saves.

use std::path::Path;
use std::time::Instant;

use rlrun::actors::{self, ActorConfig, RemoteGenerator, Role};
use rlrun::sync::SyncBackend;
use rlrun_generator::{Engine, EngineConfig, Request, SamplingParams, WeightUpdate};
use rlrun_model::{Config, Device, Kind, LoraConfig, ModelFiles, ParamLayout, Weights};
use rlrun_trainer::{OptimConfig, TrainBatch, TrainSequence, Trainer, TrainerConfig};
use serde_json::{json, Value};

use crate::bench::{machine, median};

fn lora_config(rank: i64) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        ..Default::default()
    }
}

/// Median seconds and bytes of a shared-memory sync from a trainer in this process to a generator
/// process (after two warm-up syncs that create both double-buffer files).
fn sync_seconds(
    model: &Path,
    files: &ModelFiles,
    lora: Option<LoraConfig>,
    iters: usize,
) -> anyhow::Result<(u64, f64)> {
    let tcfg = TrainerConfig {
        lora: lora.clone(),
        ..Default::default()
    };
    let trainer = actors::build_trainer(files, Kind::Float, Device::Cpu, tcfg, false, None)?;
    let cfg = ActorConfig {
        engine: Some(EngineConfig {
            lora: lora.clone(),
            ..Default::default()
        }),
        ..ActorConfig::cpu_generator(model)
    };
    let proc = actors::spawn(Role::Generator, &cfg, &[])?;
    let client = RemoteGenerator::connect(&proc.addr, None, std::time::Duration::from_secs(60))?;
    let mut backend = rlrun::sync::build(
        SyncBackend::Shm,
        &rlrun::sync::SyncOptions {
            adapters: lora.is_some(),
            ..Default::default()
        },
    )?;
    let (mut times, mut bytes) = (Vec::new(), 0);
    for i in 0..iters.max(1) + 2 {
        let out = rlrun::sync::sync(backend.as_mut(), &trainer, &client)?;
        if i >= 2 {
            times.push(out.seconds);
        }
        bytes = out.bytes;
    }
    Ok((bytes, median(times)))
}

/// One `rlrun bench train` in its own process (so its peak memory is its own); its JSON.
fn train_in_process(
    model: &Path,
    batch: i64,
    seq: i64,
    checkpointing: bool,
) -> anyhow::Result<Value> {
    let tmp = tempfile::NamedTempFile::new()?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["bench", "train", "--no-peer", "--iters", "1"])
        .arg("--model")
        .arg(model)
        .args(["--batch", &batch.to_string(), "--seq", &seq.to_string()])
        .arg("--json")
        .arg(tmp.path());
    if checkpointing {
        cmd.arg("--activation-checkpointing");
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "bench train (checkpointing {checkpointing}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_str(&std::fs::read_to_string(tmp.path())?)?)
}

pub fn memory(
    model: &Path,
    rank: i64,
    iters: usize,
    batch: i64,
    seq: i64,
    json_path: Option<&Path>,
) -> anyhow::Result<()> {
    let files = ModelFiles::open(model)?;
    println!("frugal training: {}", model.display());
    println!("  machine: {}", machine());
    let (full_bytes, full_s) = sync_seconds(model, &files, None, iters)?;
    let (lora_bytes, lora_s) = sync_seconds(model, &files, Some(lora_config(rank)), iters)?;
    println!("  weight sync through shared memory to a generator process (median of {iters}):");
    println!(
        "    full weights (f32):        {:>8.1} MB  {:>8.2} ms",
        full_bytes as f64 / 1e6,
        full_s * 1e3
    );
    println!(
        "    LoRA adapters (rank {rank:>3}): {:>8.1} MB  {:>8.2} ms",
        lora_bytes as f64 / 1e6,
        lora_s * 1e3
    );
    println!(
        "    ratio (adapters / full): bytes {:.4}, time {:.4}",
        lora_bytes as f64 / full_bytes as f64,
        lora_s / full_s
    );
    let off = train_in_process(model, batch, seq, false)?;
    let on = train_in_process(model, batch, seq, true)?;
    let (peak_off, peak_on) = (
        off["peak_rss_bytes"].as_f64().unwrap_or(0.0),
        on["peak_rss_bytes"].as_f64().unwrap_or(0.0),
    );
    let (s_off, s_on) = (
        off["seconds"].as_f64().unwrap_or(0.0),
        on["seconds"].as_f64().unwrap_or(0.0),
    );
    println!("  training step (forward + backward + AdamW), batch {batch} x {seq} tokens, f32:");
    println!(
        "    activation checkpointing off: peak {:.2} GB, {s_off:.1} s",
        peak_off / 1e9
    );
    println!(
        "    activation checkpointing on:  peak {:.2} GB, {s_on:.1} s",
        peak_on / 1e9
    );
    println!(
        "    saved {:.2} GB of peak memory ({:.0}%), for {:+.0}% time",
        (peak_off - peak_on) / 1e9,
        100.0 * (peak_off - peak_on) / peak_off.max(1.0),
        100.0 * (s_on / s_off.max(1e-9) - 1.0)
    );
    if let Some(p) = json_path {
        let v = json!({"bench": "memory", "machine": machine(), "model": model,
            "sync": {"full_bytes": full_bytes, "full_s": full_s, "lora_rank": rank,
                     "lora_bytes": lora_bytes, "lora_s": lora_s},
            "checkpointing": {"batch": batch, "seq": seq, "off": off, "on": on}});
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// Qwen2.5-3B's architecture (its `config.json`).
fn qwen25_3b() -> anyhow::Result<Config> {
    Ok(serde_json::from_value(json!({
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
        "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": true
    }))?)
}

fn mem_total() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb * 1024.0)
}

pub fn lora_large(
    steps: usize,
    prompts: usize,
    n: usize,
    max_new: usize,
    rank: i64,
    json_path: Option<&Path>,
) -> anyhow::Result<()> {
    let config = std::sync::Arc::new(qwen25_3b()?);
    let layout = std::sync::Arc::new(ParamLayout::for_config(&config));
    let params = layout.numel() as f64;
    let ram = mem_total();
    println!("LoRA on a random Qwen2.5-3B (f32), generator and trainer in one process");
    println!("  machine: {}, {:.1} GB RAM", machine(), ram / 1e9);
    println!(
        "  {:.2}B parameters, {:.1} GB of f32 weights; full fine-tuning would hold master, \
         gradients, two AdamW moments and the generator's copy: {:.0} GB",
        params / 1e9,
        params * 4.0 / 1e9,
        params * 4.0 * 5.0 / 1e9
    );
    let t = Instant::now();
    let weights = {
        let _g = tch::no_grad_guard();
        let w = Weights::empty(layout.clone(), Kind::Float, Device::Cpu)?;
        tch::manual_seed(0);
        for p in layout.params() {
            let mut v = layout.param_view(&w.flat, p)?;
            if p.name.ends_with("norm.weight") {
                let _ = v.f_fill_(1.0)?;
            } else if p.name.ends_with("bias") {
                let _ = v.f_zero_()?;
            } else {
                let _ = v.f_normal_(0.0, 0.02)?;
            }
        }
        w
    };
    println!("  random weights in {:.0} s", t.elapsed().as_secs_f64());
    let lora = lora_config(rank);
    let prompt_len = 16usize;
    let mut engine = Engine::new(
        config.clone(),
        weights.shallow_clone(),
        Vec::new(),
        None,
        EngineConfig {
            max_slots: prompts * n,
            max_len: prompt_len + max_new + 1,
            lora: Some(lora.clone()),
            ..Default::default()
        },
    )?;
    let mut trainer = Trainer::new(
        config.clone(),
        &weights,
        Kind::Float,
        None,
        TrainerConfig {
            lora: Some(lora),
            optim: OptimConfig {
                lr: 1e-4,
                ..Default::default()
            },
            ..Default::default()
        },
    )?;
    println!(
        "  LoRA rank {rank} on all seven projections: {:.1}M trainable parameters",
        trainer.weights().layout.numel() as f64 / 1e6
    );
    let mut rows = Vec::new();
    for step in 0..steps {
        let t_gen = Instant::now();
        let prompt_ids: Vec<Vec<i64>> = (0..prompts)
            .map(|i| {
                (0..prompt_len)
                    .map(|j| ((step * 7919 + i * 104_729 + j * 13) % 150_000) as i64)
                    .collect()
            })
            .collect();
        for (i, prompt) in prompt_ids.iter().enumerate() {
            engine.submit(Request {
                id: i as u64,
                prompt: prompt.clone(),
                params: SamplingParams {
                    n,
                    max_tokens: max_new,
                    stop_token_ids: Some(Vec::new()),
                    seed: Some(step as u64),
                    ..SamplingParams::default()
                },
                key: None,
            })?;
        }
        let done = engine.run_to_completion()?;
        let gen_s = t_gen.elapsed().as_secs_f64();
        // Advantages of both signs within each prompt's group, as GRPO would give.
        let sequences: Vec<TrainSequence> = done
            .iter()
            .map(|c| TrainSequence {
                prompt: prompt_ids[c.request_id as usize].clone(),
                advantages: vec![if c.index % 2 == 0 { 1.0 } else { -1.0 }; c.token_ids.len()],
                behavior_logprobs: Some(c.logprobs.clone()),
                response: c.token_ids.clone(),
                ..Default::default()
            })
            .collect();
        let t_train = Instant::now();
        trainer.train_step(&TrainBatch {
            sequences,
            max_response_len: max_new,
        })?;
        let train_s = t_train.elapsed().as_secs_f64();
        let t_sync = Instant::now();
        let buf = trainer.sync_buffer()?;
        let sync_bytes = buf.numel() * 4;
        engine.update_weights(trainer.version(), WeightUpdate::Adapters(buf))?;
        let sync_s = t_sync.elapsed().as_secs_f64();
        println!(
            "  step {}: generate {} x {} x {max_new} tokens {gen_s:.1} s, LoRA update {train_s:.1} s, \
             adapter sync {:.1} MB {:.3} s",
            step + 1,
            prompts,
            n,
            sync_bytes as f64 / 1e6,
            sync_s
        );
        rows.push(json!({"generate_s": gen_s, "train_s": train_s, "sync_s": sync_s, "sync_bytes": sync_bytes}));
    }
    let peak = rlrun::metrics::peak_rss().unwrap_or(0) as f64;
    println!(
        "  peak resident memory: {:.1} GB of {:.1} GB (weights {:.1} GB, shared by generator and trainer)",
        peak / 1e9,
        ram / 1e9,
        params * 4.0 / 1e9
    );
    if let Some(p) = json_path {
        let v = json!({"bench": "lora-large", "machine": machine(), "params": params,
            "ram_bytes": ram, "peak_rss_bytes": peak, "steps": rows, "rank": rank,
            "prompts": prompts, "n": n, "max_new": max_new});
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
