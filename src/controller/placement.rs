//! Placement: the actors of a run, built from the recipe's `[placement]`: trainer and generator
//! in this process, in child processes (`rlrun actor ...`), or generators reached by address.
//! The weight-sync backend follows from the placement ([`SyncBackend::resolve`]).

use std::path::Path;
use std::sync::Arc;

use rlrun_generator::{EngineConfig, GeneratorActor};
use rlrun_model::{Kind, ModelFiles, Tokenizer, Weights};
use rlrun_trainer::loss::{Correction, PolicyLossConfig};
use rlrun_trainer::{CriticConfig, OptimConfig, TrainerActor, TrainerConfig};
use tch::Device;

use crate::actors::{self, ActorConfig, ActorProcess, GeneratorPool, Role};
use crate::error::{Error, Result};
use crate::recipe::{DeviceChoice, DtypeChoice, Recipe, RecipeConfig};
use crate::sync::SyncBackend;

/// The actors a run drives.
pub(crate) struct Actors {
    pub generator: Box<dyn GeneratorActor>,
    pub trainer: Box<dyn TrainerActor>,
    /// The generator processes, when there are any (also `generator`).
    pub pool: Option<Arc<GeneratorPool>>,
    /// The trainer's device.
    pub device: Device,
    /// The weight-sync backend this placement uses (resolved, never `auto`).
    pub sync: SyncBackend,
    /// The run's token (`placement.token_file`), for actors and the weight store.
    pub token: Option<String>,
    /// The CUDA devices actors in this process compute on (their allocator's figures are this
    /// process's to report).
    pub local_cuda: Vec<usize>,
    /// Actor processes this run spawned (killed on drop).
    _processes: Vec<ActorProcess>,
}

/// Builds the actors for `recipe` on the model `files`.
pub(crate) fn place(
    recipe: &Recipe,
    files: &ModelFiles,
    tokenizer: Arc<Tokenizer>,
) -> Result<Actors> {
    let c = &recipe.config;
    let pl = &c.placement;
    let Plan {
        device,
        gen_device,
        kind,
        uses_ref,
        tcfg,
        ..
    } = plan(c, true)?;
    if pl.trainer.threads > 0 {
        tch::set_num_threads(pl.trainer.threads as i32);
    }
    let token = match &pl.token_file {
        Some(f) => Some(
            rlrun_proto::auth::read_token(Path::new(f))
                .map_err(|e| Error::Usage(format!("placement.token_file: {e}")))?,
        ),
        None => None,
    };
    if let Some(t) = &token {
        // This process's weight-store pulls and sync groups present (and expect) it too.
        rlrun_weights_sync::net::set_client_token(t);
    }
    let mut processes = Vec::new();
    let gen_in_process = !pl.generators_elsewhere();
    // LoRA with trainer and generator in this process on one device: one copy of the frozen
    // base, read by both (the generator only ever updates its adapters).
    let shared_base = if c.model.lora.is_some()
        && !pl.trainer_elsewhere()
        && gen_in_process
        && device == gen_device
    {
        Some(files.load_weights(kind, device)?)
    } else {
        None
    };
    let trainer: Box<dyn TrainerActor> = if !pl.trainer_addresses.is_empty() {
        let mut ranks = Vec::new();
        for addr in &pl.trainer_addresses {
            let client = actors::RemoteTrainer::connect(
                addr,
                token.as_deref(),
                std::time::Duration::from_secs(60),
            )?;
            // Fail now, naming the address, if it is not a trainer that takes our token.
            client.version().map_err(|e| Error::Actor {
                role: Role::Trainer,
                addr: Some(addr.clone()),
                message: format!("health check failed (placement.trainer_addresses): {e}"),
            })?;
            ranks.push(client);
        }
        if ranks.len() == 1 {
            Box::new(ranks.remove(0))
        } else {
            Box::new(actors::DataParallelTrainer::new(ranks))
        }
    } else if pl.trainer.devices.len() > 1 {
        // Data parallel: one trainer process per device, rank 0 listening for the others.
        let world = pl.trainer.devices.len();
        let rendezvous = free_loopback_addr()?;
        let mut ranks = Vec::new();
        for (rank, &d) in pl.trainer.devices.iter().enumerate() {
            let dp = rlrun_trainer::DataParallel {
                rank,
                world,
                rendezvous: rendezvous.clone(),
            };
            let cfg = actor_config(recipe, Role::Trainer, false, Some(dp))?;
            let p = actors::spawn(Role::Trainer, &cfg, &visible_devices(device, &[d]))?;
            let client =
                actors::RemoteTrainer::connect(&p.addr, None, std::time::Duration::from_secs(60))?;
            processes.push(p);
            ranks.push(client);
        }
        let how = if device.is_cuda() {
            "NCCL"
        } else {
            "TCP through rank 0"
        };
        eprintln!("data-parallel trainer: {world} ranks (gradients summed over {how})");
        Box::new(actors::DataParallelTrainer::new(ranks))
    } else if pl.trainer_process {
        let cfg = actor_config(recipe, Role::Trainer, false, None)?;
        let p = actors::spawn(
            Role::Trainer,
            &cfg,
            &visible_devices(device, &pl.trainer.devices),
        )?;
        let client =
            actors::RemoteTrainer::connect(&p.addr, None, std::time::Duration::from_secs(60))
                .map_err(|e| Error::Actor {
                    role: Role::Trainer,
                    addr: Some(p.addr.clone()),
                    message: e.to_string(),
                })?;
        processes.push(p);
        Box::new(client)
    } else {
        Box::new(actors::build_trainer(
            files,
            kind,
            device,
            tcfg,
            uses_ref,
            shared_base.as_ref().map(Weights::shallow_clone),
        )?)
    };

    // Generators: one in this process (its own copy of the weights), or a pool of processes.
    let (generator, pool): (Box<dyn GeneratorActor>, Option<Arc<GeneratorPool>>) =
        if !gen_in_process {
            let pool = if let Some(f) = &pl.generator_addresses_file {
                GeneratorPool::connect_file(Path::new(f), token.clone())?
            } else if pl.generator_addresses.is_empty() {
                let cfg = actor_config(recipe, Role::Generator, false, None)?;
                // Generator i runs on the group's device i (round robin) when on CUDA.
                let d = &pl.generator.devices;
                let envs = (0..pl.generator_processes)
                    .map(|i| visible_devices(gen_device, &[d[i % d.len()]]))
                    .collect();
                GeneratorPool::spawn(cfg, envs)?
            } else {
                GeneratorPool::connect(&pl.generator_addresses, token.clone())?
            };
            (Box::new(pool.clone()), Some(pool))
        } else {
            let g = actors::build_generator(
                files,
                tokenizer,
                kind,
                gen_device,
                engine_config(c),
                shared_base,
            )?;
            (Box::new(g), None)
        };
    let share_process = pool.is_none() && !pl.trainer_elsewhere();
    let mut local_cuda = Vec::new();
    for (here, d) in [
        (!pl.trainer_elsewhere(), device),
        (gen_in_process, gen_device),
    ] {
        if let (true, Device::Cuda(i)) = (here, d) {
            if !local_cuda.contains(&i) {
                local_cuda.push(i);
            }
        }
    }
    Ok(Actors {
        generator,
        trainer,
        pool,
        device,
        local_cuda,
        sync: c.sync.backend.resolve(share_process),
        token,
        _processes: processes,
    })
}

/// What the placement derives from a recipe before building anything.
struct Plan {
    device: Device,
    gen_device: Device,
    kind: Kind,
    uses_ref: bool,
    tcfg: TrainerConfig,
}

/// Devices, compute dtype and the trainer's settings (the off-policy correction resolved for
/// this placement; `announce`: print whether it is on and why).
fn plan(c: &RecipeConfig, announce: bool) -> Result<Plan> {
    let pl = &c.placement;
    let device = pick_device(pl.trainer.device, pl.trainer.devices[0])?;
    let gen_device = pick_device(pl.generator.device, pl.generator.devices[0])?;
    let kind = compute_kind(c.model.dtype, device);
    let uses_ref = c.algorithm.loss.kl.is_some() || c.algorithm.kl_in_reward.is_some();
    let reasons = off_policy_reasons(c, kind, device, gen_device);
    let (loss, warning) = c.algorithm.loss.resolve_off_policy(!reasons.is_empty());
    if announce {
        if let Some(w) = warning {
            eprintln!("warning: {w} ({})", reasons.join(", "));
        }
        match loss.off_policy {
            Some(op) if op.correction != Correction::Off => eprintln!(
                "off-policy correction: {op} (the generator's policy can differ from the trainer's: {})",
                reasons.join(", ")
            ),
            _ => {}
        }
    }
    Ok(Plan {
        device,
        gen_device,
        kind,
        uses_ref,
        tcfg: trainer_config(c, loss),
    })
}

/// What an actor process of `role` loads for `recipe`: the one source of actor settings for
/// processes this run spawns and for those a launcher starts (`rlrun cluster actor-config`,
/// used by the Ray driver). `on_cuda`: the process will see its own GPU (Ray sets
/// `CUDA_VISIBLE_DEVICES` per bundle) whatever the recipe's device choice says; `dp`: a trainer's
/// place in a data-parallel group.
pub fn actor_config(
    recipe: &Recipe,
    role: Role,
    on_cuda: bool,
    dp: Option<rlrun_trainer::DataParallel>,
) -> Result<ActorConfig> {
    let c = &recipe.config;
    let pl = &c.placement;
    let mut p = plan(c, false)?;
    p.tcfg.data_parallel = dp;
    // Launchers start processes in other directories.
    let model = std::fs::canonicalize(&recipe.model_path).unwrap_or(recipe.model_path.clone());
    let device = |d: Device| {
        if on_cuda {
            "cuda:0".to_string()
        } else {
            process_device(d)
        }
    };
    Ok(match role {
        Role::Trainer => ActorConfig {
            model: model.clone(),
            dtype: rlrun_weights_sync::shm::kind_name(p.kind).to_string(),
            device: device(p.device),
            threads: pl.trainer.threads,
            engine: None,
            trainer: Some(p.tcfg),
            reference: p.uses_ref,
        },
        Role::Generator => ActorConfig {
            model,
            dtype: rlrun_weights_sync::shm::kind_name(p.kind).to_string(),
            device: device(p.gen_device),
            threads: pl.generator.threads,
            engine: Some(engine_config(c)),
            trainer: None,
            reference: false,
        },
    })
}

/// Why the generator's policy (the behaviour policy) can differ from the trainer's before an
/// update; empty when they are the same model computed the same way.
fn off_policy_reasons(
    c: &RecipeConfig,
    kind: Kind,
    device: Device,
    gen_device: Device,
) -> Vec<String> {
    let pl = &c.placement;
    let mut why = Vec::new();
    if c.rollout.max_staleness > 0 {
        why.push(format!(
            "rollout.max_staleness = {}",
            c.rollout.max_staleness
        ));
    }
    if c.sync.every > 1 {
        why.push(format!("sync.every = {}", c.sync.every));
    }
    if kind != Kind::Float {
        why.push(format!("{kind:?} compute"));
    }
    if pl.generators_elsewhere() {
        why.push("generators in other processes".into());
    }
    if pl.trainer_elsewhere() {
        why.push("the trainer in its own process".into());
    }
    if device != gen_device {
        why.push(format!(
            "trainer on {device:?}, generator on {gen_device:?}"
        ));
    }
    why
}

/// The trainer's settings from the recipe, with the run's policy loss (off-policy correction
/// resolved).
fn trainer_config(c: &RecipeConfig, loss: PolicyLossConfig) -> TrainerConfig {
    TrainerConfig {
        optim: c.trainer.optim(),
        loss,
        ppo_epochs: c.trainer.ppo_epochs,
        mini_batches: c.trainer.mini_batches,
        micro_batch_tokens: c.trainer.micro_batch_tokens,
        logprob_chunk: c.trainer.logprob_chunk,
        temperature: c.rollout.temperature,
        activation_checkpointing: c.trainer.activation_checkpointing,
        entropy_metric: c.trainer.entropy_metric,
        routing_replay: c.trainer.routing_replay,
        router_aux_loss_coef: c.trainer.router_aux_loss_coef,
        lora: c.model.lora.clone(),
        seed: c.seed,
        data_parallel: None,
        critic: c.trainer.critic.as_ref().map(|cs| CriticConfig {
            optim: OptimConfig {
                lr: cs.lr,
                weight_decay: cs.weight_decay,
                grad_clip: (cs.grad_clip > 0.0).then_some(cs.grad_clip),
                ..c.trainer.optim()
            },
            cliprange_value: cs.cliprange_value,
        }),
    }
}

/// The generator engine's settings: slots for a step's rollouts (and evaluation), room for the
/// longest prompt plus the longest completion.
fn engine_config(c: &RecipeConfig) -> EngineConfig {
    let slots = c
        .rollout
        .max_slots
        .unwrap_or(c.data.prompts_per_step * c.rollout.n)
        .max(c.rollout.n);
    let eval_slots = c.eval.size.unwrap_or(256).min(256);
    let max_len =
        c.data.max_prompt_tokens + c.rollout.max_tokens.max(c.eval.max_tokens.unwrap_or(0)) + 1;
    EngineConfig {
        max_slots: slots.max(eval_slots),
        max_len,
        max_prefill_tokens: rlrun_generator::RUN_PREFILL_TOKENS,
        seed: c.seed,
        update_policy: c.rollout.update_policy,
        lora: c.model.lora.clone(),
        // Multi-turn episodes continue their conversations: keep finished turns' caches (as
        // many tokens as the cache itself holds at most).
        prefix_cache_tokens: if c.environment.is_some() {
            slots.max(eval_slots) * max_len
        } else {
            0
        },
    }
}

/// The compute dtype: `auto` is bf16 on CUDA, f32 on the CPU.
fn compute_kind(choice: DtypeChoice, device: Device) -> Kind {
    match choice {
        DtypeChoice::Auto if device.is_cuda() => Kind::BFloat16,
        DtypeChoice::Auto | DtypeChoice::F32 => Kind::Float,
        DtypeChoice::Bf16 => Kind::BFloat16,
        DtypeChoice::F16 => Kind::Half,
    }
}

/// An actor process sees only its devices (`CUDA_VISIBLE_DEVICES`): its first is `cuda:0`.
fn process_device(d: Device) -> String {
    match d {
        Device::Cuda(_) => "cuda:0".to_string(),
        _ => "cpu".to_string(),
    }
}

/// The environment that pins an actor process to `devices` (nothing on the CPU). The indices
/// are this process's: mapped through its own `CUDA_VISIBLE_DEVICES` when that is set.
/// A loopback address free a moment ago (the rendezvous of a data-parallel trainer's ranks).
fn free_loopback_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Usage(format!("finding a free loopback port: {e}")))?;
    let a = l
        .local_addr()
        .map_err(|e| Error::Usage(format!("finding a free loopback port: {e}")))?;
    Ok(a.to_string())
}

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
        DeviceChoice::Cuda if !tch::Cuda::is_available() => {
            return Err(Error::Placement(
                "placement asks for CUDA but no CUDA device is available".into(),
            ))
        }
        DeviceChoice::Cuda => Device::Cuda(index),
        DeviceChoice::Auto if tch::Cuda::is_available() => Device::Cuda(index),
        DeviceChoice::Auto => Device::Cpu,
    })
}
