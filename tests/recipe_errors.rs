//! Malformed recipes give one-line errors naming the key path and its line, and unknown keys get
//! a suggestion.

mod common;

use common::*;

const BASE: &str = r#"# test recipe
name = "t"
steps = 2

[model]
path = "MODEL"

[data]
train = { name = "arithmetic", min_digits = 1, max_digits = 1 }
prompts_per_step = 2

[rollout]
n = 2
max_tokens = 4

[reward]
name = "number-match"

[algorithm]
advantage = { name = "grpo" }

[algorithm.loss]
name = "ppo"

[trainer]
lr = 1e-5
"#;

/// Applies `edit` to the base recipe, runs `rlrun check`, returns the error line.
fn check_error(edit: impl Fn(String) -> String) -> String {
    let tmp = rlrun_testkit::tempdir();
    let model = rlrun_testkit::fixtures().join("tiny-qwen2");
    let text = edit(BASE.replace("MODEL", &model.display().to_string()));
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = rlrun(&["check".into(), path.display().to_string()]);
    assert!(!out.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one-line error expected, got:\n{stderr}");
    lines[0].to_string()
}

fn line_of(needle: &str) -> usize {
    BASE.lines()
        .position(|l| l.contains(needle))
        .expect("needle in base")
        + 1
}

fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "`{p}` missing from: {err}");
    }
}

#[test]
fn base_recipe_is_valid() {
    let tmp = rlrun_testkit::tempdir();
    let model = rlrun_testkit::fixtures().join("tiny-qwen2");
    let path = tmp.path().join("ok.toml");
    std::fs::write(&path, BASE.replace("MODEL", &model.display().to_string())).unwrap();
    let out = rlrun(&["check".into(), path.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_top_level_key_suggests_the_nearest() {
    let e = check_error(|t| t.replace("steps = 2", "stepz = 2"));
    assert_has(
        &e,
        &[
            "unknown field `stepz`",
            "did you mean `steps`?",
            &format!(":{}:", line_of("steps = 2")),
        ],
    );
}

#[test]
fn unknown_nested_key_names_its_table_and_line() {
    let e = check_error(|t| t.replace("lr = 1e-5", "lrr = 1e-5"));
    assert_has(
        &e,
        &[
            "trainer",
            "unknown field `lrr`",
            "did you mean `lr`?",
            &format!(":{}:", line_of("lr = 1e-5")),
        ],
    );
}

#[test]
fn unknown_loss_option_is_rejected() {
    let e = check_error(|t| t.replace("name = \"ppo\"", "name = \"ppo\"\nclip_lo = 0.1"));
    assert_has(&e, &["algorithm.loss", "clip_lo"]);
}

#[test]
fn wrong_type_names_key_and_expected_type() {
    let e = check_error(|t| t.replace("steps = 2", "steps = \"ten\""));
    assert_has(
        &e,
        &["`steps`", "string", &format!(":{}:", line_of("steps = 2"))],
    );
}

#[test]
fn negative_batch_size_is_rejected() {
    let e = check_error(|t| t.replace("prompts_per_step = 2", "prompts_per_step = -4"));
    assert_has(
        &e,
        &[
            "data.prompts_per_step",
            &format!(":{}:", line_of("prompts_per_step")),
        ],
    );
    let e = check_error(|t| t.replace("prompts_per_step = 2", "prompts_per_step = 0"));
    assert_has(
        &e,
        &[
            "`data.prompts_per_step`",
            "at least 1",
            &format!(":{}:", line_of("prompts_per_step")),
        ],
    );
}

#[test]
fn missing_model_path_is_named() {
    let e = check_error(|t| {
        let start = t.find("path = \"").unwrap();
        let end = t[start..].find('\n').unwrap() + start;
        format!("{}path = \"no/such/model\"{}", &t[..start], &t[end..])
    });
    assert_has(
        &e,
        &[
            "`model.path`",
            "no such file or directory",
            "no/such/model",
            &format!(":{}:", line_of("path = ")),
        ],
    );
}

#[test]
fn gae_without_a_critic_is_incompatible() {
    let e = check_error(|t| {
        t.replace(
            "advantage = { name = \"grpo\" }",
            "advantage = { name = \"gae\" }",
        )
    });
    assert_has(
        &e,
        &[
            "`algorithm.advantage`",
            "needs a critic",
            &format!(":{}:", line_of("advantage = ")),
        ],
    );
}

#[test]
fn grpo_needs_groups() {
    let e = check_error(|t| t.replace("n = 2", "n = 1"));
    assert_has(
        &e,
        &[
            "`rollout.n`",
            "needs rollout.n >= 2",
            &format!(":{}:", line_of("n = 2")),
        ],
    );
}

#[test]
fn zero_temperature_is_rejected_for_training() {
    let e = check_error(|t| t.replace("n = 2", "n = 2\ntemperature = 0.0"));
    assert_has(&e, &["`rollout.temperature`", "must be > 0"]);
}

#[test]
fn unknown_reward_name_lists_choices() {
    let e = check_error(|t| t.replace("name = \"number-match\"", "name = \"numbr-match\""));
    assert_has(&e, &["reward", "numbr-match", "number-match"]);
}

#[test]
fn kl_in_loss_and_reward_at_once_is_incompatible() {
    let e = check_error(|t| {
        t.replace("name = \"ppo\"", "name = \"ppo\"\nkl = { coef = 0.1 }")
            .replace(
                "advantage = { name = \"grpo\" }",
                "advantage = { name = \"grpo\" }\nkl_in_reward = { coef = 0.1 }",
            )
    });
    assert_has(&e, &["algorithm.kl_in_reward", "one or the other"]);
}

#[test]
fn negative_learning_rate_is_rejected() {
    let e = check_error(|t| t.replace("lr = 1e-5", "lr = -1e-5"));
    assert_has(
        &e,
        &[
            "`trainer.lr`",
            "must be > 0",
            &format!(":{}:", line_of("lr = 1e-5")),
        ],
    );
}

#[test]
fn negative_router_aux_loss_coef_is_rejected() {
    let e = check_error(|t| t.replace("lr = 1e-5", "lr = 1e-5\nrouter_aux_loss_coef = -0.1"));
    assert_has(&e, &["`trainer.router_aux_loss_coef`", "must be >= 0"]);
}

#[test]
fn toml_syntax_error_has_line_and_column() {
    let e = check_error(|t| t.replace("lr = 1e-5", "lr = = 1e-5"));
    assert_has(&e, &[&format!(":{}:", line_of("lr = 1e-5"))]);
}

#[test]
fn bad_override_is_reported_against_its_key() {
    let tmp = rlrun_testkit::tempdir();
    let model = rlrun_testkit::fixtures().join("tiny-qwen2");
    let path = tmp.path().join("ok.toml");
    std::fs::write(&path, BASE.replace("MODEL", &model.display().to_string())).unwrap();
    let out = rlrun(&[
        "check".into(),
        path.display().to_string(),
        "--set".into(),
        "trainer.lr=-3".into(),
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert_has(&e, &["`trainer.lr`", "must be > 0"]);
    // And a good override shows in the resolved recipe.
    let out = rlrun(&[
        "check".into(),
        path.display().to_string(),
        "--set".into(),
        "trainer.lr=3e-6".into(),
        "--set".into(),
        "rollout.n=4".into(),
    ]);
    assert!(out.status.success());
    let r = String::from_utf8_lossy(&out.stdout);
    assert!(r.contains("lr = 0.000003") && r.contains("n = 4"), "{r}");
}

#[test]
fn sync_backends_that_do_not_fit_the_placement_are_rejected() {
    // `sync.backend` is a closed set: what is not built is not accepted.
    let e = check_error(|t| format!("{t}\n[sync]\nbackend = \"cuda-ipc\"\n"));
    assert_has(
        &e,
        &[
            "sync.backend",
            "unknown variant `cuda-ipc`",
            "`auto`, `in-process`, `shm`, `net`, `nccl`",
        ],
    );
    // A broadcast needs generators in other processes.
    let e = check_error(|t| format!("{t}\n[sync]\nbackend = \"nccl\"\n"));
    assert_has(&e, &["sync.backend", "nccl", "generator_processes"]);
    let e = check_error(|t| {
        format!("{t}\n[sync]\nbackend = \"in-process\"\n[placement]\ngenerator_processes = 2\n")
    });
    assert_has(&e, &["sync.backend", "in-process", "generator"]);
    let e = check_error(|t| format!("{t}\n[sync]\nbackend = \"carrier-pigeon\"\n"));
    assert_has(&e, &["sync.backend", "unknown variant"]);
}

#[test]
fn a_weight_store_beyond_loopback_needs_a_token_and_a_reachable_address() {
    let e =
        check_error(|t| format!("{t}\n[sync]\nbackend = \"net\"\nlisten = \"10.1.2.3:7000\"\n"));
    assert_has(
        &e,
        &["sync.listen", "10.1.2.3:7000", "placement.token_file"],
    );
    let e = check_error(|t| format!("{t}\n[sync]\nlisten = \"0.0.0.0:7000\"\n"));
    assert_has(&e, &["sync.listen", "0.0.0.0:7000", "reach"]);
    let e = check_error(|t| format!("{t}\n[sync]\nlisten = \"localhost\"\n"));
    assert_has(&e, &["sync.listen", "expected ip:port"]);
}

#[test]
fn keys_that_nothing_reads_are_rejected() {
    // `sync.bucket_mb` was accepted and ignored; it is gone.
    let e = check_error(|t| format!("{t}\n[sync]\nbucket_mb = 64\n"));
    assert_has(&e, &["sync.bucket_mb", "unknown field"]);
}

#[test]
fn device_lists_that_cannot_work_are_clear_errors() {
    // Several trainer devices are data parallelism, which rlrun spawns itself...
    let e = check_error(|t| {
        format!("{t}\n[placement]\ntrainer = {{ device = \"cpu\", devices = [0, 1] }}\ntrainer_addresses = [\"127.0.0.1:1\"]\n")
    });
    assert_has(
        &e,
        &["placement.trainer.devices", "placement.trainer_addresses"],
    );
    // ... and does not train LoRA adapters yet.
    let e = check_error(|t| {
        format!("{t}\n[model.lora]\nrank = 4\n[placement]\ntrainer = {{ device = \"cpu\", devices = [0, 1] }}\n")
    });
    assert_has(&e, &["placement.trainer.devices", "LoRA"]);
    let e = check_error(|t| format!("{t}\n[placement]\ngenerator = {{ devices = [0, 1] }}\n"));
    assert_has(&e, &["placement.generator.devices", "generator_processes"]);
    let e = check_error(|t| format!("{t}\n[placement]\ntrainer = {{ devices = [] }}\n"));
    assert_has(&e, &["placement.trainer.devices", "at least one"]);
}

#[test]
fn lora_settings_name_their_key_and_line() {
    let with_lora = |lora: &'static str| {
        move |t: String| t.replace("[data]", &format!("[model.lora]\n{lora}\n\n[data]"))
    };
    let e = check_error(with_lora("rnk = 8"));
    assert_has(
        &e,
        &["model.lora", "unknown field `rnk`", "did you mean `rank`?"],
    );
    let e = check_error(with_lora("dropout = 0.1"));
    let line = line_of("[data]") + 1; // the inserted table goes where [data] was
    assert_has(
        &e,
        &["`model.lora.dropout`", "only 0", &format!(":{line}:")],
    );
    let e = check_error(with_lora("targets = [\"qkv_proj\"]"));
    assert_has(&e, &["model.lora.targets", "qkv_proj", "q_proj"]);
    let e = check_error(with_lora("init = \"/nonexistent/adapter\""));
    assert_has(&e, &["`model.lora.init`", "adapter_config.json"]);
}

#[test]
fn eval_size_beyond_the_distinct_problems_of_the_split_is_rejected() {
    // One-digit sums: 55 problems up to commutation, about 5% of them held out.
    let e = check_error(|t| {
        t.replace(
            "prompts_per_step = 2",
            "prompts_per_step = 2\neval = { name = \"arithmetic\", split = \"test\", max_digits = 1, operators = [\"add\"] }",
        ) + "\n[eval]\nsize = 10\n"
    });
    // The inserted eval line moves `lr` down one; `size` is 3 lines below it.
    let line = format!(":{}:", line_of("lr = 1e-5") + 4);
    assert_has(&e, &["eval.size", "distinct problems", &line]);
}
