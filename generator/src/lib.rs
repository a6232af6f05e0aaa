//! `rlrun-generator`: the inference engine rollouts come from.
//!
//! - [`engine`]: continuous batching over KV-cache slots; a GRPO group's prompt is prefilled once
//!   and shared by its `n` samples; weight updates between steps with a version tag.
//! - [`sampling`]: temperature / top-k / top-p / min-p with per-draw seeds from
//!   `(seed, draw key, sample index, position)` ([`DrawKey`]), and the exact log-prob definition.
//! - [`actor`]: the Generator actor ([`GeneratorActor`], [`LocalGenerator`]).

pub mod actor;
pub mod engine;
pub mod error;
pub mod sampling;

pub use actor::{CompletionStream, GeneratorActor, LocalGenerator};
pub use engine::{
    Completion, Engine, EngineConfig, EngineStats, FinishReason, Request, Timings, UpdatePolicy,
    WeightUpdate, RUN_PREFILL_TOKENS,
};
pub use error::{GenError, Result};
pub use sampling::{DrawKey, Purpose, SamplingParams};
