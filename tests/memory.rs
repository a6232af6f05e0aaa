//! Memory under a hard limit: a step of the shipped recipe with the longest responses
//! (`gsm8k_smollm2`, 256 tokens) on the real SmolLM2-135M, with a tiny batch, runs in a process
//! whose heap is capped (`RLIMIT_DATA`), so a memory regression fails here (an allocation error)
//! instead of swapping or being killed by the machine; its peak resident memory is checked too.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::*;

/// The cap on the process's data (heap and anonymous mappings).
const DATA_LIMIT_BYTES: u64 = 6 << 30;
/// What the step may hold resident at its peak (measured 5.4 GB): the trainer (f32 weights,
/// gradient, two AdamW moments), the frozen reference for KL and the generator's copy (0.54 GB
/// each), the mapped model file and the copies made while loading (kept by the allocator for
/// reuse), libtorch, and the activations of a tiny batch. Before the KV cache was sized to the
/// scheduled batch (it reserved every slot at full length: 4.5 GB for this recipe) this failed.
const PEAK_RSS_BYTES: u64 = 6_000_000_000;

#[test]
fn a_step_of_the_longest_response_recipe_fits_a_hard_memory_limit() {
    let model = root().join("models/SmolLM2-135M-Instruct");
    assert!(
        model.join("model.safetensors").exists(),
        "{} is made by `make test` (models/SmolLM2-135M-Instruct/model.safetensors)",
        model.display()
    );
    let base = rlrun_testkit::tempdir();
    let mut args = vec![root()
        .join("recipes/gsm8k_smollm2.toml")
        .display()
        .to_string()];
    args.extend(set_args(&[
        "steps=1".into(),
        "data.prompts_per_step=2".into(),
        "rollout.n=2".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        format!("logging.run_dir=\"{}\"", base.path().display()),
    ]));
    // Output to a file: the child is reaped with wait4 (for its peak memory), not through pipes.
    let log = base.path().join("rlrun.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(&args)
        .current_dir(root())
        .env("RLRUN_LOG", "warn")
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file));
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: DATA_LIMIT_BYTES,
                rlim_max: DATA_LIMIT_BYTES,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("starting rlrun");
    let pid = child.id() as libc::pid_t;
    let (status, peak_rss) = wait_with_peak_rss(pid);
    drop(child);
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the step failed under a {} GiB data limit (status {status}): {stderr}",
        DATA_LIMIT_BYTES >> 30
    );
    eprintln!("peak resident memory: {:.2} GB", peak_rss as f64 / 1e9);
    assert!(
        peak_rss <= PEAK_RSS_BYTES,
        "peak resident memory {:.2} GB > {:.2} GB",
        peak_rss as f64 / 1e9,
        PEAK_RSS_BYTES as f64 / 1e9
    );
    // The step trained on responses up to the recipe's length.
    let m = metrics(&run_dir(base.path()));
    let step = m.iter().find(|l| l["step"] == 1).expect("step 1 logged");
    assert!(step["response_length/max"].as_f64().unwrap() > 0.0);
    assert!(step["memory/peak_rss_train_bytes"].as_f64().unwrap() > 0.0);
}

/// Waits for `pid`; its wait status and peak resident memory (bytes).
fn wait_with_peak_rss(pid: libc::pid_t) -> (i32, u64) {
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    (status, usage.ru_maxrss as u64 * 1024)
}
