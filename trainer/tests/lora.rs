//! LoRA against PEFT (`peft`, the reference implementation) on the tiny Llama-3, Qwen2 and Qwen3
//! fixtures: logits, adapter gradients (with and without activation checkpointing), merged
//! weights (`merge_and_unload`), and an exported adapter loaded by `PeftModel.from_pretrained`.
//! Then what LoRA promises of the trainer: only adapters train and are saved, the reference is
//! the base with adapters off, resume is exact, the critic works.

use std::path::Path;

use rlrun_model::lora::{self, LoraConfig, Target};
use rlrun_model::{Device, Kind, ModelFiles, Weights};
use rlrun_testkit::{fixtures, max_abs_diff, read_safetensors, reference, tempdir};
use rlrun_trainer::loss::{Aggregation, KlEstimator, KlLossConfig, LossConfig, PolicyLossConfig};
use rlrun_trainer::{CriticConfig, OptimConfig, TrainBatch, TrainSequence, Trainer, TrainerConfig};
use tch::Tensor;

const TOL: f64 = 1e-5;

fn batch(n: usize, vocab: i64) -> TrainBatch {
    let sequences = (0..n)
        .map(|i| {
            let (p, r) = (3 + (i * 5) % 7, 2 + (i * 3) % 5);
            TrainSequence {
                prompt: (0..p)
                    .map(|j| 3 + ((i / 2 * 31 + j * 17) as i64 % (vocab - 3)))
                    .collect(),
                response: (0..r)
                    .map(|j| 3 + ((i * 29 + j * 13) as i64 % (vocab - 3)))
                    .collect(),
                advantages: (0..r)
                    .map(|j| {
                        if (i + j) % 3 == 0 {
                            -0.7
                        } else {
                            1.0 - 0.1 * i as f32
                        }
                    })
                    .collect(),
                returns: Some(vec![0.5; r]),
                ..Default::default()
            }
        })
        .collect();
    TrainBatch {
        sequences,
        max_response_len: 8,
    }
}

fn pg_config(lora: LoraConfig, checkpointing: bool) -> TrainerConfig {
    TrainerConfig {
        optim: OptimConfig {
            lr: 1e-2,
            ..Default::default()
        },
        loss: PolicyLossConfig {
            loss: LossConfig::Pg {},
            aggregation: Aggregation::TokenMean,
            ..Default::default()
        },
        activation_checkpointing: checkpointing,
        lora: Some(lora),
        ..Default::default()
    }
}

/// max |a - b| over the valid positions of `(B, T, V)` logits.
fn valid_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let invalid = mask.to_kind(Kind::Bool).unsqueeze(-1).logical_not();
    (a - b)
        .abs()
        .masked_fill(&invalid, 0.0)
        .max()
        .double_value(&[])
}

fn logits_with(files: &ModelFiles, base: &Weights, adapters: &Weights, scale: f64) -> Tensor {
    let _g = tch::no_grad_guard();
    let r = read_safetensors(&files.path.join("reference.safetensors"));
    let model =
        rlrun_model::build_model_with_lora(files.config.clone(), base, adapters, scale).unwrap();
    let h = model
        .forward(
            &r["input_ids"],
            &r["position_ids"],
            Some(&r["attention_mask"]),
        )
        .unwrap();
    model.logits(&h).unwrap()
}

fn peft_parity(name: &str, targets: &[&str], rslora: bool) {
    let files = ModelFiles::open(&fixtures().join(name)).unwrap();
    let base = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    let b = batch(5, files.config.vocab_size);
    let tmp = tempdir();
    let spec = tmp.path().join("spec.json");
    std::fs::write(
        &spec,
        serde_json::json!({
            "rank": 4, "alpha": 8, "rslora": rslora, "targets": targets, "seed": 3,
            "sequences": b.sequences.iter().map(|s| serde_json::json!({
                "prompt": s.prompt, "response": s.response, "advantages": s.advantages})).collect::<Vec<_>>(),
        })
        .to_string(),
    )
    .unwrap();
    let dir = files.path.to_str().unwrap();
    reference(&[
        "lora-check",
        dir,
        spec.to_str().unwrap(),
        tmp.path().to_str().unwrap(),
    ]);
    let r = read_safetensors(&tmp.path().join("reference.safetensors"));
    let mask = read_safetensors(&files.path.join("reference.safetensors"))["attention_mask"].copy();

    // The PEFT adapter as written by peft.
    let adapter_dir = tmp.path().join("adapter");
    let (cfg, adapters) = lora::load_peft(&adapter_dir, &files.config).unwrap();
    assert_eq!((cfg.rank, cfg.alpha, cfg.rslora), (4, 8.0, rslora));
    assert_eq!(cfg.targets.len(), targets.len());
    let scale = cfg.scale();

    // 1. Logits.
    let ours = logits_with(&files, &base, &adapters, scale);
    let d = valid_diff(&ours, &r["logits"], &mask);
    eprintln!("{name}: max |Δlogits| vs peft = {d:e}");
    assert!(d <= TOL, "{name}: logits {d:e}");
    // The adapters matter: without them the logits are far off.
    let zero = Weights {
        layout: adapters.layout.clone(),
        flat: adapters.flat.zeros_like(),
    };
    assert!(
        valid_diff(
            &logits_with(&files, &base, &zero, scale),
            &r["logits"],
            &mask
        ) > 1e-2
    );

    // 2. Adapter gradients through the trainer, stored activations and checkpointing.
    for ckpt in [false, true] {
        let lcfg = LoraConfig {
            init: Some(adapter_dir.clone()),
            ..Default::default()
        };
        let mut t = Trainer::new(
            files.config.clone(),
            &base,
            Kind::Float,
            None,
            pg_config(lcfg, ckpt),
        )
        .unwrap();
        let g = t.gradients(&b).unwrap();
        let w = Weights {
            layout: t.weights().layout.clone(),
            flat: g,
        };
        let mut worst: f64 = 0.0;
        for (n, g) in w.named_tensors().unwrap() {
            worst = worst.max(max_abs_diff(&g, &r[&format!("grad.{n}")]));
        }
        eprintln!("{name}: checkpointing {ckpt}: max |Δgrad| vs peft = {worst:e}");
        assert!(worst <= TOL, "{name}: gradients {worst:e}");
    }

    // 3. Merged weights = merge_and_unload.
    let merged = base.to(Kind::Float, Device::Cpu).unwrap();
    lora::merge(&merged, &merged, &adapters, scale).unwrap();
    let mut worst: f64 = 0.0;
    let mut changed = 0;
    for (n, t) in merged.named_tensors().unwrap() {
        let want = &r[&format!("merged.{n}")];
        worst = worst.max(max_abs_diff(&t, want));
        let orig = base
            .layout
            .param_view(&base.flat, base.layout.param(&n).unwrap())
            .unwrap();
        changed += usize::from(max_abs_diff(&t, &orig) > 1e-3);
    }
    eprintln!("{name}: max |Δmerged| vs merge_and_unload = {worst:e} ({changed} tensors changed)");
    assert!(worst <= TOL, "{name}: merged {worst:e}");
    assert_eq!(
        changed,
        targets.len() * files.config.num_hidden_layers as usize
    );

    // 4. Our export loads in peft with the same logits.
    let export = tmp.path().join("export");
    lora::save_peft(&export, &cfg, &adapters, dir).unwrap();
    let out = tmp.path().join("peft_logits.safetensors");
    reference(&[
        "peft-logits",
        dir,
        export.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let d = valid_diff(&ours, &read_safetensors(&out)["logits"], &mask);
    eprintln!("{name}: exported adapter in peft: max |Δlogits| = {d:e}");
    assert!(d <= TOL, "{name}: exported {d:e}");
}

#[test]
fn llama3_lora_matches_peft() {
    peft_parity(
        "tiny-llama3",
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        false,
    );
}

#[test]
fn qwen2_lora_on_some_projections_matches_peft() {
    // q and v without k (zeros between them in the fused projection), down without gate/up.
    peft_parity("tiny-qwen2", &["q_proj", "v_proj", "down_proj"], false);
}

#[test]
fn qwen3_rslora_matches_peft() {
    peft_parity(
        "tiny-qwen3",
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        true,
    );
}

fn qwen2() -> (ModelFiles, Weights) {
    let f = ModelFiles::open(&fixtures().join("tiny-qwen2")).unwrap();
    let w = f.load_weights(Kind::Float, Device::Cpu).unwrap();
    (f, w)
}

fn kl_config(lora: LoraConfig) -> TrainerConfig {
    let mut c = pg_config(lora, true);
    c.loss.kl = Some(KlLossConfig {
        coef: 0.1,
        estimator: KlEstimator::K3,
    });
    c
}

#[test]
fn only_adapters_train_and_the_reference_is_the_base() {
    let (f, w) = qwen2();
    let before = w.flat.copy();
    let b = batch(6, f.config.vocab_size);
    let mut t = Trainer::new(
        f.config.clone(),
        &w,
        Kind::Float,
        None,
        kl_config(LoraConfig::default()),
    )
    .unwrap();
    // Adapters only: rank 8 on all seven projections of 2 layers.
    let lcfg = LoraConfig::default();
    let per_layer: i64 = Target::ALL
        .iter()
        .map(|t| {
            let (i, o) = t.dims(&f.config);
            lcfg.rank * (i + o)
        })
        .sum();
    assert_eq!(
        t.weights().layout.numel(),
        per_layer * f.config.num_hidden_layers
    );
    // B = 0 at the start: the policy is the base, and so is the reference.
    let full = Trainer::new(
        f.config.clone(),
        &w,
        Kind::Float,
        None,
        TrainerConfig::default(),
    )
    .unwrap();
    let base_lp = full.compute_logprobs(&b.sequences).unwrap();
    let close = |a: &Vec<Vec<f32>>, c: &Vec<Vec<f32>>| {
        a.iter()
            .flatten()
            .zip(c.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(close(&t.compute_logprobs(&b.sequences).unwrap(), &base_lp) < 1e-6);
    for _ in 0..3 {
        let m = t.train_step(&b).unwrap();
        assert!(m["actor/grad_norm"] > 0.0);
    }
    // The policy moved; the reference did not; the base weights were not touched.
    assert!(close(&t.compute_logprobs(&b.sequences).unwrap(), &base_lp) > 1e-3);
    assert!(close(&t.compute_ref_logprobs(&b.sequences).unwrap(), &base_lp) < 1e-6);
    assert_eq!(max_abs_diff(&w.flat, &before), 0.0);
    // A checkpoint holds the adapters (also as a PEFT adapter), not the base.
    let tmp = tempdir();
    t.save(tmp.path()).unwrap();
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    let adapter_bytes = (t.weights().layout.numel() * 4) as u64;
    assert!(size(&tmp.path().join("policy.safetensors")) < adapter_bytes + 64 * 1024);
    let (cfg, saved) = lora::load_peft(tmp.path(), &f.config).unwrap();
    assert_eq!(cfg.targets, Target::ALL.to_vec());
    assert_eq!(max_abs_diff(&saved.flat, &t.weights().flat), 0.0);
}

#[test]
fn lora_resume_is_exact_and_the_critic_trains() {
    let (f, w) = qwen2();
    let b = batch(6, f.config.vocab_size);
    let mut cfg = kl_config(LoraConfig {
        rank: 4,
        targets: vec![Target::Q, Target::V, Target::Down],
        rslora: true,
        ..Default::default()
    });
    cfg.critic = Some(CriticConfig::default());
    cfg.ppo_epochs = 2;
    let new = || Trainer::new(f.config.clone(), &w, Kind::Float, None, cfg.clone()).unwrap();
    let mut a = new();
    let values0 = a.compute_values(&b.sequences).unwrap();
    a.train_step(&b).unwrap();
    let tmp = tempdir();
    a.save(tmp.path()).unwrap();
    let mut resumed = new();
    resumed.load(tmp.path()).unwrap();
    let ma = a.train_step(&b).unwrap();
    let mr = resumed.train_step(&b).unwrap();
    assert_eq!(
        max_abs_diff(&a.weights().flat, &resumed.weights().flat),
        0.0
    );
    assert_eq!(ma["actor/grad_norm"], mr["actor/grad_norm"]);
    assert!(ma["critic/grad_norm"] > 0.0);
    let values = a.compute_values(&b.sequences).unwrap();
    let moved = values0
        .iter()
        .flatten()
        .zip(values.iter().flatten())
        .any(|(x, y)| (x - y).abs() > 1e-4);
    assert!(moved, "critic values did not move");
}

#[test]
fn lora_settings_are_checked() {
    let (f, w) = qwen2();
    for (l, want) in [
        (
            LoraConfig {
                dropout: 0.05,
                ..Default::default()
            },
            "dropout",
        ),
        (
            LoraConfig {
                rank: 0,
                ..Default::default()
            },
            "rank",
        ),
        (
            LoraConfig {
                targets: vec![],
                ..Default::default()
            },
            "targets",
        ),
        (
            LoraConfig {
                init: Some("/nonexistent/adapter".into()),
                ..Default::default()
            },
            "adapter_config.json",
        ),
    ] {
        let e = Trainer::new(f.config.clone(), &w, Kind::Float, None, pg_config(l, true))
            .err()
            .expect("invalid LoRA settings accepted")
            .to_string();
        assert!(e.contains(want), "{e}");
    }
}
