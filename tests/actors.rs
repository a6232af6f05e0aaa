//! Actors as processes: the same run with the trainer and two generators in their own processes
//! gives the in-process metrics; the generator matches the trainer after every sync; a generator
//! killed with SIGKILL is restarted and the run completes; asynchronous rollouts stay within
//! their staleness bound; token and malformed-message handling of a served actor.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn overrides(run_base: &Path, steps: u64) -> Vec<String> {
    let model = rlrun_testkit::fixtures().join("tiny-llama3");
    vec![
        format!("model.path={}", model.display()),
        format!("steps={steps}"),
        "data.prompts_per_step=4".into(),
        "rollout.n=4".into(),
        "rollout.max_tokens=8".into(),
        "eval.size=4".into(),
        "eval.max_tokens=4".into(),
        "sync.probe=true".into(),
        format!("logging.run_dir=\"{}\"", run_base.display()),
    ]
}

fn run_ok(args: Vec<String>) -> String {
    let out = rlrun(&args);
    assert!(
        out.status.success(),
        "rlrun {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `rlrun recipes/quickstart.toml` with `overrides`; must succeed; returns its stderr.
fn run_quickstart(overrides: &[String]) -> String {
    run_ok(
        ["recipes/quickstart.toml".to_string()]
            .into_iter()
            .chain(set_args(overrides))
            .collect(),
    )
}

fn train_lines(m: &[Value]) -> Vec<&Value> {
    m.iter().filter(|l| l["kind"] == "train").collect()
}

/// Metrics that measure time or describe the placement, not the computation.
fn placement_or_timing(key: &str) -> bool {
    key.starts_with("time/")
        || key.starts_with("sync/")
        || key.starts_with("perf/")
        || key.starts_with("generator/")
        || key.starts_with("memory/")
        || key.ends_with("/seconds")
        || key == "wall_time"
}

#[test]
fn processes_give_the_in_process_metrics_and_the_generator_matches_the_trainer_after_each_sync() {
    let local = rlrun_testkit::tempdir();
    let mut o = overrides(local.path(), 3);
    o.push("algorithm.loss.off_policy.correction=\"off\"".into());
    run_quickstart(&o);
    let a = metrics(&run_dir(local.path()));
    // Weights through shared memory, pulled over the network from the trainer's process, and
    // broadcast by the trainer to its group of generators (over TCP: these are CPU processes).
    for backend in ["shm", "net", "nccl"] {
        let remote = rlrun_testkit::tempdir();
        let mut o = overrides(remote.path(), 3);
        o.push("placement.trainer_process=true".into());
        o.push("placement.generator_processes=2".into());
        o.push(format!("sync.backend=\"{backend}\""));
        // Generators in other processes turn the off-policy correction on by default, and its
        // weights carry the generators' rounding (their batches differ): compare the
        // computation itself, uncorrected on both sides.
        o.push("algorithm.loss.off_policy.correction=\"off\"".into());
        run_quickstart(&o);
        let b = metrics(&run_dir(remote.path()));
        assert_eq!(a.len(), b.len());
        let mut compared = 0;
        for (x, y) in a.iter().zip(&b) {
            let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
            for (k, v) in x {
                if placement_or_timing(k) {
                    continue;
                }
                let w = &y[k];
                if k == "actor/logprob_mismatch" {
                    // The generator's batches differ (two processes): rounding only.
                    let (v, w) = (v.as_f64().unwrap(), w.as_f64().unwrap());
                    assert!((v - w).abs() < 1e-5, "{backend}: {k}: {v} vs {w}");
                } else {
                    assert_eq!(v, w, "{backend}, step {}: {k}", x["step"]);
                }
                compared += 1;
            }
        }
        assert!(compared > 30, "{compared}");
        for m in train_lines(&b) {
            assert_eq!(m[&format!("sync/backend_{backend}")], 1.0, "{m}");
            assert!(m["sync/gb_per_s"].as_f64().unwrap() > 0.0);
            // Each generator's own figures.
            for i in 0..2 {
                assert!(
                    m[&format!("sync/generator{i}_s")].as_f64().unwrap() > 0.0,
                    "{m}"
                );
                assert!(m[&format!("sync/generator{i}_gb_per_s")].as_f64().unwrap() > 0.0);
            }
            assert_eq!(m["generator/processes"], 2.0);
        }
        // After every sync the generators' log-probs on the probe equal the trainer's (f32).
        for m in train_lines(&a).into_iter().chain(train_lines(&b)) {
            let d = m["sync/probe_logprob_max_diff"].as_f64().unwrap();
            assert!(
                d <= 1e-5,
                "{backend}: probe differs by {d} at step {}",
                m["step"]
            );
        }
    }
}

/// Pids of the processes whose parent is `parent` and whose command line contains `what`.
fn children_running(parent: u32, what: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // Fields after the ")" closing the command name: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if ppid == Some(parent) && cmd.contains(what) {
            out.push(pid);
        }
    }
    out
}

fn quickstart_process(overrides: &[String]) -> Child {
    let mut args = vec!["recipes/quickstart.toml".to_string()];
    args.extend(set_args(overrides));
    spawn_rlrun(&args)
}

/// Waits until `ready` holds for the run directories under `base` (the run's
/// `logging.run_dir`), then SIGKILLs the run's child process whose command line contains
/// `what`; returns its pid.
fn kill_child_when(
    run: &mut Child,
    base: &Path,
    what: &str,
    ready: impl Fn(&[std::path::PathBuf]) -> bool,
) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        assert!(Instant::now() < deadline, "not ready in time");
        assert!(
            run.try_wait().unwrap().is_none(),
            "the run ended before `{what}` was killed"
        );
        let dirs: Vec<_> = std::fs::read_dir(base)
            .map(|r| r.flatten().map(|d| d.path()).collect())
            .unwrap_or_default();
        let found = children_running(run.id(), what);
        if ready(&dirs) && !found.is_empty() {
            let ok = Command::new("kill")
                .args(["-9", &found[0].to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
            return found[0];
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Overrides for the recovery tests: long enough steps to kill something in the middle of one,
/// a reward the tiny model sometimes earns and a large learning rate, so the weights move.
fn recovery_overrides(base: &Path, steps: u64) -> Vec<String> {
    let mut o = overrides(base, steps);
    o.extend([
        "rollout.max_tokens=48".to_string(),
        "data.prompts_per_step=8".into(),
        "sync.probe=false".into(),
    ]);
    o.extend(learning());
    o
}

/// A generator process of the tiny model on the CPU (f32, one thread), spawned from this test's
/// `rlrun` binary.
fn tiny_generator() -> rlrun::actors::ActorConfig {
    std::env::set_var("RLRUN_EXE", env!("CARGO_BIN_EXE_rlrun"));
    rlrun::actors::ActorConfig::cpu_generator(&rlrun_testkit::fixtures().join("tiny-llama3"))
}

/// A reward the tiny random model earns sometimes and a large step, so that the policy moves.
fn learning() -> [String; 3] {
    [
        "reward.mode=\"matches\"".into(),
        "reward.pattern='e'".into(),
        "trainer.lr=1e-3".into(),
    ]
}

/// The metrics two runs of one recipe must agree on exactly: all but time, placement, the
/// generator's own rounding (its log-probs depend on how requests were batched) and restarts.
fn computed(m: &Value) -> Vec<(String, Value)> {
    m.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| {
            !placement_or_timing(k)
                && !k.starts_with("actor/logprob_mismatch")
                && *k != "actor/behavior_kl"
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The policy of the run's last checkpoint, by tensor name.
fn final_policy(run: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    let last = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .max()
        .expect("a checkpoint");
    rlrun_testkit::read_safetensors(&last.join("trainer").join("policy.safetensors"))
}

/// `run` (interrupted and recovered) ends where `reference` (uninterrupted) does: the same
/// computed metrics at every step and bitwise the same final weights.
fn assert_same_run(run: &Path, reference: &Path, steps: u64) {
    let (a, b) = (metrics(run), metrics(reference));
    let (ta, tb) = (train_lines(&a), train_lines(&b));
    let step_of =
        |l: &[&Value]| -> Vec<u64> { l.iter().map(|x| x["step"].as_u64().unwrap()).collect() };
    assert_eq!(
        step_of(&ta),
        (1..=steps).collect::<Vec<_>>(),
        "each step logged once"
    );
    assert_eq!(step_of(&tb), (1..=steps).collect::<Vec<_>>());
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!(computed(x), computed(y), "step {}", x["step"]);
    }
    let (wa, wb) = (final_policy(run), final_policy(reference));
    assert_eq!(wa.len(), wb.len());
    let w0 = rlrun_testkit::read_safetensors(
        &rlrun_testkit::fixtures().join("tiny-llama3/model.safetensors"),
    );
    let mut moved = false;
    for (name, t) in &wa {
        assert!(
            t.equal(&wb[name]),
            "{name}: final weights differ from the uninterrupted run"
        );
        moved |= w0.get(name).is_some_and(|w| !w.equal(t));
    }
    assert!(moved, "the runs must have trained");
}

/// With each weight sync: through shared memory, and broadcast in a group (the restarted
/// generator is not in the group: that sync falls back to the network, the next builds a new one).
#[test]
fn a_generator_killed_mid_run_is_restarted_and_the_run_ends_as_if_it_had_not_died() {
    for backend in ["shm", "nccl"] {
        a_generator_killed_mid_run(backend);
    }
}

fn a_generator_killed_mid_run(backend: &str) {
    let steps = 12;
    let with = |base: &Path| {
        let mut o = recovery_overrides(base, steps);
        o.push("placement.generator_processes=2".into());
        o.push(format!("sync.backend=\"{backend}\""));
        // Generators in other processes turn the off-policy weights on by default, and those
        // carry the generators' rounding, which depends on how re-queued requests were
        // batched: compare the draws and the updates themselves, uncorrected.
        o.push("algorithm.loss.off_policy.correction=\"off\"".into());
        o
    };
    let reference = rlrun_testkit::tempdir();
    run_quickstart(&with(reference.path()));
    let base = rlrun_testkit::tempdir();
    let mut child = quickstart_process(&with(base.path()));
    // Once the first step is logged (the second is generating), SIGKILL one generator.
    let killed = kill_child_when(&mut child, base.path(), "actor generator", |dirs| {
        dirs.iter()
            .map(|d| d.join("metrics.jsonl"))
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .any(|t| t.contains("\"kind\":\"train\""))
    });
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the run failed after killing generator {killed}:\n{stderr}"
    );
    assert!(stderr.contains("died; restarting it"), "{stderr}");
    let run = run_dir(base.path());
    let m = metrics(&run);
    assert!(
        train_lines(&m).last().unwrap()["generator/restarts"]
            .as_f64()
            .unwrap()
            >= 1.0
    );
    if backend == "nccl" {
        // One sync fell back to the network; the syncs after it broadcast in a new group.
        assert!(stderr.contains("pull it over the network"), "{stderr}");
        let by: Vec<(f64, f64)> = train_lines(&m)
            .iter()
            .map(|l| {
                let f = |k: &str| l[k].as_f64().unwrap_or(0.0);
                (f("sync/backend_nccl"), f("sync/backend_net"))
            })
            .collect();
        let fell = by.iter().position(|&(_, n)| n == 1.0).expect("a fallback");
        assert!(by[fell + 1..].iter().all(|&(g, _)| g == 1.0), "{by:?}");
        assert!(fell + 1 < by.len(), "a sync after the fallback: {by:?}");
    }
    // The re-queued requests gave the same draws: the same run, bitwise.
    assert_same_run(&run, &run_dir(reference.path()), steps);
}

#[test]
fn a_generator_killed_with_calls_in_flight_returns_the_draws_of_one_that_was_not() {
    use rlrun::actors::GeneratorPool;
    use rlrun_generator::{DrawKey, GeneratorActor, Request, SamplingParams};
    let cfg = tiny_generator();
    let request = |call: u64, j: u64, max_tokens: usize| Request {
        id: call * 100 + j,
        prompt: vec![1, 2 + call as i64, 3 + j as i64],
        params: SamplingParams {
            n: 2,
            max_tokens,
            stop_token_ids: Some(Vec::new()), // no early end: every sequence runs max_tokens
            seed: Some(11),
            ..SamplingParams::default()
        },
        key: Some(DrawKey::train(1, 0, call * 100 + j)),
    };
    // Two long calls, then a one-token call: its answer proves the generator is decoding.
    let long = |call: u64| (0..3).map(|j| request(call, j, 400)).collect::<Vec<_>>();
    let short = vec![request(9, 0, 1)];
    type Draws = Vec<(u64, usize, Vec<i64>)>;
    let collect = |rx: rlrun_generator::CompletionStream| -> Draws {
        let mut v: Draws = rx
            .iter()
            .map(|c| {
                let c = c.expect("a completion");
                (c.request_id, c.index, c.token_ids)
            })
            .collect();
        v.sort();
        v
    };
    let reference = {
        let pool = GeneratorPool::spawn(cfg.clone(), vec![Vec::new()]).unwrap();
        let (a, b) = (
            pool.generate(long(1)).unwrap(),
            pool.generate(long(2)).unwrap(),
        );
        (collect(a), collect(b))
    };
    let pool = GeneratorPool::spawn(cfg, vec![Vec::new()]).unwrap();
    let (a, b) = (
        pool.generate(long(1)).unwrap(),
        pool.generate(long(2)).unwrap(),
    );
    let s = pool.generate(short).unwrap();
    let first = s
        .recv_timeout(Duration::from_secs(600))
        .expect("the short call answers");
    assert!(first.is_ok());
    // The short call is done, the long ones have started and none of their sequences ended.
    assert!(
        a.try_recv().is_err() && b.try_recv().is_err(),
        "the long calls ended too soon"
    );
    let pid = pool.pids()[0];
    let status = Command::new("kill").args(["-9", &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -9 {pid}");
    let (ga, gb) = (collect(a), collect(b));
    assert_eq!(pool.restarts(), 1);
    assert_eq!(ga.len(), 6);
    assert_eq!(
        ga, reference.0,
        "first call: draws differ after the restart"
    );
    assert_eq!(
        gb, reference.1,
        "second call: draws differ after the restart"
    );
}

#[test]
fn a_dead_trainer_process_ends_the_run_clearly_and_resume_ends_as_an_uninterrupted_run() {
    let steps = 8;
    let with = |base: &Path| {
        let mut o = recovery_overrides(base, steps);
        o.push("placement.trainer_process=true".into());
        o.push("checkpoint.every=2".into());
        o
    };
    let reference = rlrun_testkit::tempdir();
    run_quickstart(&with(reference.path()));
    let base = rlrun_testkit::tempdir();
    let mut child = quickstart_process(&with(base.path()));
    kill_child_when(&mut child, base.path(), "actor trainer", |dirs| {
        dirs.iter()
            .any(|d| d.join("checkpoints").join("step-00000002").exists())
    });
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the run must fail when its trainer dies"
    );
    assert!(
        stderr.contains("the trainer process") && stderr.contains("rlrun resume"),
        "{stderr}"
    );
    let run = run_dir(base.path());
    run_ok(vec!["resume".into(), run.display().to_string()]);
    // The prompt stream continued from the checkpoint: 8 prompts a step, 8 steps.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoints/step-00000008/controller_state.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["cursor"]["position"], 64, "{state}");
    assert_same_run(&run, &run_dir(reference.path()), steps);
}

#[test]
fn rlrun_killed_with_sigkill_resumes_from_its_last_timed_checkpoint_to_the_same_end() {
    let steps = 30;
    // No step cadence: only the time cadence (here a few milliseconds) writes checkpoints.
    let with = |base: &Path| {
        let mut o = recovery_overrides(base, steps);
        o.push("checkpoint.every_minutes=0.0001".into());
        o
    };
    let reference = rlrun_testkit::tempdir();
    run_quickstart(&with(reference.path()));
    let base = rlrun_testkit::tempdir();
    let mut child = quickstart_process(&with(base.path()));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        assert!(Instant::now() < deadline, "no checkpoint in time");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the kill"
        );
        let ready = std::fs::read_dir(base.path())
            .map(|r| {
                r.flatten()
                    .any(|d| d.path().join("checkpoints/step-00000003").exists())
            })
            .unwrap_or(false);
        if ready {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no Ctrl-C checkpoint, no cleanup
    child.wait().unwrap();
    let run = run_dir(base.path());
    let logged = train_lines(&metrics(&run)).len() as u64;
    assert!(
        logged < steps,
        "killed before the end ({logged} steps logged)"
    );
    run_ok(vec!["resume".into(), run.display().to_string()]);
    assert_same_run(&run, &run_dir(reference.path()), steps);
}

#[test]
fn the_default_checkpoint_cadence_is_time_based() {
    let c = rlrun::recipe::CheckpointSection::default();
    assert_eq!(c.every_minutes, 15.0);
}

#[test]
fn asynchronous_rollouts_stay_within_max_staleness_and_overlap_training() {
    for (k, processes) in [(1u64, 0usize), (2, 2)] {
        let base = rlrun_testkit::tempdir();
        let mut o = overrides(base.path(), 5);
        o.push(format!("rollout.max_staleness={k}"));
        o.push(format!("placement.generator_processes={processes}"));
        // A reward the tiny random model earns sometimes and a large step, so that the policy
        // moves and stale rollouts really come from another policy.
        o.extend(learning());
        let stderr = run_quickstart(&o);
        // Stale rollouts: the decoupled objective with truncated importance weights is on by
        // default, and says why.
        assert!(
            stderr.contains(&format!(
                "off-policy correction: truncate at token level, cap 2 (the generator's policy can differ from the trainer's: rollout.max_staleness = {k}"
            )),
            "{stderr}"
        );
        assert!(!stderr.contains("warning:"), "{stderr}");
        let m = metrics(&run_dir(base.path()));
        let train = train_lines(&m);
        assert_eq!(train.len(), 5);
        for (i, s) in train.iter().enumerate() {
            let ratio = s["actor/is_ratio"].as_f64().unwrap();
            let capped = s["actor/is_capped_frac"].as_f64().unwrap();
            let weight = s["actor/is_weight_mean"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&capped), "{s}");
            assert!(weight <= ratio + 1e-12 && weight <= 2.0, "{s}");
            if i > 0 {
                // Rollouts of an older policy: weights differ from 1 and the behaviour policy
                // is measurably away from the trainer's.
                let max = s["actor/is_ratio_max"].as_f64().unwrap();
                assert!((ratio - 1.0).abs() > 1e-4 || max > 1.0 + 1e-3, "{s}");
                assert!(s["actor/behavior_kl"].as_f64().unwrap() > 1e-7, "{s}");
            }
            let step = s["step"].as_u64().unwrap();
            let staleness = s["policy/staleness_max"].as_f64().unwrap() as u64;
            let oldest = s["policy/rollout_version_min"].as_f64().unwrap() as u64;
            // Step t trains from version t-1; its rollouts are at most k versions older.
            assert!(
                oldest + 1 + k >= step,
                "step {step}: rollout version {oldest} (k = {k})"
            );
            assert!(staleness <= k, "step {step}: staleness {staleness} > {k}");
            if i > 0 {
                // Prefetched while the previous step trained: generated by a version older than
                // the one this step trains from (a behaviour, not a timing).
                assert!(staleness >= 1, "step {step}: nothing was prefetched ({s})");
            }
            if k == 1 {
                // One step ahead, all admitted at once: exactly one version behind.
                assert_eq!(staleness, (step - 1).min(1), "step {step}");
            }
            assert_eq!(s["async/dropped_stale"], 0.0);
            assert!(s["sync/probe_logprob_max_diff"].as_f64().unwrap() <= 1e-5);
        }
    }
}

#[test]
fn turning_the_off_policy_correction_off_for_stale_rollouts_warns() {
    let base = rlrun_testkit::tempdir();
    let mut o = overrides(base.path(), 3);
    o.push("rollout.max_staleness=2".into());
    o.push("algorithm.loss.off_policy.correction=\"off\"".into());
    let stderr = run_quickstart(&o);
    assert!(
        stderr.contains("warning: [algorithm.loss.off_policy] correction = \"off\" although the generator's policy can differ from the trainer's")
            && stderr.contains("(rollout.max_staleness = 2)"),
        "{stderr}"
    );
    let m = metrics(&run_dir(base.path()));
    for s in train_lines(&m) {
        // No weights applied; the mismatch is still measured.
        assert!(s.get("actor/is_ratio").is_none(), "{s}");
        assert!(s["actor/behavior_kl"].as_f64().is_some(), "{s}");
    }
    // On-policy in one process with f32: no correction and no warning.
    let base = rlrun_testkit::tempdir();
    let stderr = run_quickstart(&overrides(base.path(), 1));
    assert!(
        !stderr.contains("off-policy correction") && !stderr.contains("warning:"),
        "{stderr}"
    );
    let m = metrics(&run_dir(base.path()));
    assert!(train_lines(&m)[0].get("actor/is_ratio").is_none());
}

#[test]
fn async_resume_draws_the_prefetched_prompts_again() {
    // A checkpoint taken while the next step's prompts were already drawn records the position
    // before them: the resumed run consumes exactly the prompts an uninterrupted run would.
    let base = rlrun_testkit::tempdir();
    let mut o = overrides(base.path(), 4);
    o.push("rollout.max_staleness=1".into());
    o.push("checkpoint.every=2".into());
    run_quickstart(&o);
    let run = run_dir(base.path());
    let state = |step: u64| -> Value {
        let p = run
            .join("checkpoints")
            .join(format!("step-{step:08}"))
            .join("controller_state.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    // 4 prompts a step: after 2 steps the cursor is at 8 (not 12, though step 3 was drawn).
    assert_eq!(state(2)["cursor"]["position"], 8, "{}", state(2));
    assert_eq!(state(4)["cursor"]["position"], 16, "{}", state(4));
}

/// A served actor: the process and its address.
struct Served {
    child: Child,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_generator(dir: &Path, listen: &str, token: Option<&str>) -> Result<Served, String> {
    let cfg = dir.join("actor.json");
    let model = rlrun_testkit::fixtures().join("tiny-llama3");
    std::fs::write(
        &cfg,
        serde_json::json!({"model": model, "dtype": "f32", "device": "cpu", "threads": 1})
            .to_string(),
    )
    .unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["actor", "generator", "--listen", listen, "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = token {
        let f = dir.join("token");
        std::fs::write(&f, t).unwrap();
        cmd.arg("--token-file").arg(f);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    match lines.next() {
        Some(Ok(l)) if l.starts_with("LISTENING ") => Ok(Served {
            addr: l["LISTENING ".len()..].trim().to_string(),
            child,
        }),
        _ => {
            let out = child.wait_with_output().unwrap();
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

#[test]
fn non_loopback_listeners_need_a_token_and_calls_without_it_are_rejected() {
    use rlrun::actors::RemoteGenerator;
    use rlrun_generator::GeneratorActor;
    let dir = rlrun_testkit::tempdir();
    let err = serve_generator(dir.path(), "0.0.0.0:0", None)
        .err()
        .expect("must refuse");
    assert!(err.contains("without a token"), "{err}");

    let served = serve_generator(dir.path(), "0.0.0.0:0", Some("s3cret-token")).unwrap();
    let port = served.addr.rsplit(':').next().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let t = Duration::from_secs(10);
    let anonymous = RemoteGenerator::connect(&addr, None, t).unwrap();
    let e = anonymous
        .health()
        .expect_err("a call without the token must fail");
    assert!(e.to_string().contains("token"), "{e}");
    let wrong = RemoteGenerator::connect(&addr, Some("s3cret-tokem"), t).unwrap();
    assert!(wrong.health().is_err());
    let right = RemoteGenerator::connect(&addr, Some("s3cret-token"), t).unwrap();
    right.health().unwrap();
    right.shutdown().unwrap();
    let mut served = served;
    let status = served.child.wait().unwrap();
    assert!(status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(served.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("rejected a call"),
        "rejections are logged: {stderr}"
    );
}

#[test]
fn malformed_messages_get_an_error_status_and_the_actor_keeps_serving() {
    use rlrun::actors::RemoteGenerator;
    use rlrun_generator::{GeneratorActor, WeightUpdate};
    let dir = rlrun_testkit::tempdir();
    let served = serve_generator(dir.path(), "127.0.0.1:0", None).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for path in [
        "/rlrun.v1.Generator/Generate",
        "/rlrun.v1.Generator/UpdateWeights",
    ] {
        let status = rt.block_on(raw_call(&served.addr, path, vec![0xff; 13]));
        assert_ne!(status.code(), tonic::Code::Ok, "{path}");
        assert_ne!(
            status.code(),
            tonic::Code::Unavailable,
            "{path}: {status:?}"
        );
    }
    let client = RemoteGenerator::connect(&served.addr, None, Duration::from_secs(10)).unwrap();
    // Well-formed but invalid: weights in a file that does not exist.
    let bad = rlrun_weights_sync::shm::WeightsRef {
        version: 1,
        path: dir.path().join("missing"),
        numel: 10,
        kind: tch::Kind::Float,
        checksums: Vec::new(),
        adapters: false,
        source: None,
        group: None,
    };
    let e = client
        .update_weights(1, WeightUpdate::Shared(bad))
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    client.health().unwrap();
}

/// Sends `body` as one gRPC message to `path`; the call's status.
async fn raw_call(addr: &str, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let r = grpc
        .unary::<Vec<u8>, Vec<u8>, _>(
            tonic::Request::new(body),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await;
    match r {
        Ok(_) => tonic::Status::ok(""),
        Err(s) => s,
    }
}

/// Bytes in, bytes out: lets a test send what no generated client would.
#[derive(Default, Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        let mut v = vec![0; n];
        bytes::Buf::copy_to_slice(src, &mut v);
        Ok(Some(v))
    }
}

#[test]
fn a_recipe_uses_a_generator_started_by_hand_with_its_token() {
    let dir = rlrun_testkit::tempdir();
    let served = serve_generator(dir.path(), "127.0.0.1:0", Some("hand-token")).unwrap();
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let right = dir.path().join("token");
    // Weights through shared memory, pulled from this process's weight store, which then wants
    // the token too, or broadcast in a group whose rank 0 (this process) checks it.
    for (token_file, ok, backend) in [
        (right.clone(), true, "shm"),
        (right.clone(), true, "net"),
        (right, true, "nccl"),
        (wrong, false, "shm"),
    ] {
        let base = rlrun_testkit::tempdir();
        let mut o = overrides(base.path(), 2);
        o.push(format!("sync.backend=\"{backend}\""));
        o.push(format!(
            "placement.generator_addresses=[\"{}\"]",
            served.addr
        ));
        o.push(format!("placement.token_file=\"{}\"", token_file.display()));
        let mut args = vec!["recipes/quickstart.toml".to_string()];
        args.extend(set_args(&o));
        let out = rlrun(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if ok {
            assert!(out.status.success(), "{stderr}");
            let m = metrics(&run_dir(base.path()));
            for l in train_lines(&m) {
                assert_eq!(l[&format!("sync/backend_{backend}")], 1.0);
                assert!(l["sync/probe_logprob_max_diff"].as_f64().unwrap() <= 1e-5);
            }
        } else {
            assert!(!out.status.success());
            assert!(stderr.contains("token"), "{stderr}");
        }
    }
}

/// Two calls in flight on one generator that dies: both see it fail, one restarts it, the other
/// re-queues on the replacement (it used to find the new process healthy and report its failure
/// as the request's own).
#[test]
fn calls_that_see_the_same_generator_die_share_one_restart() {
    use rlrun::actors::GeneratorPool;
    use rlrun_generator::{GeneratorActor, Request, SamplingParams};
    let cfg = tiny_generator();
    let pool = GeneratorPool::spawn(cfg, vec![Vec::new()]).expect("spawning a generator");
    let pid = pool.pids()[0];
    let status = Command::new("kill").args(["-9", &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -9 {pid}");
    let call = |base: u64| {
        let reqs: Vec<Request> = (0..3)
            .map(|j| Request {
                id: base + j,
                prompt: vec![1, 2, 3 + j as i64],
                params: SamplingParams {
                    n: 2,
                    max_tokens: 6,
                    seed: Some(7),
                    ..SamplingParams::default()
                },
                key: None,
            })
            .collect();
        pool.generate(reqs).expect("generate")
    };
    let (a, b) = (call(0), call(100));
    for (name, rx) in [("first", a), ("second", b)] {
        let got: Vec<_> = rx.iter().collect();
        let errors: Vec<String> = got
            .iter()
            .filter_map(|c| c.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert!(errors.is_empty(), "{name} call failed: {errors:?}");
        assert_eq!(got.len(), 6, "{name} call: 3 requests x 2 samples");
    }
    assert_eq!(pool.restarts(), 1, "one restart for both callers");
    assert_ne!(pool.pids()[0], pid);
}

/// Multi-turn through a pool of two generator processes: a request continuing a finished
/// sequence goes to the member that holds its kept cache, so every next turn prefills only its
/// new tokens (without the affinity, half of them would land on the other member).
#[test]
fn a_pool_sends_each_next_turn_to_the_member_holding_its_conversation() {
    use rlrun::actors::GeneratorPool;
    use rlrun_generator::{EngineConfig, GeneratorActor, Request, SamplingParams};
    let mut cfg = tiny_generator();
    cfg.engine = Some(EngineConfig {
        max_slots: 8,
        max_len: 128,
        prefix_cache_tokens: 10_000,
        ..Default::default()
    });
    let pool = GeneratorPool::spawn(cfg, vec![Vec::new(), Vec::new()]).unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        max_tokens: 5,
        stop_token_ids: Some(Vec::new()),
        seed: Some(3),
        ..SamplingParams::default()
    };
    let first: Vec<Request> = (0..4)
        .map(|i| Request {
            id: i,
            prompt: (0..8 + i as i64)
                .map(|j| 3 + (j * 17 + i as i64) % 300)
                .collect(),
            params: params.clone(),
            key: None,
        })
        .collect();
    let turn1: Vec<_> = pool
        .generate(first.clone())
        .unwrap()
        .iter()
        .map(|c| c.unwrap())
        .collect();
    assert_eq!(turn1.len(), 4);
    let mut want = 0;
    for c in &turn1 {
        let mut prompt = first[c.request_id as usize].prompt.clone();
        want += (prompt.len() + c.token_ids.len() - 1) as u64;
        prompt.extend(&c.token_ids);
        prompt.extend([5, 6, 7]);
        // One call per conversation, as the multi-turn driver makes them.
        let next = pool
            .generate(vec![Request {
                id: 10 + c.request_id,
                prompt,
                params: params.clone(),
                key: None,
            }])
            .unwrap();
        assert!(next.recv().unwrap().is_ok());
    }
    assert_eq!(pool.stats().unwrap().prefix_hit_tokens, want);
}
