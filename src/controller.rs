//! The controller: drives Generator and Trainer actors through the RL loop.
//!
//! One step: sample prompts → generate `n` completions each → score them → (optional) KL in the
//! reward → advantages → trainer update → weight sync every `sync.every` steps. Around the steps:
//! evaluation on held-out prompts, checkpoints, metrics (JSONL + TensorBoard) and a manifest.
//! The loop only talks to [`GeneratorActor`] and [`TrainerActor`], so actors may live in this
//! process or elsewhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rlrun_generator::{
    Completion, EngineConfig, GeneratorActor, LocalGenerator, Request, SamplingParams, WeightUpdate,
};
use rlrun_model::{ChatMessage, ChatTemplate, Kind, ModelFiles, Tokenizer};
use rlrun_rollout::{
    AdvantageEstimator, AdvantageInput, Dataset, DynamicSampler, OwnedCompletion, Prompt,
    PromptStream, RewardRunner, Sample, ScoreJob,
};
use rlrun_trainer::loss::kl_penalty;
use rlrun_trainer::{
    CriticConfig, LocalTrainer, OptimConfig, TrainBatch, TrainSequence, Trainer, TrainerActor,
    TrainerConfig,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::metrics::MetricsSink;
use crate::recipe::{DeviceChoice, DtypeChoice, Recipe};

/// Set by the first Ctrl-C: finish the current step, checkpoint, exit.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler: first press requests a graceful stop, second exits at once.
pub fn install_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current step, then writing a checkpoint (Ctrl-C again to exit now)");
    });
}

/// Results of one evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    pub step: u64,
    pub problems: usize,
    /// Fraction of greedy completions whose reward reaches `eval.correct_threshold`.
    pub accuracy: f64,
    pub mean_reward: f64,
    pub mean_response_len: f64,
    /// pass@k with sampling, when `eval.pass_k > 0`.
    pub pass_at_k: Option<f64>,
    pub seconds: f64,
}

/// What the controller keeps in a checkpoint besides the trainer's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ControllerState {
    step: u64,
    cursor: rlrun_rollout::Cursor,
    policy_version: u64,
    evals: Vec<EvalResult>,
    /// The run's manifest at the time (lineage).
    manifest: serde_json::Value,
}

/// One prepared prompt of a step.
struct PromptItem {
    sample: Arc<Sample>,
    ids: Vec<i64>,
}

/// A training run.
pub struct Run {
    pub recipe: Recipe,
    pub run_dir: PathBuf,
    files: ModelFiles,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    generator: Box<dyn GeneratorActor>,
    trainer: Box<dyn TrainerActor>,
    stream: PromptStream,
    eval_set: Vec<Sample>,
    rewards: RewardRunner,
    estimator: Box<dyn AdvantageEstimator>,
    step: u64,
    synced_version: u64,
    sink: MetricsSink,
    evals: Vec<EvalResult>,
    history: Vec<BTreeMap<String, f64>>,
    manifest: serde_json::Value,
    device: Device,
    /// Completions of the last step, for inspection (Python bindings).
    pub last_rollouts: Vec<Rollout>,
    /// (prompt, completion, reward) of the last evaluation.
    last_eval: Vec<(String, String, f32)>,
    /// Shared-memory files (double-buffered) when weights cross processes.
    shm: Option<[PathBuf; 2]>,
    shm_next: usize,
    /// The generator processes, when there are any.
    pool: Option<Arc<crate::actors::GeneratorPool>>,
    /// Actor processes this run spawned (killed on drop).
    _processes: Vec<crate::actors::ActorProcess>,
    /// Generation already under way for the next steps (`rollout.max_staleness > 0`), oldest
    /// first.
    prefetched: std::collections::VecDeque<Prefetch>,
    /// Prefetched batches dropped for being too stale.
    stale_dropped: u64,
}

/// Requests handed to the generator whose completions are still to be collected.
struct PendingGeneration {
    /// In a mutex only so that a `Run` is `Sync` (the Python bindings share it across threads).
    rx: std::sync::Mutex<rlrun_generator::CompletionStream>,
    id_base: u64,
    prompts: usize,
    n: usize,
    started: Instant,
}

/// A prefetched round, collected.
struct Prefetched {
    items: Vec<PromptItem>,
    groups: Vec<Vec<Completion>>,
    skipped: usize,
    wall_s: f64,
    wait_s: f64,
}

/// The first generation round of a future step, started before the current step trains.
struct Prefetch {
    step: u64,
    items: Vec<PromptItem>,
    skipped: usize,
    pending: PendingGeneration,
    /// The prompt stream's position before these prompts were drawn (what a checkpoint records,
    /// so that a resumed run draws them again).
    cursor_before: rlrun_rollout::Cursor,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(files) = &self.shm {
            for f in files {
                let _ = std::fs::remove_file(f);
            }
        }
    }
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

/// The environment that pins an actor process to `devices` (nothing on the CPU). The indices
/// are this process's: mapped through its own `CUDA_VISIBLE_DEVICES` when that is set.
fn visible_devices(device: Device, devices: &[usize]) -> Vec<(String, String)> {
    let Device::Cuda(_) = device else {
        return Vec::new();
    };
    let ours: Option<Vec<String>> = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .map(|v| v.split(',').map(|x| x.trim().to_string()).collect());
    let names: Vec<String> = devices
        .iter()
        .map(|&d| match &ours {
            Some(list) => list.get(d).cloned().unwrap_or_else(|| d.to_string()),
            None => d.to_string(),
        })
        .collect();
    vec![("CUDA_VISIBLE_DEVICES".to_string(), names.join(","))]
}

fn pick_device(choice: DeviceChoice, index: usize) -> Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda => {
            if !tch::Cuda::is_available() {
                bail!("placement asks for CUDA but no CUDA device is available");
            }
            Device::Cuda(index)
        }
        DeviceChoice::Auto => {
            if tch::Cuda::is_available() {
                Device::Cuda(index)
            } else {
                Device::Cpu
            }
        }
    })
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (d, s) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch.
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

impl Run {
    /// Sets up a new run (run directory, actors, data) from a validated recipe.
    pub fn create(recipe: Recipe) -> Result<Run> {
        let base = PathBuf::from(&recipe.config.logging.run_dir);
        let mut run_dir = base.join(format!("{}-{}", recipe.config.name, timestamp()));
        let mut k = 1;
        while run_dir.exists() {
            run_dir = base.join(format!("{}-{}-{k}", recipe.config.name, timestamp()));
            k += 1;
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        std::fs::write(run_dir.join("recipe.toml"), &recipe.resolved)?;
        Self::build(recipe, run_dir, None)
    }

    /// Continues a run from its latest checkpoint.
    pub fn resume(run_dir: &Path) -> Result<Run> {
        let recipe_path = run_dir.join("recipe.toml");
        let recipe = Recipe::load(&recipe_path, &[]).map_err(anyhow::Error::new)?;
        let ckpt = latest_checkpoint(run_dir)?.with_context(|| {
            format!("no checkpoint in {}", run_dir.join("checkpoints").display())
        })?;
        Self::build(recipe, run_dir.to_path_buf(), Some(ckpt))
    }

    fn build(recipe: Recipe, run_dir: PathBuf, resume_from: Option<PathBuf>) -> Result<Run> {
        let c = &recipe.config;
        let device = pick_device(
            c.placement.trainer.device,
            c.placement.trainer.devices.first().copied().unwrap_or(0),
        )?;
        let gen_device = pick_device(
            c.placement.generator.device,
            c.placement.generator.devices.first().copied().unwrap_or(0),
        )?;
        if c.placement.trainer.threads > 0 {
            tch::set_num_threads(c.placement.trainer.threads as i32);
        }
        let kind = match c.model.dtype {
            DtypeChoice::Auto => {
                if device.is_cuda() {
                    Kind::BFloat16
                } else {
                    Kind::Float
                }
            }
            DtypeChoice::F32 => Kind::Float,
            DtypeChoice::Bf16 => Kind::BFloat16,
            DtypeChoice::F16 => Kind::Half,
        };
        let files = ModelFiles::open(&recipe.model_path)
            .with_context(|| format!("opening the model {}", recipe.model_path.display()))?;
        let template = files.chat_template()?;
        let tokenizer = Arc::new(ModelFiles::open(&recipe.model_path)?.tokenizer);

        let uses_ref = c.algorithm.loss.kl.is_some() || c.algorithm.kl_in_reward.is_some();
        let tcfg = TrainerConfig {
            optim: c.trainer.optim(),
            loss: c.algorithm.loss.clone(),
            ppo_epochs: c.trainer.ppo_epochs,
            mini_batches: c.trainer.mini_batches,
            micro_batch_tokens: c.trainer.micro_batch_tokens,
            logprob_chunk: c.trainer.logprob_chunk,
            temperature: c.rollout.temperature,
            critic: c.trainer.critic.as_ref().map(|cs| CriticConfig {
                optim: OptimConfig {
                    lr: cs.lr,
                    weight_decay: cs.weight_decay,
                    grad_clip: (cs.grad_clip > 0.0).then_some(cs.grad_clip),
                    ..c.trainer.optim()
                },
                cliprange_value: cs.cliprange_value,
            }),
        };
        let slots = c
            .rollout
            .max_slots
            .unwrap_or(c.data.prompts_per_step * c.rollout.n)
            .max(c.rollout.n);
        let eval_slots = c.eval.size.unwrap_or(256).min(256);
        let max_len =
            c.data.max_prompt_tokens + c.rollout.max_tokens.max(c.eval.max_tokens.unwrap_or(0)) + 1;
        let engine_cfg = EngineConfig {
            max_slots: slots.max(eval_slots),
            max_len,
            max_prefill_tokens: 16_384,
            seed: c.seed,
            update_policy: c.rollout.update_policy,
        };
        let dtype = rlrun_weights_sync::shm::kind_name(kind).to_string();
        // An actor process sees only its devices (CUDA_VISIBLE_DEVICES): its first is cuda:0.
        let device_name = |d: Device| match d {
            Device::Cuda(_) => "cuda:0".to_string(),
            _ => "cpu".to_string(),
        };
        let mut processes: Vec<crate::actors::ActorProcess> = Vec::new();

        // Trainer: f32 master on its device, computing in `kind`; here or in its own process.
        let trainer: Box<dyn TrainerActor> = if c.placement.trainer_process {
            let cfg = crate::actors::ActorConfig {
                model: recipe.model_path.clone(),
                dtype: dtype.clone(),
                device: device_name(device),
                threads: c.placement.trainer.threads,
                engine: None,
                trainer: Some(tcfg),
                reference: uses_ref,
            };
            let p = crate::actors::spawn(
                "trainer",
                &cfg,
                &visible_devices(device, &c.placement.trainer.devices),
            )?;
            let client = rlrun_trainer::RemoteTrainer::connect(
                &p.addr,
                None,
                std::time::Duration::from_secs(60),
            )?;
            processes.push(p);
            Box::new(client)
        } else {
            let master = files.load_weights(Kind::Float, device)?;
            let reference = if uses_ref {
                Some(files.load_weights(kind, device)?)
            } else {
                None
            };
            Box::new(LocalTrainer::new(Trainer::new(
                files.config.clone(),
                &master,
                kind,
                reference,
                tcfg,
            )?))
        };

        // Generators: one in this process (its own copy of the weights), or a pool of processes.
        let pl = &c.placement;
        let (generator, pool): (
            Box<dyn GeneratorActor>,
            Option<Arc<crate::actors::GeneratorPool>>,
        ) = if pl.generator_processes > 0 || !pl.generator_addresses.is_empty() {
            let pool = if pl.generator_addresses.is_empty() {
                let cfg = crate::actors::ActorConfig {
                    model: recipe.model_path.clone(),
                    dtype: dtype.clone(),
                    device: device_name(gen_device),
                    threads: pl.generator.threads,
                    engine: Some(engine_cfg),
                    trainer: None,
                    reference: false,
                };
                // Generator i runs on the group's device i (round robin) when on CUDA.
                let d = &pl.generator.devices;
                let envs = (0..pl.generator_processes)
                    .map(|i| {
                        visible_devices(
                            gen_device,
                            &[d.get(i % d.len().max(1)).copied().unwrap_or(0)],
                        )
                    })
                    .collect();
                crate::actors::GeneratorPool::spawn(cfg, envs)?
            } else {
                let token = match &pl.token_file {
                    Some(f) => Some(
                        rlrun_proto::auth::read_token(Path::new(f)).map_err(anyhow::Error::msg)?,
                    ),
                    None => None,
                };
                crate::actors::GeneratorPool::connect(&pl.generator_addresses, token)?
            };
            (Box::new(pool.clone()), Some(pool))
        } else {
            let gen_weights = files.load_weights(kind, gen_device)?;
            let engine = rlrun_generator::Engine::new(
                files.config.clone(),
                gen_weights,
                files.eos_ids(),
                Some(tokenizer.clone()),
                engine_cfg,
            )?;
            (Box::new(LocalGenerator::spawn(engine)), None)
        };
        // Shared memory carries the weights when trainer and generators are not one process.
        let shm =
            (pool.is_some() || c.placement.trainer_process || c.sync.backend == "shm").then(|| {
                let prefix = format!("rlrun-{}-{}", std::process::id(), timestamp());
                let dir = rlrun_weights_sync::shm::default_dir();
                let n = rlrun_weights_sync::shm::remove_orphans(&dir);
                if n > 0 {
                    tracing::info!("removed {n} shared-memory file(s) left by runs that are gone");
                }
                [
                    dir.join(format!("{prefix}-0")),
                    dir.join(format!("{prefix}-1")),
                ]
            });

        let train_ds: Arc<dyn Dataset> = c.data.train.build()?;
        let stream = PromptStream::new(train_ds.clone(), c.seed, c.data.shuffle)?;
        let eval_set = match &c.data.eval {
            Some(e) => {
                let ds = e.build()?;
                let n = c
                    .eval
                    .size
                    .map(|s| s as u64)
                    .or(ds.num_samples())
                    .unwrap_or(200);
                (0..n).map_while(|i| ds.get(i)).collect()
            }
            None => Vec::new(),
        };
        let rewards = RewardRunner::new(c.reward.build()?, c.reward_runner.clone())?;
        let estimator = c.algorithm.advantage.build()?;
        let manifest = crate::manifest::build(&recipe, &files, resume_from.as_deref())?;
        let sink = MetricsSink::open(&run_dir, c.logging.tensorboard, resume_from.is_some())?;
        let mut run = Run {
            shm,
            shm_next: 0,
            pool,
            _processes: processes,
            prefetched: Default::default(),
            stale_dropped: 0,
            files,
            tokenizer,
            template,
            generator,
            trainer,
            stream,
            eval_set,
            rewards,
            estimator,
            step: 0,
            synced_version: 0,
            sink,
            evals: Vec::new(),
            history: Vec::new(),
            manifest,
            device,
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

    fn restore(&mut self, ckpt: &Path) -> Result<()> {
        let state: ControllerState = serde_json::from_str(&std::fs::read_to_string(
            ckpt.join("controller_state.json"),
        )?)
        .with_context(|| format!("reading {}", ckpt.join("controller_state.json").display()))?;
        self.trainer.load(&ckpt.join("trainer"))?;
        self.stream.restore(&state.cursor)?;
        self.step = state.step;
        self.evals = state.evals;
        self.sink.truncate_after(self.step)?;
        self.sync_weights(&mut BTreeMap::new())?;
        tracing::info!(
            "resumed {} at step {} from {}",
            self.run_dir.display(),
            self.step,
            ckpt.display()
        );
        Ok(())
    }

    /// (prompt, completion, reward) of the last evaluation.
    pub fn last_eval_samples(&self) -> &[(String, String, f32)] {
        &self.last_eval
    }

    pub fn step_index(&self) -> u64 {
        self.step
    }
    pub fn history(&self) -> &[BTreeMap<String, f64>] {
        &self.history
    }
    pub fn evals(&self) -> &[EvalResult] {
        &self.evals
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn rewards_mut(&mut self) -> &mut RewardRunner {
        &mut self.rewards
    }
    pub fn generator(&self) -> &dyn GeneratorActor {
        self.generator.as_ref()
    }
    pub fn device(&self) -> Device {
        self.device
    }

    /// Renders and tokenizes a prompt.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<i64>> {
        let c = &self.recipe.config;
        let ids = match prompt {
            Prompt::Messages(msgs) => {
                let tpl = self
                    .template
                    .as_ref()
                    .context("chat prompts need a model with a chat template")?;
                let mut conv: Vec<ChatMessage> = Vec::new();
                if let Some(sys) = &c.data.system_prompt {
                    if msgs.first().map(|m| m.role.as_str()) != Some("system") {
                        conv.push(ChatMessage::new("system", sys.clone()));
                    }
                }
                conv.extend(
                    msgs.iter()
                        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone())),
                );
                let text = tpl.render(&conv, true)?;
                self.tokenizer.encode(&text, false)?
            }
            Prompt::Text(t) => self.tokenizer.encode(t, true)?,
        };
        Ok(ids.into_iter().map(i64::from).collect())
    }

    fn prepare(&self, samples: Vec<Sample>, skipped: &mut usize) -> Result<Vec<PromptItem>> {
        let mut out = Vec::new();
        for s in samples {
            let ids = self.encode_prompt(&s.prompt)?;
            if ids.len() > self.recipe.config.data.max_prompt_tokens {
                *skipped += 1;
                continue;
            }
            out.push(PromptItem {
                sample: Arc::new(s),
                ids,
            });
        }
        Ok(out)
    }

    fn sampling(&self) -> SamplingParams {
        let r = &self.recipe.config.rollout;
        SamplingParams {
            n: r.n,
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            min_p: r.min_p,
            max_tokens: r.max_tokens,
            stop_token_ids: None,
            stop: r.stop.clone(),
            seed: Some(self.recipe.config.seed),
        }
    }

    /// Generates completions for `items` (request ids from `id_base`); returns them grouped per
    /// prompt in sample order.
    fn generate(
        &self,
        items: &[PromptItem],
        params: &SamplingParams,
        id_base: u64,
    ) -> Result<Vec<Vec<Completion>>> {
        self.collect(self.submit(items, params, id_base)?)
    }

    /// Hands `items` to the generator without waiting for the completions.
    fn submit(
        &self,
        items: &[PromptItem],
        params: &SamplingParams,
        id_base: u64,
    ) -> Result<PendingGeneration> {
        let reqs: Vec<Request> = items
            .iter()
            .enumerate()
            .map(|(i, it)| Request {
                id: id_base + i as u64,
                prompt: it.ids.clone(),
                params: params.clone(),
            })
            .collect();
        Ok(PendingGeneration {
            rx: std::sync::Mutex::new(self.generator.generate(reqs)?),
            id_base,
            prompts: items.len(),
            n: params.n,
            started: Instant::now(),
        })
    }

    /// Waits for submitted requests; their completions grouped per prompt in sample order.
    fn collect(&self, p: PendingGeneration) -> Result<Vec<Vec<Completion>>> {
        let mut groups: Vec<Vec<Completion>> = vec![Vec::new(); p.prompts];
        let rx =
            p.rx.into_inner()
                .map_err(|_| anyhow::anyhow!("a generation stream was poisoned"))?;
        for c in rx.iter().take(p.prompts * p.n) {
            let c = c?;
            let g = (c.request_id - p.id_base) as usize;
            groups[g].push(c);
        }
        for g in &mut groups {
            g.sort_by_key(|c| c.index);
            if g.len() != p.n {
                bail!(
                    "the generator returned {} of {} completions for a prompt",
                    g.len(),
                    p.n
                );
            }
        }
        Ok(groups)
    }

    /// The prefetched first round of `step`: its prompts, completions, skipped prompts,
    /// generation wall time and the part of it spent waiting here. A batch more than
    /// `max_staleness` versions (plus the sync interval) behind the trainer is dropped and
    /// counted, and the step generates afresh.
    fn take_prefetched(&mut self, step: u64, round: u64) -> Result<Option<Prefetched>> {
        // Generation for steps that are past (a step that failed and was not retried) is of no use.
        while let Some(old) = self.prefetched.front().filter(|p| p.step < step) {
            let ids: Vec<u64> = (0..old.pending.prompts as u64)
                .map(|i| old.pending.id_base + i)
                .collect();
            let _ = self.generator.abort(ids);
            self.prefetched.pop_front();
        }
        if round != 0 || self.prefetched.front().is_none_or(|p| p.step != step) {
            return Ok(None);
        }
        let Some(Prefetch {
            items,
            skipped,
            pending,
            ..
        }) = self.prefetched.pop_front()
        else {
            return Ok(None);
        };
        let t = Instant::now();
        let started = pending.started;
        let groups = self.collect(pending)?;
        let c = &self.recipe.config;
        let version = self.trainer.version()?;
        let oldest = groups
            .iter()
            .flatten()
            .map(|x| x.policy_version)
            .min()
            .unwrap_or(version);
        if version.saturating_sub(oldest) > c.rollout.max_staleness + c.sync.every - 1 {
            tracing::warn!("step {step}: prefetched rollouts of version {oldest} are too stale (trainer at {version}); regenerating");
            self.stale_dropped += 1;
            return Ok(None);
        }
        Ok(Some(Prefetched {
            items,
            groups,
            skipped,
            wall_s: started.elapsed().as_secs_f64(),
            wait_s: t.elapsed().as_secs_f64(),
        }))
    }

    /// With `rollout.max_staleness = k`, starts generating the first round of steps up to
    /// `step + k` (those not started yet) so that it overlaps this step's training.
    fn prefetch(&mut self, step: u64) -> Result<()> {
        let c = &self.recipe.config;
        let k = c.rollout.max_staleness;
        let last = (step + k).min(c.steps);
        let params = self.sampling();
        let mut next = self
            .prefetched
            .back()
            .map(|p| p.step + 1)
            .unwrap_or(step + 1);
        while next <= last {
            let cursor_before = self.stream.cursor();
            let batch = self.stream.next_batch(self.first_round_prompts());
            let mut skipped = 0;
            let items = self.prepare(batch, &mut skipped)?;
            let pending = self.submit(&items, &params, next << 24)?;
            self.prefetched.push_back(Prefetch {
                step: next,
                items,
                skipped,
                pending,
                cursor_before,
            });
            next += 1;
        }
        Ok(())
    }

    /// Prompts in a step's first generation round.
    fn first_round_prompts(&self) -> usize {
        let c = &self.recipe.config;
        match c.algorithm.dynamic_sampling {
            // DynamicSampler::suggested_prompts() before any round.
            Some(_) => DynamicSampler::<()>::new(c.data.prompts_per_step, 1)
                .suggested_prompts()
                .max(1),
            None => c.data.prompts_per_step,
        }
    }

    /// The prompt stream position a checkpoint records: before any prefetched prompts.
    fn checkpoint_cursor(&self) -> rlrun_rollout::Cursor {
        match self.prefetched.front() {
            Some(p) => p.cursor_before,
            None => self.stream.cursor(),
        }
    }

    /// Abandons generation started for future steps (the end of training, or a checkpoint
    /// restore), putting its prompts back.
    fn discard_prefetched(&mut self) -> Result<()> {
        if let Some(first) = self.prefetched.front() {
            let cursor = first.cursor_before;
            let ids: Vec<u64> = self
                .prefetched
                .iter()
                .flat_map(|p| (0..p.pending.prompts as u64).map(move |i| p.pending.id_base + i))
                .collect();
            self.prefetched.clear();
            let _ = self.generator.abort(ids);
            self.stream.restore(&cursor)?;
        }
        Ok(())
    }

    fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        Ok(self.tokenizer.decode(&ids, true)?)
    }

    fn score(
        &self,
        items: &[PromptItem],
        groups: &[Vec<Completion>],
        max_tokens: usize,
    ) -> Result<(Vec<f32>, rlrun_rollout::RewardStats, Vec<String>)> {
        let mut jobs = Vec::new();
        let mut texts = Vec::new();
        for (it, g) in items.iter().zip(groups) {
            for c in g {
                let text = self.decode(&c.token_ids)?;
                texts.push(text.clone());
                jobs.push(ScoreJob::new(
                    it.sample.clone(),
                    OwnedCompletion::new(
                        text,
                        c.token_ids.iter().map(|&t| t as u32).collect(),
                        match c.finish_reason {
                            rlrun_generator::FinishReason::Stop => {
                                rlrun_rollout::FinishReason::Stop
                            }
                            rlrun_generator::FinishReason::Length => {
                                rlrun_rollout::FinishReason::Length
                            }
                            rlrun_generator::FinishReason::Abort => {
                                rlrun_rollout::FinishReason::Abort
                            }
                        },
                        max_tokens,
                    ),
                ));
            }
        }
        let (rewards, stats) = self.rewards.score_batch(jobs);
        Ok((rewards.iter().map(|r| r.value).collect(), stats, texts))
    }

    fn sync_weights(&mut self, metrics: &mut BTreeMap<String, f64>) -> Result<()> {
        let t = Instant::now();
        let checksums = self.recipe.config.sync.checksum;
        let (version, bytes) = match &self.shm {
            None => {
                let (version, flat) = self.trainer.sync_weights()?;
                let bytes = flat.numel() as f64 * flat.kind().elt_size_in_bytes() as f64;
                self.generator
                    .update_weights(version, WeightUpdate::Flat(flat))?;
                metrics.insert("sync/backend_shm".into(), 0.0);
                (version, bytes)
            }
            Some(files) => {
                let path = files[self.shm_next].clone();
                self.shm_next = 1 - self.shm_next;
                let (r, report) = self.trainer.publish_weights(&path, checksums)?;
                let t_map = Instant::now();
                self.generator
                    .update_weights(r.version, WeightUpdate::Shared(r.clone()))?;
                metrics.insert("sync/publish_s".into(), report.seconds);
                metrics.insert("sync/update_s".into(), t_map.elapsed().as_secs_f64());
                metrics.insert("sync/backend_shm".into(), 1.0);
                (r.version, report.bytes as f64)
            }
        };
        let s = t.elapsed().as_secs_f64();
        self.synced_version = version;
        if self.recipe.config.sync.probe {
            metrics.insert("sync/probe_logprob_max_diff".into(), self.probe(version)?);
        }
        metrics.insert("sync/bytes".into(), bytes);
        metrics.insert("sync/seconds".into(), s);
        metrics.insert("sync/gb_per_s".into(), bytes / s.max(1e-9) / 1e9);
        metrics.insert("time/sync_s".into(), s);
        Ok(())
    }

    /// The largest |generator - trainer| log-prob over one sampled completion of the first
    /// training prompt: zero up to rounding when the generator holds the trainer's weights.
    fn probe(&self, version: u64) -> Result<f64> {
        let sample = self
            .stream
            .dataset()
            .get(0)
            .context("the probe needs a training prompt")?;
        let mut skipped = 0;
        let items = self.prepare(vec![sample], &mut skipped)?;
        if items.is_empty() {
            bail!("the probe prompt is longer than data.max_prompt_tokens");
        }
        let params = SamplingParams {
            n: 1,
            ..self.sampling()
        };
        let c = self
            .generate(&items, &params, (1u64 << 61) | (version << 8))?
            .remove(0)
            .remove(0);
        if c.policy_version != version {
            bail!(
                "the probe ran on version {} of the weights, expected {version}",
                c.policy_version
            );
        }
        let ours = self.logprobs(items[0].ids.clone(), c.token_ids.clone())?;
        Ok(ours
            .iter()
            .zip(&c.logprobs)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max))
    }

    /// Runs one training step; returns its metrics (also logged).
    pub fn step(&mut self) -> Result<BTreeMap<String, f64>> {
        let c = self.recipe.config.clone();
        let t_step = Instant::now();
        let step = self.step + 1;
        crate::metrics::reset_peak_rss();
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        let params = self.sampling();
        let p = c.data.prompts_per_step;

        // 1-3. Prompts, generation, rewards (more rounds with dynamic sampling).
        let rounds = c
            .algorithm
            .dynamic_sampling
            .map(|d| d.max_rounds)
            .unwrap_or(1);
        let mut sampler: DynamicSampler<(PromptItem, Vec<Completion>, Vec<f32>, Vec<String>)> =
            DynamicSampler::new(p, rounds);
        let (mut gen_s, mut reward_s, mut gen_tokens, mut skipped) = (0.0, 0.0, 0usize, 0usize);
        let mut gen_wait_s = 0.0;
        let mut all_rewards: Vec<f32> = Vec::new();
        let mut reward_stats = Vec::new();
        let mut round = 0u64;
        let mut all_groups = Vec::new();
        loop {
            let want = if c.algorithm.dynamic_sampling.is_some() {
                sampler.suggested_prompts().max(1)
            } else {
                p
            };
            let (items, groups) = match self.take_prefetched(step, round)? {
                Some(pf) => {
                    skipped += pf.skipped;
                    gen_s += pf.wall_s;
                    gen_wait_s += pf.wait_s;
                    (pf.items, pf.groups)
                }
                None => {
                    let batch = self.stream.next_batch(want);
                    let items = self.prepare(batch, &mut skipped)?;
                    let t = Instant::now();
                    let groups = self.generate(&items, &params, (step << 24) | (round << 16))?;
                    gen_s += t.elapsed().as_secs_f64();
                    gen_wait_s += t.elapsed().as_secs_f64();
                    (items, groups)
                }
            };
            gen_tokens += groups
                .iter()
                .flatten()
                .map(|c| c.token_ids.len())
                .sum::<usize>();
            let t = Instant::now();
            let (rewards, stats, texts) = self.score(&items, &groups, c.rollout.max_tokens)?;
            reward_s += t.elapsed().as_secs_f64();
            all_rewards.extend(&rewards);
            reward_stats.push(stats);
            let mut per_group = Vec::new();
            for (gi, (it, g)) in items.into_iter().zip(groups).enumerate() {
                let r: Vec<f32> = rewards[gi * c.rollout.n..(gi + 1) * c.rollout.n].to_vec();
                let t: Vec<String> = texts[gi * c.rollout.n..(gi + 1) * c.rollout.n].to_vec();
                per_group.push((r.clone(), (it, g, r, t)));
            }
            round += 1;
            if c.algorithm.dynamic_sampling.is_none() {
                all_groups.extend(per_group.into_iter().map(|(_, g)| g));
                break;
            }
            sampler.add_round(
                per_group
                    .into_iter()
                    .map(|(r, g)| (g, r))
                    .collect::<Vec<_>>(),
            );
            if sampler.is_done() {
                break;
            }
        }
        if let Some(b) = crate::metrics::peak_rss() {
            m.insert("memory/peak_rss_generate_bytes".into(), b as f64);
        }
        if let Ok(s) = self.generator.stats() {
            m.insert("memory/kv_cache_bytes".into(), s.kv_cache_bytes as f64);
        }
        // Asynchronous rollouts: the next steps' generation runs while this one trains.
        if c.rollout.max_staleness > 0 {
            self.prefetch(step)?;
        } else if c.rollout.release_cache && self.pool.is_none() {
            // Colocated: the trainer gets the KV cache's memory while it runs.
            let freed = self.generator.release_cache()?;
            m.insert("memory/kv_cache_released_bytes".into(), freed as f64);
        }
        let kept = if c.algorithm.dynamic_sampling.is_some() {
            let (kept, ds) = sampler.finish();
            m.insert(
                "dynamic_sampling/dropped_groups".into(),
                ds.groups_dropped as f64,
            );
            m.insert("dynamic_sampling/rounds".into(), round as f64);
            m.insert("dynamic_sampling/kept_groups".into(), kept.len() as f64);
            kept
        } else {
            all_groups
        };
        // Reward statistics over everything generated this step (before any filtering).
        let n_all = all_rewards.len().max(1) as f64;
        let mean = all_rewards.iter().map(|&r| r as f64).sum::<f64>() / n_all;
        let std = (all_rewards
            .iter()
            .map(|&r| (r as f64 - mean).powi(2))
            .sum::<f64>()
            / n_all)
            .sqrt();
        m.insert("reward/mean".into(), mean);
        m.insert("reward/std".into(), std);
        m.insert(
            "reward/accuracy".into(),
            all_rewards
                .iter()
                .filter(|&&r| r >= c.eval.correct_threshold)
                .count() as f64
                / n_all,
        );
        for s in &reward_stats {
            for (k, v) in s.to_metrics("reward") {
                if k != "reward/mean" {
                    *m.entry(k).or_insert(0.0) += v / reward_stats.len() as f64;
                }
            }
        }
        m.insert("prompts/skipped_too_long".into(), skipped as f64);
        m.insert("time/generate_s".into(), gen_s);
        // Generation time the controller waited for (the rest overlapped earlier steps' work).
        m.insert("time/generate_wait_s".into(), gen_wait_s);
        m.insert("time/overlap_s".into(), (gen_s - gen_wait_s).max(0.0));
        if c.rollout.max_staleness > 0 {
            m.insert("async/dropped_stale".into(), self.stale_dropped as f64);
        }
        m.insert("time/reward_s".into(), reward_s);
        m.insert(
            "perf/generate_tokens_per_s".into(),
            gen_tokens as f64 / gen_s.max(1e-9),
        );
        if kept.is_empty() {
            if c.algorithm.dynamic_sampling.is_none() {
                bail!(
                    "step {step}: no usable prompts (all longer than data.max_prompt_tokens = {})",
                    c.data.max_prompt_tokens
                );
            }
            // DAPO: no informative group within max_rounds, so there is no gradient signal.
            tracing::warn!("step {step}: every group had equal rewards after {round} rounds; no update this step");
            m.insert("dynamic_sampling/skipped_update".into(), 1.0);
            m.insert("time/step_s".into(), t_step.elapsed().as_secs_f64());
            self.step = step;
            self.last_rollouts.clear();
            let rewards_hist = all_rewards.iter().map(|&r| r as f64).collect();
            self.sink.step(step, &m, &[("reward", rewards_hist)], &[])?;
            self.history.push(m.clone());
            return Ok(m);
        }

        // Build training sequences.
        let mut seqs: Vec<TrainSequence> = Vec::new();
        let mut group_ids: Vec<u64> = Vec::new();
        let mut rewards: Vec<f32> = Vec::new();
        let mut texts: Vec<(String, String)> = Vec::new();
        let mut versions: Vec<u64> = Vec::new();
        for (gi, (it, g, r, t)) in kept.iter().enumerate() {
            for ((comp, &rw), text) in g.iter().zip(r).zip(t) {
                seqs.push(TrainSequence {
                    prompt: it.ids.clone(),
                    response: comp.token_ids.clone(),
                    advantages: Vec::new(),
                    behavior_logprobs: Some(comp.logprobs.clone()),
                    returns: None,
                    old_values: None,
                    ref_logprobs: None,
                });
                group_ids.push(gi as u64);
                rewards.push(rw);
                texts.push((self.decode(&it.ids)?, text.clone()));
                versions.push(comp.policy_version);
            }
        }
        let lengths: Vec<usize> = seqs.iter().map(|s| s.response.len()).collect();

        // 4. KL in the reward, critic values, advantages.
        let t = Instant::now();
        let mut token_rewards: Option<Vec<Vec<f32>>> = None;
        if let Some(k) = &c.algorithm.kl_in_reward {
            let refs = self.trainer.compute_ref_logprobs(&seqs)?;
            let mut tr = Vec::new();
            let (mut kl_sum, mut kl_n) = (0.0f64, 0usize);
            for (s, r) in seqs.iter_mut().zip(&refs) {
                let lp = Tensor::from_slice(s.behavior_logprobs.as_deref().unwrap_or(&[]));
                let kl = Vec::<f32>::try_from(
                    kl_penalty(
                        &lp.f_unsqueeze(0)?,
                        &Tensor::from_slice(r).f_unsqueeze(0)?,
                        k.estimator,
                    )?
                    .f_squeeze_dim(0)?,
                )?;
                kl_sum += kl.iter().map(|&x| x as f64).sum::<f64>();
                kl_n += kl.len();
                tr.push(kl.iter().map(|x| -(k.coef as f32) * x).collect());
                s.ref_logprobs = Some(r.clone());
            }
            m.insert("kl_in_reward/kl".into(), kl_sum / kl_n.max(1) as f64);
            token_rewards = Some(tr);
        }
        m.insert("time/reference_s".into(), t.elapsed().as_secs_f64());
        let values = if self.estimator.needs_values() {
            Some(self.trainer.compute_values(&seqs)?)
        } else {
            None
        };
        let mut input = AdvantageInput::new(&rewards, &group_ids, &lengths);
        if let Some(tr) = &token_rewards {
            input = input.with_token_rewards(tr);
        }
        if let Some(v) = &values {
            input = input.with_values(v);
        }
        let adv = self.estimator.compute(&input)?;
        for (k, v) in &adv.metrics {
            m.insert(k.clone(), *v as f64);
        }
        for (i, s) in seqs.iter_mut().enumerate() {
            s.advantages = adv.advantages[i].clone();
            if let Some(v) = &values {
                s.returns = Some(adv.returns[i].clone());
                s.old_values = Some(v[i].clone());
            }
        }

        // 5. Update.
        let batch = TrainBatch {
            sequences: seqs,
            max_response_len: c.rollout.max_tokens,
        };
        crate::metrics::reset_peak_rss();
        let train_metrics = self.trainer.train_step(batch.clone())?;
        m.extend(train_metrics);
        if let Some(b) = crate::metrics::peak_rss() {
            m.insert("memory/peak_rss_train_bytes".into(), b as f64);
        }
        if let Ok(s) = self.generator.stats() {
            m.insert(
                "memory/kv_cache_bytes_during_training".into(),
                s.kv_cache_bytes as f64,
            );
        }

        // 6. Weight sync.
        if step.is_multiple_of(c.sync.every) {
            self.sync_weights(&mut m)?;
        }

        // Step metrics.
        let n = rewards.len() as f64;
        m.insert(
            "response_length/mean".into(),
            lengths.iter().sum::<usize>() as f64 / n,
        );
        m.insert(
            "response_length/max".into(),
            *lengths.iter().max().unwrap_or(&0) as f64,
        );
        let version = self.trainer.version()?;
        let staleness = versions
            .iter()
            .map(|&v| version.saturating_sub(1).saturating_sub(v))
            .max()
            .unwrap_or(0);
        m.insert("policy/staleness_max".into(), staleness as f64);
        m.insert(
            "policy/rollout_version_min".into(),
            versions.iter().copied().min().unwrap_or(0) as f64,
        );
        if let Some(p) = &self.pool {
            m.insert("generator/restarts".into(), p.restarts() as f64);
            m.insert("generator/processes".into(), p.len() as f64);
        }
        m.insert("policy/version".into(), version as f64);
        m.insert("time/step_s".into(), t_step.elapsed().as_secs_f64());
        self.step = step;

        self.last_rollouts = texts
            .iter()
            .zip(&batch.sequences)
            .zip(&rewards)
            .zip(&versions)
            .map(|((((pt, ct), s), &r), &v)| Rollout {
                prompt: pt.clone(),
                completion: ct.clone(),
                prompt_ids: s.prompt.clone(),
                token_ids: s.response.clone(),
                logprobs: s.behavior_logprobs.clone().unwrap_or_default(),
                reward: r,
                advantages: s.advantages.clone(),
                policy_version: v,
            })
            .collect();
        let adv_flat: Vec<f64> = batch
            .sequences
            .iter()
            .flat_map(|s| s.advantages.iter().map(|&a| a as f64))
            .collect();
        self.sink.step(
            step,
            &m,
            &[
                ("reward", all_rewards.iter().map(|&r| r as f64).collect()),
                ("advantage", adv_flat),
                (
                    "response_length",
                    lengths.iter().map(|&l| l as f64).collect(),
                ),
            ],
            &texts
                .iter()
                .zip(&rewards)
                .take(c.logging.samples)
                .map(|((p, t), r)| {
                    format!(
                        "**reward {r}**\n\n**prompt**\n\n    {}\n\n**completion**\n\n    {}",
                        p.replace('\n', "\n    "),
                        t.replace('\n', "\n    ")
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        self.history.push(m.clone());
        Ok(m)
    }

    /// Runs `n` more training steps (no evaluation or checkpoints), with a progress bar on a
    /// terminal when `progress`; stops early on Ctrl-C. Returns each step's metrics.
    pub fn train_steps(&mut self, n: u64, progress: bool) -> Result<Vec<BTreeMap<String, f64>>> {
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

    /// Samples completions of `prompts` from the current policy (ad hoc, outside training).
    pub fn generate_prompts(
        &self,
        prompts: &[Prompt],
        params: SamplingParams,
    ) -> Result<Vec<Vec<(String, Completion)>>> {
        let items = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(PromptItem {
                    sample: Arc::new(Sample::new(i as u64, p.clone())),
                    ids: self.encode_prompt(p)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let base = (1u64 << 61) | (self.step << 24);
        let groups = self.generate(&items, &params, base)?;
        groups
            .into_iter()
            .map(|g| {
                g.into_iter()
                    .map(|c| Ok((self.decode(&c.token_ids)?, c)))
                    .collect()
            })
            .collect()
    }

    /// Log-probs of `response` tokens after `prompt` under the current policy (trainer side).
    pub fn logprobs(&self, prompt: Vec<i64>, response: Vec<i64>) -> Result<Vec<f32>> {
        let n = response.len();
        let seq = TrainSequence {
            prompt,
            response,
            advantages: vec![0.0; n],
            behavior_logprobs: None,
            returns: None,
            old_values: None,
            ref_logprobs: None,
        };
        Ok(self.trainer.compute_logprobs(&[seq])?.remove(0))
    }

    /// Greedy evaluation on the held-out set.
    pub fn evaluate(&mut self) -> Result<EvalResult> {
        let c = self.recipe.config.clone();
        if self.eval_set.is_empty() {
            bail!("no evaluation set: add data.eval to the recipe");
        }
        let t = Instant::now();
        let mut skipped = 0;
        let items = self.prepare(self.eval_set.clone(), &mut skipped)?;
        let max_tokens = c.eval.max_tokens.unwrap_or(c.rollout.max_tokens);
        let greedy = SamplingParams {
            n: 1,
            temperature: 0.0,
            max_tokens,
            stop: c.rollout.stop.clone(),
            ..SamplingParams::default()
        };
        let eval_id = (1u64 << 62) | ((self.evals.len() as u64) << 24);
        let groups = self.generate(&items, &greedy, eval_id)?;
        let (rewards, _, texts) = self.score(&items, &groups, max_tokens)?;
        self.last_eval = items
            .iter()
            .zip(texts)
            .zip(&rewards)
            .map(|((it, t), &r)| Ok((self.decode(&it.ids)?, t, r)))
            .collect::<Result<_>>()?;
        let n = rewards.len().max(1) as f64;
        let correct = rewards
            .iter()
            .filter(|&&r| r >= c.eval.correct_threshold)
            .count() as f64;
        let mean_len = groups
            .iter()
            .flatten()
            .map(|c| c.token_ids.len())
            .sum::<usize>() as f64
            / n;
        let pass_at_k = if c.eval.pass_k > 0 {
            let params = SamplingParams {
                n: c.eval.pass_k,
                max_tokens,
                ..self.sampling()
            };
            let g = self.generate(&items, &params, eval_id | (1 << 23))?;
            let (r, _, _) = self.score(&items, &g, max_tokens)?;
            let solved = r
                .chunks(c.eval.pass_k)
                .filter(|ch| ch.iter().any(|&x| x >= c.eval.correct_threshold))
                .count();
            Some(solved as f64 / items.len().max(1) as f64)
        } else {
            None
        };
        let res = EvalResult {
            step: self.step,
            problems: rewards.len(),
            accuracy: correct / n,
            mean_reward: rewards.iter().map(|&r| r as f64).sum::<f64>() / n,
            mean_response_len: mean_len,
            pass_at_k,
            seconds: t.elapsed().as_secs_f64(),
        };
        let mut m = BTreeMap::new();
        m.insert("eval/accuracy".to_string(), res.accuracy);
        m.insert("eval/mean_reward".to_string(), res.mean_reward);
        m.insert("eval/response_length".to_string(), res.mean_response_len);
        m.insert("eval/problems".to_string(), res.problems as f64);
        m.insert("eval/seconds".to_string(), res.seconds);
        if let Some(p) = res.pass_at_k {
            m.insert(format!("eval/pass_at_{}", c.eval.pass_k), p);
        }
        self.sink.eval(self.step, &m)?;
        self.evals.push(res.clone());
        Ok(res)
    }

    /// Writes a checkpoint atomically and prunes old ones; returns its directory.
    pub fn save(&mut self) -> Result<PathBuf> {
        let dir = self.run_dir.join("checkpoints");
        std::fs::create_dir_all(&dir)?;
        let final_dir = dir.join(format!("step-{:08}", self.step));
        let tmp = dir.join(format!(".step-{:08}.tmp-{}", self.step, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(tmp.join("trainer"))?;
        self.trainer.save(&tmp.join("trainer"))?;
        let state = ControllerState {
            step: self.step,
            cursor: self.checkpoint_cursor(),
            policy_version: self.trainer.version()?,
            evals: self.evals.clone(),
            manifest: self.manifest.clone(),
        };
        rlrun_model::loader::write_json(&tmp.join("controller_state.json"), &state)?;
        rlrun_model::loader::atomic_write(&tmp.join("recipe.toml"), |f| {
            std::io::Write::write_all(f, self.recipe.resolved.as_bytes())
        })?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        // Keep the newest `keep`.
        let mut all = list_checkpoints(&self.run_dir)?;
        all.sort();
        let keep = self.recipe.config.checkpoint.keep;
        if all.len() > keep {
            for (_, old) in &all[..all.len() - keep] {
                let _ = std::fs::remove_dir_all(old);
            }
        }
        Ok(final_dir)
    }

    /// Writes the current policy as a Hugging Face directory (through the trainer's checkpoint
    /// writer, so it works wherever the trainer runs).
    pub fn export_hf(&self, dir: &Path) -> Result<()> {
        let tmp = tempfile::Builder::new().prefix("rlrun-export-").tempdir()?;
        self.trainer.save(tmp.path())?;
        let policy = tmp.path().join("policy.safetensors");
        let src = rlrun_model::loader::SafetensorsSource::open_files(policy.clone(), &[policy])?;
        let w = rlrun_model::loader::load_weights(
            self.files.layout().clone(),
            &src,
            Kind::Float,
            Device::Cpu,
        )?;
        rlrun_model::save_hf_dir(
            dir,
            &self.files.config,
            &self.files.generation,
            &self.files.tokenizer,
            &w,
            Kind::Float,
        )?;
        Ok(())
    }

    /// Trains to `steps` (evaluating and checkpointing per the recipe), stopping early on Ctrl-C
    /// with a checkpoint. Returns the evaluations made.
    pub fn train(&mut self, progress: bool) -> Result<TrainSummary> {
        let c = self.recipe.config.clone();
        let t0 = Instant::now();
        let has_eval = !self.eval_set.is_empty();
        let before = if has_eval && c.eval.before && self.step == 0 {
            let e = self.evaluate()?;
            tracing::info!(
                "held-out accuracy before training: {:.1}% ({} problems)",
                100.0 * e.accuracy,
                e.problems
            );
            Some(e)
        } else {
            None
        };
        let bar = crate::metrics::Progress::new(c.steps, self.step, progress);
        let mut interrupted = false;
        while self.step < c.steps {
            if STOP.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let m = self.step()?;
            bar.update(self.step, &m);
            if c.eval.every > 0
                && self.step.is_multiple_of(c.eval.every)
                && self.step < c.steps
                && has_eval
            {
                let e = self.evaluate()?;
                bar.message(&format!(
                    "step {}: held-out accuracy {:.1}%",
                    self.step,
                    100.0 * e.accuracy
                ));
            }
            if c.checkpoint.every > 0
                && self.step.is_multiple_of(c.checkpoint.every)
                && self.step < c.steps
            {
                self.save()?;
            }
        }
        bar.finish();
        if STOP.load(Ordering::SeqCst) {
            interrupted = true;
        }
        // Generation started for steps that will not run here: its prompts go back to the stream.
        self.discard_prefetched()?;
        let after = if has_eval && c.eval.after && !interrupted {
            let e = self.evaluate()?;
            tracing::info!(
                "held-out accuracy after training: {:.1}% ({} problems)",
                100.0 * e.accuracy,
                e.problems
            );
            Some(e)
        } else {
            None
        };
        let ckpt = self.save()?;
        if c.checkpoint.export_hf && !interrupted {
            self.export_hf(&self.run_dir.join("final"))?;
        }
        self.sink.flush()?;
        Ok(TrainSummary {
            before,
            after,
            steps: self.step,
            interrupted,
            checkpoint: ckpt,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
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
}

fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = run_dir.join("checkpoints");
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name
                .strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                if e.path().join("controller_state.json").exists() {
                    out.push((n, e.path()));
                }
            }
        }
    }
    Ok(out)
}

/// The newest complete checkpoint of a run.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(run_dir)?.into_iter().max().map(|(_, p)| p))
}
