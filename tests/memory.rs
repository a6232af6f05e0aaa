//! Memory under a hard limit: a step of the shipped recipe with the longest responses
//! (`gsm8k_smollm2`, 256 tokens) on the real SmolLM2-135M, with a tiny batch, and the LoRA
//! quickstart's first step each run in a process whose heap is capped (`RLIMIT_DATA`), so a
//! memory regression fails here (an allocation error) instead of swapping or being killed by the
//! machine; their peak resident memory is checked too. A step that does not fit its cap ends with
//! an error naming the phase and the keys that use less, and a checkpoint to resume from.

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
    capped_step(
        "gsm8k_smollm2",
        &["data.prompts_per_step=2", "rollout.n=2"],
        DATA_LIMIT_BYTES,
        PEAK_RSS_BYTES,
    );
}

/// The LoRA quickstart's first step, as shipped (16 prompts x 8 samples): one copy of the base
/// shared by generator and trainer, adapters and their optimizer state (MBs), no reference copy.
/// Measured 1.93 GB; full fine-tuning's quickstart takes 4.4 GB. (The data limit counts address
/// space the allocator reserves per thread, well above what is resident.)
#[test]
fn the_lora_quickstart_step_fits_in_two_gigabytes() {
    capped_step("quickstart_lora", &[], 4 << 30, 2_150_000_000);
}

/// Runs the first step of `recipe` (evaluation off, `sets` added) in a process whose data is
/// capped at `data_limit` bytes, and checks its peak resident memory against `peak_limit`.
fn capped_step(recipe: &str, sets: &[&str], data_limit: u64, peak_limit: u64) {
    let base = rlrun_testkit::tempdir();
    let out = capped(&first_step_args(recipe, sets, base.path()), data_limit);
    assert!(
        out.ok,
        "{recipe}: the step failed under a {} GiB data limit (status {}): {}",
        data_limit as f64 / (1u64 << 30) as f64,
        out.status,
        out.log
    );
    eprintln!(
        "{recipe}: peak resident memory {:.2} GB",
        out.peak_rss as f64 / 1e9
    );
    assert!(
        out.peak_rss <= peak_limit,
        "{recipe}: peak resident memory {:.2} GB > {:.2} GB",
        out.peak_rss as f64 / 1e9,
        peak_limit as f64 / 1e9
    );
    // The step trained on responses.
    let m = metrics(&run_dir(base.path()));
    let step = m.iter().find(|l| l["step"] == 1).expect("step 1 logged");
    assert!(step["response_length/max"].as_f64().unwrap() > 0.0);
    assert!(step["memory/peak_rss_train_bytes"].as_f64().unwrap() > 0.0);
}

/// An allocation that fails names the phase, what torch asked for and the recipe keys that use
/// less memory; with the trainer untouched the run stops with a checkpoint of the last completed
/// step, and `rlrun resume` with a smaller setting finishes it under the same limit.
#[test]
fn running_out_of_memory_names_the_phase_and_keys_and_stops_with_a_checkpoint() {
    let base = rlrun_testkit::tempdir();
    // The LoRA quickstart's step fits in 2 GB; 64 sequences of up to 128 new tokens in one
    // micro-batch, with every layer's activations kept and the logits of every token at once
    // (49,152 per token, f32), need more than the 4 GiB cap.
    let sets = [
        "data.prompts_per_step=8",
        "rollout.max_tokens=128",
        "trainer.micro_batch_tokens=1000000",
        "trainer.logprob_chunk=1000000",
        "trainer.activation_checkpointing=false",
    ];
    let out = capped(
        &first_step_args("quickstart_lora", &sets, base.path()),
        4 << 30,
    );
    assert!(!out.ok, "the step should not fit: {}", out.log);
    for part in [
        "out of memory while the step 1 train phase ran",
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate",
        "trainer.micro_batch_tokens",
        "the run stopped with a checkpoint of step 0",
    ] {
        assert!(
            out.log.contains(part),
            "`{part}` missing from:\n{}",
            out.log
        );
    }
    let run = run_dir(base.path());
    assert!(run.join("checkpoints/step-00000000").is_dir());
    let resumed = capped(
        &[
            "resume".into(),
            run.display().to_string(),
            "--set".into(),
            "trainer.micro_batch_tokens=2048".into(),
            "--set".into(),
            "trainer.activation_checkpointing=true".into(),
        ],
        4 << 30,
    );
    assert!(resumed.ok, "the resumed run failed: {}", resumed.log);
    let m = metrics(&run);
    assert!(m.iter().any(|l| l["step"] == 1 && l["kind"] == "train"));
}

/// `rlrun <recipe>` for its first step, evaluation off, `sets` added, runs under `base`.
fn first_step_args(recipe: &str, sets: &[&str], base: &std::path::Path) -> Vec<String> {
    let model = root().join("models/SmolLM2-135M-Instruct");
    assert!(
        model.join("model.safetensors").exists(),
        "{} is made by `make test` (models/SmolLM2-135M-Instruct/model.safetensors)",
        model.display()
    );
    let mut args = vec![root()
        .join(format!("recipes/{recipe}.toml"))
        .display()
        .to_string()];
    let mut all: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    all.extend([
        "steps=1".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        format!("logging.run_dir=\"{}\"", base.display()),
    ]);
    args.extend(set_args(&all));
    args
}

/// How a capped run ended.
struct Capped {
    ok: bool,
    status: i32,
    peak_rss: u64,
    log: String,
}

/// Runs `rlrun args` in a process whose data is capped at `data_limit` bytes.
fn capped(args: &[String], data_limit: u64) -> Capped {
    // Output to a file: the child is reaped with wait4 (for its peak memory), not through pipes.
    let dir = rlrun_testkit::tempdir();
    let log = dir.path().join("rlrun.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(root())
        .env("RLRUN_LOG", "warn")
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file));
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: data_limit,
                rlim_max: data_limit,
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
    Capped {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        status,
        peak_rss,
        log: std::fs::read_to_string(&log).unwrap_or_default(),
    }
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
