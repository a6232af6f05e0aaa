//! A custom reward in ~20 lines: implement `RewardFn`, then score with it.
//! Run: `cargo run -p rlrun-rollout --example custom_reward`
use rlrun_rollout::reward::extract::last_tagged;
use rlrun_rollout::{Completion, Prompt, Reward, RewardError, RewardFn, Sample};

/// 1 if the answer in `<answer>…</answer>` is the ground truth spelled backwards.
struct Reversed;

impl RewardFn for Reversed {
    fn name(&self) -> &str {
        "reversed"
    }
    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        let answer = last_tagged(completion.text, "answer");
        let want: Option<String> = sample
            .ground_truth
            .as_deref()
            .map(|g| g.chars().rev().collect());
        let ok = answer.is_some() && answer == want.as_deref();
        Ok(Reward::binary(ok).with_metric("has_answer", f32::from(u8::from(answer.is_some()))))
    }
}

fn main() {
    let sample = Sample::new(0, Prompt::user("Reverse 'abc'.")).with_ground_truth("abc");
    for text in ["<answer>cba</answer>", "<answer>abc</answer>", "cba"] {
        let r = Reversed
            .score(&sample, &Completion::from_text(text))
            .unwrap();
        println!("{text:>24} -> {} {:?}", r.value, r.metrics);
    }
}
