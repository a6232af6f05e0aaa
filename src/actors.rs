//! Actors in their own processes: `rlrun actor generator|trainer` (the server side), spawning them
//! from the controller, and a pool of generator processes that spreads requests by load and
//! restarts a generator that dies (re-queuing its unfinished requests).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rlrun_generator::{
    Completion, CompletionStream, Engine, EngineConfig, EngineStats, GenError, GeneratorActor,
    GeneratorService, LocalGenerator, RemoteGenerator, Request, WeightUpdate,
};
use rlrun_model::{Kind, ModelFiles, Tokenizer};
use rlrun_trainer::{LocalTrainer, Trainer, TrainerConfig, TrainerService};
use rlrun_weights_sync::shm::WeightsRef;
use serde::{Deserialize, Serialize};
use tch::Device;

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
/// generator in the controller's process and in `rlrun actor generator`.
pub fn build_generator(
    files: &ModelFiles,
    tokenizer: Arc<Tokenizer>,
    kind: Kind,
    device: Device,
    cfg: EngineConfig,
) -> Result<LocalGenerator> {
    let weights = files.load_weights(kind, device)?;
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
pub fn build_trainer(
    files: &ModelFiles,
    kind: Kind,
    device: Device,
    cfg: TrainerConfig,
    reference: bool,
) -> Result<LocalTrainer> {
    let master = files.load_weights(Kind::Float, device)?;
    let reference = if reference {
        Some(files.load_weights(kind, device)?)
    } else {
        None
    };
    let trainer = Trainer::new(files.config.clone(), &master, kind, reference, cfg)?;
    Ok(LocalTrainer::new(trainer))
}

/// Exits this process once its parent has gone (a watchdog thread polls the parent pid): a
/// spawned actor never outlives the run that started it, however that run ended.
///
/// Not `PR_SET_PDEATHSIG`: that signal follows the *thread* that forked the child, and the
/// generator pool restarts dead members from short-lived request threads, whose exit would kill
/// the healthy replacement.
pub fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::Builder::new()
        .name("rlrun-parent-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            if std::os::unix::process::parent_id() != parent {
                eprintln!("rlrun actor: parent process {parent} exited; exiting");
                std::process::exit(3);
            }
        })
        .expect("spawning the parent watchdog");
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
            let actor = Arc::new(build_generator(&files, tokenizer, kind, device, engine)?);
            builder.add_service(GeneratorService::new(actor, shutdown.clone()).into_server(token))
        }
        Role::Trainer => {
            let tcfg = cfg.trainer.clone().unwrap_or_default();
            let trainer = build_trainer(&files, kind, device, tcfg, cfg.reference)?;
            builder.add_service(
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

/// A spawned actor process.
pub struct ActorProcess {
    pub child: Child,
    pub addr: String,
    _config: tempfile::NamedTempFile,
}

impl Drop for ActorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `rlrun` binary that actor processes run: `$RLRUN_EXE`, else this executable when it is
/// `rlrun`, else `rlrun` beside it or on the PATH (a library user, e.g. Python, is not `rlrun`).
pub fn rlrun_exe() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RLRUN_EXE") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().at("/proc/self/exe")?;
    if me.file_stem().is_some_and(|n| n == "rlrun") {
        return Ok(me);
    }
    let beside = me.with_file_name("rlrun");
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("rlrun"));
    std::iter::once(beside)
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Usage("actor processes run the `rlrun` binary: set RLRUN_EXE to its path (or put it on the PATH)".into()))
}

/// Starts `rlrun actor <role>` on a free loopback port and waits for it to listen.
pub fn spawn(role: Role, cfg: &ActorConfig, env: &[(String, String)]) -> Result<ActorProcess> {
    let fail = |m: String| Error::Actor {
        role,
        addr: None,
        message: m,
    };
    let mut file = tempfile::Builder::new()
        .prefix("rlrun-actor-")
        .suffix(".json")
        .tempfile()
        .at(std::env::temp_dir())?;
    serde_json::to_writer(&mut file, cfg).map_err(|source| Error::Json {
        path: file.path().to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new(rlrun_exe()?);
    cmd.args([
        "actor",
        role.as_str(),
        "--listen",
        "127.0.0.1:0",
        "--config",
    ])
    .arg(file.path())
    .arg("--exit-with-parent")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("spawning the process: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("no stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("LISTENING ") => {
                break l["LISTENING ".len()..].trim().to_string()
            }
            Some(Ok(_)) => continue,
            _ => {
                let status = child.wait().map_err(|e| fail(e.to_string()))?;
                return Err(fail(format!(
                    "the process exited before listening ({status})"
                )));
            }
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Ok(ActorProcess {
        child,
        addr,
        _config: file,
    })
}

struct Member {
    client: RemoteGenerator,
    process: Option<ActorProcess>,
    /// Bumped at each restart, so that of several callers who saw the old process fail, only the
    /// first restarts it and the others re-queue on its replacement.
    epoch: u64,
}

/// One place in the pool: its own lock (restarting a member does not block the others) and its
/// load, readable without that lock.
struct Slot {
    member: Mutex<Member>,
    /// Samples submitted and not yet finished.
    outstanding: AtomicU64,
}

impl Slot {
    fn new(client: RemoteGenerator, process: Option<ActorProcess>) -> Slot {
        Slot {
            member: Mutex::new(Member {
                client,
                process,
                epoch: 0,
            }),
            outstanding: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::result::Result<std::sync::MutexGuard<'_, Member>, GenError> {
        self.member
            .lock()
            .map_err(|_| GenError::Unavailable("generator pool poisoned".into()))
    }
}

/// Generators in other processes as one [`GeneratorActor`]: requests go to the least loaded
/// member; a member whose process dies is restarted (with the current weights) and its
/// unfinished requests are re-queued on the pool. Sampling is seeded per request and sample, so
/// a re-queued request gives the same completions.
pub struct GeneratorPool {
    /// Itself, for the threads that drive requests.
    me: std::sync::Weak<GeneratorPool>,
    members: Vec<Slot>,
    spawn_cfg: Option<ActorConfig>,
    spawn_env: Vec<Vec<(String, String)>>,
    token: Option<String>,
    current: Mutex<Option<WeightsRef>>,
    restarts: AtomicU64,
}

impl GeneratorPool {
    /// Spawns one generator process per entry of `envs` (each member's extra environment, e.g.
    /// its `CUDA_VISIBLE_DEVICES`; a restarted member gets the same).
    pub fn spawn(cfg: ActorConfig, envs: Vec<Vec<(String, String)>>) -> Result<Arc<Self>> {
        let mut members = Vec::new();
        for env in &envs {
            let p = spawn(Role::Generator, &cfg, env)?;
            let client = RemoteGenerator::connect(&p.addr, None, Duration::from_secs(60))?;
            members.push(Slot::new(client, Some(p)));
        }
        Ok(Arc::new_cyclic(|me| GeneratorPool {
            me: me.clone(),
            members,
            spawn_cfg: Some(cfg),
            spawn_env: envs,
            token: None,
            current: Mutex::new(None),
            restarts: AtomicU64::new(0),
        }))
    }

    /// Connects to generators started elsewhere (not restarted by the pool).
    pub fn connect(addrs: &[String], token: Option<String>) -> Result<Arc<Self>> {
        let mut members = Vec::new();
        for a in addrs {
            let client = RemoteGenerator::connect(a, token.as_deref(), Duration::from_secs(60))?;
            // Fail now, naming the address, if it is not a generator that takes our token.
            client.health().map_err(|e| Error::Actor {
                role: Role::Generator,
                addr: Some(a.clone()),
                message: format!("health check failed (placement.generator_addresses): {e}"),
            })?;
            members.push(Slot::new(client, None));
        }
        Ok(Arc::new_cyclic(|me| GeneratorPool {
            me: me.clone(),
            members,
            spawn_cfg: None,
            spawn_env: Vec::new(),
            token,
            current: Mutex::new(None),
            restarts: AtomicU64::new(0),
        }))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Generator processes restarted so far.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// OS process ids of the spawned members (for tests).
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|s| s.lock().ok()?.process.as_ref().map(|p| p.child.id()))
            .collect()
    }

    /// Replaces member `i` if its process has died; returns whether it was replaced, by this
    /// call or (when `seen` is the epoch a caller saw fail) by another caller since.
    fn revive(&self, i: usize, seen: Option<u64>) -> Result<bool> {
        let mut m = self.members[i].lock()?;
        if seen.is_some_and(|e| e != m.epoch) {
            return Ok(true);
        }
        // A process killed a moment ago may not have been reaped yet (its sockets close first):
        // one that does not answer a health check counts as dead too.
        let dead = match m.process.as_mut() {
            Some(p) => {
                p.child.try_wait().map(|s| s.is_some()).unwrap_or(true)
                    || m.client.health().is_err()
            }
            None => m.client.health().is_err(),
        };
        if dead {
            if let Some(p) = m.process.as_mut() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        if !dead {
            return Ok(false);
        }
        let cfg = self.spawn_cfg.as_ref().ok_or_else(|| Error::Actor {
            role: Role::Generator,
            addr: Some(m.client.addr().to_string()),
            message: "unreachable, and started elsewhere: it cannot be restarted from here".into(),
        })?;
        tracing::warn!("generator {} died; restarting it", m.client.addr());
        let p = spawn(Role::Generator, cfg, &self.spawn_env[i])?;
        let client =
            RemoteGenerator::connect(&p.addr, self.token.as_deref(), Duration::from_secs(60))?;
        if let Some(w) = self
            .current
            .lock()
            .map_err(|_| GenError::Unavailable("generator pool poisoned".into()))?
            .clone()
        {
            client.update_weights(w.version, WeightUpdate::Shared(w))?;
        }
        *m = Member {
            client,
            process: Some(p),
            epoch: m.epoch + 1,
        };
        self.restarts.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    fn least_loaded(&self) -> usize {
        (0..self.members.len())
            .min_by_key(|&i| self.members[i].outstanding.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// Starts `reqs` on member `i` (counted in its load until [`Self::done`]); returns the
    /// stream and the member's epoch.
    fn submit(
        &self,
        i: usize,
        reqs: Vec<Request>,
    ) -> (std::result::Result<CompletionStream, GenError>, u64) {
        let n: u64 = reqs.iter().map(|r| r.params.n as u64).sum();
        self.members[i].outstanding.fetch_add(n, Ordering::SeqCst);
        match self.members[i].lock() {
            Ok(m) => (m.client.generate(reqs), m.epoch),
            Err(e) => (Err(e), 0),
        }
    }

    fn done(&self, i: usize, n: u64) {
        let _ = self.members[i]
            .outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| {
                Some(x.saturating_sub(n))
            });
    }
}

impl GeneratorActor for GeneratorPool {
    fn generate(&self, requests: Vec<Request>) -> std::result::Result<CompletionStream, GenError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let pool = self
            .me
            .upgrade()
            .ok_or_else(|| GenError::Unavailable("generator pool dropped".into()))?;
        // Split the requests over the members, by load.
        let k = pool.len().max(1);
        let mut parts: Vec<Vec<Request>> = vec![Vec::new(); k];
        for (j, r) in requests.into_iter().enumerate() {
            parts[(pool.least_loaded() + j) % k].push(r);
        }
        for (i, part) in parts.into_iter().enumerate().filter(|(_, p)| !p.is_empty()) {
            let pool = pool.clone();
            let tx = tx.clone();
            std::thread::spawn(move || pool.drive(i, part, tx));
        }
        Ok(rx)
    }

    fn update_weights(
        &self,
        version: u64,
        update: WeightUpdate,
    ) -> std::result::Result<(), GenError> {
        let WeightUpdate::Shared(r) = update else {
            return Err(GenError::Weights(
                "generator processes take weights through shared memory".into(),
            ));
        };
        if let Ok(mut c) = self.current.lock() {
            *c = Some(r.clone());
        }
        for i in 0..self.len() {
            let (res, epoch) = {
                let m = self.members[i].lock()?;
                let res = m
                    .client
                    .update_weights(version, WeightUpdate::Shared(r.clone()));
                (res, m.epoch)
            };
            if let Err(e) = res {
                // A dead member is restarted with the current weights.
                if !self
                    .revive(i, Some(epoch))
                    .map_err(|x| GenError::Unavailable(format!("{e}; restart failed: {x:#}")))?
                {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn abort(&self, request_ids: Vec<u64>) -> std::result::Result<(), GenError> {
        for s in &self.members {
            let _ = s.lock()?.client.abort(request_ids.clone());
        }
        Ok(())
    }

    fn stats(&self) -> std::result::Result<EngineStats, GenError> {
        let mut total = EngineStats::default();
        for slot in &self.members {
            let s = slot.lock()?.client.stats()?;
            total.queue_depth += s.queue_depth;
            total.active += s.active;
            total.slots += s.slots;
            total.generated_tokens += s.generated_tokens;
            total.busy_s += s.busy_s;
            total.kv_cache_bytes += s.kv_cache_bytes;
            total.policy_version = s.policy_version;
        }
        Ok(total)
    }

    fn health(&self) -> std::result::Result<(), GenError> {
        for i in 0..self.len() {
            self.revive(i, None)
                .map_err(|e| GenError::Unavailable(format!("{e:#}")))?;
        }
        Ok(())
    }
}

impl GeneratorPool {
    /// Runs `reqs` on member `i`, forwarding completions; on a member failure, revives it and
    /// re-runs the requests whose samples have not all arrived (duplicates are dropped).
    fn drive(
        self: Arc<Self>,
        mut i: usize,
        reqs: Vec<Request>,
        tx: std::sync::mpsc::Sender<std::result::Result<Completion, GenError>>,
    ) {
        let mut delivered: HashSet<(u64, usize)> = HashSet::new();
        let mut pending: Vec<Request> = reqs;
        let mut attempts = 0;
        while !pending.is_empty() {
            let n: u64 = pending.iter().map(|r| r.params.n as u64).sum();
            let (stream, epoch) = self.submit(i, pending.clone());
            let failure = match stream {
                Ok(rx) => {
                    let mut failed = None;
                    for c in rx.iter() {
                        match c {
                            Ok(c) => {
                                if delivered.insert((c.request_id, c.index))
                                    && tx.send(Ok(c)).is_err()
                                {
                                    self.done(i, n);
                                    return;
                                }
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    failed
                }
                Err(e) => Some(e),
            };
            self.done(i, n);
            let want: HashMap<u64, usize> = pending.iter().map(|r| (r.id, r.params.n)).collect();
            pending.retain(|r| (0..want[&r.id]).any(|s| !delivered.contains(&(r.id, s))));
            let Some(e) = failure else {
                if pending.is_empty() {
                    return;
                }
                let _ = tx.send(Err(GenError::Unavailable(
                    "generator stream ended early".into(),
                )));
                return;
            };
            attempts += 1;
            match self.revive(i, Some(epoch)) {
                Ok(true) if attempts <= 3 => {
                    tracing::warn!(
                        "re-queuing {} request(s) after a generator restart",
                        pending.len()
                    );
                }
                Ok(false) if attempts <= 3 => {
                    // The member is alive: the error was the request's own.
                    let _ = tx.send(Err(e));
                    return;
                }
                other => {
                    let why = match other {
                        Err(x) => format!("{e}; restart failed: {x:#}"),
                        _ => format!("{e}; giving up after {attempts} attempts"),
                    };
                    let _ = tx.send(Err(GenError::Unavailable(why)));
                    return;
                }
            }
            i = self.least_loaded().min(self.len().saturating_sub(1));
        }
    }
}
