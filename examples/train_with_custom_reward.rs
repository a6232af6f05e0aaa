//! Training with a reward function written in Rust: register it under a name, point a recipe's
//! `[reward]` at it, and run the recipe through the library.
//!
//! ```sh
//! cargo run --release --example train_with_custom_reward -- recipes/quickstart.toml --set steps=2
//! ```

use std::sync::Arc;

use rlrun_rollout::reward::registry;
use rlrun_rollout::{Completion, Reward, RewardError, RewardFn, Sample};

/// 1 for the exact answer, 0.5 for an answer off by at most 1, else 0; a metric counts answers
/// that are numbers at all.
struct CloseEnough;

impl RewardFn for CloseEnough {
    fn name(&self) -> &str {
        "close-enough"
    }
    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        let got: Option<i64> = completion.text.trim().parse().ok();
        let want: Option<i64> = sample
            .ground_truth
            .as_deref()
            .and_then(|g| g.trim().parse().ok());
        let value = match (got, want) {
            (Some(g), Some(w)) if g == w => 1.0,
            (Some(g), Some(w)) if (g - w).abs() <= 1 => 0.5,
            _ => 0.0,
        };
        Ok(Reward::new(value).with_metric("is_number", f32::from(u8::from(got.is_some()))))
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let recipe = args
        .next()
        .unwrap_or_else(|| "recipes/quickstart.toml".into());
    let mut overrides: Vec<String> = Vec::new();
    while let Some(a) = args.next() {
        if a == "--set" {
            overrides.extend(args.next());
        }
    }
    registry::register("close-enough", Arc::new(CloseEnough));
    overrides.push(r#"reward={ name = "registered", function = "close-enough" }"#.into());

    let mut run = rlrun::Run::create(rlrun::Recipe::load(recipe.as_ref(), &overrides)?)?;
    let summary = run.train(false)?;
    for (i, m) in run.history().iter().enumerate() {
        let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "step {}: reward {:.3}, is_number {:.2}",
            i + 1,
            get("reward/mean"),
            get("reward/is_number")
        );
    }
    println!(
        "{} steps in {:.1}s; checkpoint {}",
        summary.steps,
        summary.seconds,
        summary.checkpoint.display()
    );
    Ok(())
}
