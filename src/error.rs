//! The `rlrun` library's error type. Each variant says what a user needs to act on it: the file,
//! the actor and its address, the step. (`anyhow` is for the `rlrun` binary only.)

use std::path::PathBuf;

use crate::actors::Role;
use crate::recipe::RecipeError;

/// Result alias of the `rlrun` library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a run, an actor process or the recipe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Model(#[from] rlrun_model::ModelError),
    #[error("generator: {0}")]
    Generator(#[from] rlrun_generator::GenError),
    #[error("trainer: {0}")]
    Trainer(#[from] rlrun_trainer::TrainError),
    #[error(transparent)]
    Rollout(#[from] rlrun_rollout::Error),
    #[error("weight sync: {0}")]
    Sync(#[from] rlrun_weights_sync::SyncError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// An actor process (spawned or named by address) failed to start, answer or serve.
    #[error("{role} actor{}: {message}", addr.as_deref().map(|a| format!(" at {a}")).unwrap_or_default())]
    Actor {
        role: Role,
        addr: Option<String>,
        message: String,
    },
    /// A training step could not go on.
    #[error("step {step}: {message}")]
    Step { step: u64, message: String },
    /// A placement the machine cannot give (no CUDA device, too many devices, ...).
    #[error("placement: {0}")]
    Placement(String),
    /// A call that this run's state does not allow (no evaluation set, no checkpoint, ...).
    #[error("{0}")]
    Usage(String),
    /// An allocation failed during a phase of a step: torch's message (what was asked for), the
    /// recipe keys that use less memory, and what became of the run.
    #[error("out of memory while the step {step} {phase} phase ran: {detail}\n  to use less memory: {keys}\n  {outcome}")]
    OutOfMemory {
        step: u64,
        phase: &'static str,
        detail: String,
        keys: &'static str,
        /// The trainer's state is still the previous step's (a checkpoint of it is exact).
        untouched: bool,
        outcome: String,
    },
}

/// The recipe keys that bring a phase's memory down without changing what the run computes
/// (so `rlrun resume --set` accepts them).
fn memory_keys(phase: &str) -> &'static str {
    match phase {
        "generate" => "rollout.max_slots (fewer sequences decoded at once)",
        "train" => "trainer.micro_batch_tokens (smaller micro-batches), trainer.activation_checkpointing = true, trainer.logprob_chunk",
        _ => "sync.backend (\"shm\" maps the weights instead of copying them)",
    }
}

impl Error {
    /// `e` as [`Error::OutOfMemory`] when it is an allocation failure (torch's CUDA "out of
    /// memory", its CPU allocator's "can't allocate memory" / "not enough memory"), else `e`.
    pub fn in_phase(e: Error, step: u64, phase: &'static str, untouched: bool) -> Error {
        let text = e.to_string();
        let lower = text.to_lowercase();
        let oom = [
            "out of memory",
            "not enough memory",
            "can't allocate memory",
        ];
        if !oom.iter().any(|m| lower.contains(m)) {
            return e;
        }
        // torch's message says what was asked for (the rest is a C++ trace): from the
        // allocator's words to the end of that line.
        let line = text
            .lines()
            .find(|l| oom.iter().any(|m| l.to_lowercase().contains(m)))
            .unwrap_or(&text);
        let from = ["CUDA out of memory", "DefaultCPUAllocator"]
            .iter()
            .find_map(|m| line.find(m))
            .unwrap_or(0);
        let detail = line[from..].trim().to_string();
        Error::OutOfMemory {
            step,
            phase,
            detail,
            keys: memory_keys(phase),
            untouched,
            outcome: String::new(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `.at(path)` on I/O results: the error names the file.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_failures_become_out_of_memory_errors_naming_what_was_asked() {
        let cuda = Error::Usage("trainer: libtorch: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB\nframe #0: ...".into());
        let e = Error::in_phase(cuda, 3, "train", true);
        let text = e.to_string();
        assert!(text.starts_with("out of memory while the step 3 train phase ran: CUDA out of memory. Tried to allocate 2.00 GiB"), "{text}");
        assert!(
            text.contains("trainer.micro_batch_tokens") && !text.contains("frame #0"),
            "{text}"
        );
        let other = Error::Usage("a recipe key is wrong".into());
        assert!(matches!(
            Error::in_phase(other, 3, "train", true),
            Error::Usage(_)
        ));
        let gen = Error::in_phase(
            Error::Usage(
                "x: DefaultCPUAllocator: not enough memory: you tried to allocate 9 bytes".into(),
            ),
            1,
            "generate",
            true,
        );
        assert!(gen.to_string().contains("rollout.max_slots"), "{gen}");
    }
}
