//! Generator processes as one [`GeneratorActor`]: requests spread by load, a member whose
//! process dies restarted (by the pool, or by the launcher that started it, which then names its
//! new address) with the current weights, its unfinished requests re-queued.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rlrun_generator::{
    Completion, CompletionStream, EngineStats, GenError, GeneratorActor, Request, WeightUpdate,
};
use rlrun_weights_sync::shm::WeightsRef;

use super::process::{spawn, ActorProcess};
use super::{ActorConfig, RemoteGenerator, Role};
use crate::error::{Error, IoContext, Result};

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
/// member, except that a request continuing a single-sample sequence a member finished (a
/// multi-turn conversation's next turn) goes to that member, which kept its cache; a member whose process dies is restarted (with the current weights) and its
/// unfinished requests are re-queued on the pool. Sampling is seeded per request and sample, so
/// a re-queued request gives the same completions.
pub struct GeneratorPool {
    /// Itself, for the threads that drive requests.
    me: std::sync::Weak<GeneratorPool>,
    members: Vec<Slot>,
    spawn_cfg: Option<ActorConfig>,
    spawn_env: Vec<Vec<(String, String)>>,
    token: Option<String>,
    /// Generators started by a launcher that restarts them (the Ray driver): the file where it
    /// keeps their addresses, one per member, re-read when a member dies.
    addresses_file: Option<PathBuf>,
    current: Mutex<Option<WeightsRef>>,
    /// Seconds each member took to take the last weight update (map or pull, swap, acknowledge).
    update_seconds: Mutex<Vec<f64>>,
    restarts: AtomicU64,
    /// Which member holds the kept cache of which finished sequence (multi-turn: a next turn
    /// goes where its conversation's cache is). None when the members keep no caches.
    affinity: Option<Mutex<Affinity>>,
}

/// Finished single-sample sequences (prompt and all but the last sampled token: what a member
/// keeps, see `EngineConfig::prefix_cache_tokens`) by length and hash, and the member that
/// produced each. A routing hint only: a miss or a stale entry costs a full prefill, never a
/// wrong result.
#[derive(Default)]
struct Affinity {
    by_len: std::collections::BTreeMap<usize, HashMap<u64, usize>>,
    entries: usize,
}

/// How long a pool waits for a launcher to start a dead generator again (Ray notices a dead node
/// and restarts its actors elsewhere in seconds).
const RELAUNCH_WAIT: Duration = Duration::from_secs(120);

/// The JSON list of generator addresses a launcher keeps in `file`.
fn read_addresses(file: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file).at(file)?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: file.to_path_buf(),
        source,
    })
}

/// Entries kept at most (then the index starts over).
const AFFINITY_ENTRIES: usize = 1 << 16;

/// Hashes of every prefix of `tokens`: `h[k]` covers `tokens[..k]`.
fn prefix_hashes(tokens: &[i64]) -> Vec<u64> {
    let mut h = Vec::with_capacity(tokens.len() + 1);
    let mut x: u64 = 0xcbf2_9ce4_8422_2325;
    h.push(x);
    for &t in tokens {
        x = (x ^ t as u64)
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(17);
        h.push(x);
    }
    h
}

impl Affinity {
    /// The member whose kept sequence is the longest proper prefix of `prompt`.
    fn member_for(&self, prompt: &[i64]) -> Option<usize> {
        if self.entries == 0 {
            return None;
        }
        let h = prefix_hashes(prompt);
        self.by_len
            .range(..prompt.len())
            .rev()
            .find_map(|(&len, m)| m.get(&h[len]).copied())
    }

    fn record(&mut self, tokens: &[i64], member: usize) {
        if self.entries >= AFFINITY_ENTRIES {
            *self = Affinity::default();
        }
        let h = *prefix_hashes(tokens).last().expect("one hash at least");
        if self
            .by_len
            .entry(tokens.len())
            .or_default()
            .insert(h, member)
            .is_none()
        {
            self.entries += 1;
        }
    }
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
            affinity: cfg
                .engine
                .as_ref()
                .is_some_and(|e| e.prefix_cache_tokens > 0)
                .then(Mutex::default),
            spawn_cfg: Some(cfg),
            spawn_env: envs,
            token: None,
            addresses_file: None,
            current: Mutex::new(None),
            update_seconds: Mutex::default(),
            restarts: AtomicU64::new(0),
        }))
    }

    /// Connects to generators started by a launcher that keeps their addresses in `file` (a JSON
    /// list, rewritten when it restarts one): a member that dies is reconnected at the address
    /// the file gives it next.
    pub fn connect_file(file: &Path, token: Option<String>) -> Result<Arc<Self>> {
        let addrs = read_addresses(file)?;
        Self::connect_with(&addrs, token, Some(file.to_path_buf()))
    }

    /// Connects to generators started elsewhere (not restarted by the pool).
    pub fn connect(addrs: &[String], token: Option<String>) -> Result<Arc<Self>> {
        Self::connect_with(addrs, token, None)
    }

    fn connect_with(
        addrs: &[String],
        token: Option<String>,
        addresses_file: Option<PathBuf>,
    ) -> Result<Arc<Self>> {
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
            addresses_file,
            current: Mutex::new(None),
            update_seconds: Mutex::default(),
            restarts: AtomicU64::new(0),
            // Their engine settings are not known here: route by affinity in case they keep.
            affinity: Some(Mutex::default()),
        }))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Generator processes restarted so far.
    /// Seconds each member took to take the last weight update (in member order).
    pub fn update_seconds(&self) -> Vec<f64> {
        self.update_seconds
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

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
        let old = m.client.addr().to_string();
        let (client, process) = match (&self.spawn_cfg, &self.addresses_file) {
            (Some(cfg), _) => {
                tracing::warn!("generator {old} died; restarting it");
                let p = spawn(Role::Generator, cfg, &self.spawn_env[i])?;
                let client = RemoteGenerator::connect(
                    &p.addr,
                    self.token.as_deref(),
                    Duration::from_secs(60),
                )?;
                (client, Some(p))
            }
            (None, Some(file)) => {
                tracing::warn!(
                    "generator {old} died; waiting for its launcher to start it again (addresses in {})",
                    file.display()
                );
                (self.relaunched(file, i, &old)?, None)
            }
            (None, None) => {
                return Err(Error::Actor {
                    role: Role::Generator,
                    addr: Some(old),
                    message: "unreachable, and started elsewhere: it cannot be restarted from here"
                        .into(),
                })
            }
        };
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
            process,
            epoch: m.epoch + 1,
        };
        self.restarts.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    /// Member `i` as its launcher started it again: the address `file` gives it once that is no
    /// longer `old` and answers a health check (within [`RELAUNCH_WAIT`]).
    fn relaunched(&self, file: &Path, i: usize, old: &str) -> Result<RemoteGenerator> {
        let deadline = std::time::Instant::now() + RELAUNCH_WAIT;
        loop {
            let addr = read_addresses(file)
                .ok()
                .and_then(|a| a.get(i).cloned())
                .filter(|a| a != old);
            if let Some(a) = addr {
                let c = RemoteGenerator::connect(&a, self.token.as_deref(), Duration::from_secs(5));
                if let Ok(c) = c.and_then(|c| c.health().map(|()| c)) {
                    return Ok(c);
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Actor {
                    role: Role::Generator,
                    addr: Some(old.to_string()),
                    message: format!(
                        "died, and its launcher gave no new address in {} within {RELAUNCH_WAIT:?}",
                        file.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Records which member finished `c` (single-sample requests: the ones members keep).
    fn remember(&self, member: usize, reqs: &[Request], c: &Completion) {
        let Some(affinity) = &self.affinity else {
            return;
        };
        let Some(r) = reqs.iter().find(|r| r.id == c.request_id) else {
            return;
        };
        if r.params.n != 1 || c.token_ids.is_empty() {
            return;
        }
        let kept = [&r.prompt[..], &c.token_ids[..c.token_ids.len() - 1]].concat();
        if let Ok(mut a) = affinity.lock() {
            a.record(&kept, member);
        }
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
        // Split the requests over the members, by load; a request continuing a sequence one
        // member finished goes to that member (its kept cache).
        let k = pool.len().max(1);
        let mut parts: Vec<Vec<Request>> = vec![Vec::new(); k];
        let affinity = pool.affinity.as_ref().and_then(|a| a.lock().ok());
        for (j, r) in requests.into_iter().enumerate() {
            let i = affinity
                .as_ref()
                .and_then(|a| a.member_for(&r.prompt))
                .filter(|&i| i < k)
                .unwrap_or((pool.least_loaded() + j) % k);
            parts[i].push(r);
        }
        drop(affinity);
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
                "generator processes take weights through shared memory or the network (a weights reference)".into(),
            ));
        };
        if let Ok(mut c) = self.current.lock() {
            // A restarted member is not in a sync group: it pulls the version from the store.
            *c = Some(WeightsRef {
                group: None,
                ..r.clone()
            });
        }
        // Members drop their kept caches at a weight update.
        if let Some(Ok(mut a)) = self.affinity.as_ref().map(Mutex::lock) {
            *a = Affinity::default();
        }
        // Every member at once: a group broadcast needs them all receiving together.
        let results: Vec<(std::result::Result<(), GenError>, u64, f64)> =
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..self.len())
                    .map(|i| {
                        let mut mine = r.clone();
                        if let Some(g) = mine.group.as_mut() {
                            g.rank = i + 1;
                        }
                        s.spawn(move || {
                            let t = std::time::Instant::now();
                            let m = self.members[i].lock()?;
                            let res = m.client.update_weights(version, WeightUpdate::Shared(mine));
                            Ok((res, m.epoch, t.elapsed().as_secs_f64()))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(GenError::Unavailable("a weight update panicked".into()))
                        })
                    })
                    .collect::<std::result::Result<Vec<_>, GenError>>()
            })?;
        let mut seconds = Vec::with_capacity(self.len());
        for (i, (res, epoch, s)) in results.into_iter().enumerate() {
            seconds.push(s);
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
        if let Ok(mut s) = self.update_seconds.lock() {
            *s = seconds;
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
            total.kv_cache_used_bytes += s.kv_cache_used_bytes;
            total.kv_cache_peak_used_bytes += s.kv_cache_peak_used_bytes;
            total.prefill_tokens += s.prefill_tokens;
            total.prefix_hit_tokens += s.prefix_hit_tokens;
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
                                self.remember(i, &pending, &c);
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
