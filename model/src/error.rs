//! Errors of the model crate. Every variant names the file and, where there is one, the tensor.

use std::path::PathBuf;

/// Result alias of the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What went wrong while reading, building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("missing file {path}{hint}")]
    MissingFile { path: PathBuf, hint: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "unsupported model_type `{model_type}` in {path}; supported: {}",
        crate::config::SUPPORTED_MODEL_TYPES.join(", ")
    )]
    UnsupportedArchitecture { model_type: String, path: PathBuf },
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor `{name}` not found in {path}")]
    MissingTensor { name: String, path: PathBuf },
    #[error("tensor `{name}` in {path} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error("tensor `{name}` in {path} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    #[error("{path}: invalid GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error(
        "tensor `{name}` in {path} has GGUF type {ggml_type}, which rlrun cannot dequantize \
         (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
    )]
    UnsupportedGgufType {
        name: String,
        path: PathBuf,
        ggml_type: String,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            return ModelError::MissingFile {
                path,
                hint: String::new(),
            };
        }
        ModelError::Io { path, source }
    }
}

/// Adds context to a libtorch error.
pub(crate) trait TorchContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> TorchContext<T> for std::result::Result<T, tch::TchError> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| ModelError::Torch {
            context: context(),
            source,
        })
    }
}

impl From<tch::TchError> for ModelError {
    fn from(source: tch::TchError) -> Self {
        ModelError::Torch {
            context: "libtorch".into(),
            source,
        }
    }
}
