//! Errors of the trainer.

/// Result alias of the trainer crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// What went wrong in the trainer.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] rlrun_model::ModelError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Loss(#[from] crate::loss::LossError),
    #[error("{path}: {message}")]
    Checkpoint {
        path: std::path::PathBuf,
        message: String,
    },
    /// The request cannot be served as given (bad input, wrong state).
    #[error("{0}")]
    Invalid(String),
    /// The trainer (a process, named with its address) is gone or unreachable.
    #[error("{0}")]
    Unavailable(String),
}
