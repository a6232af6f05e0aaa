//! Trainer: gradients and AdamW against PyTorch, micro-batch invariance, exact resume, HF export,
//! fitting a fixed batch, the critic, and bf16 compute on the CPU (f32 accumulation and masters).

use std::sync::Arc;

use rlrun_model::{save_hf_dir, Device, Kind, ModelFiles, Weights};
use rlrun_testkit::{fixtures, max_abs_diff, read_safetensors, reference, tempdir};
use rlrun_trainer::loss::{Aggregation, KlEstimator, KlLossConfig, LossConfig, PolicyLossConfig};
use rlrun_trainer::{
    AdamWImpl, CriticConfig, OptimConfig, Schedule, TrainBatch, TrainSequence, Trainer,
    TrainerConfig,
};
use tch::Tensor;

fn files(name: &str) -> ModelFiles {
    ModelFiles::open(&fixtures().join(name)).unwrap()
}

fn weights(f: &ModelFiles) -> Weights {
    f.load_weights(Kind::Float, Device::Cpu).unwrap()
}

/// A deterministic batch: sequences of different lengths, advantages of both signs; consecutive
/// pairs share their prompt (like GRPO groups), so the trainer's shared-prompt path is exercised.
fn batch(n: usize, vocab: i64) -> TrainBatch {
    let mut seqs = Vec::new();
    for i in 0..n {
        let g = i / 2;
        let p = 3 + (g * 5) % 7;
        let r = 1 + (i * 3) % 6;
        let ptok = |j: usize| 3 + ((g * 31 + j * 17) as i64 % (vocab - 3));
        let rtok = |j: usize| 3 + ((i * 29 + j * 13) as i64 % (vocab - 3));
        seqs.push(TrainSequence {
            prompt: (0..p).map(ptok).collect(),
            response: (0..r).map(rtok).collect(),
            advantages: (0..r)
                .map(|j| {
                    if (i + j) % 3 == 0 {
                        -0.7
                    } else {
                        1.0 - 0.1 * i as f32
                    }
                })
                .collect(),
            ..Default::default()
        });
    }
    TrainBatch {
        sequences: seqs,
        max_response_len: 8,
    }
}

fn pg_config(lr: f64, clip: Option<f64>) -> TrainerConfig {
    TrainerConfig {
        optim: OptimConfig {
            lr,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: clip,
            schedule: Schedule::Constant { warmup_steps: 0 },
            implementation: AdamWImpl::SingleTensor,
        },
        loss: PolicyLossConfig {
            loss: LossConfig::Pg {},
            aggregation: Aggregation::TokenMean,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Multi-turn rollouts: observation tokens (loss mask 0) are context only. The gradient equals
/// autograd through transformers of `-Σ mask·A·logp / Σ mask`, and differs from the unmasked one.
#[test]
fn loss_mask_drops_observation_tokens_like_pytorch() {
    let f = files("tiny-qwen2");
    let w = weights(&f);
    let cfg = TrainerConfig {
        activation_checkpointing: true,
        ..pg_config(1e-2, Some(0.05))
    };
    let mut b = batch(4, f.config.vocab_size);
    let grad = |b: &TrainBatch| {
        Trainer::new(f.config.clone(), &w, Kind::Float, None, cfg.clone())
            .unwrap()
            .gradients(b)
            .unwrap()
    };
    let unmasked = grad(&b);
    for (i, s) in b.sequences.iter_mut().enumerate() {
        // Every other token of the longer responses is an "observation"; the first is the model's.
        s.loss_mask = (0..s.response.len())
            .map(|j| u8::from(j == 0 || (i + j) % 2 == 0))
            .collect();
    }
    assert!(b.sequences.iter().any(|s| s.loss_mask.contains(&0)));
    let masked = grad(&b);
    let tmp = tempdir();
    let named: Vec<(String, Tensor)> = Weights {
        layout: trainer_layout(&f),
        flat: masked.shallow_clone(),
    }
    .named_tensors()
    .unwrap()
    .into_iter()
    .flat_map(|(n, t)| [(format!("g1.{n}"), t.copy()), (format!("g2.{n}"), t.copy())])
    .collect();
    let grads_path = tmp.path().join("grads.safetensors");
    rlrun_model::loader::write_safetensors(&grads_path, &named, &Default::default()).unwrap();
    let inp = tmp.path().join("in.json");
    std::fs::write(
        &inp,
        serde_json::json!({
            "sequences": b.sequences.iter().map(|s| serde_json::json!({
                "prompt": s.prompt, "response": s.response, "advantages": s.advantages,
                "loss_mask": s.loss_mask})).collect::<Vec<_>>(),
            "lr": cfg.optim.lr, "betas": [cfg.optim.betas.0, cfg.optim.betas.1], "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "grad_clip": cfg.optim.grad_clip.unwrap(),
        })
        .to_string(),
    )
    .unwrap();
    let out = tmp.path().join("out.safetensors");
    reference(&[
        "adamw-check",
        fixtures().join("tiny-qwen2").to_str().unwrap(),
        inp.to_str().unwrap(),
        grads_path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let r = read_safetensors(&out);
    let mut worst: f64 = 0.0;
    for (name, t) in named.iter().filter(|(n, _)| n.starts_with("g1.")) {
        worst = worst.max(max_abs_diff(t, &r[&format!("torch_grad.{}", &name[3..])]));
    }
    assert!(worst <= 1e-5, "masked gradient vs torch: {worst:e}");
    assert!(
        max_abs_diff(&masked, &unmasked) > 1e-3,
        "the mask should matter"
    );
}

#[test]
fn gradients_and_adamw_steps_match_pytorch() {
    let f = files("tiny-qwen2");
    let w = weights(&f);
    let cfg = TrainerConfig {
        activation_checkpointing: false,
        ..pg_config(1e-2, Some(0.05))
    };
    let mut trainer = Trainer::new(f.config.clone(), &w, Kind::Float, None, cfg.clone()).unwrap();
    let b = batch(5, f.config.vocab_size);
    let named = |flat: &Tensor, prefix: &str| -> Vec<(String, Tensor)> {
        let w = Weights {
            layout: trainer_layout(&f),
            flat: flat.shallow_clone(),
        };
        w.named_tensors()
            .unwrap()
            .into_iter()
            .map(|(n, t)| (format!("{prefix}.{n}"), t.copy()))
            .collect()
    };
    let g1 = trainer.gradients(&b).unwrap();
    // The same gradients with activation checkpointing (layers recomputed in the backward).
    let ckpt_cfg = TrainerConfig {
        activation_checkpointing: true,
        ..cfg.clone()
    };
    let g1_ckpt = Trainer::new(f.config.clone(), &w, Kind::Float, None, ckpt_cfg)
        .unwrap()
        .gradients(&b)
        .unwrap();
    let info1 = trainer.apply_gradients(g1.copy()).unwrap();
    let w1 = trainer.weights().flat.copy();
    let g2 = trainer.gradients(&b).unwrap();
    let info2 = trainer.apply_gradients(g2.copy()).unwrap();
    let w2 = trainer.weights().flat.copy();
    // The same two steps through PyTorch's fused AdamW kernel (`trainer.adamw = "fused"`).
    let mut fused_cfg = cfg.clone();
    fused_cfg.optim.implementation = AdamWImpl::Fused;
    let mut fused = Trainer::new(f.config.clone(), &w, Kind::Float, None, fused_cfg).unwrap();
    fused.apply_gradients(g1.copy()).unwrap();
    let wf1 = fused.weights().flat.copy();
    fused.apply_gradients(g2.copy()).unwrap();
    let wf2 = fused.weights().flat.copy();

    let tmp = tempdir();
    let grads_path = tmp.path().join("grads.safetensors");
    let mut all = named(&g1, "g1");
    all.extend(named(&g2, "g2"));
    rlrun_model::loader::write_safetensors(&grads_path, &all, &Default::default()).unwrap();
    let inp = tmp.path().join("in.json");
    std::fs::write(
        &inp,
        serde_json::json!({
            "sequences": b.sequences.iter().map(|s| serde_json::json!({
                "prompt": s.prompt, "response": s.response, "advantages": s.advantages})).collect::<Vec<_>>(),
            "lr": cfg.optim.lr, "betas": [cfg.optim.betas.0, cfg.optim.betas.1], "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "grad_clip": cfg.optim.grad_clip.unwrap(),
        })
        .to_string(),
    )
    .unwrap();
    let out = tmp.path().join("out.safetensors");
    let dir = fixtures().join("tiny-qwen2");
    reference(&[
        "adamw-check",
        dir.to_str().unwrap(),
        inp.to_str().unwrap(),
        grads_path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let r = read_safetensors(&out);
    // Gradients: ours (with and without activation checkpointing) vs autograd through
    // transformers.
    for (g, what) in [(&g1, "stored activations"), (&g1_ckpt, "checkpointing")] {
        let mut worst_g: f64 = 0.0;
        for (name, t) in named(g, "x") {
            let name = name.trim_start_matches("x.");
            worst_g = worst_g.max(max_abs_diff(&t, &r[&format!("torch_grad.{name}")]));
        }
        eprintln!("{what}: max |grad - torch grad| = {worst_g:e}");
        assert!(worst_g <= 1e-5, "{what}: {worst_g:e}");
    }
    // Pre-clip norms and the parameters after each step.
    for (info, step) in [(info1, 1), (info2, 2)] {
        let want = r[&format!("pre_clip_norm{step}")].double_value(&[0]);
        // f32 sums over all elements, in another order than torch's: ~1e-6 relative apart.
        assert!(
            (info.grad_norm - want).abs() <= 1e-5 * want.max(1.0),
            "step {step}: norm {} vs {want}",
            info.grad_norm
        );
        assert!(
            info.grad_norm > 0.05,
            "clipping should be active (norm {})",
            info.grad_norm
        );
    }
    // Both kernels against torch's: single-tensor (`foreach=False`) and fused (`fused=True`).
    for (flat, step, key) in [
        (&w1, 1, "step"),
        (&w2, 2, "step"),
        (&wf1, 1, "fused_step"),
        (&wf2, 2, "fused_step"),
    ] {
        let mut worst: f64 = 0.0;
        for (name, t) in named(flat, "x") {
            let name = name.trim_start_matches("x.");
            worst = worst.max(max_abs_diff(&t, &r[&format!("{key}{step}.{name}")]));
        }
        eprintln!("{key} {step}: max |param - torch AdamW param| = {worst:e}");
        assert!(worst <= 1e-6, "{key} {step}: {worst:e}");
    }
    assert!(
        max_abs_diff(&wf2, &w.flat) > 1e-3,
        "the fused steps moved the weights"
    );
    // The steps moved the weights by far more than the tolerance.
    assert!(max_abs_diff(&w2, &w.flat) > 1e-3);
}

fn trainer_layout(f: &ModelFiles) -> Arc<rlrun_model::ParamLayout> {
    f.layout().clone()
}

fn ppo_kl_config(micro_batch_tokens: usize) -> TrainerConfig {
    TrainerConfig {
        optim: OptimConfig {
            lr: 1e-3,
            ..Default::default()
        },
        loss: PolicyLossConfig {
            loss: LossConfig::Ppo {
                clip_low: 0.2,
                clip_high: 0.28,
                dual_clip: Some(3.0),
            },
            aggregation: Aggregation::SeqMeanTokenMean,
            kl: Some(KlLossConfig {
                estimator: KlEstimator::K3,
                coef: 0.1,
            }),
            entropy_coef: 0.01,
            off_policy: None,
        },
        micro_batch_tokens,
        ppo_epochs: 2,
        mini_batches: 2,
        ..Default::default()
    }
}

#[test]
fn micro_batch_split_does_not_change_the_update() {
    let f = files("tiny-llama3");
    let w = weights(&f);
    let b = batch(8, f.config.vocab_size);
    let mut results = Vec::new();
    // The last run also recomputes activations in the backward (checkpointing): same update.
    for (budget, checkpointing) in [
        (10_000, false),
        (40, false),
        (20, false),
        (1, false),
        (20, true),
    ] {
        let mut t = Trainer::new(
            f.config.clone(),
            &w,
            Kind::Float,
            Some(weights(&f)),
            TrainerConfig {
                activation_checkpointing: checkpointing,
                ..ppo_kl_config(budget)
            },
        )
        .unwrap();
        let m = t.train_step(&b).unwrap();
        t.train_step(&b).unwrap();
        results.push((
            format!(
                "{budget}{}",
                if checkpointing { " checkpointed" } else { "" }
            ),
            t.weights().flat.copy(),
            m,
        ));
    }
    let (_, base, m0) = &results[0];
    assert!(
        max_abs_diff(base, &w.flat) > 1e-4,
        "the update should move the weights"
    );
    for (budget, flat, m) in &results[1..] {
        let d = max_abs_diff(flat, base);
        assert!(d <= 1e-5, "budget {budget}: max |Δw| = {d:e}");
        let dl = (m["actor/pg_loss"] - m0["actor/pg_loss"]).abs();
        assert!(dl <= 1e-6, "budget {budget}: loss differs by {dl:e}");
    }
}

#[test]
fn resume_is_bitwise_exact() {
    let f = files("tiny-qwen3");
    let b = |k: usize| {
        let mut x = batch(6, f.config.vocab_size);
        for s in &mut x.sequences {
            for a in &mut s.advantages {
                *a *= 1.0 + 0.1 * k as f32;
            }
        }
        x
    };
    let mut cfg = ppo_kl_config(30);
    cfg.critic = Some(CriticConfig::default());
    let with_returns = |mut x: TrainBatch| {
        for s in &mut x.sequences {
            s.returns = Some(s.advantages.iter().map(|a| a * 0.5).collect());
            s.old_values = Some(vec![0.0; s.response.len()]);
        }
        x
    };
    let mut straight = Trainer::new(
        f.config.clone(),
        &weights(&f),
        Kind::Float,
        Some(weights(&f)),
        cfg.clone(),
    )
    .unwrap();
    let mut losses = Vec::new();
    for k in 0..6 {
        losses.push(straight.train_step(&with_returns(b(k))).unwrap()["actor/pg_loss"]);
    }
    let tmp = tempdir();
    let mut first = Trainer::new(
        f.config.clone(),
        &weights(&f),
        Kind::Float,
        Some(weights(&f)),
        cfg.clone(),
    )
    .unwrap();
    let mut resumed_losses = Vec::new();
    for k in 0..3 {
        resumed_losses.push(first.train_step(&with_returns(b(k))).unwrap()["actor/pg_loss"]);
    }
    first.save(tmp.path()).unwrap();
    drop(first);
    let mut second = Trainer::new(
        f.config.clone(),
        &weights(&f),
        Kind::Float,
        Some(weights(&f)),
        cfg,
    )
    .unwrap();
    second.load(tmp.path()).unwrap();
    assert_eq!(second.optimizer_steps(), 12);
    for k in 3..6 {
        resumed_losses.push(second.train_step(&with_returns(b(k))).unwrap()["actor/pg_loss"]);
    }
    assert_eq!(losses, resumed_losses, "logged losses differ after resume");
    let d = max_abs_diff(&straight.weights().flat, &second.weights().flat);
    assert_eq!(d, 0.0, "weights differ after resume: {d:e}");
    let vs = straight.compute_values(&b(0).sequences).unwrap();
    let vr = second.compute_values(&b(0).sequences).unwrap();
    assert_eq!(vs, vr, "critic differs after resume");
}

#[test]
fn exported_directory_loads_in_transformers_with_same_logits() {
    let f = files("tiny-llama3");
    let mut t = Trainer::new(
        f.config.clone(),
        &weights(&f),
        Kind::Float,
        None,
        pg_config(1e-2, None),
    )
    .unwrap();
    t.train_step(&batch(4, f.config.vocab_size)).unwrap();
    let tmp = tempdir();
    let out = tmp.path().join("export");
    save_hf_dir(
        &out,
        &f.config,
        &f.generation,
        &f.tokenizer,
        &t.weights(),
        Kind::Float,
    )
    .unwrap();
    // Our logits from the trained weights vs transformers' from the exported directory.
    let ids = Tensor::from_slice(&[5i64, 9, 33, 2, 17, 101, 4, 8, 7, 7, 15, 3]).view([2, 6]);
    let pos = Tensor::arange(6, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .expand([2, 6], true)
        .copy();
    let mask = Tensor::ones([2, 6], (Kind::Int64, Device::Cpu));
    let inp = tmp.path().join("in.safetensors");
    Tensor::write_safetensors(
        &[
            ("input_ids", &ids),
            ("attention_mask", &mask),
            ("position_ids", &pos),
        ],
        &inp,
    )
    .unwrap();
    let lp = tmp.path().join("logits.safetensors");
    reference(&[
        "logits",
        out.to_str().unwrap(),
        inp.to_str().unwrap(),
        lp.to_str().unwrap(),
    ]);
    let want = read_safetensors(&lp)["logits"].shallow_clone();
    let _g = tch::no_grad_guard();
    let model = rlrun_model::build_model(f.config.clone(), &t.weights()).unwrap();
    let ours = model
        .logits(&model.forward(&ids, &pos, None).unwrap())
        .unwrap();
    let d = max_abs_diff(&ours, &want);
    assert!(d <= 1e-4, "max |Δlogits| = {d:e}");
    // And the exported weights differ from the original (the step was saved, not the input).
    let reopened = ModelFiles::open(&out).unwrap();
    assert!(max_abs_diff(&weights(&reopened).flat, &weights(&f).flat) > 1e-4);
}

#[test]
fn ppo_fits_a_fixed_batch() {
    let f = files("tiny-qwen2");
    let cfg = TrainerConfig {
        optim: OptimConfig {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
        loss: PolicyLossConfig {
            loss: LossConfig::Ppo {
                clip_low: 0.2,
                clip_high: 0.2,
                dual_clip: None,
            },
            ..Default::default()
        },
        ppo_epochs: 2,
        ..Default::default()
    };
    let mut t = Trainer::new(f.config.clone(), &weights(&f), Kind::Float, None, cfg).unwrap();
    let b = batch(6, f.config.vocab_size);
    let split = |lps: &[Vec<f32>]| {
        let (mut pos, mut neg, mut np, mut nn) = (0.0, 0.0, 0, 0);
        for (s, lp) in b.sequences.iter().zip(lps) {
            for (a, l) in s.advantages.iter().zip(lp) {
                if *a > 0.0 {
                    pos += l;
                    np += 1;
                } else {
                    neg += l;
                    nn += 1;
                }
            }
        }
        (pos / np as f32, neg / nn as f32)
    };
    // The policy-gradient objective on the fixed batch: -mean(A * logprob).
    let objective = |lps: &[Vec<f32>]| -> f64 {
        let (mut s, mut n) = (0.0, 0);
        for (seq, lp) in b.sequences.iter().zip(lps) {
            for (a, l) in seq.advantages.iter().zip(lp) {
                s -= (a * l) as f64;
                n += 1;
            }
        }
        s / n as f64
    };
    let lp0 = t.compute_logprobs(&b.sequences).unwrap();
    let (pos0, neg0) = split(&lp0);
    let mut losses = vec![objective(&lp0)];
    for _ in 0..15 {
        let m = t.train_step(&b).unwrap();
        assert!(m["actor/pg_clipfrac_high"] >= 0.0);
        losses.push(objective(&t.compute_logprobs(&b.sequences).unwrap()));
    }
    let (pos1, neg1) = split(&t.compute_logprobs(&b.sequences).unwrap());
    eprintln!("positive-advantage mean logprob {pos0:.3} -> {pos1:.3}; negative {neg0:.3} -> {neg1:.3}; loss {:.4} -> {:.4}", losses[0], losses[15]);
    assert!(pos1 > pos0 + 0.5, "positive tokens: {pos0} -> {pos1}");
    assert!(neg1 < neg0, "negative tokens: {neg0} -> {neg1}");
    assert!(losses[15] < losses[0] - 1.0, "loss {losses:?}");
    assert!(
        losses.windows(2).filter(|w| w[1] < w[0]).count() >= 12,
        "loss should mostly decrease: {losses:?}"
    );
}

#[test]
fn critic_learns_the_returns() {
    let f = files("tiny-qwen2");
    let cfg = TrainerConfig {
        critic: Some(CriticConfig {
            optim: OptimConfig {
                lr: 1e-2,
                weight_decay: 0.0,
                ..Default::default()
            },
            cliprange_value: 0.0,
        }),
        ..pg_config(1e-6, None)
    };
    let mut t = Trainer::new(f.config.clone(), &weights(&f), Kind::Float, None, cfg).unwrap();
    let mut b = batch(6, f.config.vocab_size);
    for s in &mut b.sequences {
        s.returns = Some(
            (0..s.response.len())
                .map(|j| 0.5 + 0.1 * j as f32)
                .collect(),
        );
    }
    let err = |t: &Trainer| -> f64 {
        let v = t.compute_values(&b.sequences).unwrap();
        let mut e = 0.0;
        for (s, v) in b.sequences.iter().zip(&v) {
            for (r, x) in s.returns.as_ref().unwrap().iter().zip(v) {
                e += ((r - x) as f64).powi(2);
            }
        }
        e
    };
    let e0 = err(&t);
    let mut m = Default::default();
    for _ in 0..20 {
        m = t.train_step(&b).unwrap();
    }
    let e1 = err(&t);
    eprintln!("critic squared error {e0:.4} -> {e1:.4}");
    assert!(e1 < 0.1 * e0, "{e0} -> {e1}");
    assert!(m.contains_key("critic/vf_loss") && m.contains_key("critic/grad_norm"));
}

// ---------------------------------------------------------------------------------------------
// bf16 on the CPU (CPU torch has bf16): the production GPU dtype policy, tested here.
// ---------------------------------------------------------------------------------------------

/// The f32 gradient of `b` with the compute dtype `kind`, packed into micro-batches of
/// `budget` padded tokens.
fn gradient_with(f: &ModelFiles, b: &TrainBatch, kind: Kind, budget: usize, ckpt: bool) -> Tensor {
    let cfg = TrainerConfig {
        micro_batch_tokens: budget,
        activation_checkpointing: ckpt,
        ..pg_config(1e-3, None)
    };
    Trainer::new(f.config.clone(), &weights(f), kind, None, cfg)
        .unwrap()
        .gradients(b)
        .unwrap()
}

fn rel_diff(a: &Tensor, b: &Tensor, scale: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / scale.norm().double_value(&[])
}

#[test]
fn bf16_gradients_accumulate_in_f32_whatever_the_micro_batch_split() {
    let f = files("tiny-llama3");
    let b = batch(32, f.config.vocab_size);
    let g32 = gradient_with(&f, &b, Kind::Float, 100_000, false);
    let one = gradient_with(&f, &b, Kind::BFloat16, 100_000, false);
    let many = gradient_with(&f, &b, Kind::BFloat16, 1, false); // 32 micro-batches
    let many_ckpt = gradient_with(&f, &b, Kind::BFloat16, 1, true);
    assert_eq!(one.kind(), Kind::Float);
    // bf16 itself: how far a bf16 forward/backward is from the f32 one.
    let bf16_noise = rel_diff(&one, &g32, &g32);
    let split = rel_diff(&many, &one, &g32);
    let split_ckpt = rel_diff(&many_ckpt, &one, &g32);
    eprintln!(
        "relative to |g_f32|: bf16 vs f32 {bf16_noise:.2e}; 32 micro-batches vs 1: {split:.2e} ({split_ckpt:.2e} checkpointed)"
    );
    assert!(bf16_noise > 1e-4 && bf16_noise < 0.05, "{bf16_noise}");
    // Each micro-batch's gradient is rounded to bf16 once (relative 2^-9) before it is added
    // in f32; with bf16 accumulation every one of the 31 additions rounds the running sum too.
    // The split may differ from one micro-batch by bf16's own noise, not by more.
    assert!(
        split <= bf16_noise,
        "split {split:e} vs bf16 noise {bf16_noise:e}"
    );
    assert!(split_ckpt <= bf16_noise, "{split_ckpt:e} vs {bf16_noise:e}");

    // The accumulation alone, exactly: 32 copies of one sequence, one per micro-batch. Each
    // micro-batch computes the one-sequence gradient scaled by exactly 2^-5 (its loss is
    // divided by 32x the tokens; a power-of-two scale commutes with every rounding), and the
    // sum of 32 such bf16 values is exact in f32 (at most 13 significant bits), so it must equal
    // the gradient of the sequence alone (summed in bf16, as before, it was 1.5e-2 off).
    let one_seq = TrainBatch {
        sequences: vec![b.sequences[3].clone()],
        max_response_len: b.max_response_len,
    };
    let copies = TrainBatch {
        sequences: vec![b.sequences[3].clone(); 32],
        max_response_len: b.max_response_len,
    };
    let single = gradient_with(&f, &one_seq, Kind::BFloat16, 100_000, false);
    let summed = gradient_with(&f, &copies, Kind::BFloat16, 1, false);
    let d = rel_diff(&summed, &single, &single);
    eprintln!("32 micro-batches of one sequence vs the sequence alone: {d:.2e}");
    assert!(d <= 1e-6, "accumulation is not exact: {d:e}");
}

#[test]
fn bf16_step_raises_the_likelihood_of_a_positive_batch_and_keeps_f32_masters() {
    let f = files("tiny-qwen2");
    let mut b = batch(8, f.config.vocab_size);
    for s in &mut b.sequences {
        s.advantages.iter_mut().for_each(|a| *a = 1.0);
    }
    let w0 = weights(&f);
    let mut t = Trainer::new(
        f.config.clone(),
        &w0,
        Kind::BFloat16,
        None,
        pg_config(1e-3, None),
    )
    .unwrap();
    let mean = |lps: &[Vec<f32>]| {
        let all: Vec<f32> = lps.iter().flatten().copied().collect();
        all.iter().sum::<f32>() / all.len() as f32
    };
    let before = mean(&t.compute_logprobs(&b.sequences).unwrap());
    t.train_step(&b).unwrap();
    let after = mean(&t.compute_logprobs(&b.sequences).unwrap());
    eprintln!("bf16: mean log-prob of the positive batch {before:.4} -> {after:.4}");
    assert!(after > before + 0.05, "{before} -> {after}");

    // The master is f32 and what is saved; the compute (and sync) buffer is its rounding.
    let master = t.weights().flat;
    assert_eq!(master.kind(), Kind::Float);
    let sync = t.sync_buffer().unwrap();
    assert_eq!(sync.kind(), Kind::BFloat16);
    assert!(sync.equal(&master.to_kind(Kind::BFloat16)));
    // Steps far below bf16's resolution still move the f32 master (they are not lost).
    let mut tiny = Trainer::new(
        f.config.clone(),
        &w0,
        Kind::BFloat16,
        None,
        pg_config(1e-6, None),
    )
    .unwrap();
    for _ in 0..3 {
        tiny.train_step(&b).unwrap();
    }
    let m = tiny.weights().flat;
    let changed = |a: &Tensor, b: &Tensor| a.ne_tensor(b).sum(Kind::Int64).int64_value(&[]);
    let in_f32 = changed(&m, &w0.flat);
    let in_bf16 = changed(&m.to_kind(Kind::BFloat16), &w0.flat.to_kind(Kind::BFloat16));
    eprintln!("lr 1e-6: {in_f32} master elements moved, {in_bf16} of their bf16 roundings");
    assert!(in_f32 > 10 * in_bf16.max(1), "{in_f32} vs {in_bf16}");
    assert!(tiny
        .sync_buffer()
        .unwrap()
        .equal(&m.to_kind(Kind::BFloat16)));
    let dir = tempdir();
    tiny.save(dir.path()).unwrap();
    let saved = read_safetensors(&dir.path().join("policy.safetensors"));
    let named = Weights {
        layout: trainer_layout(&f),
        flat: m.shallow_clone(),
    }
    .named_tensors()
    .unwrap();
    for (name, t) in named {
        let s = &saved[&name];
        assert_eq!(s.kind(), Kind::Float, "{name}");
        assert!(s.equal(&t), "{name}: saved tensor is not the f32 master");
    }
}
