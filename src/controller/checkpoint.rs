//! Checkpoints and resume: the trainer's state plus the controller's (step, prompt-stream
//! position, evaluations, lineage), written atomically (a temporary directory, fsync, rename), so
//! a crash never leaves a half-written checkpoint as the newest one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rlrun_model::Kind;
use serde::{Deserialize, Serialize};
use tch::Device;

use super::{EvalResult, Run};
use crate::error::{Error, IoContext, Result};

/// What the controller keeps in a checkpoint besides the trainer's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ControllerState {
    step: u64,
    cursor: rlrun_rollout::Cursor,
    policy_version: u64,
    evals: Vec<EvalResult>,
    /// The run's manifest at the time (lineage).
    manifest: serde_json::Value,
}

const STATE_FILE: &str = "controller_state.json";

impl Run {
    /// Writes a checkpoint atomically and prunes old ones; returns its directory.
    pub fn save(&mut self) -> Result<PathBuf> {
        let dir = self.run_dir.join("checkpoints");
        std::fs::create_dir_all(&dir).at(&dir)?;
        let final_dir = dir.join(format!("step-{:08}", self.step));
        let tmp = dir.join(format!(".step-{:08}.tmp-{}", self.step, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        std::fs::create_dir_all(tmp.join("trainer")).at(&tmp)?;
        self.actors.trainer.save(&tmp.join("trainer"))?;
        let state = ControllerState {
            step: self.step,
            cursor: self.rollouts.checkpoint_cursor(),
            policy_version: self.actors.trainer.version()?,
            evals: self.evals.clone(),
            manifest: self.manifest.clone(),
        };
        rlrun_model::loader::write_json(&tmp.join(STATE_FILE), &state)?;
        rlrun_model::loader::atomic_write(&tmp.join("recipe.toml"), |f| {
            std::io::Write::write_all(f, self.recipe.resolved.as_bytes())
        })?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).at(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir).at(&final_dir)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        // Keep the newest `keep`.
        let mut all = list_checkpoints(&self.run_dir);
        all.sort();
        let keep = self.recipe.config.checkpoint.keep;
        if all.len() > keep {
            for (_, old) in &all[..all.len() - keep] {
                let _ = std::fs::remove_dir_all(old);
            }
        }
        Ok(final_dir)
    }

    /// Restores the run's state from the checkpoint `ckpt` and syncs the restored weights.
    pub(crate) fn restore(&mut self, ckpt: &Path) -> Result<()> {
        let path = ckpt.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).at(&path)?;
        let state: ControllerState =
            serde_json::from_str(&text).map_err(|source| Error::Json { path, source })?;
        self.actors.trainer.load(&ckpt.join("trainer"))?;
        self.rollouts.stream.restore(&state.cursor)?;
        self.step = state.step;
        self.evals = state.evals;
        self.sink.truncate_after(self.step)?;
        self.sync_weights(&mut BTreeMap::new())?;
        tracing::info!(
            "resumed {} at step {} from {}",
            self.run_dir.display(),
            self.step,
            ckpt.display()
        );
        Ok(())
    }

    /// Writes the current policy as a Hugging Face directory (through the trainer's checkpoint
    /// writer, so it works wherever the trainer runs). With LoRA: the adapter in PEFT's format
    /// in `dir/adapter`, and the model with it merged in `dir`.
    pub fn export_hf(&self, dir: &Path) -> Result<()> {
        let tmp = tempfile::Builder::new()
            .prefix("rlrun-export-")
            .tempdir()
            .at(std::env::temp_dir())?;
        self.actors.trainer.save(tmp.path())?;
        let w = if self.recipe.config.model.lora.is_some() {
            let adapter = dir.join("adapter");
            std::fs::create_dir_all(&adapter).at(&adapter)?;
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(tmp.path().join(f), adapter.join(f)).at(adapter.join(f))?;
            }
            let (lora, adapters) = rlrun_model::lora::load_peft(tmp.path(), &self.files.config)?;
            let w = self.files.load_weights(Kind::Float, Device::Cpu)?;
            rlrun_model::lora::merge(&w, &w, &adapters, lora.scale())?;
            w
        } else {
            let policy = tmp.path().join("policy.safetensors");
            let src =
                rlrun_model::loader::SafetensorsSource::open_files(policy.clone(), &[policy])?;
            rlrun_model::loader::load_weights(
                self.files.layout().clone(),
                &src,
                Kind::Float,
                Device::Cpu,
            )?
        };
        rlrun_model::save_hf_dir(
            dir,
            &self.files.config,
            &self.files.generation,
            &self.files.tokenizer,
            &w,
            Kind::Float,
        )?;
        Ok(())
    }
}

fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(run_dir.join("checkpoints")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name
                .strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                if e.path().join(STATE_FILE).exists() {
                    out.push((n, e.path()));
                }
            }
        }
    }
    out
}

/// The newest complete checkpoint of a run.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(run_dir).into_iter().max().map(|(_, p)| p))
}
