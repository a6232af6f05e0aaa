//! Scoring a batch of completions in parallel, with panic and time-limit isolation.
//!
//! See [`RewardRunner`].

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reward::{Reward, RewardError, RewardFn};
use crate::sample::{OwnedCompletion, Sample};

fn default_timeout() -> f64 {
    10.0
}

/// Parameters of a [`RewardRunner`] (recipe section, e.g. `[reward_runner]`).
///
/// ```
/// # use rlrun_rollout::RewardRunnerConfig;
/// let cfg: RewardRunnerConfig = toml::from_str("num_threads = 4\ntimeout_secs = 2.5").unwrap();
/// assert_eq!(cfg.failure_score, 0.0);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardRunnerConfig {
    /// Worker threads; default: the number of CPUs (`std::thread::available_parallelism`).
    #[serde(default)]
    pub num_threads: Option<usize>,
    /// Time limit for one `score` call, in seconds (default 10).
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// The value given to a call that panicked, timed out, or returned a non-finite value
    /// (default 0).
    #[serde(default)]
    pub failure_score: f32,
}

impl Default for RewardRunnerConfig {
    fn default() -> Self {
        Self {
            num_threads: None,
            timeout_secs: default_timeout(),
            failure_score: 0.0,
        }
    }
}

/// One completion to score, with its (shared) sample.
#[derive(Clone, Debug)]
pub struct ScoreJob {
    /// The sample; shared by the completions of one prompt.
    pub sample: Arc<Sample>,
    /// The completion.
    pub completion: OwnedCompletion,
}

impl ScoreJob {
    /// A job.
    pub fn new(sample: Arc<Sample>, completion: OwnedCompletion) -> Self {
        Self { sample, completion }
    }
}

/// Why a call was given the failure score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// The reward panicked.
    Panic,
    /// The reward returned an error (a Python reward that raised, say).
    Error,
    /// The reward exceeded its time limit.
    Timeout,
    /// The reward returned NaN or an infinity.
    NonFinite,
}

/// What happened in one [`RewardRunner::score_batch`] call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RewardStats {
    /// Completions scored (including failures).
    pub count: usize,
    /// Mean reward value (failures count with the failure score).
    pub mean: f64,
    /// Calls that panicked.
    pub panics: usize,
    /// Calls that returned an error.
    pub errors: usize,
    /// Calls that exceeded the time limit.
    pub timeouts: usize,
    /// Calls that returned a non-finite value.
    pub non_finite: usize,
    /// Each failed call: (index in the batch, why).
    pub failures: Vec<(usize, Failure)>,
    /// Mean of each per-sample metric over the successful calls that reported it.
    pub metrics: BTreeMap<String, f64>,
    /// Wall-clock seconds for the batch.
    pub seconds: f64,
    /// Abandoned worker threads (from this or earlier batches) still stuck in a call.
    pub leaked_threads: usize,
}

impl RewardStats {
    /// Flattens the stats into metric names under `prefix` (e.g. `reward`): `reward/mean`,
    /// `reward/panics`, `reward/errors`, `reward/timeouts`, `reward/non_finite`, `reward/seconds`, and
    /// `reward/<metric>` for each per-sample metric mean.
    pub fn to_metrics(&self, prefix: &str) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = self
            .metrics
            .iter()
            .map(|(k, v)| (format!("{prefix}/{k}"), *v))
            .collect();
        out.insert(format!("{prefix}/mean"), self.mean);
        out.insert(format!("{prefix}/panics"), self.panics as f64);
        out.insert(format!("{prefix}/errors"), self.errors as f64);
        out.insert(format!("{prefix}/timeouts"), self.timeouts as f64);
        out.insert(format!("{prefix}/non_finite"), self.non_finite as f64);
        out.insert(format!("{prefix}/seconds"), self.seconds);
        out
    }
}

enum Outcome {
    Scored(Reward),
    Failed(RewardError),
    Panicked(String),
}

enum Event {
    Started {
        index: usize,
        worker: usize,
        at: Instant,
    },
    Finished {
        index: usize,
        outcome: Outcome,
    },
}

struct Task {
    index: usize,
    job: ScoreJob,
    reward: Arc<dyn RewardFn>,
    events: mpsc::Sender<Event>,
}

struct Worker {
    abandoned: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

struct Pool {
    workers: BTreeMap<usize, Worker>,
    /// Abandoned workers, kept to count those still running.
    abandoned: Vec<JoinHandle<()>>,
    next_id: usize,
}

/// Scores batches of completions with one [`RewardFn`] on a thread pool.
///
/// It owns a pool of worker threads (plain `std` threads) fed from one job queue.
/// Each call to [`score_batch`](Self::score_batch) sends one job per completion and waits for the
/// results on its own channel:
///
/// - a call that returns an **error** scores the failure score and is counted in `errors`;
/// - a call that **panics** is caught (`catch_unwind`) and scores the failure score (default 0);
///   the worker lives on. The panic message is logged (and printed by the process's panic hook);
/// - a call that runs **longer than the time limit** (measured from when a worker picked it up)
///   scores the failure score; the runner stops waiting for it at once, marks its worker as
///   abandoned and starts a replacement, so the pool keeps its size. The abandoned thread cannot
///   be killed (Rust has no safe way to): it is leaked until the call returns, then it exits
///   without taking more work and its late result is discarded. [`RewardStats::leaked_threads`]
///   counts threads still stuck;
/// - a **non-finite** value (NaN, ±inf) is replaced by the failure score too.
///
/// None of these stops the batch or later batches; all are counted in [`RewardStats`].
///
/// ```
/// use std::sync::Arc;
/// use rlrun_rollout::{NumberMatch, OwnedCompletion, Prompt, RewardRunner, RewardRunnerConfig, Sample, ScoreJob};
///
/// let runner = RewardRunner::new(Arc::new(NumberMatch::gsm8k()), RewardRunnerConfig::default()).unwrap();
/// let sample = Arc::new(Sample::new(0, Prompt::user("2+2?")).with_ground_truth("4"));
/// let jobs = ["#### 4", "#### 5"]
///     .iter()
///     .map(|t| ScoreJob::new(sample.clone(), OwnedCompletion::from_text(*t)))
///     .collect();
/// let (rewards, stats) = runner.score_batch(jobs);
/// assert_eq!(rewards[0].value, 1.0);
/// assert_eq!(rewards[1].value, 0.0);
/// assert_eq!(stats.mean, 0.5);
/// ```
pub struct RewardRunner {
    reward: Arc<dyn RewardFn>,
    timeout: Duration,
    failure_score: f32,
    num_threads: usize,
    queue: Mutex<Option<mpsc::Sender<Task>>>,
    receiver: Arc<Mutex<mpsc::Receiver<Task>>>,
    pool: Mutex<Pool>,
}

impl std::fmt::Debug for RewardRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewardRunner")
            .field("reward", &self.reward.name())
            .field("timeout", &self.timeout)
            .field("failure_score", &self.failure_score)
            .field("num_threads", &self.num_threads)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The runner's own critical sections never panic; recover from poisoning anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RewardRunner {
    /// Starts the worker threads.
    pub fn new(reward: Arc<dyn RewardFn>, config: RewardRunnerConfig) -> Result<Self> {
        let err = |message: String| Error::Config {
            what: "reward runner".into(),
            message,
        };
        if !(config.timeout_secs.is_finite() && config.timeout_secs > 0.0) {
            return Err(err(format!(
                "timeout_secs must be finite and > 0, got {}",
                config.timeout_secs
            )));
        }
        if !config.failure_score.is_finite() {
            return Err(err("failure_score must be finite".into()));
        }
        let num_threads = match config.num_threads {
            Some(0) => return Err(err("num_threads must be >= 1".into())),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let (tx, rx) = mpsc::channel();
        let runner = Self {
            reward,
            timeout: Duration::from_secs_f64(config.timeout_secs),
            failure_score: config.failure_score,
            num_threads,
            queue: Mutex::new(Some(tx)),
            receiver: Arc::new(Mutex::new(rx)),
            pool: Mutex::new(Pool {
                workers: BTreeMap::new(),
                abandoned: Vec::new(),
                next_id: 0,
            }),
        };
        {
            let mut pool = lock(&runner.pool);
            for _ in 0..num_threads {
                runner.spawn_worker(&mut pool).map_err(|e| Error::Config {
                    what: "reward runner".into(),
                    message: format!("cannot start a worker thread: {e}"),
                })?;
            }
        }
        Ok(runner)
    }

    /// The reward this runner scores with.
    pub fn reward(&self) -> &Arc<dyn RewardFn> {
        &self.reward
    }

    fn spawn_worker(&self, pool: &mut Pool) -> std::io::Result<()> {
        let id = pool.next_id;
        pool.next_id += 1;
        let abandoned = Arc::new(AtomicBool::new(false));
        let flag = abandoned.clone();
        let receiver = self.receiver.clone();
        let handle = std::thread::Builder::new()
            .name(format!("rlrun-reward-{id}"))
            .spawn(move || worker_loop(id, &receiver, &flag))?;
        pool.workers.insert(id, Worker { abandoned, handle });
        Ok(())
    }

    /// Tops the pool up to `num_threads` workers (after spawn failures).
    fn ensure_workers(&self, pool: &mut Pool) {
        pool.workers.retain(|_, w| !w.handle.is_finished());
        while pool.workers.len() < self.num_threads {
            if let Err(e) = self.spawn_worker(pool) {
                tracing::error!(error = %e, "reward runner cannot start a worker thread");
                break;
            }
        }
    }

    fn abandon(&self, worker: usize) {
        let mut pool = lock(&self.pool);
        if let Some(w) = pool.workers.remove(&worker) {
            w.abandoned.store(true, Ordering::SeqCst);
            pool.abandoned.push(w.handle);
        }
        pool.abandoned.retain(|h| !h.is_finished());
        self.ensure_workers(&mut pool);
    }

    /// Scores every job; returns the rewards in job order and the batch statistics. Never fails:
    /// failed calls get the failure score and are counted.
    pub fn score_batch(&self, jobs: Vec<ScoreJob>) -> (Vec<Reward>, RewardStats) {
        let started = Instant::now();
        let n = jobs.len();
        let (events_tx, events_rx) = mpsc::channel();
        {
            let mut pool = lock(&self.pool);
            self.ensure_workers(&mut pool);
        }
        let mut results: Vec<Option<Reward>> = vec![None; n];
        let mut stats = RewardStats {
            count: n,
            ..RewardStats::default()
        };
        {
            let queue = lock(&self.queue);
            for (index, job) in jobs.into_iter().enumerate() {
                let task = Task {
                    index,
                    job,
                    reward: self.reward.clone(),
                    events: events_tx.clone(),
                };
                let sent = queue.as_ref().is_some_and(|q| q.send(task).is_ok());
                if !sent {
                    // Only possible while the runner is being dropped.
                    results[index] = Some(Reward::new(self.failure_score));
                    stats.failures.push((index, Failure::Panic));
                    stats.panics += 1;
                }
            }
        }
        drop(events_tx);

        let mut running: BTreeMap<usize, (usize, Instant)> = BTreeMap::new();
        let mut remaining = results.iter().filter(|r| r.is_none()).count();
        while remaining > 0 {
            let now = Instant::now();
            let wait = running
                .values()
                .map(|&(_, at)| (at + self.timeout).saturating_duration_since(now))
                .min()
                .unwrap_or(self.timeout)
                .max(Duration::from_millis(1));
            match events_rx.recv_timeout(wait) {
                Ok(Event::Started { index, worker, at }) => {
                    if results[index].is_none() {
                        running.insert(index, (worker, at));
                    }
                }
                Ok(Event::Finished { index, outcome }) => {
                    running.remove(&index);
                    if results[index].is_some() {
                        continue;
                    }
                    remaining -= 1;
                    results[index] = Some(match outcome {
                        Outcome::Scored(r) if r.value.is_finite() => r,
                        Outcome::Scored(r) => {
                            tracing::warn!(
                                reward = self.reward.name(),
                                index,
                                value = r.value,
                                "reward returned a non-finite value; using the failure score"
                            );
                            stats.non_finite += 1;
                            stats.failures.push((index, Failure::NonFinite));
                            Reward::new(self.failure_score)
                        }
                        Outcome::Failed(e) => {
                            tracing::warn!(reward = self.reward.name(), index, error = %e,
                                "reward failed; using the failure score");
                            stats.errors += 1;
                            stats.failures.push((index, Failure::Error));
                            Reward::new(self.failure_score)
                        }
                        Outcome::Panicked(message) => {
                            tracing::warn!(reward = self.reward.name(), index, %message,
                                "reward panicked; using the failure score");
                            stats.panics += 1;
                            stats.failures.push((index, Failure::Panic));
                            Reward::new(self.failure_score)
                        }
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Every task was dropped without reporting: cannot happen while workers
                    // catch panics, but never wait forever.
                    for (index, r) in results.iter_mut().enumerate() {
                        if r.is_none() {
                            *r = Some(Reward::new(self.failure_score));
                            stats.panics += 1;
                            stats.failures.push((index, Failure::Panic));
                        }
                    }
                    remaining = 0;
                }
            }
            let now = Instant::now();
            let expired: Vec<(usize, usize)> = running
                .iter()
                .filter(|(_, &(_, at))| now.duration_since(at) >= self.timeout)
                .map(|(&index, &(worker, _))| (index, worker))
                .collect();
            for (index, worker) in expired {
                running.remove(&index);
                if results[index].is_some() {
                    continue;
                }
                tracing::warn!(reward = self.reward.name(), index, timeout_secs = self.timeout.as_secs_f64(),
                    "reward exceeded its time limit; using the failure score and replacing its thread");
                results[index] = Some(Reward::new(self.failure_score));
                stats.timeouts += 1;
                stats.failures.push((index, Failure::Timeout));
                remaining -= 1;
                self.abandon(worker);
            }
        }

        let rewards: Vec<Reward> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Reward::new(self.failure_score)))
            .collect();
        stats.failures.sort_unstable_by_key(|&(i, _)| i);
        let failed: std::collections::BTreeSet<usize> =
            stats.failures.iter().map(|&(i, _)| i).collect();
        let mut sums: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
        for (i, r) in rewards.iter().enumerate() {
            if failed.contains(&i) {
                continue;
            }
            for (k, v) in &r.metrics {
                let e = sums.entry(k.as_str()).or_insert((0.0, 0));
                e.0 += f64::from(*v);
                e.1 += 1;
            }
        }
        stats.metrics = sums
            .into_iter()
            .map(|(k, (s, c))| (k.to_string(), s / c as f64))
            .collect();
        stats.mean = if n == 0 {
            0.0
        } else {
            rewards.iter().map(|r| f64::from(r.value)).sum::<f64>() / n as f64
        };
        stats.seconds = started.elapsed().as_secs_f64();
        stats.leaked_threads = {
            let mut pool = lock(&self.pool);
            pool.abandoned.retain(|h| !h.is_finished());
            pool.abandoned.len()
        };
        (rewards, stats)
    }

    /// Live worker threads, excluding abandoned ones (for tests and diagnostics).
    pub fn num_workers(&self) -> usize {
        let mut pool = lock(&self.pool);
        pool.workers.retain(|_, w| !w.handle.is_finished());
        pool.workers.len()
    }
}

fn worker_loop(id: usize, receiver: &Mutex<mpsc::Receiver<Task>>, abandoned: &AtomicBool) {
    loop {
        let task = {
            let rx = lock(receiver);
            rx.recv()
        };
        let Ok(task) = task else {
            break; // The runner was dropped.
        };
        // The batch may already be gone (receiver dropped); ignore send errors.
        let _ = task.events.send(Event::Started {
            index: task.index,
            worker: id,
            at: Instant::now(),
        });
        let outcome = match catch_unwind(AssertUnwindSafe(|| {
            task.reward
                .score(&task.job.sample, &task.job.completion.as_completion())
        })) {
            Ok(Ok(r)) => Outcome::Scored(r),
            Ok(Err(e)) => Outcome::Failed(e),
            Err(payload) => Outcome::Panicked(
                payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into()),
            ),
        };
        let _ = task.events.send(Event::Finished {
            index: task.index,
            outcome,
        });
        if abandoned.load(Ordering::SeqCst) {
            break; // Replaced after a timeout: do not take more work.
        }
    }
}

impl Drop for RewardRunner {
    fn drop(&mut self) {
        // Closing the queue ends idle workers; join them (abandoned ones are left to finish).
        lock(&self.queue).take();
        let workers = std::mem::take(&mut lock(&self.pool).workers);
        for (_, w) in workers {
            let _ = w.handle.join();
        }
    }
}
