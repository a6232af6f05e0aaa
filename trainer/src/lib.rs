//! `rlrun-trainer`: policy losses, optimization and checkpoints.
//!
//! - [`loss`]: the `PolicyLoss` trait, PPO / GSPO / PG, aggregation modes, KL estimators.
//! - [`optim`]: AdamW over flat buffers, LR schedules, gradient clipping.
//! - [`batch`]: training sequences and their packing into micro-batches.
//! - [`dp`]: data parallelism across trainer processes (gradient sums, shares of a batch).
//! - [`trainer`]: the [`Trainer`] (policy, reference model, critic; steps; checkpoints).

pub mod actor;
pub mod batch;
pub mod dp;
pub mod error;
pub mod kl;
pub mod loss;
pub mod optim;
pub mod trainer;

pub use actor::{LocalTrainer, TrainerActor};
pub use batch::{TrainBatch, TrainSequence};
pub use dp::DataParallel;
pub use error::{Result, TrainError};
pub use optim::{AdamW, AdamWImpl, OptimConfig, Schedule};
pub use trainer::{CriticConfig, SeqValues, StepMetrics, Trainer, TrainerConfig};
