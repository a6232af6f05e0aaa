//! `rlrun selftest cuda`: checks of the code paths that differ on a GPU, run by
//! `scripts/device-check.sh` on a machine with CUDA (CI machines have none). Each check prints
//! PASS/FAIL with its figures and all of them go to a JSON report; the exit code is non-zero if
//! any check failed.
//!
//! Checks: model logits on CUDA (f32 against transformers' reference, bf16 against f32), the
//! generator's bf16 log-probs against the trainer's (train/inference mismatch), trainer gradients
//! with activation checkpointing against stored activations, trainer steps in bf16 with f32
//! master weights, NCCL's bucketed broadcast and sum at world size 1 (timed).

use std::path::Path;

use anyhow::{bail, Context, Result};
use rlrun_generator::{Engine, EngineConfig, Request, SamplingParams};
use rlrun_model::{build_model, ChatMessage, ModelFiles};
use rlrun_trainer::loss::{Aggregation, LossConfig, PolicyLossConfig};
use rlrun_trainer::{OptimConfig, TrainBatch, TrainSequence, Trainer, TrainerConfig};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

struct Report {
    checks: Vec<Value>,
    failed: usize,
}

impl Report {
    fn record(&mut self, name: &str, ok: bool, figures: Value) {
        println!("{} {name}: {figures}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.failed += 1;
        }
        self.checks
            .push(json!({"check": name, "pass": ok, "figures": figures}));
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Logits of the reference inputs of a fixture model, on `device` in `kind`, valid positions only.
fn fixture_logits(dir: &Path, device: Device, kind: Kind) -> Result<(Tensor, Tensor)> {
    let files = ModelFiles::open(dir)?;
    let w = files.load_weights(kind, device)?;
    let model = build_model(files.config.clone(), &w)?;
    let r: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("reference.safetensors"))?
            .into_iter()
            .collect();
    let _g = tch::no_grad_guard();
    let ids = r["input_ids"].to_device(device);
    let mask = r["attention_mask"].to_device(device);
    let pos = r["position_ids"].to_device(device);
    let logits = model
        .logits(&model.forward(&ids, &pos, Some(&mask))?)?
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
    let valid = r["attention_mask"].to_kind(Kind::Bool).unsqueeze(-1);
    Ok((
        logits.masked_fill(&valid.logical_not(), 0.0),
        r["logits"].masked_fill(&valid.logical_not(), 0.0),
    ))
}

pub fn cuda(fixtures: &Path, smollm2: Option<&Path>, out: Option<&Path>) -> Result<()> {
    if !tch::Cuda::is_available() {
        bail!("CUDA is not available (is libtorch_cuda.so loaded? set LD_LIBRARY_PATH to torch's lib dir)");
    }
    let dev = Device::Cuda(0);
    let mut rep = Report {
        checks: Vec::new(),
        failed: 0,
    };

    // 0. NCCL through the real library at world size 1 (one GPU: NCCL refuses two ranks on one
    // device): bucketed broadcast and sum of 1 GiB, timed.
    {
        if std::env::var_os("NCCL_SOCKET_IFNAME").is_none() {
            // The group's bootstrap listens on loopback only.
            std::env::set_var("NCCL_SOCKET_IFNAME", "lo");
        }
        use rlrun_weights_sync::nccl;
        let run = || -> Result<Value> {
            let version = nccl::load()?;
            let id = nccl::unique_id()?;
            let comm = nccl::Comm::init(&id, 1, 0, dev, std::time::Duration::from_secs(60))?;
            let t = Tensor::randn([1 << 28], (Kind::Float, dev));
            let before = t.copy();
            let bucket = 64 << 20;
            let mut times = Vec::new();
            for _ in 0..4 {
                let t0 = std::time::Instant::now();
                comm.broadcast(&t, 0, bucket)?;
                let b = t0.elapsed().as_secs_f64();
                let t0 = std::time::Instant::now();
                comm.all_reduce_sum(&t, bucket)?;
                times.push((b, t0.elapsed().as_secs_f64()));
            }
            let unchanged = t.equal(&before);
            let (b, a) = times[times.len() - 1];
            Ok(
                json!({"nccl_version": version, "bytes": 1u64 << 30, "bucket_bytes": bucket,
                "broadcast_ms": b * 1e3, "all_reduce_ms": a * 1e3, "unchanged_at_world_1": unchanged}),
            )
        };
        match run() {
            Ok(v) => {
                let ok = v["unchanged_at_world_1"] == json!(true);
                rep.record(
                    "NCCL world size 1: bucketed broadcast and all-reduce of 1 GiB",
                    ok,
                    v,
                )
            }
            Err(e) => rep.record(
                "NCCL world size 1: bucketed broadcast and all-reduce of 1 GiB",
                false,
                json!({"error": format!("{e:#}")}),
            ),
        }
    }

    // 1. Model parity on CUDA.
    // Gemma 3's masks (sliding windows, CUDA's SDPA with a boolean mask) and the MoE experts
    // (grouped by expert) differ on CUDA too.
    for name in [
        "tiny-llama3",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-gemma3",
        "tiny-qwen3moe",
        "tiny-qwen2moe",
    ] {
        let dir = fixtures.join(name);
        let (ours, want) = fixture_logits(&dir, dev, Kind::Float)?;
        let d32 = max_diff(&ours, &want);
        let (bf, _) = fixture_logits(&dir, dev, Kind::BFloat16)?;
        let dbf = max_diff(&bf, &want);
        let scale = want.abs().max().double_value(&[]);
        rep.record(
            &format!("model parity {name} (CUDA)"),
            d32 <= 1e-4 && dbf <= 0.05 * scale.max(1.0),
            json!({"f32_vs_transformers_max_abs": d32, "bf16_vs_transformers_max_abs": dbf, "logit_scale": scale}),
        );
    }

    // 1b. Trainer gradients on CUDA: activation checkpointing (layers recomputed in the
    // backward, CUDA attention kernels) against stored activations.
    for name in ["tiny-llama3", "tiny-qwen3", "tiny-gemma3", "tiny-qwen3moe"] {
        let files = ModelFiles::open(&fixtures.join(name))?;
        let master = files.load_weights(Kind::Float, dev)?;
        let batch = TrainBatch {
            sequences: (0..6i64)
                .map(|i| TrainSequence {
                    prompt: (0..5 + i % 2).map(|j| 3 + (j * 7 + i / 2) % 50).collect(),
                    response: (0..3 + i).map(|j| 3 + (j * 11 + i) % 50).collect(),
                    advantages: (0..3 + i)
                        .map(|j| if (i + j) % 3 == 0 { -0.5 } else { 1.0 })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            max_response_len: 8,
        };
        let grads = |checkpointing: bool| -> Result<Tensor> {
            let cfg = TrainerConfig {
                activation_checkpointing: checkpointing,
                ..TrainerConfig::default()
            };
            let mut t = Trainer::new(files.config.clone(), &master, Kind::Float, None, cfg)?;
            Ok(t.gradients(&batch)?)
        };
        let (stored, recomputed) = (grads(false)?, grads(true)?);
        let d = max_diff(&stored, &recomputed);
        let scale = stored.abs().max().double_value(&[]);
        rep.record(
            &format!("trainer gradients with activation checkpointing {name} (CUDA f32)"),
            d <= 1e-5 * scale.max(1.0),
            json!({"max_abs_diff": d, "grad_scale": scale}),
        );
    }

    // 1c. Kept KV prefixes (multi-turn): a finished sequence's cache copied out and back in on
    // CUDA; the next turn continues it like a full prefill.
    {
        let files = ModelFiles::open(&fixtures.join("tiny-llama3"))?;
        let run = |keep: usize| -> Result<(Vec<i64>, Vec<f32>, u64)> {
            let mut e = Engine::new(
                files.config.clone(),
                files.load_weights(Kind::Float, dev)?,
                vec![],
                None,
                EngineConfig {
                    max_slots: 4,
                    max_len: 64,
                    prefix_cache_tokens: keep,
                    ..Default::default()
                },
            )?;
            let params = |max_tokens| SamplingParams {
                temperature: 1.0,
                max_tokens,
                stop_token_ids: Some(vec![]),
                seed: Some(3),
                ..Default::default()
            };
            let prompt: Vec<i64> = (0..11).map(|j| 5 + j * 13 % 300).collect();
            e.submit(Request {
                id: 1,
                prompt: prompt.clone(),
                params: params(6),
                key: None,
            })?;
            let first = e.run_to_completion()?.remove(0);
            let mut next = prompt;
            next.extend(&first.token_ids);
            next.extend([7, 8, 9]);
            e.submit(Request {
                id: 2,
                prompt: next,
                params: params(6),
                key: None,
            })?;
            let c = e.run_to_completion()?.remove(0);
            Ok((c.token_ids, c.logprobs, e.stats().prefix_hit_tokens))
        };
        let (full, kept) = (run(0)?, run(1024)?);
        let d = full
            .1
            .iter()
            .zip(&kept.1)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        rep.record(
            "kept KV prefix continues like a full prefill (CUDA f32)",
            full.0 == kept.0 && d <= 1e-4 && kept.2 > 0,
            json!({"max_abs_logprob_diff": d, "prefix_hit_tokens": kept.2}),
        );
    }

    if let Some(model_dir) = smollm2 {
        let files = ModelFiles::open(model_dir)?;
        // 2. bf16 generator vs trainer log-probs on the same tokens (train/inference mismatch).
        let tpl = files.chat_template()?.context("chat template")?;
        let prompts: Vec<Vec<i64>> = (0..32)
            .map(|i| {
                let text = tpl.render(
                    &[ChatMessage::new(
                        "user",
                        format!("Tell me something about the number {}.", 7 * i + 3),
                    )],
                    true,
                )?;
                Ok(files
                    .tokenizer
                    .encode(&text, false)?
                    .into_iter()
                    .map(i64::from)
                    .collect())
            })
            .collect::<Result<_>>()?;
        let gw = files.load_weights(Kind::BFloat16, dev)?;
        let mut engine = Engine::new(
            files.config.clone(),
            gw,
            files.eos_ids(),
            None,
            EngineConfig {
                max_slots: 128,
                max_len: 256,
                ..Default::default()
            },
        )?;
        for (i, p) in prompts.iter().enumerate() {
            engine.submit(Request {
                id: i as u64,
                prompt: p.clone(),
                params: SamplingParams {
                    n: 4,
                    temperature: 1.0,
                    max_tokens: 64,
                    seed: Some(1),
                    ..Default::default()
                },
                key: None,
            })?;
        }
        let done = engine.run_to_completion()?;
        drop(engine);
        let master = files.load_weights(Kind::Float, dev)?;
        let trainer = Trainer::new(
            files.config.clone(),
            &master,
            Kind::BFloat16,
            None,
            TrainerConfig::default(),
        )?;
        let seqs: Vec<TrainSequence> = done
            .iter()
            .map(|c| TrainSequence {
                prompt: prompts[c.request_id as usize].clone(),
                response: c.token_ids.clone(),
                advantages: vec![0.0; c.token_ids.len()],
                ..Default::default()
            })
            .collect();
        let lps = trainer.compute_logprobs(&seqs)?;
        let (mut sum, mut n, mut max) = (0.0f64, 0usize, 0.0f64);
        for (c, lp) in done.iter().zip(&lps) {
            for (a, b) in c.logprobs.iter().zip(lp) {
                let d = (a - b).abs() as f64;
                sum += d;
                n += 1;
                max = max.max(d);
            }
        }
        let mean = sum / n.max(1) as f64;
        rep.record(
            "bf16 generator vs trainer log-probs (SmolLM2-135M, 128 samples)",
            mean <= 1e-2,
            json!({"tokens": n, "mean_abs_diff": mean, "max_abs_diff": max, "goal_mean": 1e-2}),
        );

        // 3. Trainer steps in bf16 with f32 master weights: fit a fixed batch.
        let cfg = TrainerConfig {
            optim: OptimConfig {
                lr: 1e-4,
                weight_decay: 0.0,
                ..Default::default()
            },
            loss: PolicyLossConfig {
                loss: LossConfig::Pg {},
                aggregation: Aggregation::TokenMean,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut t = Trainer::new(files.config.clone(), &master, Kind::BFloat16, None, cfg)?;
        let batch = TrainBatch {
            sequences: seqs
                .iter()
                .take(16)
                .map(|s| TrainSequence {
                    advantages: vec![1.0; s.response.len()],
                    ..s.clone()
                })
                .collect(),
            max_response_len: 64,
        };
        let lp0: f64 = t
            .compute_logprobs(&batch.sequences)?
            .iter()
            .flatten()
            .map(|&x| x as f64)
            .sum();
        let mut last = Default::default();
        for _ in 0..3 {
            last = t.train_step(&batch)?;
        }
        let lp1: f64 = t
            .compute_logprobs(&batch.sequences)?
            .iter()
            .flatten()
            .map(|&x| x as f64)
            .sum();
        let master_kind = t.weights().flat.kind();
        rep.record(
            "trainer bf16 steps (f32 master) raise the log-likelihood of a positive batch",
            lp1 > lp0 && master_kind == Kind::Float,
            json!({"sum_logprob_before": lp0, "sum_logprob_after": lp1, "master_dtype": format!("{master_kind:?}"), "step_metrics": last}),
        );
    }

    println!("{} checks, {} failed", rep.checks.len(), rep.failed);
    if let Some(out) = out {
        std::fs::write(
            out,
            serde_json::to_string_pretty(&json!({"checks": rep.checks}))?,
        )?;
    }
    if rep.failed > 0 {
        bail!("{} selftest check(s) failed", rep.failed);
    }
    Ok(())
}
