//! Generator engine: greedy parity with transformers' `generate`, log-prob consistency with a full
//! forward, sampling statistics, determinism across batch compositions, weight updates, bad input
//! and aborts.

use std::collections::HashMap;
use std::sync::Arc;

use rlrun_generator::sampling::{sample, RowParams};
use rlrun_generator::{
    Completion, Engine, EngineConfig, FinishReason, GeneratorActor, LocalGenerator, Request,
    SamplingParams, UpdatePolicy, WeightUpdate,
};
use rlrun_model::logprobs::token_logprobs;
use rlrun_model::{build_model, ChatMessage, Device, Kind, ModelFiles, Weights};
use rlrun_testkit::{fixtures, reference, smollm2_dir, tempdir};
use tch::Tensor;

fn engine_for(dir: &std::path::Path, cfg: EngineConfig) -> (Engine, ModelFiles) {
    let files = ModelFiles::open(dir).unwrap();
    let weights = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    let tok = Arc::new(ModelFiles::open(dir).unwrap().tokenizer);
    let engine = Engine::new(
        files.config.clone(),
        weights,
        files.eos_ids(),
        Some(tok),
        cfg,
    )
    .unwrap();
    (engine, files)
}

fn by_key(done: Vec<Completion>) -> HashMap<(u64, usize), Completion> {
    done.into_iter()
        .map(|c| ((c.request_id, c.index), c))
        .collect()
}

#[test]
fn greedy_matches_transformers_generate_with_slot_refill() {
    let dir = smollm2_dir();
    let (mut engine, files) = engine_for(
        &dir,
        EngineConfig {
            max_slots: 5,
            max_len: 192,
            max_prefill_tokens: 200,
            ..Default::default()
        },
    );
    let tpl = files.chat_template().unwrap().unwrap();
    let questions = [
        "What is 2 + 2?",
        "Name three primary colors.",
        "Write one sentence about the sea.",
        "What is the capital of Japan?",
        "Translate 'good morning' to French.",
        "Give me a synonym for happy.",
        "What is 15 times 4? Explain briefly.",
        "List two planets.",
        "Why is the sky blue? Answer in one short paragraph, please, without jargon.",
        "Say hello.",
        "What comes after Monday?",
        "Spell the word cat backwards.",
        "How many legs does a spider have?",
        "Complete: The quick brown fox",
        "Is 17 a prime number?",
        "Describe a cat in five words.",
        "What is 100 - 37?",
    ];
    let prompts: Vec<Vec<i64>> = questions
        .iter()
        .map(|q| {
            let text = tpl.render(&[ChatMessage::new("user", *q)], true).unwrap();
            files
                .tokenizer
                .encode(&text, false)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect()
        })
        .collect();
    let lens: std::collections::HashSet<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lens.len() > 5, "prompts should have different lengths");
    for (i, p) in prompts.iter().enumerate() {
        engine
            .submit(Request {
                id: i as u64,
                prompt: p.clone(),
                params: SamplingParams::greedy(64),
                key: None,
            })
            .unwrap();
    }
    let done = by_key(engine.run_to_completion().unwrap());
    assert_eq!(done.len(), prompts.len());

    let tmp = tempdir();
    let inp = tmp.path().join("req.json");
    let out = tmp.path().join("out.json");
    std::fs::write(
        &inp,
        serde_json::json!({"prompts": prompts, "max_new_tokens": 64}).to_string(),
    )
    .unwrap();
    reference(&[
        "generate",
        dir.to_str().unwrap(),
        inp.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let mut stopped = 0;
    for (i, want) in hf["completions"].as_array().unwrap().iter().enumerate() {
        let mut want: Vec<i64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        if let Some(eos) = want.iter().position(|&t| t == 2) {
            want.truncate(eos + 1);
        }
        let ours = &done[&(i as u64, 0)];
        assert_eq!(ours.token_ids, want, "prompt {i} ({:?})", questions[i]);
        let expect = if want.last() == Some(&2) {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        stopped += usize::from(expect == FinishReason::Stop);
        assert_eq!(ours.finish_reason, expect, "prompt {i}");
    }
    assert!(
        stopped >= 3,
        "too few completions ended with EOS ({stopped}) to exercise slot refill"
    );
}

/// Log-probs returned by the generator equal those of a full forward over prompt + completion,
/// at the same temperature (the train/inference consistency check).
#[test]
fn logprobs_match_full_forward() {
    for name in ["tiny-qwen2", "tiny-llama3"] {
        let dir = fixtures().join(name);
        let (mut engine, files) = engine_for(
            &dir,
            EngineConfig {
                max_slots: 6,
                max_len: 64,
                ..Default::default()
            },
        );
        let temperature = 0.7;
        for r in 0..4u64 {
            let prompt: Vec<i64> = (0..(5 + 3 * r as i64))
                .map(|j| 3 + (j * 37 + r as i64 * 11) % 300)
                .collect();
            engine
                .submit(Request {
                    id: r,
                    prompt,
                    params: SamplingParams {
                        n: 3,
                        temperature,
                        max_tokens: 20,
                        stop_token_ids: Some(vec![]),
                        seed: Some(5),
                        ..Default::default()
                    },
                    key: None,
                })
                .unwrap();
        }
        let done = engine.run_to_completion().unwrap();
        assert_eq!(done.len(), 12);
        let weights = files.load_weights(Kind::Float, Device::Cpu).unwrap();
        let model = build_model(files.config.clone(), &weights).unwrap();
        let _g = tch::no_grad_guard();
        let mut worst: f64 = 0.0;
        for c in &done {
            let prompt: Vec<i64> = (0..(5 + 3 * c.request_id as i64))
                .map(|j| 3 + (j * 37 + c.request_id as i64 * 11) % 300)
                .collect();
            let seq: Vec<i64> = prompt.iter().chain(&c.token_ids).copied().collect();
            let t = seq.len() as i64;
            let ids = Tensor::from_slice(&seq).view([1, t]);
            let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]);
            let h = model.forward(&ids, &pos, None).unwrap().squeeze_dim(0);
            let p = prompt.len() as i64;
            let rows = h.narrow(0, p - 1, c.token_ids.len() as i64);
            let targets = Tensor::from_slice(&c.token_ids);
            let (lp, _) = token_logprobs(
                &rows,
                model.lm_head_weight(),
                &targets,
                temperature,
                7,
                false,
            )
            .unwrap();
            let d = (lp - Tensor::from_slice(&c.logprobs))
                .abs()
                .max()
                .double_value(&[]);
            worst = worst.max(d);
        }
        eprintln!("{name}: max |generator logprob - full forward logprob| = {worst:e}");
        assert!(worst <= 1e-4, "{name}: {worst:e}");
    }
}

/// Chi-square goodness of fit of the sampler on a fixed toy distribution.
#[test]
fn sampling_frequencies_match_analytic_distributions() {
    let logits = Tensor::from_slice(&[2.0f32, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]);
    let v = 8usize;
    let n = 40_000usize;
    let base: Vec<f64> = Vec::<f32>::try_from(&logits)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let softmax = |xs: &[f64], t: f64, keep: &dyn Fn(usize) -> bool| -> Vec<f64> {
        let e: Vec<f64> = xs
            .iter()
            .enumerate()
            .map(|(i, &x)| if keep(i) { (x / t).exp() } else { 0.0 })
            .collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect()
    };
    let full_t = |t: f64| softmax(&base, t, &|_| true);
    // Analytic distributions of each filter (tokens are sorted by logit already).
    let p07 = full_t(0.7);
    let p1 = full_t(1.0);
    let cases: Vec<(&str, RowParamsSpec, Vec<f64>)> = vec![
        (
            "temperature 0.7",
            RowParamsSpec {
                t: 0.7,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
            },
            p07.clone(),
        ),
        (
            "temperature 1.6",
            RowParamsSpec {
                t: 1.6,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
            },
            full_t(1.6),
        ),
        (
            "top_k 3",
            RowParamsSpec {
                t: 1.0,
                top_k: 3,
                top_p: 1.0,
                min_p: 0.0,
            },
            softmax(&base, 1.0, &|i| i < 3),
        ),
        (
            "top_p 0.8",
            RowParamsSpec {
                t: 1.0,
                top_k: 0,
                top_p: 0.8,
                min_p: 0.0,
            },
            {
                // smallest prefix whose mass reaches 0.8
                let mut keep = 0;
                let mut mass = 0.0;
                while mass < 0.8 {
                    mass += p1[keep];
                    keep += 1;
                }
                softmax(&base, 1.0, &|i| i < keep)
            },
        ),
        (
            "min_p 0.2 at t=0.7",
            RowParamsSpec {
                t: 0.7,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.2,
            },
            {
                let pmax = p07[0];
                softmax(&base, 0.7, &|i| p07[i] >= 0.2 * pmax)
            },
        ),
    ];
    for (label, spec, want) in cases {
        let batch = logits.unsqueeze(0).expand([n as i64, v as i64], false);
        let rows: Vec<RowParams> = (0..n)
            .map(|i| RowParams {
                temperature: spec.t,
                top_p: spec.top_p,
                top_k: spec.top_k,
                min_p: spec.min_p,
                uniform: rlrun_generator::DrawKey::default().uniform(11, i as u64, 0),
            })
            .collect();
        let (tok, lp) = sample(&batch, &rows).unwrap();
        let tok = Vec::<i64>::try_from(tok).unwrap();
        let mut counts = vec![0f64; v];
        for t in &tok {
            counts[*t as usize] += 1.0;
        }
        let mut chi2 = 0.0;
        let mut dof = 0;
        for i in 0..v {
            if want[i] == 0.0 {
                assert_eq!(counts[i], 0.0, "{label}: filtered token {i} was sampled");
                continue;
            }
            let e = want[i] * n as f64;
            chi2 += (counts[i] - e).powi(2) / e;
            dof += 1;
        }
        // 99.9% quantile of chi-square with up to 7 degrees of freedom is 24.3.
        eprintln!("{label}: chi2 = {chi2:.2} (dof {})", dof - 1);
        assert!(
            chi2 < 24.3,
            "{label}: chi2 {chi2} (counts {counts:?}, expected {want:?})"
        );
        // Log-probs are of the unfiltered temperature-scaled distribution.
        let lp = Vec::<f32>::try_from(lp).unwrap();
        let full = full_t(spec.t);
        for (t, l) in tok.iter().zip(&lp).take(50) {
            assert!((*l as f64 - full[*t as usize].ln()).abs() < 1e-5, "{label}");
        }
    }
}

struct RowParamsSpec {
    t: f64,
    top_k: i64,
    top_p: f64,
    min_p: f64,
}

fn sampled_requests(ids: &[u64], n: usize) -> Vec<Request> {
    ids.iter()
        .map(|&id| Request {
            id,
            prompt: (0..(4 + id as i64 % 7))
                .map(|j| 3 + (j * 13 + id as i64 * 5) % 250)
                .collect(),
            params: SamplingParams {
                n,
                temperature: 1.0,
                top_p: 0.95,
                max_tokens: 12 + (id as usize % 5),
                seed: Some(42),
                ..Default::default()
            },
            key: None,
        })
        .collect()
}

#[test]
fn same_seed_same_tokens_across_runs_and_batch_compositions() {
    let dir = fixtures().join("tiny-llama3");
    let run = |slots: usize, ids: &[u64], n: usize| {
        let (mut e, _) = engine_for(
            &dir,
            EngineConfig {
                max_slots: slots,
                max_len: 64,
                max_prefill_tokens: 16,
                ..Default::default()
            },
        );
        for r in sampled_requests(ids, n) {
            e.submit(r).unwrap();
        }
        by_key(e.run_to_completion().unwrap())
    };
    let alone = run(4, &[1, 2], 4);
    let again = run(4, &[1, 2], 4);
    let mixed = run(12, &[7, 1, 9, 2, 11, 3], 4);
    let narrow = run(5, &[2, 8, 1], 4);
    let mut distinct = std::collections::HashSet::new();
    for key in alone.keys() {
        let a = &alone[key];
        distinct.insert(a.token_ids.clone());
        for other in [&again, &mixed, &narrow] {
            let b = &other[key];
            assert_eq!(a.token_ids, b.token_ids, "{key:?}");
            let d = a
                .logprobs
                .iter()
                .zip(&b.logprobs)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{key:?}: logprobs differ by {d}");
        }
    }
    assert!(
        distinct.len() >= 6,
        "samples of a group should differ: {}",
        distinct.len()
    );
}

#[test]
fn finished_sequences_cost_no_decode_rows() {
    // 6 requests x 4 samples of different lengths (12 to 16 tokens) in 24 slots: as the shorter
    // ones finish, the longer ones move down into their slots, so every decode row computed
    // decodes an active sequence.
    let dir = fixtures().join("tiny-llama3");
    let (mut e, _) = engine_for(
        &dir,
        EngineConfig {
            max_slots: 24,
            max_len: 64,
            ..Default::default()
        },
    );
    let ids = [7, 1, 9, 2, 11, 3];
    for r in sampled_requests(&ids, 4) {
        e.submit(r).unwrap();
    }
    let done = by_key(e.run_to_completion().unwrap());
    assert_eq!(done.len(), 24);
    let lens: std::collections::BTreeSet<usize> =
        done.values().map(|c| c.token_ids.len()).collect();
    assert!(lens.len() >= 3, "lengths should differ: {lens:?}");
    let st = e.stats();
    assert!(st.decode_tokens > 0);
    assert_eq!(
        st.decode_rows, st.decode_tokens,
        "decode rows spent on finished sequences"
    );
    // The moves do not change the draws: the same as each request alone.
    for id in ids {
        let (mut alone, _) = engine_for(
            &dir,
            EngineConfig {
                max_slots: 4,
                max_len: 64,
                ..Default::default()
            },
        );
        for r in sampled_requests(&[id], 4) {
            alone.submit(r).unwrap();
        }
        for (key, c) in by_key(alone.run_to_completion().unwrap()) {
            assert_eq!(c.token_ids, done[&key].token_ids, "{key:?}");
        }
    }
}

fn perturbed(w: &Weights, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    &w.flat + Tensor::randn(w.flat.size(), (Kind::Float, Device::Cpu)) * 0.05
}

#[test]
fn weight_update_changes_logprobs_and_version() {
    let dir = fixtures().join("tiny-qwen3");
    for policy in [UpdatePolicy::Drain, UpdatePolicy::AbortRequeue] {
        let (engine, files) = engine_for(
            &dir,
            EngineConfig {
                max_slots: 4,
                max_len: 64,
                update_policy: policy,
                ..Default::default()
            },
        );
        let actor = LocalGenerator::spawn(engine);
        let probe = |actor: &LocalGenerator| -> Completion {
            let rx = actor
                .generate(vec![Request {
                    id: 100,
                    prompt: vec![5, 6, 7, 8, 9],
                    params: SamplingParams {
                        temperature: 0.0,
                        max_tokens: 8,
                        stop_token_ids: Some(vec![]),
                        ..Default::default()
                    },
                    key: None,
                }])
                .unwrap();
            rx.recv().unwrap().unwrap()
        };
        let before = probe(&actor);
        assert_eq!(before.policy_version, 0);
        let w = files.load_weights(Kind::Float, Device::Cpu).unwrap();
        let new_flat = perturbed(&w, 3);
        // Start a long generation, then update mid-flight.
        let rx = actor.generate(sampled_requests(&[1, 2], 2)).unwrap();
        actor
            .update_weights(7, WeightUpdate::Flat(new_flat.shallow_clone()))
            .unwrap();
        let inflight: Vec<Completion> = rx.iter().map(Result::unwrap).collect();
        assert_eq!(inflight.len(), 4);
        let after = probe(&actor);
        assert_eq!(after.policy_version, 7);
        // The new log-probs are the new model's: recompute with a model over the new weights.
        let mut nw = files.load_weights(Kind::Float, Device::Cpu).unwrap();
        nw.flat = new_flat.shallow_clone();
        let model = build_model(files.config.clone(), &nw).unwrap();
        let _g = tch::no_grad_guard();
        let seq: Vec<i64> = [5, 6, 7, 8, 9]
            .iter()
            .chain(&after.token_ids)
            .copied()
            .collect();
        let t = seq.len() as i64;
        let h = model
            .forward(
                &Tensor::from_slice(&seq).view([1, t]),
                &Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]),
                None,
            )
            .unwrap()
            .squeeze_dim(0);
        let (lp, _) = token_logprobs(
            &h.narrow(0, 4, after.token_ids.len() as i64),
            model.lm_head_weight(),
            &Tensor::from_slice(&after.token_ids),
            1.0,
            64,
            false,
        )
        .unwrap();
        let d = (lp - Tensor::from_slice(&after.logprobs))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-4, "{policy:?}: {d}");
        let changed = before
            .logprobs
            .iter()
            .zip(&after.logprobs)
            .any(|(a, b)| (a - b).abs() > 1e-3);
        assert!(
            changed,
            "{policy:?}: log-probs did not change after the update"
        );
        // Every in-flight completion carries one version: old (drain) or new (abort + requeue).
        for c in &inflight {
            match policy {
                UpdatePolicy::Drain => assert_eq!(c.policy_version, 0),
                UpdatePolicy::AbortRequeue => assert_eq!(c.policy_version, 7),
            }
        }
    }
}

#[test]
fn bad_requests_are_clear_errors() {
    let dir = fixtures().join("tiny-qwen2");
    let (mut e, _) = engine_for(
        &dir,
        EngineConfig {
            max_slots: 2,
            max_len: 16,
            ..Default::default()
        },
    );
    let req = |prompt: Vec<i64>, params: SamplingParams| Request {
        id: 1,
        prompt,
        params,
        key: None,
    };
    let cases = [
        (
            req(vec![3; 16], SamplingParams::default()),
            "does not fit the context",
        ),
        (
            req(
                vec![3; 4],
                SamplingParams {
                    n: 0,
                    ..Default::default()
                },
            ),
            "`n` must be at least 1",
        ),
        (
            req(
                vec![3; 4],
                SamplingParams {
                    temperature: -0.5,
                    ..Default::default()
                },
            ),
            "temperature",
        ),
        (
            req(
                vec![3; 4],
                SamplingParams {
                    stop_token_ids: Some(vec![5, 99999]),
                    ..Default::default()
                },
            ),
            "stop token id 99999",
        ),
        (req(vec![], SamplingParams::default()), "empty prompt"),
        (
            req(vec![3, -1], SamplingParams::default()),
            "outside the vocabulary",
        ),
        (
            req(
                vec![3; 4],
                SamplingParams {
                    n: 3,
                    ..Default::default()
                },
            ),
            "exceeds the engine's 2 slots",
        ),
    ];
    for (r, want) in cases {
        let msg = e.submit(r).unwrap_err().to_string();
        assert!(msg.contains(want), "{msg} should mention {want}");
    }
    assert!(e.is_idle());
}

#[test]
fn abort_frees_the_slot_for_queued_work() {
    let dir = fixtures().join("tiny-qwen2");
    let (mut e, _) = engine_for(
        &dir,
        EngineConfig {
            max_slots: 1,
            max_len: 64,
            ..Default::default()
        },
    );
    let long = SamplingParams {
        max_tokens: 40,
        stop_token_ids: Some(vec![]),
        seed: Some(1),
        ..Default::default()
    };
    e.submit(Request {
        id: 1,
        prompt: vec![3, 4, 5],
        params: long.clone(),
        key: None,
    })
    .unwrap();
    e.submit(Request {
        id: 2,
        prompt: vec![6, 7],
        params: long.clone(),
        key: None,
    })
    .unwrap();
    for _ in 0..3 {
        assert!(e.step().unwrap().is_empty());
    }
    assert_eq!(e.stats().active, 1);
    assert_eq!(e.stats().queue_depth, 1);
    let aborted = e.abort(&[1]);
    assert_eq!(aborted.len(), 1);
    assert_eq!(aborted[0].finish_reason, FinishReason::Abort);
    assert!(!aborted[0].token_ids.is_empty());
    assert_eq!(e.stats().active, 0);
    // The queued request now gets the slot and runs to its length limit.
    let done = e.run_to_completion().unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].request_id, 2);
    assert_eq!(done[0].token_ids.len(), 40);
    assert_eq!(done[0].finish_reason, FinishReason::Length);
}

/// A kept prefix (multi-turn): a request continuing a finished sequence prefills only its new
/// tokens, and its completion (tokens and log-probs) is the one a full prefill gives; also with
/// `n > 1` samples of the continuation and across a mix of continuing and fresh prompts. A weight
/// update drops the kept prefixes.
#[test]
fn kept_prefixes_continue_conversations_like_a_full_prefill() {
    let dir = fixtures().join("tiny-llama3");
    let cfg = |keep: usize| EngineConfig {
        max_slots: 8,
        max_len: 128,
        prefix_cache_tokens: keep,
        ..Default::default()
    };
    let params = |n: usize, max_tokens: usize| SamplingParams {
        n,
        temperature: 1.0,
        max_tokens,
        stop_token_ids: Some(vec![]),
        seed: Some(7),
        ..Default::default()
    };
    let first: Vec<Vec<i64>> = (0..3)
        .map(|i| (0..9 + 3 * i).map(|j| 5 + (i * 31 + j * 7) % 300).collect())
        .collect();
    let run = |keep: usize| {
        let (mut engine, _) = engine_for(&dir, cfg(keep));
        for (i, p) in first.iter().enumerate() {
            engine
                .submit(Request {
                    id: i as u64,
                    prompt: p.clone(),
                    params: params(1, 6),
                    key: None,
                })
                .unwrap();
        }
        let turn1 = by_key(engine.run_to_completion().unwrap());
        // Next turns: the conversation so far plus an observation; one fresh prompt besides.
        let mut next = Vec::new();
        for (i, p) in first.iter().enumerate() {
            let mut q = p.clone();
            q.extend(&turn1[&(i as u64, 0)].token_ids);
            q.extend([11, 12, 13 + i as i64]);
            next.push(q);
        }
        next.push((0..12).map(|j| 40 + j).collect());
        for (i, q) in next.iter().enumerate() {
            engine
                .submit(Request {
                    id: 10 + i as u64,
                    prompt: q.clone(),
                    params: params(if i == 1 { 3 } else { 1 }, 5),
                    key: None,
                })
                .unwrap();
        }
        let turn2 = by_key(engine.run_to_completion().unwrap());
        (turn2, engine.stats())
    };
    let (full, full_stats) = run(0);
    let (kept, kept_stats) = run(10_000);
    assert_eq!(full_stats.prefix_hit_tokens, 0);
    // Turn 1's prompts and all but the last sampled token of each completion were kept.
    let want: u64 = first.iter().map(|p| p.len() as u64 + 5).sum();
    assert_eq!(kept_stats.prefix_hit_tokens, want);
    assert_eq!(
        full_stats.prefill_tokens - kept_stats.prefill_tokens,
        want,
        "only the new tokens are prefilled"
    );
    assert_eq!(full.len(), kept.len());
    let mut worst = 0f32;
    for (k, a) in &full {
        let b = &kept[k];
        assert_eq!(a.token_ids, b.token_ids, "{k:?}");
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= 1e-5, "{worst:e}");

    // A weight update drops them: the next continuation prefills in full.
    let (mut engine, files) = engine_for(&dir, cfg(10_000));
    engine
        .submit(Request {
            id: 1,
            prompt: first[0].clone(),
            params: params(1, 4),
            key: None,
        })
        .unwrap();
    let c = engine.run_to_completion().unwrap().remove(0);
    let w = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    engine
        .update_weights(1, WeightUpdate::Flat(w.flat.shallow_clone()))
        .unwrap();
    let mut q = first[0].clone();
    q.extend(&c.token_ids);
    q.push(9);
    engine
        .submit(Request {
            id: 2,
            prompt: q,
            params: params(1, 2),
            key: None,
        })
        .unwrap();
    engine.run_to_completion().unwrap();
    assert_eq!(engine.stats().prefix_hit_tokens, 0);
}
