//! Mixture of experts through the actors' code (Qwen3-MoE, f32 CPU): the generator engine records
//! the experts of every token it feeds the model; the trainer, given those routes with its
//! sequences, replays them, so its log-probs equal the generator's even on a router built to
//! flip on last-bit differences (`rlrun_testkit::flipping_router`); without replay they do not,
//! and `actor/routing_flip_frac` reports how often the router differs. Also: a recipe trains a
//! mixture-of-experts model end to end.

mod common;

use rlrun_generator::{Engine, EngineConfig, Request, SamplingParams};
use rlrun_model::{Device, Kind, ModelFiles, Weights};
use rlrun_testkit::{fixtures, flipping_router, tempdir};
use rlrun_trainer::{TrainBatch, TrainSequence, Trainer, TrainerConfig};

fn flipping_weights(files: &ModelFiles) -> Weights {
    let w = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    let spec = w
        .layout
        .param("model.layers.0.mlp.gate.weight")
        .unwrap()
        .clone();
    flipping_router(&mut w.layout.param_view(&w.flat, &spec).unwrap());
    w
}

#[test]
fn trainer_replays_the_generators_expert_choices() {
    let files = ModelFiles::open(&fixtures().join("tiny-qwen3moe")).unwrap();
    let mut engine = Engine::new(
        files.config.clone(),
        flipping_weights(&files),
        vec![],
        None,
        EngineConfig {
            max_slots: 32,
            max_len: 64,
            ..Default::default()
        },
    )
    .unwrap();
    let prompts: Vec<Vec<i64>> = (0..6)
        .map(|i| (0..5 + i).map(|j| 3 + (i * 37 + j * 11) % 380).collect())
        .collect();
    for (i, p) in prompts.iter().enumerate() {
        engine
            .submit(Request {
                id: i as u64,
                prompt: p.clone(),
                params: SamplingParams {
                    n: 4,
                    temperature: 1.0,
                    max_tokens: 24,
                    seed: Some(3),
                    ..Default::default()
                },
                key: None,
            })
            .unwrap();
    }
    let done = engine.run_to_completion().unwrap();
    let seqs: Vec<TrainSequence> = done
        .iter()
        .map(|c| {
            // (prompt + response - 1) tokens x 2 MoE layers x top-2.
            let fed = c.prompt_len + c.token_ids.len() - 1;
            assert_eq!(c.routes.len(), fed * 2 * 2, "routes of every fed token");
            TrainSequence {
                prompt: prompts[c.request_id as usize].clone(),
                response: c.token_ids.clone(),
                advantages: vec![1.0; c.token_ids.len()],
                behavior_logprobs: Some(c.logprobs.clone()),
                routes: c.routes.clone(),
                ..Default::default()
            }
        })
        .collect();
    let trainer = |replay: bool| {
        Trainer::new(
            files.config.clone(),
            &flipping_weights(&files),
            Kind::Float,
            None,
            TrainerConfig {
                routing_replay: replay,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let max_diff = |t: &Trainer| {
        let lps = t.compute_logprobs(&seqs).unwrap();
        done.iter()
            .zip(&lps)
            .flat_map(|(c, lp)| c.logprobs.iter().zip(lp).map(|(a, b)| (a - b).abs()))
            .fold(0f32, f32::max)
    };
    let mut with = trainer(true);
    let mut without = trainer(false);
    let (d_with, d_without) = (max_diff(&with), max_diff(&without));
    let batch = TrainBatch {
        sequences: seqs.clone(),
        max_response_len: 24,
    };
    let flips = |t: &mut Trainer| t.train_step(&batch).unwrap()["actor/routing_flip_frac"];
    let (f_with, f_without) = (flips(&mut with), flips(&mut without));
    eprintln!(
        "generator vs trainer max |Δ logprob|: {d_with:e} with routing replay, {d_without:e} \
         without; router flips: {:.2}% of token-layer routings",
        100.0 * f_without
    );
    assert!(d_with <= 1e-5, "with replay: {d_with:e}");
    assert!(
        d_without > 1e-4,
        "the router should flip without replay: {d_without:e}"
    );
    assert!(f_without > 0.0 && f_with > 0.0, "{f_with} {f_without}");
    assert_eq!(f_with, f_without, "the same rollouts, the same router");
}

/// A GRPO recipe on the tiny Qwen3-MoE model: the engine's routes reach the trainer through the
/// controller, the flip fraction is logged, and the run learns like a dense one.
#[test]
fn moe_recipe_runs_with_routing_replay() {
    let tmp = tempdir();
    let mut args = vec!["recipes/quickstart.toml".to_string()];
    args.extend(common::set_args(&[
        format!("model.path={}", fixtures().join("tiny-qwen3moe").display()),
        format!("logging.run_dir={}", tmp.path().display()),
        "steps=2".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        "trainer.lr=1e-3".into(),
    ]));
    let out = common::rlrun(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = common::metrics(&common::run_dir(tmp.path()))
        .into_iter()
        .filter(|v: &serde_json::Value| v["kind"] == "train")
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let f = l["actor/routing_flip_frac"]
            .as_f64()
            .expect("flip fraction logged");
        assert!((0.0..=1.0).contains(&f), "{f}");
        // In one process in f32 the replayed trainer reproduces the generator's log-probs.
        let kl = l["actor/behavior_kl"].as_f64().unwrap();
        assert!(kl.abs() < 1e-6, "behavior_kl {kl}");
    }
}
