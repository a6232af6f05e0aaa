//! The load-balancing loss of a mixture-of-experts model (Qwen3-MoE, `trainer.router_aux_loss_coef`)
//! against transformers' `load_balancing_loss_func` (`output_router_logits=True`, with the
//! attention mask): the same value and the same gradients (router, attention, embeddings: the
//! loss reaches everything below each router, including earlier layers' experts), with and
//! without activation checkpointing.

use rlrun_model::{Device, Kind, ModelFiles};
use rlrun_testkit::{fixtures, max_abs_diff, read_safetensors, reference, tempdir};
use rlrun_trainer::{TrainBatch, TrainSequence, Trainer, TrainerConfig};

#[test]
fn load_balancing_loss_and_gradients_match_transformers() {
    let dir = fixtures().join("tiny-qwen3moe");
    let files = ModelFiles::open(&dir).unwrap();
    // Distinct prompts (no shared-prompt layout, like transformers' padded batch); zero
    // advantages, so the policy loss contributes no gradient and only the aux loss does.
    let seqs: Vec<TrainSequence> = (0..4)
        .map(|i| {
            let p: Vec<i64> = (0..3 + i)
                .map(|j| 3 + (i * 41 + j * 7) as i64 % 380)
                .collect();
            let r: Vec<i64> = (0..2 + 2 * i)
                .map(|j| 5 + (i * 13 + j * 29) as i64 % 370)
                .collect();
            TrainSequence {
                prompt: p,
                advantages: vec![0.0; r.len()],
                response: r,
                ..Default::default()
            }
        })
        .collect();
    let coef = 0.5;
    let tmp = tempdir();
    let inp = tmp.path().join("in.json");
    let out = tmp.path().join("out.safetensors");
    let spec = serde_json::json!({
        "coef": coef,
        "sequences": seqs.iter().map(|s| serde_json::json!({"prompt": s.prompt, "response": s.response})).collect::<Vec<_>>(),
    });
    std::fs::write(&inp, spec.to_string()).unwrap();
    reference(&[
        "moe-aux",
        dir.to_str().unwrap(),
        inp.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let want = read_safetensors(&out);
    let want_aux = want["aux"].double_value(&[0]);
    let batch = TrainBatch {
        sequences: seqs,
        max_response_len: 8,
    };
    for checkpointing in [false, true] {
        let weights = files.load_weights(Kind::Float, Device::Cpu).unwrap();
        let mut trainer = Trainer::new(
            files.config.clone(),
            &weights,
            Kind::Float,
            None,
            TrainerConfig {
                router_aux_loss_coef: coef,
                activation_checkpointing: checkpointing,
                ..Default::default()
            },
        )
        .unwrap();
        let grad = trainer.gradients(&batch).unwrap();
        let layout = &weights.layout;
        let mut checked = 0;
        for name in [
            "model.layers.0.mlp.gate.weight",
            "model.layers.2.mlp.gate.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.embed_tokens.weight",
        ] {
            let ours = layout
                .param_view(&grad, layout.param(name).unwrap())
                .unwrap();
            let theirs = &want[&format!("grad.{name}")];
            let d = max_abs_diff(&ours, theirs);
            let scale = theirs.abs().max().double_value(&[]);
            assert!(scale > 0.0, "{name}: no gradient in the reference");
            assert!(
                d <= 1e-6 + 1e-4 * scale,
                "checkpointing {checkpointing}: {name}: max |Δgrad| = {d:e} (scale {scale:e})"
            );
            checked += 1;
        }
        // Layer 0's experts feed layer 2's router; layer 2's (the last) feed no router.
        let expert = |l: i64, e: i64| {
            let name = format!("model.layers.{l}.mlp.experts.{e}.down_proj.weight");
            layout
                .param_view(&grad, layout.param(&name).unwrap())
                .unwrap()
        };
        let theirs = want["grad.model.layers.0.mlp.experts.down_proj"].get(3);
        let d = max_abs_diff(&expert(0, 3), &theirs);
        assert!(theirs.abs().max().double_value(&[]) > 0.0);
        assert!(d <= 1e-6, "layer 0 expert 3: max |Δgrad| = {d:e}");
        assert_eq!(expert(2, 3).abs().max().double_value(&[]), 0.0);
        let m = trainer.train_step(&batch).unwrap();
        let aux = m["actor/router_aux_loss"];
        assert!(
            (aux - want_aux).abs() <= 1e-6,
            "aux loss {aux} vs transformers {want_aux}"
        );
        assert_eq!(checked, 6);
    }
}
