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
}

impl Error {
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
