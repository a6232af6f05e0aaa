//! Errors of the generator.

/// Result alias of the generator crate.
pub type Result<T, E = GenError> = std::result::Result<T, E>;

/// What went wrong in the generator.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// The request cannot be served as given (bad parameter, prompt too long, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Model(#[from] rlrun_model::ModelError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The actor thread or process is gone.
    #[error("generator unavailable: {0}")]
    Unavailable(String),
    #[error("weight update: {0}")]
    Weights(String),
}
