//! Datasets: Parquet and JSONL loading (verl layout, field mapping, malformed rows), the
//! epoch-shuffled resumable stream, and the generated tasks.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use rlrun_rollout::reward::evaluate_countdown;
use rlrun_rollout::*;
use serde_json::json;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write fixture");
}

#[test]
fn parquet_verl_layout_with_malformed_rows() {
    let dir = common::temp_dir();
    let path = dir.path().join("train.parquet");
    common::verl_parquet::write_verl_parquet(&path, 1000, Some(100)).unwrap();
    let ds = rlrun_rollout::data::load_parquet(&FileDatasetConfig::new(&path)).unwrap();
    assert_eq!(ds.len(), 990);
    let report = ds.load_report().unwrap();
    assert_eq!(report.rows_read, 1000);
    assert_eq!(report.rows_kept, 990);
    assert_eq!(report.rows_skipped, 10);
    assert!(
        report.first_skipped[0].starts_with("row 1: missing prompt"),
        "{:?}",
        report.first_skipped
    );
    assert!(report.first_skipped[1].starts_with("row 101:"));

    let s = &ds.samples()[0]; // row index 1 (row 0 is malformed)
    let (question, answer, gt) = common::verl_parquet::row_text(1);
    match &s.prompt {
        Prompt::Messages(m) => {
            assert_eq!(m.len(), 1);
            assert_eq!(m[0].role, "user");
            assert!(m[0].content.starts_with(&question));
        }
        other => panic!("expected chat prompt, got {other:?}"),
    }
    assert_eq!(s.id, 0);
    assert_eq!(s.ground_truth.as_deref(), Some(gt.as_str()));
    assert_eq!(s.data_source, "openai/gsm8k");
    assert_eq!(
        s.extra,
        json!({"split": "train", "index": 1, "answer": answer, "question": question})
    );
    // Ids are dense indices over valid rows.
    assert!(ds
        .samples()
        .iter()
        .enumerate()
        .all(|(i, s)| s.id == i as u64));
}

#[test]
fn parquet_field_mapping_into_nested_structs() {
    let dir = common::temp_dir();
    let path = dir.path().join("other.parquet");
    common::verl_parquet::write_verl_parquet(&path, 50, None).unwrap();
    let mut cfg = FileDatasetConfig::new(&path);
    cfg.fields = toml::from_str(
        "prompt = \"extra_info.question\"\nground_truth = \"extra_info.index\"\ndata_source = \"ability\"\nextra = \"reward_model\"",
    )
    .unwrap();
    cfg.text_as_chat = false;
    cfg.template = Some("Q: {prompt}\nA:".into());
    cfg.limit = Some(20);
    let ds = DatasetConfig::Parquet(cfg).build().unwrap();
    assert_eq!(ds.num_samples(), Some(20));
    let s = ds.get(3).unwrap();
    let (question, _, gt) = common::verl_parquet::row_text(3);
    assert_eq!(s.prompt, Prompt::Text(format!("Q: {question}\nA:")));
    assert_eq!(
        s.ground_truth.as_deref(),
        Some("3"),
        "an int64 ground truth becomes its text"
    );
    assert_eq!(s.data_source, "math");
    assert_eq!(s.extra, json!({"ground_truth": gt, "style": "rule"}));
}

#[test]
fn parquet_errors_name_the_file_and_columns() {
    let dir = common::temp_dir();
    let path = dir.path().join("p.parquet");
    common::verl_parquet::write_verl_parquet(&path, 10, None).unwrap();
    let mut cfg = FileDatasetConfig::new(&path);
    cfg.fields.prompt = "question".into();
    let err = rlrun_rollout::data::load_parquet(&cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("p.parquet")
            && err.contains("`question` not found")
            && err.contains("reward_model"),
        "{err}"
    );

    let all_bad = dir.path().join("bad.parquet");
    common::verl_parquet::write_verl_parquet(&all_bad, 10, Some(1)).unwrap();
    let err = rlrun_rollout::data::load_parquet(&FileDatasetConfig::new(&all_bad)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoValidRows {
                rows_read: 10,
                skipped: 10,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("row 1: missing prompt"), "{err}");

    let not_parquet = dir.path().join("x.parquet");
    write(&not_parquet, "hello");
    let err = rlrun_rollout::data::load_parquet(&FileDatasetConfig::new(&not_parquet)).unwrap_err();
    assert!(err.to_string().contains("x.parquet"), "{err}");
    let err = rlrun_rollout::data::load_parquet(&FileDatasetConfig::new(
        dir.path().join("missing.parquet"),
    ))
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("missing.parquet"));
}

const JSONL: &str = r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "data_source": "toy", "reward_model": {"ground_truth": "4", "style": "rule"}, "extra_info": {"k": 1}}
not json at all

[1, 2, 3]
{"data_source": "toy"}
{"prompt": 5}
{"prompt": [{"role": "user"}]}
{"prompt": [], "reward_model": {"ground_truth": "x"}}
{"prompt": "plain question", "reward_model": {"ground_truth": 12}}
{"prompt": "no answer"}
{"prompt": "ü 🎉", "reward_model.ground_truth": "literal key wins", "reward_model": {"ground_truth": "nested"}, "data_source": null}
"#;

#[test]
fn jsonl_verl_layout_skips_and_counts_malformed_lines() {
    let dir = common::temp_dir();
    let path = dir.path().join("mixed.jsonl");
    write(&path, JSONL);
    let ds = rlrun_rollout::data::load_jsonl(&FileDatasetConfig::new(&path)).unwrap();
    assert_eq!(ds.len(), 4);
    let report = ds.load_report().unwrap();
    assert_eq!(report.rows_read, 10, "blank line not counted");
    assert_eq!(report.rows_skipped, 6);
    let lines: Vec<&str> = report
        .first_skipped
        .iter()
        .map(|s| s.split(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        lines,
        ["line 2", "line 4", "line 5", "line 6", "line 7", "line 8"]
    );
    assert!(report.first_skipped[0].contains("invalid JSON"));
    assert!(report.first_skipped[2].contains("missing prompt field `prompt`"));

    let s = ds.samples();
    assert_eq!(
        s[0].prompt,
        Prompt::Messages(vec![
            ChatMessage::system("Be brief."),
            ChatMessage::user("2+2?")
        ])
    );
    assert_eq!(s[0].ground_truth.as_deref(), Some("4"));
    assert_eq!(s[0].extra, json!({"k": 1}));
    assert_eq!(s[1].prompt, Prompt::user("plain question"));
    assert_eq!(s[1].ground_truth.as_deref(), Some("12"));
    assert_eq!(s[1].data_source, "mixed", "file stem when the row has none");
    assert_eq!(s[2].ground_truth, None);
    assert_eq!(s[2].extra, serde_json::Value::Null);
    assert_eq!(s[3].ground_truth.as_deref(), Some("literal key wins"));
    assert_eq!(s[3].prompt.last_user_text(), "ü 🎉");
}

#[test]
fn jsonl_gzip_mapping_and_errors() {
    let dir = common::temp_dir();
    let gz = dir.path().join("qa.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    for i in 0..30 {
        writeln!(
            enc,
            "{}",
            json!({"question": format!("q{i}"), "answer": i, "meta": {"i": i}})
        )
        .unwrap();
    }
    enc.finish().unwrap();
    let cfg: DatasetConfig = toml::from_str(&format!(
        "name = \"jsonl\"\npath = {:?}\ndefault_data_source = \"qa\"\ntemplate = \"{{prompt}}?\"\nlimit = 25\nfields = {{ prompt = \"question\", ground_truth = \"answer\", extra = \"meta\" }}",
        gz.display().to_string()
    ))
    .unwrap();
    let ds = cfg.build().unwrap();
    assert_eq!(ds.num_samples(), Some(25));
    let s = ds.get(7).unwrap();
    assert_eq!(s.prompt, Prompt::user("q7?"));
    assert_eq!(s.ground_truth.as_deref(), Some("7"));
    assert_eq!(s.data_source, "qa");
    assert_eq!(s.extra, json!({"i": 7}));
    assert!(ds.get(25).is_none());

    let bad = dir.path().join("bad.jsonl");
    write(&bad, "{}\n{\"prompt\": null}\n");
    let err = rlrun_rollout::data::load_jsonl(&FileDatasetConfig::new(&bad)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bad.jsonl") && msg.contains("no valid rows") && msg.contains("line 1"),
        "{msg}"
    );
    let empty = dir.path().join("empty.jsonl");
    write(&empty, "\n\n");
    assert!(matches!(
        rlrun_rollout::data::load_jsonl(&FileDatasetConfig::new(&empty)),
        Err(Error::NoValidRows { rows_read: 0, .. })
    ));
}

fn tiny(n: usize) -> Arc<dyn Dataset> {
    let samples = (0..n)
        .map(|i| Sample::new(0, Prompt::text(format!("q{i}"))))
        .collect();
    Arc::new(InMemoryDataset::new("tiny", samples))
}

fn ids(batch: &[Sample]) -> Vec<u64> {
    batch.iter().map(|s| s.id).collect()
}

#[test]
fn stream_epochs_are_seeded_permutations() {
    let ds = tiny(100);
    let mut a = PromptStream::new(ds.clone(), 7, true).unwrap();
    let mut b = PromptStream::new(ds.clone(), 7, true).unwrap();
    let mut c = PromptStream::new(ds.clone(), 8, true).unwrap();
    let e0 = ids(&a.next_batch(100));
    let e1 = ids(&a.next_batch(100));
    assert_eq!(
        e0.iter().copied().collect::<BTreeSet<_>>().len(),
        100,
        "each sample once"
    );
    assert_eq!(e1.iter().copied().collect::<BTreeSet<_>>().len(), 100);
    assert_ne!(e0, e1, "reshuffled per epoch");
    assert_ne!(e0, (0..100).collect::<Vec<_>>());
    assert_eq!(
        ids(&b.next_batch(200)),
        [e0.clone(), e1].concat(),
        "same seed, same order"
    );
    assert_ne!(ids(&c.next_batch(100)), e0, "other seed, other order");
    assert_eq!(a.epoch(), 1);
    // The permutation is pinned: changing it would silently change resumed runs.
    assert_eq!(
        &e0[..5],
        &rlrun_rollout::data::epoch_permutation(7, 0, 100)[..5]
    );
    let mut plain = PromptStream::new(ds, 7, false).unwrap();
    assert_eq!(
        ids(&plain.next_batch(150)),
        (0..100).chain(0..50).collect::<Vec<_>>()
    );
}

#[test]
fn stream_resumes_exactly_from_a_serialized_cursor() {
    let ds = tiny(37);
    let mut run = PromptStream::new(ds.clone(), 2024, true).unwrap();
    run.next_batch(30);
    run.next_batch(30); // now inside epoch 1
    let saved = serde_json::to_string(&run.cursor()).unwrap();
    let expected: Vec<Vec<u64>> = (0..5).map(|_| ids(&run.next_batch(16))).collect();

    let mut resumed = PromptStream::new(ds.clone(), 0, true).unwrap();
    let cursor: Cursor = serde_json::from_str(&saved).unwrap();
    assert_eq!(cursor.epoch, 1);
    assert_eq!(cursor.position, 23);
    resumed.restore(&cursor).unwrap();
    let got: Vec<Vec<u64>> = (0..5).map(|_| ids(&resumed.next_batch(16))).collect();
    assert_eq!(got, expected);

    // A cursor from a dataset of another size is refused.
    let mut other = PromptStream::new(tiny(36), 0, true).unwrap();
    assert!(other.restore(&cursor).is_err());
    let past_end = Cursor {
        position: 99,
        ..cursor
    };
    assert!(resumed.restore(&past_end).is_err());
    assert!(PromptStream::new(tiny(0), 0, true).is_err());
}

#[test]
fn stream_over_generated_task_resumes_too() {
    let ds = DatasetConfig::Countdown(CountdownTaskConfig::default())
        .build()
        .unwrap();
    let mut run = PromptStream::new(ds.clone(), 5, true).unwrap();
    let first = run.next_batch(10);
    assert_eq!(ids(&first), (0..10).collect::<Vec<_>>());
    let cursor = run.cursor();
    assert_eq!(cursor.num_samples, None);
    let next = run.next_batch(5);
    let mut resumed = PromptStream::new(ds, 5, true).unwrap();
    resumed.restore(&cursor).unwrap();
    assert_eq!(resumed.next_batch(5), next);
}

/// Parses `a op b op c ...` and evaluates it exactly with the Countdown evaluator.
fn evaluate_expression(expression: &str) -> (i128, Vec<i128>) {
    let numbers: Vec<i128> = expression
        .split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().unwrap())
        .collect();
    let e = evaluate_countdown(expression, &numbers, true).unwrap();
    assert_eq!(e.value.1, 1, "division must be exact in {expression}");
    (e.value.0, numbers)
}

#[test]
fn arithmetic_task_is_deterministic_correct_and_configurable() {
    let cfg: ArithmeticConfig = toml::from_str(
        "min_digits = 2\nmax_digits = 3\noperators = [\"add\", \"sub\", \"mul\", \"div\"]\nnum_operands = 4",
    )
    .unwrap();
    let task = ArithmeticTask::new(cfg.clone()).unwrap();
    let again = ArithmeticTask::new(cfg).unwrap();
    let reward = RewardConfig::NumberMatch(Default::default())
        .build()
        .unwrap();
    let mut seen_div = false;
    for i in (0..500).rev() {
        let s = task.get(i).unwrap();
        assert_eq!(
            s,
            again.get(i).unwrap(),
            "pure function of (seed, split, index)"
        );
        assert_eq!(s.id, i);
        let expression = s.extra["expression"].as_str().unwrap();
        seen_div |= expression.contains('/');
        let (value, numbers) = evaluate_expression(expression);
        assert_eq!(numbers.len(), 4);
        assert_eq!(
            s.ground_truth.as_deref(),
            Some(value.to_string().as_str()),
            "{expression}"
        );
        assert_eq!(
            s.prompt,
            Prompt::user(format!(
                "What is {expression}? Put your final answer within \\boxed{{}}."
            ))
        );
        let right = format!("\\boxed{{{value}}}");
        assert_eq!(
            reward
                .score(&s, &Completion::from_text(&right))
                .unwrap()
                .value,
            1.0
        );
        let wrong = format!("\\boxed{{{}}}", value + 1);
        assert_eq!(
            reward
                .score(&s, &Completion::from_text(&wrong))
                .unwrap()
                .value,
            0.0
        );
    }
    assert!(seen_div);
    let other_seed = ArithmeticTask::new(ArithmeticConfig {
        seed: 1,
        ..Default::default()
    })
    .unwrap();
    let default = ArithmeticTask::new(ArithmeticConfig::default()).unwrap();
    assert_ne!(other_seed.get(0), default.get(0));
    // Operand digits respect the config (no division: operands are shown as drawn).
    let one_digit: ArithmeticConfig =
        toml::from_str("max_digits = 1\noperators = [\"mul\"]\nsize = 50\nchat = false").unwrap();
    let t = ArithmeticTask::new(one_digit).unwrap();
    assert_eq!(t.num_samples(), Some(50));
    assert!(t.get(50).is_none());
    for i in 0..50 {
        let s = t.get(i).unwrap();
        let (_, numbers) = evaluate_expression(s.extra["expression"].as_str().unwrap());
        assert!(numbers.iter().all(|n| (0..10).contains(n)));
        assert!(matches!(s.prompt, Prompt::Text(_)));
    }
    for bad in [
        "min_digits = 0",
        "min_digits = 4\nmax_digits = 3",
        "operators = []",
        "num_operands = 1",
        "max_digits = 9\nnum_operands = 5",
        "template = \"no placeholder\"",
    ] {
        let cfg: ArithmeticConfig = toml::from_str(bad).unwrap();
        assert!(ArithmeticTask::new(cfg).is_err(), "{bad}");
    }
}

#[test]
fn train_and_test_splits_never_overlap() {
    // A small problem space (1-digit +/-: 200 problems) so collisions would be certain otherwise.
    let base = "max_digits = 1\noperators = [\"add\", \"sub\"]";
    let problems = |split: &str, seed: u64| -> HashSet<String> {
        let cfg: ArithmeticConfig =
            toml::from_str(&format!("{base}\nsplit = \"{split}\"\nseed = {seed}")).unwrap();
        let task = ArithmeticTask::new(cfg).unwrap();
        (0..2000)
            .map(|i| {
                task.get(i).unwrap().extra["expression"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let train = problems("train", 0);
    let test = problems("test", 0);
    let test_other_seed = problems("test", 99);
    assert!(test.len() >= 3, "held-out set too small: {test:?}");
    assert!(
        train.len() > 150,
        "train covers most of the space: {}",
        train.len()
    );
    assert!(train.is_disjoint(&test));
    assert!(train.is_disjoint(&test_other_seed));
    assert_eq!(
        train.len() + test.len(),
        200,
        "the two sides partition the space"
    );

    // The same under commutation, for every operator: `a + b` in test never has `b + a` in
    // train (checked with a key computed here, independently of the task's canonical form).
    for op in ["add", "sub", "mul", "div"] {
        let key_set = |split: &str| -> HashSet<String> {
            let cfg: ArithmeticConfig = toml::from_str(&format!(
                "max_digits = 1\noperators = [\"{op}\"]\nsplit = \"{split}\""
            ))
            .unwrap();
            let task = ArithmeticTask::new(cfg).unwrap();
            (0..3000)
                .map(|i| {
                    let e = task.get(i).unwrap().extra["expression"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    let parts: Vec<&str> = e.split(' ').collect();
                    let (a, sym, b) = (parts[0], parts[1], parts[2]);
                    match sym {
                        "+" | "*" if a > b => format!("{b} {sym} {a}"),
                        _ => e.clone(),
                    }
                })
                .collect()
        };
        let (train, test) = (key_set("train"), key_set("test"));
        assert!(!test.is_empty(), "{op}: no held-out problem");
        assert!(
            train.is_disjoint(&test),
            "{op}: {:?}",
            train.intersection(&test).collect::<Vec<_>>()
        );
    }
    // Three operands, mixed operators: every rearrangement of the additive terms and of the
    // factors lands on the same side.
    let cfg: ArithmeticConfig =
        toml::from_str("max_digits = 1\nnum_operands = 3\noperators = [\"add\", \"sub\", \"mul\"]")
            .unwrap();
    let train_task = ArithmeticTask::new(cfg.clone()).unwrap();
    let test_task = ArithmeticTask::new(ArithmeticConfig {
        split: Split::Test,
        ..cfg
    })
    .unwrap();
    let problems = |t: &ArithmeticTask| -> HashSet<String> {
        (0..3000)
            .map(|i| {
                t.get(i).unwrap().extra["problem"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert!(problems(&train_task).is_disjoint(&problems(&test_task)));
    let mut twins = 0;
    for i in 0..300 {
        let s = test_task.get(i).unwrap();
        let e = s.extra["expression"].as_str().unwrap();
        let t: Vec<&str> = e.split(' ').collect();
        // `a op1 b op2 c` with op1 = op2 = + (or *): `c op b op a` is the same problem.
        if t[1] == t[3] && (t[1] == "+" || t[1] == "*") {
            let twin = format!("{} {} {} {} {}", t[4], t[3], t[2], t[1], t[0]);
            let found = (0..3000)
                .filter_map(|j| train_task.get(j))
                .any(|x| x.extra["expression"].as_str() == Some(twin.as_str()));
            assert!(!found, "{e} is held out but {twin} is in train");
            twins += 1;
        }
    }
    assert!(twins > 0);

    let countdown = |split: Split| -> HashSet<String> {
        let task = CountdownTask::new(CountdownTaskConfig {
            split,
            max_number: 6,
            min_numbers: 3,
            max_numbers: 3,
            max_target: 30,
            ..Default::default()
        })
        .unwrap();
        (0..1500)
            .map(|i| {
                let s = task.get(i).unwrap();
                let mut n: Vec<i64> = serde_json::from_value(s.extra["numbers"].clone()).unwrap();
                n.sort_unstable();
                format!("{n:?}|{}", s.ground_truth.unwrap())
            })
            .collect()
    };
    let (train, test) = (countdown(Split::Train), countdown(Split::Test));
    assert!(!test.is_empty());
    assert!(train.is_disjoint(&test));
}

#[test]
fn countdown_task_problems_are_solvable_and_scored() {
    let task = CountdownTask::new(CountdownTaskConfig::default()).unwrap();
    let reward = RewardConfig::Countdown(Default::default()).build().unwrap();
    for i in 0..300 {
        let s = task.get(i).unwrap();
        let numbers: Vec<i128> = serde_json::from_value(s.extra["numbers"].clone()).unwrap();
        assert!((3..=4).contains(&numbers.len()));
        assert!(numbers.iter().all(|n| (1..=100).contains(n)));
        let target: i128 = s.ground_truth.as_deref().unwrap().parse().unwrap();
        assert!((1..=1000).contains(&target));
        let solution = s.extra["solution"].as_str().unwrap();
        assert!(
            evaluate_countdown(solution, &numbers, true)
                .unwrap()
                .equals(target),
            "{solution}"
        );
        let text = format!("<think>...</think>\n<answer>{solution}</answer>");
        assert_eq!(
            reward
                .score(&s, &Completion::from_text(&text))
                .unwrap()
                .value,
            1.0
        );
        assert!(s
            .prompt
            .last_user_text()
            .contains(&format!("equals {target}")));
    }
}
