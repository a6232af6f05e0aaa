//! `rlrun`: the recipe format, the controller loop, metrics, TensorBoard and lineage.
//!
//! The command-line tool (`src/main.rs`) and the Python bindings are thin layers over
//! [`recipe::Recipe`] and [`controller::Run`].

pub mod actors;
pub mod cluster;
pub mod controller;
pub mod error;
pub mod manifest;
pub mod metrics;
pub mod multiturn;
pub mod recipe;
pub mod sync;
pub mod tensorboard;
mod util;

pub use controller::{EvalResult, MemorySummary, Run, TrainSummary};
pub use error::{Error, Result};
pub use recipe::{Recipe, RecipeError};

/// Gives the allocator's free memory back to the system (`malloc_trim`, every arena). Called
/// when a run switches between generation and training: with [`tune_allocator`]'s settings freed
/// memory otherwise stays with the thread arena that freed it, so the KV cache the generator
/// thread released could not serve the trainer's activations (measured: the resident peak of a
/// training step grew by the size of the cache).
pub fn release_free_memory() {
    // SAFETY: malloc_trim only returns free pages of the allocator's arenas to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The project's Python (the references' venv, the Ray driver's): `$RLRUN_PYTHON`,
/// `.venv/bin/python`, else `python3`.
pub fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("RLRUN_PYTHON") {
        return p.into();
    }
    let venv = std::path::Path::new(".venv/bin/python");
    if venv.exists() {
        return venv.to_path_buf();
    }
    "python3".into()
}

/// Tunes glibc malloc for libtorch's large, short-lived CPU tensors: freed blocks stay in the
/// heap for reuse instead of going back to the kernel, so the next step's activations and
/// gradients do not page-fault their way into fresh memory (measured: a large share of CPU
/// training time was spent in the kernel zero-filling pages). Call once, early.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
    }
}

const MMAP_THRESHOLD: i32 = 1 << 30;
const TRIM_THRESHOLD: i32 = i32::MAX;
const TOP_PAD: i32 = 256 << 20;

/// [`tune_allocator`]'s settings as glibc's environment variables, for a peer process measured
/// against this one (`rlrun bench`): both sides then run with the same allocator settings.
pub fn allocator_env() -> [(&'static str, String); 3] {
    [
        ("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD.to_string()),
        ("MALLOC_TRIM_THRESHOLD_", TRIM_THRESHOLD.to_string()),
        ("MALLOC_TOP_PAD_", TOP_PAD.to_string()),
    ]
}
