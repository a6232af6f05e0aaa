//! Multi-turn rollouts extend a trajectory without re-tokenizing earlier turns: the text after a
//! model turn (`ChatTemplate::observation_suffix`: the observation messages and the next
//! generation prompt) is rendered once and tokenized alone. For the ChatML template of SmolLM2
//! and Gemma 3's template, prompt + model turn + suffix is the template's own rendering of the
//! whole conversation, and the suffix's tokens appended to the earlier tokens are the tokens of
//! that whole text.

use rlrun_model::{ChatMessage, ModelFiles};
use rlrun_testkit::{gemma3_gguf, smollm2_dir};

fn check(files: &ModelFiles, end_of_turn: &str, observations: &[Vec<ChatMessage>]) {
    let tpl = files.chat_template().unwrap().expect("a chat template");
    let tok = &files.tokenizer;
    let ids = |s: &str| tok.encode(s, false).unwrap();
    let user = ChatMessage::new("user", "What is 123 * 456? Use the calculator.");
    let turn = "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"123 * 456\"}}\n</tool_call>";
    for obs in observations {
        let prompt = tpl.render(std::slice::from_ref(&user), true).unwrap();
        let suffix = tpl.observation_suffix(obs, end_of_turn).unwrap();
        let mut conv = vec![user.clone(), ChatMessage::new("assistant", turn)];
        conv.extend(obs.iter().cloned());
        let whole = tpl.render(&conv, true).unwrap();
        // Text: what the trajectory holds is what the template renders.
        let built = format!("{prompt}{turn}{end_of_turn}{suffix}");
        assert_eq!(built, whole, "observation {obs:?}");
        // Tokens: the earlier tokens (prompt, then the model's turn as it would be sampled: its
        // text and the stop token) followed by the suffix's own tokens = the whole text's tokens.
        let mut traj = ids(&prompt);
        traj.extend(ids(&format!("{turn}{end_of_turn}")));
        traj.extend(ids(&suffix));
        assert_eq!(traj, ids(&whole), "observation {obs:?}");
    }
    // A stop token the template does not end assistant turns with is an error.
    let err = tpl
        .observation_suffix(&[ChatMessage::new("user", "x")], "<|not-the-end|>")
        .unwrap_err()
        .to_string();
    assert!(err.contains("<|not-the-end|>"), "{err}");
}

#[test]
fn observation_suffix_is_token_exact_for_chatml_and_gemma3() {
    let one = vec![ChatMessage::new("user", "56088")];
    let two = vec![
        ChatMessage::new("tool", "result: 56088"),
        ChatMessage::new("user", "  note: exact\n"),
    ];
    check(
        &ModelFiles::open(&smollm2_dir()).unwrap(),
        "<|im_end|>",
        &[one.clone(), two],
    );
    // Gemma's template alternates user and model turns: one observation message per turn.
    check(
        &ModelFiles::open(&gemma3_gguf()).unwrap(),
        "<end_of_turn>",
        &[one],
    );
}
