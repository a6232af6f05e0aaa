//! The actor layer: what an actor is ([`Role`], [`ActorConfig`]), the one factory for each engine
//! (used by the controller's process and by `rlrun actor`), and the actors over gRPC.
//!
//! - [`rpc`]: the one RPC helper (connection, blocking calls, streams, status mapping);
//! - [`generator`], [`trainer`]: each actor's gRPC service and client (the engines in
//!   `rlrun-generator` and `rlrun-trainer` know nothing of transport);
//! - [`process`]: spawning `rlrun actor` processes, and their exit with the parent;
//! - [`pool`]: generator processes as one actor, restarting a member that dies;
//! - [`serve`]: `rlrun actor generator|trainer`, the server side.

pub mod generator;
pub mod pool;
pub mod process;
pub mod rpc;
pub mod trainer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rlrun_generator::{Engine, EngineConfig, LocalGenerator};
use rlrun_model::{Kind, ModelFiles, Tokenizer, Weights};
use rlrun_trainer::{LocalTrainer, Trainer, TrainerConfig};
use serde::{Deserialize, Serialize};
use tch::Device;

pub use generator::{GeneratorService, RemoteGenerator};
pub use pool::GeneratorPool;
pub use process::{exit_now, exit_with_parent, rlrun_exe, spawn, ActorProcess};
pub use rpc::CallError;
pub use trainer::{DataParallelTrainer, RemoteTrainer, TrainerService};

use crate::error::{Error, IoContext, Result};

/// What an actor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Generator,
    Trainer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Generator => "generator",
            Role::Trainer => "trainer",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an actor process loads (`--config`, JSON; unknown keys are errors).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorConfig {
    pub model: PathBuf,
    /// "f32", "bf16" or "f16": the compute dtype.
    pub dtype: String,
    /// "cpu" or "cuda:N".
    pub device: String,
    /// Torch CPU threads (0: default).
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub engine: Option<EngineConfig>,
    #[serde(default)]
    pub trainer: Option<TrainerConfig>,
    /// Load a frozen reference model (KL).
    #[serde(default)]
    pub reference: bool,
}

impl ActorConfig {
    /// A generator of `model` in f32 on the CPU with one thread and default engine settings
    /// (benchmarks' and tests' generator processes).
    pub fn cpu_generator(model: &Path) -> Self {
        ActorConfig {
            model: model.to_path_buf(),
            dtype: "f32".into(),
            device: "cpu".into(),
            threads: 1,
            engine: None,
            trainer: None,
            reference: false,
        }
    }
}

fn kind_of(s: &str) -> Result<Kind> {
    rlrun_weights_sync::shm::kind_from_name(s)
        .ok_or_else(|| Error::Usage(format!("actor config: unknown dtype `{s}`")))
}

fn device_of(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        s if s.starts_with("cuda") => Device::Cuda(
            s.strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .unwrap_or(0),
        ),
        other => {
            return Err(Error::Usage(format!(
                "actor config: unknown device `{other}`"
            )))
        }
    })
}

/// The generator engine on `device` in `kind`, on its own thread: the one factory for a
/// generator in the controller's process and in `rlrun actor generator`. `weights`: already
/// loaded (frozen LoRA base weights shared with the trainer), else read from `files`.
pub fn build_generator(
    files: &ModelFiles,
    tokenizer: Arc<Tokenizer>,
    kind: Kind,
    device: Device,
    cfg: EngineConfig,
    weights: Option<Weights>,
) -> Result<LocalGenerator> {
    let weights = match weights {
        Some(w) => w,
        None => files.load_weights(kind, device)?,
    };
    let engine = Engine::new(
        files.config.clone(),
        weights,
        files.eos_ids(),
        Some(tokenizer),
        cfg,
    )?;
    Ok(LocalGenerator::spawn(engine))
}

/// The trainer: f32 master weights on `device`, computing in `kind`, with a frozen reference
/// copy when `reference`; the one factory for the controller's process and `rlrun actor trainer`.
/// With LoRA: the base in `kind` only (`base` when already loaded, shared with a generator), and
/// no reference copy (the reference is the base with the adapters off).
pub fn build_trainer(
    files: &ModelFiles,
    kind: Kind,
    device: Device,
    cfg: TrainerConfig,
    reference: bool,
    base: Option<Weights>,
) -> Result<LocalTrainer> {
    if cfg.lora.is_some() {
        let base = match base {
            Some(b) => b,
            None => files.load_weights(kind, device)?,
        };
        let trainer = Trainer::new(files.config.clone(), &base, kind, None, cfg)?;
        return Ok(LocalTrainer::new(trainer));
    }
    let master = files.load_weights(Kind::Float, device)?;
    let reference = if reference {
        Some(files.load_weights(kind, device)?)
    } else {
        None
    };
    let trainer = Trainer::new(files.config.clone(), &master, kind, reference, cfg)?;
    Ok(LocalTrainer::new(trainer))
}

/// `rlrun actor <role>`: loads the actor, listens, prints `LISTENING <addr>` on stdout and serves
/// until a Shutdown call (or, for a spawned actor, until its parent exits).
pub fn serve(role: Role, listen: &str, token_file: Option<&Path>, config: &Path) -> Result<()> {
    let usage = |m: String| Error::Actor {
        role,
        addr: Some(listen.to_string()),
        message: m,
    };
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| usage(format!("--listen {listen}: expected host:port")))?;
    let token = match token_file {
        Some(p) => Some(rlrun_proto::auth::read_token(p).map_err(usage)?),
        None => None,
    };
    rlrun_proto::auth::check_listen(&addr, token.as_deref()).map_err(usage)?;
    if let Some(t) = &token {
        // Weight stores of this run (`net` sync) want the same token.
        rlrun_weights_sync::net::set_client_token(t);
    }
    let text = std::fs::read_to_string(config).at(config)?;
    let cfg: ActorConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: config.to_path_buf(),
        source,
    })?;
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads as i32);
    }
    let kind = kind_of(&cfg.dtype)?;
    let device = device_of(&cfg.device)?;
    let files = ModelFiles::open(&cfg.model)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| usage(format!("starting the async runtime: {e}")))?;
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| usage(format!("binding {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| usage(format!("the bound address: {e}")))?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(rlrun_proto::HEARTBEAT_INTERVAL))
        .http2_keepalive_timeout(Some(rlrun_proto::HEARTBEAT_TIMEOUT));
    let router = match role {
        Role::Generator => {
            let tokenizer = Arc::new(files.tokenizer.clone());
            let engine = cfg.engine.clone().unwrap_or_default();
            let actor = Arc::new(build_generator(
                &files, tokenizer, kind, device, engine, None,
            )?);
            builder.add_service(GeneratorService::new(actor, shutdown.clone()).into_server(token))
        }
        Role::Trainer => {
            let tcfg = cfg.trainer.clone().unwrap_or_default();
            let trainer = build_trainer(&files, kind, device, tcfg, cfg.reference, None)?;
            // `net` sync: the trainer's weight store is served on the trainer's own address.
            let store = rlrun_weights_sync::net::WeightStore::new();
            trainer.attach_store(store.clone());
            builder
                .add_service(store.service(token.clone()))
                .add_service(
                    TrainerService::new(Arc::new(trainer), shutdown.clone()).into_server(token),
                )
        }
    };
    println!("LISTENING {bound}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    tracing::info!("{role} actor serving on {bound}");
    rt.block_on(
        router.serve_with_incoming_shutdown(incoming, async move { shutdown.notified().await }),
    )
    .map_err(|e| Error::Actor {
        role,
        addr: Some(bound.to_string()),
        message: format!("serving: {e}"),
    })?;
    Ok(())
}
