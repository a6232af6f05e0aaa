//! Gemma 3 270M on real weights: rlrun imports the Q4_K_M GGUF (K-quants and Q5_0/Q8_0
//! dequantized, norms stored by llama.cpp as `1 + w` restored), and the imported model agrees with
//! transformers loading the same GGUF itself (`scripts/hf_reference.py gemma3`): logits within 1e-3
//! (f32) on 8 prompts, and greedy decoding through the generator's KV cache token-for-token equal
//! to `generate` for 32 tokens.

use std::collections::HashMap;
use std::sync::Arc;

use rlrun_generator::{Engine, EngineConfig, Request, SamplingParams};
use rlrun_model::{build_model, import_gguf, Device, Kind, ModelFiles};
use rlrun_testkit::{fixtures, gemma3_gguf, max_abs_diff, read_safetensors, tempdir};
use tch::Tensor;

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn imported_gemma3_270m_matches_transformers_gguf_loading() {
    let gguf = gemma3_gguf();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gemma3-reference.json")).unwrap(),
    )
    .unwrap();
    let want = read_safetensors(&fixtures().join("gemma3-reference.safetensors"));
    let tmp = tempdir();
    let dir = tmp.path().join("gemma3");
    import_gguf(&gguf, &dir, Kind::Float).unwrap();
    let files = ModelFiles::open(&dir).unwrap();
    let cfg = files.config.clone();
    assert_eq!(cfg.model_type, "gemma3_text");
    assert_eq!((cfg.vocab_size, cfg.num_hidden_layers), (262144, 18));
    assert_eq!(files.eos_ids(), vec![1, 106], "<eos> and <end_of_turn>");
    let weights = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    let model = build_model(cfg.clone(), &weights).unwrap();

    // 1. Logits, one prompt at a time, on the reference's vocabulary subset; argmax on all of it.
    let prompts: Vec<Vec<i64>> = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    assert_eq!(prompts.len(), 8);
    let texts = reference["texts"].as_array().unwrap();
    let cols = &want["cols"];
    let mut worst = 0f64;
    {
        let _guard = tch::no_grad_guard();
        for (i, p) in prompts.iter().enumerate() {
            // Our tokenizer gives the same ids (after the `<bos>` both prepend).
            let text = texts[i].as_str().unwrap();
            let ours: Vec<i64> = files
                .tokenizer
                .encode(text, true)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect();
            assert_eq!(&ours, p, "tokens of {text:?}");
            let t = p.len() as i64;
            let x = Tensor::from_slice(p).view([1, t]);
            let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]);
            let logits = model
                .logits(&model.forward(&x, &pos, None).unwrap())
                .unwrap()
                .get(0);
            let d = max_abs_diff(&logits.index_select(1, cols), &want[&format!("logits.{i}")]);
            worst = worst.max(d);
            assert!(d <= 1e-3, "prompt {i}: max |Δlogits| = {d:e}");
            assert!(
                logits
                    .argmax(-1, false)
                    .equal(&want[&format!("argmax.{i}")]),
                "prompt {i}: argmax differs"
            );
        }
    }
    eprintln!(
        "gemma3 270M: max |Δlogits| = {worst:e} over {} columns",
        cols.size()[0]
    );

    // 2. Greedy decoding, all prompts in one batch through the engine's KV cache.
    let n = reference["max_new_tokens"].as_u64().unwrap() as usize;
    let mut engine = Engine::new(
        cfg,
        weights,
        files.eos_ids(),
        Some(Arc::new(files.tokenizer.clone())),
        EngineConfig {
            max_slots: 8,
            max_len: 96,
            ..Default::default()
        },
    )
    .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        engine
            .submit(Request {
                id: i as u64,
                prompt: p.clone(),
                params: SamplingParams::greedy(n),
                key: None,
            })
            .unwrap();
    }
    let done: HashMap<u64, Vec<i64>> = engine
        .run_to_completion()
        .unwrap()
        .into_iter()
        .map(|c| (c.request_id, c.token_ids))
        .collect();
    for (i, g) in reference["greedy"].as_array().unwrap().iter().enumerate() {
        assert_eq!(done[&(i as u64)], ids(g), "greedy tokens of prompt {i}");
    }
}
