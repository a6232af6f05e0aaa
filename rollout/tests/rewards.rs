//! Built-in rewards on adversarial inputs, the Countdown parser, and the recipe config shapes.

use std::sync::Arc;
use std::time::Instant;

use rlrun_rollout::reward::extract::{last_boxed, last_number, last_tagged};
use rlrun_rollout::reward::{evaluate_countdown, CountdownError};
use rlrun_rollout::*;

/// Every built-in, with a config that exercises it.
fn all_builtins() -> Vec<Arc<dyn RewardFn>> {
    let configs = [
        r#"name = "gsm8k""#,
        r#"name = "number-match""#,
        r#"name = "math""#,
        r#"name = "countdown""#,
        r#"name = "exact-match"
           extract = "boxed""#,
        r#"name = "regex-match"
           pattern = '(?P<answer>\d+)\s*$'
           mode = "capture-equals-ground-truth""#,
        r#"name = "format""#,
        r#"name = "overlong-penalty"
           buffer_tokens = 4"#,
        r#"name = "length-penalty"
           target_tokens = 2"#,
    ];
    configs
        .iter()
        .map(|c| {
            let cfg: RewardConfig = toml::from_str(c).unwrap_or_else(|e| panic!("{c}: {e}"));
            cfg.build().unwrap_or_else(|e| panic!("{c}: {e}"))
        })
        .collect()
}

fn adversarial_texts() -> Vec<String> {
    let mut v = vec![
        String::new(),
        " ".into(),
        "\n\n\n".into(),
        "\\boxed{".into(),
        "\\boxed{}".into(),
        "\\boxed".into(),
        "}}}}{{{{".into(),
        "\\boxed{\\frac{1}{2}".into(),
        "\\boxed{\\}".into(),
        "\\boxed{\\\\}".into(),
        "####".into(),
        "#### ".into(),
        "Answer:".into(),
        "<answer>".into(),
        "</answer><answer>".into(),
        "<answer></answer>".into(),
        "<think></think><answer></answer>".into(),
        "$$$$\\$\\$".into(),
        "-".into(),
        "--5".into(),
        ".".into(),
        "1e308 1e309 NaN inf -inf".into(),
        "99999999999999999999999999999999999999999999999999".into(),
        "١٢٣ ۴۵۶ 一二三 ½ ² Ⅻ".into(),
        "\\boxed{👍} 🎉 \u{200b}\u{feff} ﷽ \u{0}".into(),
        "e\u{301}\u{301}\u{301}\u{301}".into(),
        "\\boxed{\u{0}\u{1}\u{7f}}".into(),
        "\\frac\\frac\\frac\\sqrt\\sqrt".into(),
        "\\left\\right\\left(\\right)".into(),
        "\\text{\\text{\\text{".into(),
    ];
    // Deeply nested braces (balanced and not).
    v.push(format!(
        "\\boxed{{{}1{}}}",
        "{".repeat(5000),
        "}".repeat(5000)
    ));
    v.push(format!("\\boxed{{{}", "{".repeat(20_000)));
    v.push(format!(
        "\\boxed{{{}1{}}}",
        "\\frac{".repeat(2000),
        "}{2}".repeat(2000)
    ));
    v.push(format!(
        "<answer>{}1{}</answer>",
        "(".repeat(10_000),
        ")".repeat(10_000)
    ));
    // Huge inputs.
    v.push("9".repeat(1_000_000));
    v.push("\\boxed{1} ".repeat(100_000));
    v.push("ü".repeat(500_000));
    v.push(format!(
        "<think>{}</think><answer>{}</answer>",
        "x".repeat(1_000_000),
        "1 + ".repeat(100_000)
    ));
    v
}

#[test]
fn builtins_survive_adversarial_completions_and_ground_truths() {
    let rewards = all_builtins();
    let texts = adversarial_texts();
    let ids: Vec<u32> = vec![7; 10];
    let mut ground_truths: Vec<Option<String>> = vec![None];
    ground_truths.extend(texts.iter().step_by(3).map(|t| Some(t.clone())));
    ground_truths.push(Some(r#"{"target": "x", "numbers": [1e400]}"#.into()));
    let started = Instant::now();
    for gt in &ground_truths {
        let mut sample = Sample::new(0, Prompt::text("q"))
            .with_extra(serde_json::json!({"numbers": [1, 2, "three"]}));
        sample.ground_truth = gt.clone();
        for text in &texts {
            let completion = Completion::new(text, &ids, FinishReason::Length, 5);
            for r in &rewards {
                let out = r.score(&sample, &completion).unwrap();
                assert!(out.value.is_finite(), "{}: non-finite", r.name());
                assert!(
                    (-1.0..=1.0).contains(&out.value),
                    "{} gave {} on {:?}",
                    r.name(),
                    out.value,
                    &text[..text.len().min(40)]
                );
                assert!(out.metrics.values().all(|m| m.is_finite()));
            }
        }
    }
    // A hang guard, not a timing claim: catastrophic backtracking on these inputs would run for
    // hours; a healthy build takes well under a second.
    assert!(
        started.elapsed().as_secs() < 600,
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn adversarial_strings_never_match_a_plain_answer() {
    let sample = Sample::new(0, Prompt::text("q")).with_ground_truth("42");
    for r in all_builtins().iter().filter(|r| {
        matches!(
            r.name(),
            "gsm8k" | "number-match" | "math" | "exact-match" | "regex-match"
        )
    }) {
        for text in adversarial_texts() {
            assert_eq!(
                r.score(&sample, &Completion::from_text(&text))
                    .unwrap()
                    .value,
                0.0,
                "{}",
                r.name()
            );
        }
    }
}

#[test]
fn extraction_edge_cases() {
    assert_eq!(last_boxed(""), None);
    assert_eq!(last_boxed("\\boxed{a{b}c}"), Some("a{b}c"));
    assert_eq!(last_boxed("\\boxed{\\{1,2\\}}"), Some("\\{1,2\\}"));
    assert_eq!(last_boxed("\\fbox{3} then \\boxed{4}"), Some("4"));
    assert_eq!(last_boxed("\\boxed{4} then \\fbox{3}"), Some("3"));
    assert_eq!(last_boxed("\\boxed{ü🎉}"), Some("ü🎉"));
    assert_eq!(last_tagged("<answer>ü</answer>", "answer"), Some("ü"));
    assert_eq!(last_number("١٢٣"), None);
    assert_eq!(last_number("x = -3.5."), Some(-3.5));
}

#[test]
fn math_reward_handles_real_world_completion_shapes() {
    let reward = MathMatch::default();
    let s = |gt: &str| Sample::new(0, Prompt::text("q")).with_ground_truth(gt);
    let score = |gt: &str, text: &str| {
        reward
            .score(&s(gt), &Completion::from_text(text))
            .unwrap()
            .value
    };
    assert_eq!(
        score("\\frac{1}{2}", "so $x = \\boxed{\\dfrac{1}{2}}$."),
        1.0
    );
    assert_eq!(score("\\frac{1}{2}", "so $x = \\boxed{0.5}$."), 1.0);
    assert_eq!(score("\\frac{1}{2}", "\\boxed{1/2}"), 1.0);
    assert_eq!(score("\\frac{1}{2}", "the answer is 1/2"), 0.0, "no box");
    assert_eq!(score("(3, -1)", "\\boxed{\\left(3,-1\\right)}"), 1.0);
    assert_eq!(score("(3, -1)", "\\boxed{(-1, 3)}"), 0.0);
    assert_eq!(score("x^2+2x+1", "\\boxed{x^2 + 2x + 1}"), 1.0);
    assert_eq!(score("90^\\circ", "\\boxed{90}"), 1.0);
    assert_eq!(score("\\$18.90", "\\boxed{18.9}"), 1.0);
    assert_eq!(score("5\\sqrt{2}", "\\boxed{\\sqrt{50}}"), 1.0);
    assert_eq!(score("\\text{(C)}", "\\boxed{C}"), 1.0);
    assert_eq!(
        score("2", "first \\boxed{2}, finally \\boxed{3}"),
        0.0,
        "last box counts"
    );
    // A full solution as ground truth uses its last box.
    assert_eq!(score("... hence \\boxed{7}.", "\\boxed{7}"), 1.0);
}

#[test]
fn countdown_parser_rejects_reuse_unknown_numbers_and_division_by_zero() {
    let nums = [3, 7, 25, 50];
    // Uses a number twice.
    assert_eq!(
        evaluate_countdown("25 + 25 + 3 + 7", &nums, false),
        Err(CountdownError::UnknownNumber(25))
    );
    assert_eq!(
        evaluate_countdown("(50 - 25) * 3 + 7 - 7", &nums, false),
        Err(CountdownError::UnknownNumber(7))
    );
    // Unknown numbers (including ones that are digits of given numbers).
    assert_eq!(
        evaluate_countdown("2 * 5 + 3 + 7", &nums, false),
        Err(CountdownError::UnknownNumber(2))
    );
    assert_eq!(
        evaluate_countdown("50 + 25 + 3 + 70", &nums, false),
        Err(CountdownError::UnknownNumber(70))
    );
    // Division by zero, directly or through a subexpression.
    assert_eq!(
        evaluate_countdown("50 / (7 - 7)", &[50, 7, 7], true),
        Err(CountdownError::DivisionByZero)
    );
    assert_eq!(
        evaluate_countdown("(3 + 7) / (25 - 25)", &[3, 7, 25, 25], true),
        Err(CountdownError::DivisionByZero)
    );
    // Valid, with exact fractions along the way: 50 / (7 / 3 - 25 / 25) = 37.5
    let e = evaluate_countdown("50 / (7 / 3 - 25 / 25)", &[50, 7, 3, 25, 25], true).unwrap();
    assert_eq!(e.value, (75, 2));
    // Anything that is not arithmetic on integer literals.
    for bad in [
        "__import__('os')",
        "3 ** 7",
        "3.5 + 7",
        "x + 3",
        "3 + 7)",
        "(3 + 7",
        "3 7",
        "0x10",
    ] {
        assert!(
            evaluate_countdown(bad, &[3, 7, 16, 0], false).is_err(),
            "{bad}"
        );
    }

    let reward = CountdownReward::new(Default::default()).unwrap();
    let sample = Sample::new(0, Prompt::text("q"))
        .with_ground_truth("85")
        .with_extra(serde_json::json!({"numbers": [3, 7, 25, 50]}));
    let score = |t: &str| {
        reward
            .score(&sample, &Completion::from_text(t))
            .unwrap()
            .value
    };
    assert_eq!(score("<answer>50 + 25 + 7 + 3</answer>"), 1.0);
    assert_eq!(score("<answer>50 + 25 + 7 + 3 + 3</answer>"), 0.0);
    assert_eq!(score("<answer>50 + 25 + 10</answer>"), 0.0);
}

#[test]
fn config_shapes_parse_and_reject_unknowns() {
    // Advantage: every variant.
    for (text, name) in [
        ("name = \"grpo\"", "grpo"),
        ("name = \"grpo\"\nepsilon = 1e-4", "grpo"),
        ("name = \"dr-grpo\"", "dr-grpo"),
        ("name = \"rloo\"", "rloo"),
        ("name = \"reinforce-pp\"\ngamma = 0.99", "reinforce-pp"),
        ("name = \"reinforce-pp-baseline\"", "reinforce-pp-baseline"),
        (
            "name = \"gae\"\ngamma = 1.0\nlambda = 0.95\nwhiten = false",
            "gae",
        ),
    ] {
        let cfg: AdvantageConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(cfg.build().unwrap().name(), name);
    }
    for bad in [
        "name = \"ppo\"",
        "name = \"grpo\"\nlambda = 0.9",
        "name = \"dr-grpo\"\nepsilon = 1.0",
        "name = \"rloo\"\nx = 1",
        "gamma = 1.0",
    ] {
        assert!(
            toml::from_str::<AdvantageConfig>(bad).is_err(),
            "accepted {bad:?}"
        );
    }
    let cfg: AdvantageConfig = toml::from_str("name = \"gae\"\nlambda = 1.5").unwrap();
    assert!(cfg.build().is_err(), "lambda out of range");

    // Reward: nested weighted sum, inline tables.
    let cfg: RewardConfig = toml::from_str(
        r#"
        name = "weighted-sum"
        terms = [
          { weight = 1.0, reward = { name = "countdown", format_score = 0.1 } },
          { weight = 0.5, reward = { name = "weighted-sum", terms = [
              { weight = 1.0, reward = { name = "format" } },
              { weight = -1.0, reward = { name = "length-penalty", coef = 0.5, target_tokens = 100, max_tokens = 200 } },
          ] } },
        ]
        "#,
    )
    .unwrap();
    assert_eq!(cfg.build().unwrap().name(), "weighted-sum");
    for bad in [
        "name = \"math\"\nstrict = true",
        "name = \"gsm8k\"\nformat = \"loose\"",
        "name = \"regex-match\"",
        "name = \"bleu\"",
        "name = \"weighted-sum\"\nterms = [{ weight = 1.0, reward = { name = \"math\" }, extra = 1 }]",
    ] {
        assert!(toml::from_str::<RewardConfig>(bad).is_err(), "accepted {bad:?}");
    }
    for invalid in [
        "name = \"regex-match\"\npattern = \"(\"",
        "name = \"weighted-sum\"\nterms = []",
        "name = \"overlong-penalty\"\nbuffer_tokens = 0",
        "name = \"gsm8k\"\ntolerance = -1.0",
    ] {
        let cfg: RewardConfig = toml::from_str(invalid).unwrap();
        assert!(cfg.build().is_err(), "built {invalid:?}");
    }
    // number-match defaults to the strict boxed format, gsm8k to flexible.
    let strict: RewardConfig = toml::from_str("name = \"number-match\"").unwrap();
    let flexible: RewardConfig = toml::from_str("name = \"gsm8k\"").unwrap();
    let s = Sample::new(0, Prompt::text("")).with_ground_truth("7");
    let c = Completion::from_text("The answer is 7.");
    assert_eq!(strict.build().unwrap().score(&s, &c).unwrap().value, 0.0);
    assert_eq!(flexible.build().unwrap().score(&s, &c).unwrap().value, 1.0);

    // Dataset.
    for text in [
        "name = \"jsonl\"\npath = \"x.jsonl\"",
        "name = \"parquet\"\npath = \"x.parquet\"\nfields = { prompt = \"question\", ground_truth = \"answer\", data_source = \"src\", extra = \"meta\" }",
        "name = \"arithmetic\"\nsplit = \"test\"\nsize = 100\noperators = [\"div\"]",
        "name = \"countdown\"\nmin_numbers = 2\nmax_numbers = 3",
        "name = \"gsm8k\"",
        "name = \"math\"\nsubset = \"math500\"",
    ] {
        toml::from_str::<DatasetConfig>(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
    for bad in [
        "name = \"jsonl\"",
        "name = \"jsonl\"\npath = \"x\"\nfields = { question = \"q\" }",
        "name = \"arithmetic\"\noperators = [\"pow\"]",
        "name = \"math\"\nsubset = \"level5\"",
        "name = \"csv\"\npath = \"x\"",
    ] {
        assert!(
            toml::from_str::<DatasetConfig>(bad).is_err(),
            "accepted {bad:?}"
        );
    }

    // Runner.
    assert!(toml::from_str::<RewardRunnerConfig>("timeout = 3").is_err());
}
