//! `rlrun`: the recipe format, the controller loop, metrics, TensorBoard and lineage.
//!
//! The command-line tool (`src/main.rs`) and the Python bindings are thin layers over
//! [`recipe::Recipe`] and [`controller::Run`].

pub mod actors;
pub mod controller;
pub mod error;
pub mod manifest;
pub mod metrics;
pub mod recipe;
pub mod sync;
pub mod tensorboard;
mod util;

pub use controller::{EvalResult, MemorySummary, Run, TrainSummary};
pub use error::{Error, Result};
pub use recipe::{Recipe, RecipeError};

/// Tunes glibc malloc for libtorch's large, short-lived CPU tensors: freed blocks stay in the
/// heap for reuse instead of going back to the kernel, so the next step's activations and
/// gradients do not page-fault their way into fresh memory (measured: a large share of CPU
/// training time was spent in the kernel zero-filling pages). Call once, early.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
