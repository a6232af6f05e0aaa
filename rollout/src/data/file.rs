//! Prompt files: JSONL (optionally gzipped) and Parquet, in verl's layout or any other through a
//! [`FieldMap`].
//!
//! verl's layout (what its `examples/data_preprocess/*.py` write): `prompt` (list of
//! `{role, content}`), `data_source` (string), `reward_model` (struct with `ground_truth`),
//! `extra_info` (struct). A field path with dots (`reward_model.ground_truth`) looks into nested
//! objects/structs; a column or key whose name contains the dots literally is preferred.
//!
//! Malformed rows (not JSON, prompt missing or of the wrong type, ...) are skipped and counted;
//! the first [`MAX_LOGGED_MALFORMED`] are logged with file and line (JSONL) or row (Parquet) at
//! `warn` level, then one summary line. A file without any valid row is an error.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::InMemoryDataset;
use crate::error::{Error, Result};
use crate::sample::{ChatMessage, Prompt, Sample};

/// How many malformed rows are logged one by one (the rest are counted).
pub const MAX_LOGGED_MALFORMED: usize = 20;

fn default_prompt() -> String {
    "prompt".into()
}
fn default_ground_truth() -> String {
    "reward_model.ground_truth".into()
}
fn default_data_source() -> String {
    "data_source".into()
}
fn default_extra() -> String {
    "extra_info".into()
}
fn yes() -> bool {
    true
}

/// Which fields of a row hold what. Defaults are verl's layout.
///
/// ```
/// # use rlrun_rollout::FieldMap;
/// // A JSONL of {"question": ..., "answer": ...}:
/// let f: FieldMap = toml::from_str("prompt = \"question\"\nground_truth = \"answer\"").unwrap();
/// assert_eq!(f.data_source, "data_source");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMap {
    /// The prompt: a string (plain text) or a list of `{role, content}` (chat). Default `prompt`.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// The reference answer (string; numbers and other JSON are stored as their JSON text).
    /// Default `reward_model.ground_truth`. Missing or null: no ground truth.
    #[serde(default = "default_ground_truth")]
    pub ground_truth: String,
    /// The data source (string). Default `data_source`. Missing: the config's
    /// `default_data_source`, else the file stem.
    #[serde(default = "default_data_source")]
    pub data_source: String,
    /// Extra data for rewards (any JSON). Default `extra_info`. Missing: `null`.
    #[serde(default = "default_extra")]
    pub extra: String,
}

impl Default for FieldMap {
    fn default() -> Self {
        Self {
            prompt: default_prompt(),
            ground_truth: default_ground_truth(),
            data_source: default_data_source(),
            extra: default_extra(),
        }
    }
}

/// Parameters of `name = "jsonl"` and `name = "parquet"` datasets.
///
/// ```
/// # use rlrun_rollout::DatasetConfig;
/// let cfg: DatasetConfig = toml::from_str(r#"
///     name = "parquet"
///     path = "data/gsm8k/train.parquet"
///     fields = { prompt = "prompt", ground_truth = "reward_model.ground_truth" }
/// "#).unwrap();
/// # let _ = cfg;
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDatasetConfig {
    /// The file. JSONL files ending in `.gz` are decompressed.
    pub path: PathBuf,
    /// Field names (default: verl's layout).
    #[serde(default)]
    pub fields: FieldMap,
    /// Data source for rows without one (default: the file stem).
    #[serde(default)]
    pub default_data_source: Option<String>,
    /// Plain-string prompts become a single `user` chat message (default `true`); `false` keeps
    /// them as plain text (for base models without a chat template).
    #[serde(default = "yes")]
    pub text_as_chat: bool,
    /// A template applied to plain-string prompts before the above, with `{prompt}` replaced by
    /// the prompt (e.g. `"{prompt}\nPut your final answer within \\boxed{}."`).
    #[serde(default)]
    pub template: Option<String>,
    /// Keep only the first `limit` valid rows.
    #[serde(default)]
    pub limit: Option<usize>,
}

impl FileDatasetConfig {
    /// A config for `path` with verl's field names and the defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            fields: FieldMap::default(),
            default_data_source: None,
            text_as_chat: true,
            template: None,
            limit: None,
        }
    }
}

/// What a file load read and skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LoadReport {
    /// The file.
    pub path: PathBuf,
    /// Rows (non-blank lines for JSONL) read.
    pub rows_read: u64,
    /// Valid rows kept.
    pub rows_kept: u64,
    /// Malformed rows skipped.
    pub rows_skipped: u64,
    /// The first malformed rows, as `line N: reason` (JSONL) or `row N: reason` (Parquet).
    pub first_skipped: Vec<String>,
}

impl LoadReport {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            ..Self::default()
        }
    }

    fn skip(&mut self, unit: &str, number: u64, reason: &str) {
        self.rows_skipped += 1;
        if self.first_skipped.len() < MAX_LOGGED_MALFORMED {
            tracing::warn!(file = %self.path.display(), at = %format!("{unit} {number}"), reason, "skipping malformed row");
            self.first_skipped
                .push(format!("{unit} {number}: {reason}"));
        }
    }

    fn finish(self, samples: Vec<Sample>) -> Result<InMemoryDataset> {
        if self.rows_skipped > self.first_skipped.len() as u64 {
            tracing::warn!(
                file = %self.path.display(),
                skipped = self.rows_skipped,
                "more malformed rows skipped (only the first {MAX_LOGGED_MALFORMED} are logged)"
            );
        }
        if samples.is_empty() {
            return Err(Error::NoValidRows {
                path: self.path.clone(),
                rows_read: self.rows_read,
                skipped: self.rows_skipped,
                first_problem: self.first_skipped.first().cloned(),
            });
        }
        if self.rows_skipped > 0 {
            tracing::info!(file = %self.path.display(), kept = samples.len(), skipped = self.rows_skipped,
                "loaded prompts with malformed rows skipped");
        }
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(InMemoryDataset::new(name, samples).with_report(self))
    }
}

/// Turns the four fields of one row into a sample; `Err(reason)` for a malformed row.
struct RowBuilder<'a> {
    config: &'a FileDatasetConfig,
    default_source: String,
}

impl<'a> RowBuilder<'a> {
    fn new(config: &'a FileDatasetConfig) -> Self {
        let default_source = config.default_data_source.clone().unwrap_or_else(|| {
            let stem = config
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            stem.split('.').next().unwrap_or_default().to_string()
        });
        Self {
            config,
            default_source,
        }
    }

    fn build(
        &self,
        id: u64,
        prompt: Option<Value>,
        ground_truth: Option<Value>,
        data_source: Option<Value>,
        extra: Option<Value>,
    ) -> std::result::Result<Sample, String> {
        let f = &self.config.fields;
        let prompt = match prompt {
            None | Some(Value::Null) => return Err(format!("missing prompt field `{}`", f.prompt)),
            Some(Value::String(text)) => {
                let text = match &self.config.template {
                    Some(t) => t.replace("{prompt}", &text),
                    None => text,
                };
                if self.config.text_as_chat {
                    Prompt::user(text)
                } else {
                    Prompt::Text(text)
                }
            }
            Some(Value::Array(items)) => {
                if items.is_empty() {
                    return Err(format!("prompt field `{}` is an empty list", f.prompt));
                }
                let mut messages = Vec::with_capacity(items.len());
                for (k, item) in items.into_iter().enumerate() {
                    let role = item.get("role").and_then(Value::as_str);
                    let content = item.get("content").and_then(Value::as_str);
                    match (role, content) {
                        (Some(r), Some(c)) => messages.push(ChatMessage::new(r, c)),
                        _ => {
                            return Err(format!(
                                "prompt field `{}` message {k} lacks string `role` and `content`",
                                f.prompt
                            ))
                        }
                    }
                }
                Prompt::Messages(messages)
            }
            Some(other) => {
                return Err(format!(
                    "prompt field `{}` must be a string or a list of {{role, content}}, got {}",
                    f.prompt,
                    json_kind(&other)
                ))
            }
        };
        let ground_truth = match ground_truth {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => Some(other.to_string()),
        };
        let data_source = match data_source {
            None | Some(Value::Null) => self.default_source.clone(),
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(format!(
                    "data source field `{}` must be a string, got {}",
                    f.data_source,
                    json_kind(&other)
                ))
            }
        };
        let mut sample = Sample::new(id, prompt)
            .with_data_source(data_source)
            .with_extra(extra.unwrap_or(Value::Null));
        sample.ground_truth = ground_truth;
        Ok(sample)
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Looks a field path up in a JSON object: the literal key first, then dotted nesting.
fn lookup(row: &serde_json::Map<String, Value>, path: &str) -> Option<Value> {
    if let Some(v) = row.get(path) {
        return Some(v.clone());
    }
    let mut parts = path.split('.');
    let mut current = row.get(parts.next()?)?;
    for part in parts {
        current = current.get(part)?;
    }
    Some(current.clone())
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a JSONL file (gzip-compressed if its name ends in `.gz`).
pub fn load_jsonl(config: &FileDatasetConfig) -> Result<InMemoryDataset> {
    let path = &config.path;
    let file = open(path)?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let builder = RowBuilder::new(config);
    let mut report = LoadReport::new(path);
    let mut samples = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| Error::IoAtLine {
                path: path.clone(),
                line: line_no + 1,
                source,
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if config.limit.is_some_and(|l| samples.len() >= l) {
            break;
        }
        report.rows_read += 1;
        let row: Value = match serde_json::from_slice(&buf) {
            Ok(v) => v,
            Err(e) => {
                report.skip("line", line_no, &format!("invalid JSON: {e}"));
                continue;
            }
        };
        let Value::Object(row) = row else {
            report.skip(
                "line",
                line_no,
                &format!("expected a JSON object, got {}", json_kind(&row)),
            );
            continue;
        };
        let f = &config.fields;
        match builder.build(
            samples.len() as u64,
            lookup(&row, &f.prompt),
            lookup(&row, &f.ground_truth),
            lookup(&row, &f.data_source),
            lookup(&row, &f.extra),
        ) {
            Ok(s) => samples.push(s),
            Err(reason) => report.skip("line", line_no, &reason),
        }
    }
    report.rows_kept = samples.len() as u64;
    report.finish(samples)
}

/// A field path resolved against an Arrow schema: the arrays from the top-level column down to
/// the leaf (a row is null if any of them is null there).
struct Resolved {
    chain: Vec<ArrayRef>,
}

impl Resolved {
    fn value(&self, row: usize) -> Option<Value> {
        if self.chain.iter().any(|a| a.is_null(row)) {
            return Some(Value::Null);
        }
        self.chain.last().map(|leaf| to_json(leaf.as_ref(), row))
    }
}

/// Resolves `path` in a batch: the literal column name first, then `struct.child.…`.
fn resolve(batch: &RecordBatch, path: &str) -> Option<Resolved> {
    if let Some(col) = batch.column_by_name(path) {
        return Some(Resolved {
            chain: vec![col.clone()],
        });
    }
    let mut parts = path.split('.');
    let mut current = batch.column_by_name(parts.next()?)?.clone();
    let mut chain = vec![current.clone()];
    for part in parts {
        let s = current.as_struct_opt()?;
        current = s.column_by_name(part)?.clone();
        chain.push(current.clone());
    }
    Some(Resolved { chain })
}

/// The top-level column a field path needs, if the schema has it.
fn root_column(schema: &arrow_schema::Schema, path: &str) -> Option<usize> {
    schema
        .index_of(path)
        .ok()
        .or_else(|| schema.index_of(path.split('.').next()?).ok())
}

fn float_json(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// One Arrow value as JSON. Types without a JSON equivalent (dates, decimals, binary that is not
/// UTF-8, ...) become `null`.
fn to_json(array: &dyn Array, row: usize) -> Value {
    if array.is_null(row) {
        return Value::Null;
    }
    macro_rules! prim {
        ($t:ty) => {
            Value::from(array.as_primitive::<$t>().value(row))
        };
    }
    macro_rules! dict {
        ($k:ty) => {{
            let d = array.as_dictionary::<$k>();
            match usize::try_from(d.keys().value(row)) {
                Ok(key) if key < d.values().len() => to_json(d.values().as_ref(), key),
                _ => Value::Null,
            }
        }};
    }
    match array.data_type() {
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 => float_json(f64::from(array.as_primitive::<Float32Type>().value(row))),
        DataType::Float64 => float_json(array.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(row).to_string()),
        DataType::Binary => std::str::from_utf8(array.as_binary::<i32>().value(row))
            .map_or(Value::Null, |s| Value::String(s.to_string())),
        DataType::LargeBinary => std::str::from_utf8(array.as_binary::<i64>().value(row))
            .map_or(Value::Null, |s| Value::String(s.to_string())),
        DataType::List(_) => list_json(array.as_list::<i32>().value(row).as_ref()),
        DataType::LargeList(_) => list_json(array.as_list::<i64>().value(row).as_ref()),
        DataType::FixedSizeList(_, _) => list_json(array.as_fixed_size_list().value(row).as_ref()),
        DataType::Struct(fields) => {
            let s = array.as_struct();
            Value::Object(
                fields
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| (f.name().clone(), to_json(c.as_ref(), row)))
                    .collect(),
            )
        }
        DataType::Map(_, _) => {
            let entries = array.as_map().value(row);
            let (keys, values) = (entries.column(0), entries.column(1));
            let mut object = serde_json::Map::new();
            for k in 0..entries.len() {
                let key = match to_json(keys.as_ref(), k) {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                object.insert(key, to_json(values.as_ref(), k));
            }
            Value::Object(object)
        }
        DataType::Dictionary(key, _) => match key.as_ref() {
            DataType::Int8 => dict!(Int8Type),
            DataType::Int16 => dict!(Int16Type),
            DataType::Int32 => dict!(Int32Type),
            DataType::Int64 => dict!(Int64Type),
            DataType::UInt8 => dict!(UInt8Type),
            DataType::UInt16 => dict!(UInt16Type),
            DataType::UInt32 => dict!(UInt32Type),
            DataType::UInt64 => dict!(UInt64Type),
            _ => Value::Null,
        },
        _ => Value::Null,
    }
}

fn list_json(values: &dyn Array) -> Value {
    Value::Array((0..values.len()).map(|j| to_json(values, j)).collect())
}

/// Loads a Parquet file, reading only the columns the field map needs.
pub fn load_parquet(config: &FileDatasetConfig) -> Result<InMemoryDataset> {
    let path = &config.path;
    let parquet_err = |source| Error::Parquet {
        path: path.clone(),
        source,
    };
    let file = open(path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err)?;
    let schema = builder.schema().clone();
    let f = &config.fields;
    if root_column(&schema, &f.prompt).is_none() {
        let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(Error::Config {
            what: format!("dataset `{}`", path.display()),
            message: format!(
                "prompt column `{}` not found; columns are: {}",
                f.prompt,
                columns.join(", ")
            ),
        });
    }
    let mut roots: Vec<usize> = [&f.prompt, &f.ground_truth, &f.data_source, &f.extra]
        .iter()
        .filter_map(|p| root_column(&schema, p))
        .collect();
    roots.sort_unstable();
    roots.dedup();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(8192)
        .build()
        .map_err(parquet_err)?;

    let row_builder = RowBuilder::new(config);
    let mut report = LoadReport::new(path);
    let mut samples = Vec::new();
    let mut row_no = 0u64;
    'batches: for batch in reader {
        let batch = batch.map_err(|source| Error::Arrow {
            path: path.clone(),
            row: row_no + 1,
            source,
        })?;
        let prompt = resolve(&batch, &f.prompt);
        let ground_truth = resolve(&batch, &f.ground_truth);
        let data_source = resolve(&batch, &f.data_source);
        let extra = resolve(&batch, &f.extra);
        for r in 0..batch.num_rows() {
            if config.limit.is_some_and(|l| samples.len() >= l) {
                break 'batches;
            }
            row_no += 1;
            report.rows_read += 1;
            let get = |c: &Option<Resolved>| c.as_ref().and_then(|c| c.value(r));
            match row_builder.build(
                samples.len() as u64,
                get(&prompt),
                get(&ground_truth),
                get(&data_source),
                get(&extra),
            ) {
                Ok(s) => samples.push(s),
                Err(reason) => report.skip("row", row_no, &reason),
            }
        }
    }
    report.rows_kept = samples.len() as u64;
    report.finish(samples)
}
