//! Recipes: TOML files that describe a run, parsed in two stages.
//!
//! 1. Raw: serde with `deny_unknown_fields` everywhere ([`RecipeConfig`]). Errors carry the key
//!    path, the line and column, what was expected, and for an unknown key the nearest valid one.
//! 2. Validated ([`Recipe`]): cross-field checks (GAE needs a critic, GRPO needs `rollout.n >= 2`,
//!    the model path exists, ...), each error again naming the key and its line.
//!
//! `--set a.b=value` overrides are applied to the document before parsing (values are TOML;
//! anything that does not parse as TOML is taken as a string).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rlrun_generator::UpdatePolicy;
use rlrun_rollout::{
    AdvantageConfig, AdvantageEstimator, Dataset, DatasetConfig, RewardConfig, RewardFn,
    RewardRunnerConfig, Sample,
};
use rlrun_trainer::loss::{KlEstimator, PolicyLossConfig};
use rlrun_trainer::{AdamWImpl, OptimConfig, Schedule};
use serde::{Deserialize, Serialize};

pub use crate::sync::SyncBackend;

/// A recipe error: where (file, key path, line:column) and what.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeError {
    pub file: String,
    pub key: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for RecipeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": `{}`: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for RecipeError {}

/// The whole recipe (raw stage). Field docs are the reference for recipe authors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeConfig {
    /// Run name (run directories are `<logging.run_dir>/<name>-<timestamp>`).
    #[serde(default = "default_name")]
    pub name: String,
    /// Every random choice derives from this seed (and the step / sample index).
    #[serde(default)]
    pub seed: u64,
    /// Training steps (rollout batch + update each).
    pub steps: u64,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub rollout: RolloutSection,
    /// How completions are scored; required unless an `[environment]` scores episodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<RewardConfig>,
    /// Multi-turn episodes in an environment (tool use, games) instead of single completions:
    /// the environment's rewards replace `[reward]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<rlrun_rollout::env::EnvironmentConfig>,
    #[serde(default)]
    pub reward_runner: RewardRunnerConfig,
    #[serde(default)]
    pub algorithm: AlgorithmSection,
    #[serde(default)]
    pub trainer: TrainerSection,
    #[serde(default)]
    pub placement: PlacementSection,
    #[serde(default)]
    pub sync: SyncSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub logging: LoggingSection,
    /// Beyond one machine: Ray placement and Kubernetes manifests.
    #[serde(default)]
    pub cluster: crate::cluster::ClusterSection,
}

fn default_name() -> String {
    "run".into()
}

/// `[model]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face directory or a `.gguf` file (relative paths: from the working directory,
    /// else from the recipe's directory).
    pub path: String,
    /// `auto` (bf16 on CUDA, f32 on CPU), `f32`, `bf16`, `f16`.
    #[serde(default)]
    pub dtype: DtypeChoice,
    /// `[model.lora]`: train LoRA adapters on the frozen model instead of all its weights
    /// (`rank`, `alpha`, `targets`, `rslora`, `init` = a PEFT adapter directory to start from).
    #[serde(default)]
    pub lora: Option<rlrun_model::LoraConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// `[data]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training prompts (see rlrun-rollout's `DatasetConfig`).
    pub train: DatasetConfig,
    /// Held-out evaluation prompts.
    #[serde(default)]
    pub eval: Option<DatasetConfig>,
    /// Prompts per training step (each sampled `rollout.n` times).
    pub prompts_per_step: usize,
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// A system message put before chat prompts (instead of the template's default, if any).
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Prompts longer than this many tokens are skipped (counted in the metrics).
    #[serde(default = "default_max_prompt_tokens")]
    pub max_prompt_tokens: usize,
}

fn yes() -> bool {
    true
}
fn default_max_prompt_tokens() -> usize {
    1024
}

/// `[rollout]`: sampling of training completions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSection {
    /// Completions per prompt (the group size).
    pub n: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: i64,
    pub min_p: f64,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// KV-cache slots of each generator (default: every completion of a step at once).
    pub max_slots: Option<usize>,
    pub update_policy: UpdatePolicy,
    /// Versions a rollout may lag behind the trainer (0: on-policy).
    pub max_staleness: u64,
    /// Free the generator's KV cache while the trainer runs, when both are in this process (it
    /// grows back for the next generation): the memory goes to the trainer.
    pub release_cache: bool,
}

impl Default for RolloutSection {
    fn default() -> Self {
        RolloutSection {
            n: 8,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_tokens: 256,
            stop: Vec::new(),
            max_slots: None,
            update_policy: UpdatePolicy::Drain,
            max_staleness: 0,
            release_cache: true,
        }
    }
}

/// `[algorithm]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgorithmSection {
    #[serde(default = "default_advantage")]
    pub advantage: AdvantageConfig,
    #[serde(default)]
    pub loss: PolicyLossConfig,
    /// KL to the reference model subtracted from the per-token reward (instead of a loss term).
    #[serde(default)]
    pub kl_in_reward: Option<KlRewardConfig>,
    /// DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts.
    #[serde(default)]
    pub dynamic_sampling: Option<DynamicSamplingConfig>,
}

fn default_advantage() -> AdvantageConfig {
    AdvantageConfig::Grpo(Default::default())
}

impl Default for AlgorithmSection {
    fn default() -> Self {
        AlgorithmSection {
            advantage: default_advantage(),
            loss: PolicyLossConfig::default(),
            kl_in_reward: None,
            dynamic_sampling: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlRewardConfig {
    #[serde(default)]
    pub estimator: KlEstimator,
    pub coef: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicSamplingConfig {
    /// Generation rounds per step at most (each samples more prompts).
    #[serde(default = "default_rounds")]
    pub max_rounds: usize,
}

fn default_rounds() -> usize {
    3
}

/// `[trainer]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerSection {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Max gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    pub schedule: Schedule,
    /// `fused` (PyTorch's fused kernel) or `single-tensor` (PyTorch's `foreach=False` algorithm).
    pub adamw: AdamWImpl,
    pub ppo_epochs: usize,
    pub mini_batches: usize,
    pub micro_batch_tokens: usize,
    pub logprob_chunk: i64,
    /// Recompute each layer in the backward instead of keeping its activations.
    pub activation_checkpointing: bool,
    /// Compute each token's entropy for the `actor/entropy` metric.
    pub entropy_metric: bool,
    /// Mixture-of-experts models: use the generator's expert choices in the trainer's forward
    /// (routing replay). `actor/routing_flip_frac` is logged either way.
    pub routing_replay: bool,
    /// Mixture-of-experts models: coefficient of the load-balancing loss (0: off).
    pub router_aux_loss_coef: f64,
    pub critic: Option<CriticSection>,
}

impl Default for TrainerSection {
    fn default() -> Self {
        let o = OptimConfig::default();
        TrainerSection {
            lr: o.lr,
            betas: o.betas,
            eps: o.eps,
            weight_decay: o.weight_decay,
            grad_clip: o.grad_clip.unwrap_or(0.0),
            schedule: o.schedule,
            adamw: o.implementation,
            ppo_epochs: 1,
            mini_batches: 1,
            micro_batch_tokens: 4096,
            logprob_chunk: 1024,
            activation_checkpointing: true,
            entropy_metric: true,
            routing_replay: true,
            router_aux_loss_coef: 0.0,
            critic: None,
        }
    }
}

/// `[trainer.critic]`: a value model initialized from the policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriticSection {
    pub lr: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub cliprange_value: f64,
}

impl Default for CriticSection {
    fn default() -> Self {
        CriticSection {
            lr: 1e-5,
            weight_decay: 0.01,
            grad_clip: 1.0,
            cliprange_value: 0.5,
        }
    }
}

/// `[placement]`: where the actors run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementSection {
    pub trainer: DeviceGroup,
    pub generator: DeviceGroup,
    /// Generators as separate processes (`rlrun actor generator`), this many.
    pub generator_processes: usize,
    /// Generators reached by address (started by hand or another launcher).
    pub generator_addresses: Vec<String>,
    /// Generators started by a launcher that restarts them (the Ray driver): a file with the
    /// JSON list of their addresses, re-read when one dies.
    pub generator_addresses_file: Option<String>,
    /// The shared token of `generator_addresses` and `trainer_addresses` (a file holding it).
    pub token_file: Option<String>,
    /// The trainer in its own process (`rlrun actor trainer`).
    pub trainer_process: bool,
    /// A trainer reached by address (started by the Ray driver, by hand or another launcher),
    /// with the settings `rlrun cluster actor-config` gives it; several: the ranks of a
    /// data-parallel trainer, in rank order.
    pub trainer_addresses: Vec<String>,
}

impl PlacementSection {
    /// The trainer runs outside this process (spawned, data-parallel ranks, or reached by
    /// address).
    pub fn trainer_elsewhere(&self) -> bool {
        self.trainer_process || !self.trainer_addresses.is_empty() || self.trainer.devices.len() > 1
    }

    /// The generators run outside this process (spawned or reached by address).
    pub fn generators_elsewhere(&self) -> bool {
        self.generator_processes > 0
            || !self.generator_addresses.is_empty()
            || self.generator_addresses_file.is_some()
    }
}

/// A device group: `device = "auto" | "cpu" | "cuda"` and, on CUDA, `devices = [0, 1]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceGroup {
    pub device: DeviceChoice,
    pub devices: Vec<usize>,
    /// CPU threads for this actor's torch ops (0: torch's default).
    pub threads: usize,
}

impl Default for DeviceGroup {
    fn default() -> Self {
        DeviceGroup {
            device: DeviceChoice::Auto,
            devices: vec![0],
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// `[sync]`: weight sync from the trainer to the generators.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    /// Sync every this many steps.
    pub every: u64,
    /// `auto` picks by placement (`in-process` when trainer and generator share this process,
    /// else `shm`); or `in-process`, `shm`, `net` (pulled over the network from the trainer's
    /// weight store: generators on other machines), `nccl` (broadcast by the trainer to its
    /// generator processes as one group: NCCL on CUDA, TCP on CPU; `net` as the fallback).
    pub backend: SyncBackend,
    /// Per-tensor checksums verified by the receiver.
    pub checksum: bool,
    /// `net` with the trainer in this process: where this process serves the weight store
    /// (host:port; loopback by default; any other address needs `placement.token_file` and must
    /// be one the generators reach, not 0.0.0.0).
    pub listen: String,
    /// After each sync, generate a fixed probe (the first training prompt, one sample) and
    /// compare the generator's log-probs with the trainer's: `sync/probe_logprob_max_diff`.
    pub probe: bool,
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection {
            every: 1,
            backend: SyncBackend::Auto,
            checksum: false,
            listen: "127.0.0.1:0".into(),
            probe: false,
        }
    }
}

/// `[eval]`: greedy evaluation on `data.eval`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Every this many steps (0: only before and after training).
    pub every: u64,
    pub before: bool,
    pub after: bool,
    /// Distinct problems evaluated: the first this many distinct problems of `data.eval` (an
    /// error if it has fewer); unset: every distinct problem of a finite `data.eval`, up to 200
    /// of a generated one.
    pub size: Option<usize>,
    /// Completion length limit (default: `rollout.max_tokens`).
    pub max_tokens: Option<usize>,
    /// Also sample this many completions per problem at `rollout.temperature` for pass@k (0: off).
    pub pass_k: usize,
    /// A completion counts as correct when its reward is at least this.
    pub correct_threshold: f32,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every: 0,
            before: true,
            after: true,
            size: None,
            max_tokens: None,
            pass_k: 0,
            correct_threshold: 1.0,
        }
    }
}

/// `[checkpoint]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Every this many steps (0: no step cadence).
    pub every: u64,
    /// Also whenever this many minutes have passed since the last checkpoint (0: no time
    /// cadence), whichever comes first: a crash loses at most this much training. Default 15.
    /// A checkpoint is always written at the end and on Ctrl-C.
    pub every_minutes: f64,
    /// Checkpoints kept (older ones are deleted).
    pub keep: usize,
    /// Also write a Hugging Face directory of the final policy (`<run>/final`).
    pub export_hf: bool,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every: 0,
            every_minutes: 15.0,
            keep: 2,
            export_hf: false,
        }
    }
}

/// `[logging]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// Parent directory of run directories.
    pub run_dir: String,
    pub tensorboard: bool,
    /// Sample completions logged as text per step.
    pub samples: usize,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection {
            run_dir: "runs".into(),
            tensorboard: true,
            samples: 2,
        }
    }
}

/// A validated recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub config: RecipeConfig,
    /// Where it was read from.
    pub source: PathBuf,
    /// The model path, resolved.
    pub model_path: PathBuf,
    /// The resolved TOML text (overrides applied, defaults filled in).
    pub resolved: String,
    /// The datasets, reward and advantage estimator, built once by validation.
    pub built: Arc<Built>,
}

/// What validation built from a recipe, and a run uses.
pub struct Built {
    pub train: Arc<dyn Dataset>,
    /// The evaluation problems (distinct; see `eval_set`), empty without `data.eval`.
    pub eval: Vec<Sample>,
    /// None when an environment scores the episodes.
    pub reward: Option<Arc<dyn RewardFn>>,
    pub environment: Option<Arc<dyn rlrun_rollout::env::Environment>>,
    pub estimator: Arc<dyn AdvantageEstimator>,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("train", &self.train.num_samples())
            .field("eval", &self.eval.len())
            .finish_non_exhaustive()
    }
}

/// Source positions of keys, for validation errors.
struct Spans {
    doc: Option<toml_edit::Document<String>>,
    text: String,
}

impl Spans {
    fn new(text: &str) -> Self {
        Spans {
            doc: toml_edit::Document::parse(text.to_string()).ok(),
            text: text.to_string(),
        }
    }

    /// (line, column) of the key path `a.b.c` (of its deepest existing prefix).
    fn locate(&self, path: &str) -> Option<(usize, usize)> {
        let doc = self.doc.as_ref()?;
        let mut item: &toml_edit::Item = doc.as_item();
        let mut span = None;
        for part in path.split('.') {
            let table = item.as_table_like()?;
            let (key, child) = table.get_key_value(part)?;
            span = key.span().or_else(|| child.span()).or(span);
            item = child;
        }
        span.map(|s| line_col(&self.text, s.start))
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Applies `key.path=value` overrides to TOML text.
pub fn apply_overrides(
    text: &str,
    overrides: &[String],
    file: &str,
) -> Result<String, RecipeError> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unzip();
        RecipeError {
            file: file.into(),
            key: String::new(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })?;
    for o in overrides {
        let err = |m: String| RecipeError {
            file: "--set".into(),
            key: o.clone(),
            line: None,
            column: None,
            message: m,
        };
        let (path, value) = o
            .split_once('=')
            .ok_or_else(|| err("expected key.path=value".into()))?;
        let value: toml_edit::Value = value
            .trim()
            .parse()
            .unwrap_or_else(|_| toml_edit::Value::from(value.trim()));
        let parts: Vec<&str> = path.trim().split('.').collect();
        let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
        for part in &parts[..parts.len() - 1] {
            if table.get(part).is_none() {
                table.insert(part, toml_edit::Item::Table(toml_edit::Table::new()));
            }
            table = table
                .get_mut(part)
                .and_then(|i| i.as_table_like_mut())
                .ok_or_else(|| err(format!("`{part}` is not a table")))?;
        }
        let last = parts.last().copied().unwrap_or_default();
        table.insert(last, toml_edit::Item::Value(value));
    }
    Ok(doc.to_string())
}

/// Every key a struct accepts, for "did you mean" on unknown keys: taken from serde's message.
fn suggest(message: &str) -> Option<String> {
    let unknown = message.split("unknown field `").nth(1)?.split('`').next()?;
    let expected = message.split("expected").nth(1)?;
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(unknown, c), *c))
        .filter(|(s, _)| *s > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    Some(best.1.to_string())
}

impl Recipe {
    /// Reads, overrides, parses and validates a recipe file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError {
            file: file.clone(),
            key: String::new(),
            line: None,
            column: None,
            message: format!("cannot read the recipe: {e}"),
        })?;
        Self::from_str(&text, path, overrides)
    }

    /// Parses and validates recipe text (`source` names it in errors and anchors relative paths).
    pub fn from_str(
        text: &str,
        source: &Path,
        overrides: &[String],
    ) -> Result<Recipe, RecipeError> {
        let file = source.display().to_string();
        let text = if overrides.is_empty() {
            text.to_string()
        } else {
            apply_overrides(text, overrides, &file)?
        };
        let de = toml::Deserializer::parse(&text).map_err(|e| RecipeError {
            file: file.clone(),
            key: String::new(),
            line: e.span().map(|s| line_col(&text, s.start).0),
            column: e.span().map(|s| line_col(&text, s.start).1),
            message: e.message().trim().to_string(),
        })?;
        let mut config: RecipeConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let mut message = inner.message().trim().to_string();
            if let Some(s) = suggest(&message) {
                message.push_str(&format!("; did you mean `{s}`?"));
            }
            let spans = Spans::new(&text);
            let pos = inner
                .span()
                .map(|s| line_col(&text, s.start))
                .or_else(|| spans.locate(&key));
            RecipeError {
                file: file.clone(),
                key: if key == "." { String::new() } else { key },
                line: pos.map(|p| p.0),
                column: pos.map(|p| p.1),
                message,
            }
        })?;
        let spans = Spans::new(&text);
        let err = |key: &str, message: String| {
            let pos = spans.locate(key);
            RecipeError {
                file: file.clone(),
                key: key.into(),
                line: pos.map(|p| p.0),
                column: pos.map(|p| p.1),
                message,
            }
        };
        let model_path = resolve_path(&config.model.path, source);
        if let Some(init) = config.model.lora.as_mut().and_then(|l| l.init.as_mut()) {
            *init = resolve_path(&init.to_string_lossy(), source);
        }
        validate(&config, &model_path, &err)?;
        let built = build(&config, &err)?;
        let resolved = toml::to_string_pretty(&config)
            .map_err(|e| err("", format!("cannot serialize the recipe: {e}")))?;
        Ok(Recipe {
            config,
            source: source.to_path_buf(),
            model_path,
            resolved,
            built: Arc::new(built),
        })
    }
}

/// A relative path: from the working directory if it exists there, else from the recipe's
/// directory or the nearest of its ancestors where it exists (so `models/x` in `recipes/y.toml`
/// finds the project's `models/x` from anywhere).
pub fn resolve_path(p: &str, recipe: &Path) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() || p.exists() {
        return p;
    }
    let dir = recipe.parent().map(|d| d.to_path_buf()).unwrap_or_default();
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    dir.ancestors()
        .map(|a| a.join(&p))
        .find(|c| c.exists())
        .unwrap_or(p)
}

fn validate(
    c: &RecipeConfig,
    model_path: &Path,
    err: &dyn Fn(&str, String) -> RecipeError,
) -> Result<(), RecipeError> {
    if c.steps == 0 {
        return Err(err("steps", "must be at least 1".into()));
    }
    crate::cluster::check(&c.cluster).map_err(|(k, m)| err(&k, m))?;
    if !model_path.exists() {
        return Err(err(
            "model.path",
            format!("no such file or directory: {}", model_path.display()),
        ));
    }
    if let Some(l) = &c.model.lora {
        l.validate().map_err(|m| {
            let field = m.split_whitespace().next().unwrap_or_default();
            err(&format!("model.lora.{field}"), m.clone())
        })?;
        l.resolved()
            .map_err(|e| err("model.lora.init", e.to_string()))?;
    }
    if c.data.prompts_per_step == 0 {
        return Err(err("data.prompts_per_step", "must be at least 1".into()));
    }
    let r = &c.rollout;
    if r.n == 0 {
        return Err(err("rollout.n", "must be at least 1".into()));
    }
    if !(r.temperature > 0.0 && r.temperature.is_finite()) {
        return Err(err(
            "rollout.temperature",
            format!("must be > 0 for training rollouts (got {}); greedy decoding is used for evaluation", r.temperature),
        ));
    }
    if !(r.top_p > 0.0 && r.top_p <= 1.0) {
        return Err(err(
            "rollout.top_p",
            format!("must be in (0, 1], got {}", r.top_p),
        ));
    }
    if r.top_k < 0 {
        return Err(err(
            "rollout.top_k",
            format!("must be >= 0 (0 disables), got {}", r.top_k),
        ));
    }
    if !(0.0..=1.0).contains(&r.min_p) {
        return Err(err(
            "rollout.min_p",
            format!("must be in [0, 1], got {}", r.min_p),
        ));
    }
    if r.max_tokens == 0 {
        return Err(err("rollout.max_tokens", "must be at least 1".into()));
    }
    if let Some(s) = r.max_slots {
        if s < r.n {
            return Err(err(
                "rollout.max_slots",
                format!("must be at least rollout.n ({}), got {s}", r.n),
            ));
        }
    }
    let a = &c.algorithm;
    let adv_name = serde_json::to_value(&a.advantage)
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_default();
    let grouped = matches!(
        adv_name.as_str(),
        "grpo" | "dr-grpo" | "rloo" | "reinforce-pp-baseline"
    );
    if grouped && r.n < 2 {
        return Err(err(
            "rollout.n",
            format!(
                "advantage `{adv_name}` compares samples of a prompt: needs rollout.n >= 2, got {}",
                r.n
            ),
        ));
    }
    let is_gae = matches!(a.advantage, AdvantageConfig::Gae(_));
    if is_gae && c.trainer.critic.is_none() {
        return Err(err(
            "algorithm.advantage",
            "`gae` needs a critic: add a [trainer.critic] section".into(),
        ));
    }
    if !is_gae && c.trainer.critic.is_some() {
        return Err(err(
            "trainer.critic",
            format!("a critic is only used by `gae`, but the advantage is `{adv_name}`"),
        ));
    }
    a.loss
        .validate()
        .map_err(|e| err("algorithm.loss", e.to_string()))?;
    if let Some(k) = &a.kl_in_reward {
        if !(k.coef >= 0.0 && k.coef.is_finite()) {
            return Err(err(
                "algorithm.kl_in_reward.coef",
                format!("must be >= 0, got {}", k.coef),
            ));
        }
        if a.loss.kl.is_some() {
            return Err(err(
                "algorithm.kl_in_reward",
                "KL is already a loss term (algorithm.loss.kl): use one or the other".into(),
            ));
        }
    }
    if let Some(d) = &a.dynamic_sampling {
        if d.max_rounds == 0 {
            return Err(err(
                "algorithm.dynamic_sampling.max_rounds",
                "must be at least 1".into(),
            ));
        }
        if !grouped {
            return Err(err("algorithm.dynamic_sampling", format!("needs a group advantage (grpo, dr-grpo, rloo, reinforce-pp-baseline), not `{adv_name}`")));
        }
    }
    if let Some(e) = &c.environment {
        if r.max_staleness > 0 {
            return Err(err(
                "rollout.max_staleness",
                "multi-turn episodes ([environment]) are generated on-policy: set it to 0".into(),
            ));
        }
        if e.max_tokens_per_turn == Some(0) {
            return Err(err(
                "environment.max_tokens_per_turn",
                "must be at least 1".into(),
            ));
        }
        if c.eval.pass_k > 0 {
            return Err(err(
                "eval.pass_k",
                "pass@k is not computed for multi-turn episodes ([environment]): set it to 0"
                    .into(),
            ));
        }
    }
    let t = &c.trainer;
    if !(t.lr > 0.0 && t.lr.is_finite()) {
        return Err(err("trainer.lr", format!("must be > 0, got {}", t.lr)));
    }
    if !(t.router_aux_loss_coef >= 0.0 && t.router_aux_loss_coef.is_finite()) {
        return Err(err(
            "trainer.router_aux_loss_coef",
            format!("must be >= 0, got {}", t.router_aux_loss_coef),
        ));
    }
    if t.weight_decay < 0.0 {
        return Err(err(
            "trainer.weight_decay",
            format!("must be >= 0, got {}", t.weight_decay),
        ));
    }
    if t.grad_clip < 0.0 {
        return Err(err(
            "trainer.grad_clip",
            format!("must be >= 0 (0 disables), got {}", t.grad_clip),
        ));
    }
    for (k, v) in [
        ("trainer.ppo_epochs", t.ppo_epochs),
        ("trainer.mini_batches", t.mini_batches),
        ("trainer.micro_batch_tokens", t.micro_batch_tokens),
    ] {
        if v == 0 {
            return Err(err(k, "must be at least 1".into()));
        }
    }
    let batch = c.data.prompts_per_step * r.n;
    if t.mini_batches > batch {
        return Err(err(
            "trainer.mini_batches",
            format!(
                "{} mini-batches for {batch} sequences per step",
                t.mini_batches
            ),
        ));
    }
    if c.sync.every == 0 {
        return Err(err("sync.every", "must be at least 1".into()));
    }
    let pl = &c.placement;
    let separate = pl.trainer_elsewhere() || pl.generators_elsewhere();
    let generator_sources = [
        pl.generator_processes > 0,
        !pl.generator_addresses.is_empty(),
        pl.generator_addresses_file.is_some(),
    ];
    if generator_sources.iter().filter(|&&b| b).count() > 1 {
        return Err(err(
            "placement.generator_addresses_file",
            "give one of generator_processes, generator_addresses and generator_addresses_file"
                .into(),
        ));
    }
    if pl.trainer_process && !pl.trainer_addresses.is_empty() {
        return Err(err(
            "placement.trainer_addresses",
            "give either a trainer address or placement.trainer_process = true, not both".into(),
        ));
    }
    match c.sync.listen.parse::<std::net::SocketAddr>() {
        Err(_) => {
            return Err(err(
                "sync.listen",
                format!("`{}`: expected ip:port", c.sync.listen),
            ))
        }
        Ok(a) if a.ip().is_unspecified() => {
            return Err(err(
                "sync.listen",
                format!(
                    "`{a}`: generators are told this address, so name the one they reach this machine at"
                ),
            ))
        }
        Ok(a) if !a.ip().is_loopback() && pl.token_file.is_none() => {
            return Err(err(
                "sync.listen",
                format!("`{a}` is beyond loopback: set placement.token_file"),
            ))
        }
        Ok(_) => {}
    }
    if c.sync.backend == SyncBackend::Nccl && !pl.generators_elsewhere() {
        return Err(err(
            "sync.backend",
            "`nccl` broadcasts to generator processes: set placement.generator_processes (or generator addresses, or a cluster)".into(),
        ));
    }
    if c.sync.backend == SyncBackend::InProcess && separate {
        return Err(err(
            "sync.backend",
            "`in-process` needs the trainer and the generator in this process (placement.trainer_process = false, no generator processes or addresses)".into(),
        ));
    }
    for (key, group) in [
        ("placement.trainer.devices", &pl.trainer),
        ("placement.generator.devices", &pl.generator),
    ] {
        if group.devices.is_empty() {
            return Err(err(key, "needs at least one device index".into()));
        }
    }
    if pl.trainer.devices.len() > 1 {
        // Data parallel: one trainer process per device.
        if !pl.trainer_addresses.is_empty() {
            return Err(err(
                "placement.trainer.devices",
                "a data-parallel trainer on several devices is spawned by rlrun: not with placement.trainer_addresses (list its ranks there instead)".into(),
            ));
        }
    }
    for (key, ranks) in [
        ("placement.trainer.devices", pl.trainer.devices.len()),
        ("placement.trainer_addresses", pl.trainer_addresses.len()),
    ] {
        if ranks > 1 && c.model.lora.is_some() {
            return Err(err(
                key,
                "data parallelism with LoRA adapters is not supported yet: one trainer".into(),
            ));
        }
    }
    if pl.generator.devices.len() > 1 && pl.generator_processes == 0 {
        return Err(err(
            "placement.generator.devices",
            format!(
                "an in-process generator runs on one device; to use {:?}, run generators as processes (placement.generator_processes), which are spread over them round robin",
                pl.generator.devices
            ),
        ));
    }
    if !(c.checkpoint.every_minutes >= 0.0 && c.checkpoint.every_minutes.is_finite()) {
        return Err(err(
            "checkpoint.every_minutes",
            format!(
                "must be >= 0 (0: no time cadence), got {}",
                c.checkpoint.every_minutes
            ),
        ));
    }
    if c.checkpoint.keep == 0 {
        return Err(err("checkpoint.keep", "must be at least 1".into()));
    }
    if c.data.eval.is_none() && (c.eval.every > 0) {
        return Err(err(
            "eval.every",
            "needs an evaluation set: add data.eval".into(),
        ));
    }
    Ok(())
}

/// Indices tried per requested problem before concluding the split has too few distinct ones.
const DRAWS_PER_PROBLEM: u64 = 50;

/// The evaluation set: the first `size` distinct problems of `ds` (by [`Sample::problem_key`],
/// so a generated split never shows `a + b` and `b + a` twice), in index order; without `size`,
/// every distinct problem of a finite dataset (an unbounded one gets 200). An error when the
/// dataset has fewer distinct problems than asked for.
fn eval_set(ds: &dyn Dataset, size: Option<usize>) -> Result<Vec<Sample>, String> {
    let want = size.map(|s| s as u64).or(ds.num_samples()).unwrap_or(200);
    let limit = ds
        .num_samples()
        .unwrap_or(u64::MAX)
        .min(want.saturating_mul(DRAWS_PER_PROBLEM));
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut i = 0;
    while (out.len() as u64) < want && i < limit {
        let Some(s) = ds.get(i) else { break };
        i += 1;
        if seen.insert(s.problem_key()) {
            out.push(s);
        }
    }
    if size.is_some() && (out.len() as u64) < want {
        return Err(format!(
            "{want} problems asked for, but the eval dataset `{}` has only {} distinct problems (in its first {i} items): lower eval.size or widen the dataset",
            ds.name(),
            out.len()
        ));
    }
    Ok(out)
}

/// Builds the datasets, the reward and the estimator (once; the run uses these).
fn build(
    c: &RecipeConfig,
    err: &dyn Fn(&str, String) -> RecipeError,
) -> Result<Built, RecipeError> {
    let train = c
        .data
        .train
        .build()
        .map_err(|e| err("data.train", e.to_string()))?;
    let eval = match &c.data.eval {
        Some(e) => {
            let ds = e.build().map_err(|e| err("data.eval", e.to_string()))?;
            eval_set(ds.as_ref(), c.eval.size).map_err(|e| err("eval.size", e))?
        }
        None => Vec::new(),
    };
    let reward = match (&c.reward, &c.environment) {
        (Some(r), None) => Some(r.build().map_err(|e| err("reward", e.to_string()))?),
        (None, Some(_)) => None,
        (Some(_), Some(_)) => {
            return Err(err(
                "reward",
                "an [environment] scores its episodes: remove [reward] (or the environment)".into(),
            ))
        }
        (None, None) => {
            return Err(err(
                "reward",
                "missing: add a [reward] section (or an [environment])".into(),
            ))
        }
    };
    let environment = match &c.environment {
        Some(e) => Some(e.build().map_err(|m| err("environment", m))?),
        None => None,
    };
    let estimator = c
        .algorithm
        .advantage
        .build()
        .map_err(|e| err("algorithm.advantage", e.to_string()))?;
    Ok(Built {
        train,
        eval,
        reward,
        environment,
        estimator: Arc::from(estimator),
    })
}

impl TrainerSection {
    /// The optimizer settings of the policy.
    pub fn optim(&self) -> OptimConfig {
        OptimConfig {
            lr: self.lr,
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
            grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip),
            schedule: self.schedule.clone(),
            implementation: self.adamw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_the_nearest_key() {
        let m = "unknown field `lrr`, expected one of `lr`, `betas`, `eps`";
        assert_eq!(suggest(m).as_deref(), Some("lr"));
        assert_eq!(suggest("unknown field `zzzz`, expected `lr`"), None);
    }

    #[test]
    fn overrides_set_nested_values_and_strings() {
        let t = apply_overrides(
            "[trainer]\nlr = 1.0\n",
            &[
                "trainer.lr=1e-6".into(),
                "rollout.n=4".into(),
                "name=abc".into(),
            ],
            "r",
        )
        .unwrap();
        let v: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(v["trainer"]["lr"].as_float(), Some(1e-6));
        assert_eq!(v["rollout"]["n"].as_integer(), Some(4));
        assert_eq!(v["name"].as_str(), Some("abc"));
    }
}
