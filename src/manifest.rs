//! `manifest.json`: what a run was made of (resolved recipe, rlrun version and git commit, SHA-256
//! of the model and dataset files) and where it came from (the checkpoint it resumed from).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use rlrun_model::ModelFiles;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::recipe::Recipe;

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn files_of(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every `path` value inside a dataset config (JSONL/Parquet files, eval-data directories).
fn dataset_paths(v: &Value, out: &mut Vec<PathBuf>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if (k == "path" || k.ends_with("_dir")) && x.is_string() {
                    out.push(PathBuf::from(x.as_str().unwrap_or_default()));
                } else {
                    dataset_paths(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dataset_paths(x, out)),
        _ => {}
    }
}

/// Builds the manifest of a run.
pub fn build(recipe: &Recipe, model: &ModelFiles, parent: Option<&Path>) -> Result<Value> {
    let model_files: Vec<Value> = files_of(&model.path)
        .iter()
        .map(|p| Ok(json!({"path": p.display().to_string(), "sha256": sha256_file(p)?})))
        .collect::<Result<_>>()?;
    let mut paths = Vec::new();
    let data = serde_json::to_value(&recipe.config.data).map_err(|source| crate::Error::Json {
        path: recipe.source.clone(),
        source,
    })?;
    dataset_paths(&data, &mut paths);
    let datasets: Vec<Value> = paths
        .iter()
        .flat_map(|p| files_of(p))
        .map(|p| Ok(json!({"path": p.display().to_string(), "sha256": sha256_file(&p)?})))
        .collect::<Result<_>>()?;
    // A PEFT adapter the run starts from is an input like the model.
    let adapter: Vec<Value> = recipe
        .config
        .model
        .lora
        .as_ref()
        .and_then(|l| l.init.as_ref())
        .map(|dir| files_of(dir))
        .unwrap_or_default()
        .iter()
        .map(|p| Ok(json!({"path": p.display().to_string(), "sha256": sha256_file(p)?})))
        .collect::<Result<_>>()?;
    Ok(json!({
        "rlrun_version": env!("CARGO_PKG_VERSION"),
        "git_commit": option_env!("RLRUN_GIT_COMMIT").unwrap_or("unknown"),
        "created_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "recipe_source": recipe.source.display().to_string(),
        "recipe": recipe.resolved,
        "model": {"path": model.path.display().to_string(), "files": model_files, "lora_init": adapter},
        "datasets": datasets,
        "parent_checkpoint": parent.map(|p| p.display().to_string()),
        "torch_threads": tch::get_num_threads(),
        "cuda_devices": if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 },
    }))
}

/// Writes `<run>/manifest.json` atomically.
pub fn write(run_dir: &Path, manifest: &Value) -> Result<()> {
    rlrun_model::loader::write_json(&run_dir.join("manifest.json"), manifest)?;
    Ok(())
}
