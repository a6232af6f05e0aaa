//! `rlrun`: the recipe format, the controller loop, metrics, TensorBoard and lineage.
//!
//! The command-line tool (`src/main.rs`) and the Python bindings are thin layers over
//! [`recipe::Recipe`] and [`controller::Run`].

pub mod controller;
pub mod manifest;
pub mod metrics;
pub mod recipe;
pub mod tensorboard;

pub use controller::{EvalResult, Run, TrainSummary};
pub use recipe::{Recipe, RecipeError};
