//! Helpers for the rlrun integration tests: run the real `rlrun` binary on recipes with tiny
//! settings, each run in its own temporary run directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_rlrun")
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Overrides that shrink any shipped recipe to a seconds-long run on the tiny test model.
pub fn tiny(run_dir: &Path) -> Vec<String> {
    let model = rlrun_testkit::fixtures().join("tiny-llama3");
    vec![
        format!("model.path={}", model.display()),
        "steps=2".into(),
        "data.prompts_per_step=2".into(),
        "rollout.n=2".into(),
        "rollout.max_tokens=4".into(),
        "eval.size=4".into(),
        "eval.max_tokens=4".into(),
        "eval.every=1".into(),
        "checkpoint.every=1".into(),
        format!("logging.run_dir=\"{}\"", run_dir.display()),
    ]
}

/// Runs `rlrun <args...>` from the repository root.
pub fn rlrun(args: &[String]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(root())
        .env("RLRUN_LOG", "warn")
        .output()
        .expect("running rlrun")
}

/// Starts `rlrun <args...>` from the repository root with its output piped.
pub fn spawn_rlrun(args: &[String]) -> std::process::Child {
    Command::new(bin())
        .args(args)
        .current_dir(root())
        .env("RLRUN_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting rlrun")
}

pub fn set_args(overrides: &[String]) -> Vec<String> {
    overrides
        .iter()
        .flat_map(|o| ["--set".to_string(), o.clone()])
        .collect()
}

/// The single run directory created under `base`.
pub fn run_dir(base: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(base)
        .expect("run base")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "expected one run directory in {}: {dirs:?}",
        base.display()
    );
    dirs[0].clone()
}

/// metrics.jsonl as JSON values.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}
