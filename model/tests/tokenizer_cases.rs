//! Shared checker for tokenizer/chat-template cases produced by `scripts/hf_reference.py`
//! (included by several test crates, each using part of it).

#![allow(dead_code)]

use rlrun_model::{ChatTemplate, Tokenizer};
use serde_json::Value;

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Checks encode (with and without special tokens), decode, chat rendering and chat ids; returns
/// the number of strings checked.
pub fn check(tok: &Tokenizer, cases: &Value) -> usize {
    let strings = cases["strings"].as_array().unwrap();
    for (i, s) in strings.iter().enumerate() {
        let s = s.as_str().unwrap();
        let want = ids(&cases["ids"][i]);
        assert_eq!(tok.encode(s, true).unwrap(), want, "encode {s:?}");
        assert_eq!(
            tok.encode(s, false).unwrap(),
            ids(&cases["ids_no_special"][i]),
            "encode (no special) {s:?}"
        );
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            cases["decoded"][i].as_str().unwrap(),
            "decode {s:?}"
        );
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            cases["decoded_skip_special"][i].as_str().unwrap(),
            "decode (skip special) {s:?}"
        );
    }
    let tpl = ChatTemplate::from_tokenizer(tok)
        .unwrap()
        .expect("chat template");
    let chats = cases["chats"].as_array().unwrap();
    assert!(chats.len() >= 20, "only {} conversations", chats.len());
    check_chats(tok, &tpl, chats);
    strings.len()
}

/// Checks each chat case (`messages`, optional `tools`, `add_generation_prompt`): `tpl` renders
/// transformers' text and `tok` encodes it to transformers' ids.
pub fn check_chats(tok: &Tokenizer, tpl: &ChatTemplate, chats: &[Value]) {
    for c in chats {
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let text = tpl
            .render_json_with_tools(&c["messages"], c.get("tools"), agp)
            .unwrap();
        assert_eq!(
            text,
            c["text"].as_str().unwrap(),
            "chat render {}",
            c["messages"]
        );
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids(&c["ids"]),
            "chat ids {}",
            c["messages"]
        );
    }
}
