//! The controller: drives Generator and Trainer actors through the RL loop.
//!
//! One step ([`Run::step`]): generate `n` completions per prompt → score them → advantages
//! (after KL in the reward and critic values, when the recipe has them) → trainer update →
//! weight sync every `sync.every` steps. Around the steps: evaluation, checkpoints, metrics
//! (JSONL + TensorBoard) and a manifest. Each part lives in its own module:
//!
//! | module | what |
//! |---|---|
//! | [`placement`] | building the actors from `[placement]` (in process, child processes, by address) |
//! | [`rollouts`] | the prompt stream, generation requests, scoring, dynamic-sampling rounds, prefetch |
//! | [`batch`] | pure functions from scored rollouts to the trainer's batch |
//! | [`eval`] | held-out evaluation and the sync probe |
//! | [`checkpoint`] | checkpoints, resume, HF export |
//! | [`step_metrics`] | what a step logs |
//! | [`adhoc`] | calls outside the schedule (notebooks): generate, log-probs, accessors |
//!
//! The loop only talks to [`GeneratorActor`] and [`TrainerActor`] and moves weights through a
//! [`WeightSync`](crate::sync::WeightSync), so actors may live in this process or elsewhere.

mod adhoc;
mod batch;
mod checkpoint;
mod episodes;
mod eval;
mod placement;
mod rollouts;
mod step_metrics;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rlrun_model::ModelFiles;
use rlrun_rollout::{AdvantageEstimator, AdvantageInput, PromptStream, RewardRunner, Sample};
use rlrun_trainer::{TrainBatch, TrainError};

pub use checkpoint::latest_checkpoint;
pub use eval::{paired_gain, wilson, EvalResult};
pub use placement::actor_config;
pub use step_metrics::MemorySummary;

use crate::error::{Error, IoContext, Result};
use crate::metrics::MetricsSink;
use crate::recipe::Recipe;
use crate::sync::WeightSync;
use batch::StepBatch;
use placement::Actors;
use rollouts::{PromptEncoder, Rollouts};
use step_metrics::Metrics;

/// Set by the first Ctrl-C: finish the current step, checkpoint, exit.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler: first press requests a graceful stop, second exits at once.
pub fn install_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now");
            crate::actors::exit_now(130);
        }
        eprintln!("\ninterrupt: finishing the current step, then writing a checkpoint (Ctrl-C again to exit now)");
    });
}

/// A training run.
pub struct Run {
    pub recipe: Recipe,
    pub run_dir: PathBuf,
    files: ModelFiles,
    prompts: PromptEncoder,
    actors: Actors,
    sync: Box<dyn WeightSync>,
    rollouts: Rollouts,
    eval_set: Vec<Sample>,
    /// None when an environment scores episodes.
    rewards: Option<RewardRunner>,
    /// The recipe's environment (multi-turn episodes), if any.
    episodes: Option<episodes::Episodes>,
    estimator: Arc<dyn AdvantageEstimator>,
    step: u64,
    sink: MetricsSink,
    evals: Vec<EvalResult>,
    history: Vec<Metrics>,
    manifest: serde_json::Value,
    /// Completions of the last step, for inspection (Python bindings).
    pub last_rollouts: Vec<Rollout>,
    /// (prompt, completion, reward) of the last evaluation.
    last_eval: Vec<(String, String, f32)>,
}

/// A scored completion of the last step.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub prompt: String,
    pub completion: String,
    pub prompt_ids: Vec<i64>,
    pub token_ids: Vec<i64>,
    pub logprobs: Vec<f32>,
    pub reward: f32,
    pub advantages: Vec<f32>,
    pub policy_version: u64,
}

/// What [`Run::train`] did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub before: Option<EvalResult>,
    pub after: Option<EvalResult>,
    pub steps: u64,
    pub interrupted: bool,
    pub checkpoint: PathBuf,
    pub seconds: f64,
    /// The largest of each memory metric over the steps run.
    pub memory: MemorySummary,
}

/// A rollout context borrowing the run's parts (a macro so that the borrows stay disjoint from
/// `self.rollouts`).
macro_rules! context {
    ($run:expr) => {
        rollouts::Context {
            generator: $run.actors.generator.as_ref(),
            enc: &$run.prompts,
            rewards: $run.rewards.as_ref(),
            episodes: $run.episodes.as_ref(),
            config: &$run.recipe.config,
        }
    };
}

impl Run {
    /// Sets up a new run (run directory, actors, data) from a validated recipe.
    pub fn create(recipe: Recipe) -> Result<Run> {
        let base = PathBuf::from(&recipe.config.logging.run_dir);
        let name = &recipe.config.name;
        let mut run_dir = base.join(format!("{name}-{}", crate::util::timestamp()));
        let mut k = 1;
        while run_dir.exists() {
            run_dir = base.join(format!("{name}-{}-{k}", crate::util::timestamp()));
            k += 1;
        }
        std::fs::create_dir_all(&run_dir).at(&run_dir)?;
        let path = run_dir.join("recipe.toml");
        std::fs::write(&path, &recipe.resolved).at(&path)?;
        Self::build(recipe, run_dir, None)
    }

    /// Continues a run from its latest checkpoint.
    pub fn resume(run_dir: &Path) -> Result<Run> {
        Self::resume_with(run_dir, &[])
    }

    /// Continues a run with its placement or memory use changed by `overrides` (`placement.*`,
    /// `cluster.*`, `sync.backend`, `sync.listen`, `rollout.max_slots`,
    /// `trainer.micro_batch_tokens`, `trainer.activation_checkpointing`, `trainer.logprob_chunk`
    /// only: where the actors run, how weights travel and how the work is split, not what it
    /// computes), e.g. a run checkpointed by a data-parallel trainer resumed at another world
    /// size, on a Ray cluster's new actors, or after running out of memory.
    pub fn resume_with(run_dir: &Path, overrides: &[String]) -> Result<Run> {
        const KEYS: [&str; 6] = [
            "sync.backend=",
            "sync.listen=",
            "rollout.max_slots=",
            "trainer.micro_batch_tokens=",
            "trainer.activation_checkpointing=",
            "trainer.logprob_chunk=",
        ];
        let movable = |o: &str| {
            o.starts_with("placement.")
                || o.starts_with("cluster.")
                || KEYS.iter().any(|k| o.starts_with(k))
        };
        if let Some(o) = overrides.iter().find(|o| !movable(o)) {
            return Err(Error::Usage(format!(
                "resume --set {o}: only placement.*, cluster.*, sync.backend, sync.listen, rollout.max_slots, trainer.micro_batch_tokens, trainer.activation_checkpointing and trainer.logprob_chunk can change when resuming (what the run computes cannot)"
            )));
        }
        let recipe = Recipe::load(&run_dir.join("recipe.toml"), overrides)?;
        let ckpt = latest_checkpoint(run_dir)?.ok_or_else(|| {
            Error::Usage(format!(
                "no checkpoint in {}",
                run_dir.join("checkpoints").display()
            ))
        })?;
        Self::build(recipe, run_dir.to_path_buf(), Some(ckpt))
    }

    fn build(recipe: Recipe, run_dir: PathBuf, resume_from: Option<PathBuf>) -> Result<Run> {
        let c = &recipe.config;
        let files = ModelFiles::open(&recipe.model_path)?;
        let tokenizer = Arc::new(files.tokenizer.clone());
        let prompts = PromptEncoder::new(tokenizer.clone(), files.chat_template()?, c);
        let episodes = episodes::Episodes::new(
            c,
            recipe.built.environment.clone(),
            &files,
            tokenizer.clone(),
        )?;
        let actors = placement::place(&recipe, &files, tokenizer)?;
        let sync = crate::sync::build(
            actors.sync,
            &crate::sync::SyncOptions {
                checksums: c.sync.checksum,
                adapters: c.model.lora.is_some(),
                serve_store: (!c.placement.trainer_elsewhere()).then(|| c.sync.listen.clone()),
                token: actors.token.clone(),
                generators: actors.pool.as_ref().map_or(0, |p| p.len()),
                group_host: c
                    .sync
                    .listen
                    .rsplit_once(':')
                    .map_or("127.0.0.1", |(h, _)| h)
                    .to_string(),
            },
        )?;
        // The recipe's datasets, rewards and estimator were built (and checked) by validation.
        let built = recipe.built.clone();
        let stream = PromptStream::new(built.train.clone(), c.seed, c.data.shuffle)?;
        let eval_set = built.eval.clone();
        let rewards = match &built.reward {
            Some(r) => Some(RewardRunner::new(r.clone(), c.reward_runner.clone())?),
            None => None,
        };
        let estimator = built.estimator.clone();
        let manifest = crate::manifest::build(&recipe, &files, resume_from.as_deref())?;
        let sink = MetricsSink::open(&run_dir, c.logging.tensorboard, resume_from.is_some())?;
        let mut run = Run {
            files,
            prompts,
            actors,
            sync,
            rollouts: Rollouts::new(stream),
            eval_set,
            rewards,
            episodes,
            estimator,
            step: 0,
            sink,
            evals: Vec::new(),
            history: Vec::new(),
            manifest,
            last_rollouts: Vec::new(),
            last_eval: Vec::new(),
            recipe,
            run_dir,
        };
        if let Some(ckpt) = resume_from {
            run.restore(&ckpt)?;
        }
        crate::manifest::write(&run.run_dir, &run.manifest)?;
        Ok(run)
    }

    /// Runs one training step; returns its metrics (also logged).
    pub fn step(&mut self) -> Result<Metrics> {
        let t_step = Instant::now();
        let step = self.step + 1;
        crate::metrics::reset_peak_rss();
        step_metrics::cuda_reset(&self.actors.local_cuda);
        // 1-3. Generate and score (a prefetched first round, dynamic-sampling rounds).
        let version = self.actors.trainer.version()?;
        let collected = self
            .rollouts
            .collect_step(&context!(self), step, version)
            .map_err(|e| Error::in_phase(e, step, "generate", true))?;
        let mut m = step_metrics::rollouts(&collected, &self.recipe.config);
        let generator = self.actors.generator.as_ref();
        step_metrics::memory(
            &mut m,
            "memory/peak_rss_generate_bytes",
            "memory/kv_cache_bytes",
            Some("memory/kv_cache_peak_used_bytes"),
            generator,
        );
        step_metrics::cuda_phase(&mut m, "generate", &self.actors.local_cuda);
        self.between_generation_and_training(step, &mut m)?;
        if collected.kept.is_empty() {
            return self.finish_without_update(step, &collected, m, t_step);
        }
        // 4. Advantages.
        let mut batch = batch::build(&collected.kept);
        m.extend(self.advantages(&mut batch)?);
        // 5. Update. An allocation failure before the optimizer step leaves the trainer as it was
        // (one optimizer step per update: the weights change only at its end).
        let t = &self.recipe.config.trainer;
        let one_update = t.ppo_epochs * t.mini_batches == 1;
        let updated = self.update(&batch).map_err(|e| {
            let untouched = one_update && self.actors.trainer.version().ok() == Some(version);
            Error::in_phase(e, step, "train", untouched)
        })?;
        m.extend(updated);
        step_metrics::cuda_phase(&mut m, "train", &self.actors.local_cuda);
        // 6. Weight sync.
        if step.is_multiple_of(self.recipe.config.sync.every) {
            self.sync_weights(&mut m)
                .map_err(|e| Error::in_phase(e, step, "sync", false))?;
            step_metrics::cuda_phase(&mut m, "sync", &self.actors.local_cuda);
        }
        m.extend(step_metrics::batch(&batch, self.actors.trainer.version()?));
        self.step = step;
        self.last_rollouts = batch::rollouts(&batch);
        let texts = step_metrics::sample_texts(&batch, self.recipe.config.logging.samples);
        let hist = step_metrics::histograms(&collected.all_rewards, Some(&batch));
        self.log_step(m, &hist, &texts, t_step)
    }

    /// Async rollouts: the next steps' generation starts now, overlapping this step's training.
    /// Colocated and synchronous: the trainer gets the KV cache's memory while it runs.
    fn between_generation_and_training(&mut self, step: u64, m: &mut Metrics) -> Result<()> {
        let c = &self.recipe.config;
        if c.rollout.max_staleness > 0 {
            self.rollouts.prefetch(&context!(self), step)?;
            m.insert(
                "async/dropped_stale".into(),
                self.rollouts.stale_dropped as f64,
            );
        } else if c.rollout.release_cache && self.actors.pool.is_none() {
            let freed = self.actors.generator.release_cache()?;
            m.insert("memory/kv_cache_released_bytes".into(), freed as f64);
            crate::release_free_memory();
        }
        Ok(())
    }

    /// A step with nothing to train on: an error, unless dynamic sampling found no group with
    /// distinct rewards within its rounds (DAPO), which skips the update.
    fn finish_without_update(
        &mut self,
        step: u64,
        collected: &rollouts::StepRollouts,
        mut m: Metrics,
        t_step: Instant,
    ) -> Result<Metrics> {
        let c = &self.recipe.config;
        if c.algorithm.dynamic_sampling.is_none() {
            return Err(Error::Step {
                step,
                message: format!(
                    "no usable prompts (all longer than data.max_prompt_tokens = {})",
                    c.data.max_prompt_tokens
                ),
            });
        }
        tracing::warn!(
            "step {step}: every group had equal rewards after {} rounds; no update this step",
            collected.rounds
        );
        m.insert("dynamic_sampling/skipped_update".into(), 1.0);
        self.step = step;
        self.last_rollouts.clear();
        let hist = step_metrics::histograms(&collected.all_rewards, None);
        self.log_step(m, &hist, &[], t_step)
    }

    /// KL in the reward, critic values, then the estimator's advantages on `b`'s sequences.
    fn advantages(&self, b: &mut StepBatch) -> Result<Metrics> {
        let mut m = Metrics::new();
        let t = Instant::now();
        let trainer = self.actors.trainer.as_ref();
        let token_rewards = match &self.recipe.config.algorithm.kl_in_reward {
            Some(k) => {
                let refs = trainer.compute_ref_logprobs(&b.seqs)?;
                let behaviour: Vec<Vec<f32>> = b
                    .seqs
                    .iter()
                    .map(|s| s.behavior_logprobs.clone().unwrap_or_default())
                    .collect();
                let kl = rlrun_trainer::kl::kl_in_reward(&behaviour, &refs, k.estimator, k.coef)
                    .map_err(TrainError::from)?;
                for (s, r) in b.seqs.iter_mut().zip(refs) {
                    s.ref_logprobs = Some(r);
                }
                m.insert("kl_in_reward/kl".into(), kl.mean_kl);
                Some(kl.token_rewards)
            }
            None => None,
        };
        m.insert("time/reference_s".into(), t.elapsed().as_secs_f64());
        let values = if self.estimator.needs_values() {
            Some(trainer.compute_values(&b.seqs)?)
        } else {
            None
        };
        // Multi-turn episodes: per-turn rewards join the KL's per-token ones.
        let token_rewards = match (token_rewards, &b.token_rewards) {
            (Some(mut kl), Some(env)) => {
                for (k, e) in kl.iter_mut().zip(env) {
                    for (x, y) in k.iter_mut().zip(e) {
                        *x += y;
                    }
                }
                Some(kl)
            }
            (kl, env) => kl.or_else(|| env.clone()),
        };
        let outcomes = b.outcomes.as_deref().unwrap_or(&b.rewards);
        let mut input = AdvantageInput::new(outcomes, &b.group_ids, &b.lengths);
        if let Some(tr) = &token_rewards {
            input = input.with_token_rewards(tr);
        }
        if let Some(m) = &b.response_mask {
            input = input.with_response_mask(m);
        }
        if let Some(v) = &values {
            input = input.with_values(v);
        }
        let adv = self.estimator.compute(&input)?;
        m.extend(adv.metrics.iter().map(|(k, &v)| (k.clone(), f64::from(v))));
        batch::set_advantages(&mut b.seqs, adv, values);
        Ok(m)
    }

    /// One trainer update on `b`.
    fn update(&self, b: &StepBatch) -> Result<Metrics> {
        let batch = TrainBatch {
            sequences: b.seqs.clone(),
            max_response_len: self.recipe.config.rollout.max_tokens,
        };
        crate::metrics::reset_peak_rss();
        let mut m = self.actors.trainer.train_step(batch)?;
        // The trainer's activations are free again: give them back before generation grows.
        crate::release_free_memory();
        step_metrics::memory(
            &mut m,
            "memory/peak_rss_train_bytes",
            "memory/kv_cache_bytes_during_training",
            None,
            self.actors.generator.as_ref(),
        );
        Ok(m)
    }

    /// Publishes the trainer's weights and applies them to the generators (then probes them,
    /// when `sync.probe`).
    fn sync_weights(&mut self, m: &mut Metrics) -> Result<()> {
        let a = &self.actors;
        let outcome =
            crate::sync::sync(self.sync.as_mut(), a.trainer.as_ref(), a.generator.as_ref())?;
        m.extend(outcome.metrics());
        if let Some(p) = &a.pool {
            // Per generator: what it took to take this version (a pull over `net`, a mapping
            // over `shm`), with the acknowledgment.
            for (i, s) in p.update_seconds().into_iter().enumerate() {
                m.insert(format!("sync/generator{i}_s"), s);
                m.insert(
                    format!("sync/generator{i}_gb_per_s"),
                    outcome.bytes as f64 / s.max(1e-9) / 1e9,
                );
            }
        }
        if self.recipe.config.sync.probe {
            m.insert(
                "sync/probe_logprob_max_diff".into(),
                self.probe(outcome.version)?,
            );
        }
        Ok(())
    }

    /// Logs a finished step's metrics (pool counters and step time added) and keeps them.
    fn log_step(
        &mut self,
        mut m: Metrics,
        histograms: &[(&str, Vec<f64>)],
        texts: &[String],
        t_step: Instant,
    ) -> Result<Metrics> {
        if let Some(p) = &self.actors.pool {
            m.insert("generator/restarts".into(), p.restarts() as f64);
            m.insert("generator/processes".into(), p.len() as f64);
        }
        m.insert("time/step_s".into(), t_step.elapsed().as_secs_f64());
        self.sink.step(self.step, &m, histograms, texts)?;
        self.history.push(m.clone());
        Ok(m)
    }

    /// Runs `n` more training steps (no evaluation or checkpoints), with a progress bar on a
    /// terminal when `progress`; stops early on Ctrl-C. Returns each step's metrics.
    pub fn train_steps(&mut self, n: u64, progress: bool) -> Result<Vec<Metrics>> {
        let bar = crate::metrics::Progress::new(self.step + n, self.step, progress);
        let mut out = Vec::new();
        for _ in 0..n {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            let m = self.step()?;
            bar.update(self.step, &m);
            out.push(m);
        }
        bar.finish();
        Ok(out)
    }

    /// Trains to `steps` (evaluating and checkpointing per the recipe), stopping early on Ctrl-C
    /// with a checkpoint.
    pub fn train(&mut self, progress: bool) -> Result<TrainSummary> {
        let c = self.recipe.config.clone();
        let t0 = Instant::now();
        let has_eval = !self.eval_set.is_empty();
        let before = if has_eval && c.eval.before && self.step == 0 {
            Some(self.evaluate_and_log("before training")?)
        } else {
            None
        };
        let bar = crate::metrics::Progress::new(c.steps, self.step, progress);
        let every = std::time::Duration::from_secs_f64(c.checkpoint.every_minutes * 60.0);
        let mut last_checkpoint = Instant::now();
        while self.step < c.steps && !STOP.load(Ordering::SeqCst) {
            let m = match self.step() {
                Ok(m) => m,
                Err(e) => return Err(self.after_failed_step(e)),
            };
            bar.update(self.step, &m);
            let inside = self.step < c.steps;
            if has_eval && c.eval.every > 0 && self.step.is_multiple_of(c.eval.every) && inside {
                let e = self.evaluate()?;
                bar.message(&format!(
                    "step {}: held-out accuracy {:.1}%",
                    self.step,
                    100.0 * e.accuracy
                ));
            }
            let by_steps = c.checkpoint.every > 0 && self.step.is_multiple_of(c.checkpoint.every);
            let by_time = !every.is_zero() && last_checkpoint.elapsed() >= every;
            if (by_steps || by_time) && inside {
                self.save()?;
                last_checkpoint = Instant::now();
            }
        }
        bar.finish();
        let interrupted = STOP.load(Ordering::SeqCst);
        // Generation started for steps that will not run here: its prompts go back to the stream.
        self.rollouts
            .discard_prefetched(self.actors.generator.as_ref())?;
        let after = if has_eval && c.eval.after && !interrupted {
            Some(self.evaluate_and_log("after training")?)
        } else {
            None
        };
        let checkpoint = self.save()?;
        if c.checkpoint.export_hf && !interrupted {
            self.export_hf(&self.run_dir.join("final"))?;
        }
        self.sink.flush()?;
        Ok(TrainSummary {
            before,
            after,
            steps: self.step,
            interrupted,
            checkpoint,
            seconds: t0.elapsed().as_secs_f64(),
            memory: MemorySummary::of(&self.history),
        })
    }

    /// A step failed with `e`: after running out of memory with the trainer still at the last
    /// completed step, a checkpoint of that step is written (prefetched prompts returned to the
    /// stream), so the run continues with `rlrun resume` and a smaller setting; `e`, completed.
    fn after_failed_step(&mut self, e: Error) -> Error {
        let Error::OutOfMemory {
            step,
            phase,
            detail,
            keys,
            untouched,
            ..
        } = e
        else {
            return e;
        };
        let outcome = if untouched {
            let saved = self
                .rollouts
                .discard_prefetched(self.actors.generator.as_ref())
                .and_then(|()| self.save());
            match saved {
                Ok(p) => format!(
                    "the run stopped with a checkpoint of step {} ({}): continue with `rlrun resume {} --set <key>=<value>`",
                    self.step,
                    p.display(),
                    self.run_dir.display()
                ),
                Err(w) => format!("writing a checkpoint of step {} failed too: {w}", self.step),
            }
        } else {
            format!(
                "the trainer had begun its update: no checkpoint was written; continue from the last one with `rlrun resume {} --set <key>=<value>`",
                self.run_dir.display()
            )
        };
        Error::OutOfMemory {
            step,
            phase,
            detail,
            keys,
            untouched,
            outcome,
        }
    }

    fn evaluate_and_log(&mut self, when: &str) -> Result<EvalResult> {
        let e = self.evaluate()?;
        tracing::info!(
            "held-out accuracy {when}: {:.1}% ({} problems)",
            100.0 * e.accuracy,
            e.problems
        );
        Ok(e)
    }
}
