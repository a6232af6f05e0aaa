//! A whole run through the `rlrun` binary: metrics.jsonl and TensorBoard (read back with
//! TensorBoard's own reader), Ctrl-C leaving a resumable checkpoint, and resume continuing the run
//! exactly (same weights and metrics as an uninterrupted run).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn quickstart_tiny(run_base: &std::path::Path, steps: u64) -> Vec<String> {
    let mut o = tiny(run_base);
    o.retain(|x| {
        !x.starts_with("steps=")
            && !x.starts_with("checkpoint.every")
            && !x.starts_with("eval.every")
    });
    o.push(format!("steps={steps}"));
    o.push("eval.every=0".into());
    o.push("checkpoint.every=0".into());
    o.push("data.prompts_per_step=4".into());
    // A KL term and an entropy bonus so those metrics exist.
    o.push("algorithm.loss.kl={ coef = 0.01 }".into());
    o.push("algorithm.loss.entropy_coef=0.001".into());
    o
}

#[test]
fn metrics_and_tensorboard_hold_the_step_metrics() {
    let tmp = rlrun_testkit::tempdir();
    let mut args = vec!["recipes/quickstart.toml".to_string()];
    args.extend(set_args(&quickstart_tiny(tmp.path(), 3)));
    let out = Command::new(bin())
        .args(&args)
        .current_dir(root())
        .env("RLRUN_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // The log goes to a pipe here, not a terminal: plain text, no colour escape codes.
    assert!(log.contains("INFO") && !log.contains('\u{1b}'), "{log}");
    let run = run_dir(tmp.path());
    let m = metrics(&run);
    let train: Vec<_> = m.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(
        train
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let required = [
        "reward/mean",
        "reward/std",
        "reward/accuracy",
        "response_length/mean",
        "response_length/max",
        "actor/pg_clipfrac_low",
        "actor/pg_clipfrac_high",
        "actor/ppo_kl",
        "actor/kl",
        "actor/entropy",
        "actor/grad_norm",
        "actor/lr",
        "perf/generate_tokens_per_s",
        "perf/train_tokens_per_s",
        "time/generate_s",
        "time/reward_s",
        "time/reference_s",
        "time/train_s",
        "time/sync_s",
        "sync/bytes",
        "sync/gb_per_s",
        "policy/staleness_max",
        "time/step_s",
    ];
    for k in required {
        assert!(
            train.iter().all(|l| l[k].is_number()),
            "metric `{k}` missing: {:?}",
            train[0]
        );
    }
    let evals: Vec<_> = m.iter().filter(|l| l["kind"] == "eval").collect();
    assert_eq!(evals.len(), 2, "before and after");
    assert!(evals.iter().all(|l| l["eval/accuracy"].is_number()));

    // TensorBoard, read by TensorBoard's reader: same tags, steps and values.
    let tb = run.join("tensorboard");
    let py = rlrun_testkit::python();
    let out = Command::new(py)
        .arg(root().join("scripts/read_tensorboard.py"))
        .arg(&tb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in required {
        let series = events["scalars"][k]
            .as_array()
            .unwrap_or_else(|| panic!("no scalar `{k}` in TensorBoard"));
        assert_eq!(series.len(), 3, "{k}");
        for (point, line) in series.iter().zip(&train) {
            assert_eq!(point[0].as_u64(), line["step"].as_u64(), "{k}");
            let (a, b) = (point[1].as_f64().unwrap(), line[k].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{k}: TensorBoard {a} vs metrics.jsonl {b}"
            );
        }
    }
    assert!(events["scalars"]["eval/accuracy"]
        .as_array()
        .is_some_and(|s| s.len() == 2));
    for h in ["hist/reward", "hist/advantage", "hist/response_length"] {
        let series = events["histograms"][h]
            .as_array()
            .unwrap_or_else(|| panic!("no histogram {h}"));
        assert_eq!(series.len(), 3);
        assert!(series.iter().all(|p| p[1].as_f64().unwrap() >= 1.0));
    }
    let texts = events["texts"]["samples/0"]
        .as_array()
        .expect("sample completions as text");
    assert_eq!(texts.len(), 3);
    assert!(texts[0][1].as_str().unwrap().contains("**completion**"));
    // Manifest: recipe, version, hashes.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["recipe"].as_str().unwrap().contains("steps = 3"));
    assert_eq!(manifest["rlrun_version"], env!("CARGO_PKG_VERSION"));
    let files = manifest["model"]["files"].as_array().unwrap();
    assert!(files.iter().any(
        |f| f["path"].as_str().unwrap().ends_with("model.safetensors")
            && f["sha256"].as_str().unwrap().len() == 64
    ));
    assert!(manifest["parent_checkpoint"].is_null());
}

/// Ctrl-C mid-run writes a checkpoint and exits 0; `rlrun resume` continues, and the result equals
/// an uninterrupted run: same final weights, every step logged once, lineage recorded.
#[test]
fn ctrl_c_leaves_a_resumable_checkpoint_and_resume_is_exact() {
    let steps = 10;
    // Uninterrupted reference run.
    let straight = rlrun_testkit::tempdir();
    let mut args = vec!["recipes/quickstart.toml".to_string()];
    args.extend(set_args(&quickstart_tiny(straight.path(), steps)));
    let out = rlrun(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let straight_run = run_dir(straight.path());

    // Interrupted run.
    let tmp = rlrun_testkit::tempdir();
    let mut args = vec!["recipes/quickstart.toml".to_string()];
    args.extend(set_args(&quickstart_tiny(tmp.path(), steps)));
    let child = spawn_rlrun(&args);
    // Wait for the second training step, then SIGINT.
    let t0 = Instant::now();
    let run = loop {
        // A hang guard only: a healthy run gets there in seconds.
        assert!(t0.elapsed() < Duration::from_secs(600), "run did not start");
        if let Ok(mut e) = std::fs::read_dir(tmp.path()) {
            if let Some(Ok(d)) = e.next() {
                let done = std::fs::read_to_string(d.path().join("metrics.jsonl"))
                    .map(|t| t.lines().filter(|l| l.contains("\"train\"")).count())
                    .unwrap_or(0);
                if done >= 2 {
                    break d.path();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("interrupted at step"), "{stdout}");
    let ckpt = rlrun::controller::latest_checkpoint(&run)
        .unwrap()
        .expect("a checkpoint after Ctrl-C");
    let stopped_at: u64 = ckpt
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("step-")
        .parse()
        .unwrap();
    assert!(
        stopped_at >= 2 && stopped_at < steps,
        "stopped at {stopped_at}"
    );

    // Resume to the end.
    let out = rlrun(&["resume".into(), run.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = metrics(&run);
    let train_steps: Vec<u64> = m
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        train_steps,
        (1..=steps).collect::<Vec<_>>(),
        "every step exactly once"
    );
    // Same rewards at every step and the same final weights as the uninterrupted run.
    let sm = metrics(&straight_run);
    let rewards = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter()
            .filter(|l| l["kind"] == "train")
            .map(|l| l["reward/mean"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(rewards(&m), rewards(&sm));
    let final_ckpt = format!("checkpoints/step-{steps:08}/trainer/policy.safetensors");
    let a = rlrun_testkit::read_safetensors(&run.join(&final_ckpt));
    let b = rlrun_testkit::read_safetensors(&straight_run.join(&final_ckpt));
    for (name, t) in &a {
        assert_eq!(
            rlrun_testkit::max_abs_diff(t, &b[name]),
            0.0,
            "{name} differs after resume"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["parent_checkpoint"]
        .as_str()
        .unwrap()
        .contains(&format!("step-{stopped_at:08}")));
}

#[test]
fn the_custom_reward_example_trains_with_its_rust_reward() {
    // `cargo test` builds the examples next to the test executables' directory.
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples/train_with_custom_reward");
    assert!(
        example.exists(),
        "{} not built: a plain `cargo test` builds the examples",
        example.display()
    );
    let tmp = rlrun_testkit::tempdir();
    let mut args = vec!["recipes/quickstart.toml".to_string()];
    let mut o = tiny(tmp.path());
    o.retain(|x| !x.starts_with("eval.every") && !x.starts_with("checkpoint.every"));
    args.extend(set_args(&o));
    let out = Command::new(&example)
        .args(&args)
        .current_dir(root())
        .env("RLRUN_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two steps, each with the reward's own metric (a number between 0 and 1, not NaN).
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for l in lines {
        let v: f64 = l
            .rsplit("is_number ")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!((0.0..=1.0).contains(&v), "{l}");
    }
    let run = run_dir(tmp.path());
    let m = metrics(&run);
    assert!(m.iter().any(|l| l["reward/is_number"].is_number()), "{m:?}");
}

#[test]
fn the_kv_cache_is_released_while_training_and_results_do_not_change() {
    let mut runs = Vec::new();
    for release in [true, false] {
        let tmp = rlrun_testkit::tempdir();
        let mut args = vec!["recipes/quickstart.toml".to_string()];
        let mut o = tiny(tmp.path());
        o.push(format!("rollout.release_cache={release}"));
        args.extend(set_args(&o));
        let out = rlrun(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = metrics(&run_dir(tmp.path()));
        let train: Vec<_> = m.into_iter().filter(|l| l["kind"] == "train").collect();
        for l in &train {
            let held = l["memory/kv_cache_bytes"].as_f64().unwrap();
            let during = l["memory/kv_cache_bytes_during_training"].as_f64().unwrap();
            assert!(held > 0.0, "{l}");
            if release {
                assert_eq!(during, 0.0, "{l}");
                assert_eq!(l["memory/kv_cache_released_bytes"].as_f64().unwrap(), held);
            } else {
                assert_eq!(during, held, "{l}");
            }
            assert!(l["memory/peak_rss_train_bytes"].as_f64().unwrap() > 0.0);
        }
        runs.push(train);
    }
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        for k in [
            "reward/mean",
            "actor/pg_loss",
            "actor/grad_norm",
            "actor/logprob_mismatch",
            "response_length/mean",
        ] {
            assert_eq!(a[k], b[k], "{k}");
        }
    }
}
