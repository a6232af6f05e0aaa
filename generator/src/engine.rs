//! The inference engine: continuous batching over a fixed number of KV-cache slots.
//!
//! Each step (1) applies a pending weight update when the update policy allows, (2) admits queued
//! requests into free slots and prefills them (the prompt of a request's `n` samples is prefilled
//! once, into one slot, and its cache copied to the siblings), and (3) decodes one token for every
//! active sequence. Finished sequences free their slot at once, so queued work starts while the
//! rest keep decoding. Weight updates happen between steps, never mid-token.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use rlrun_model::{CacheWrite, Config, KvCache, Model, Routing, Tokenizer, Weights};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{GenError, Result};
use crate::sampling::{sample, DrawKey, RowParams, SamplingParams};

/// The KV cache starts empty and grows to what admitted requests need: positions in steps of
/// [`CACHE_LEN_STEP`], slots in steps of [`CACHE_SLOT_STEP`] (up to `max_len` and `max_slots`).
const CACHE_LEN_STEP: usize = 64;
const CACHE_SLOT_STEP: usize = 8;

/// One generation request: a tokenized prompt and how to sample it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Caller-chosen id, unique among requests in flight (routing and abort only).
    pub id: u64,
    pub prompt: Vec<i64>,
    pub params: SamplingParams,
    /// What every random draw of this request derives from; `None`: an ad-hoc key made from
    /// the request id ([`Request::draw_key`]).
    #[serde(default)]
    pub key: Option<DrawKey>,
}

impl Request {
    /// The key its draws derive from.
    pub fn draw_key(&self) -> DrawKey {
        self.key.unwrap_or(DrawKey {
            prompt: self.id,
            ..DrawKey::default()
        })
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token (included in `token_ids`) or stop string.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
    /// Aborted by the caller.
    Abort,
}

/// Wall-clock timings of a completion, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From submission until prefill started.
    pub queued_s: f64,
    /// From submission until the first token was sampled.
    pub first_token_s: f64,
    /// From submission until the completion finished.
    pub total_s: f64,
}

/// One sampled completion of a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub request_id: u64,
    /// Which of the request's `n` samples.
    pub index: usize,
    pub prompt_len: usize,
    /// Response token ids (a final stop token included).
    pub token_ids: Vec<i64>,
    /// `log softmax(logits / temperature)[token]` of each response token (see [`crate::sampling`]).
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// Version of the weights that produced every token of this completion.
    pub policy_version: u64,
    pub timings: Timings,
    /// Mixture-of-experts models: the experts each token fed to the model was routed to, for
    /// the prompt and every response token but the last, flattened as `(token, moe_layer, k)`
    /// (for routing replay in the trainer). Empty for dense models.
    pub routes: Vec<i16>,
}

/// What to do with in-flight sequences when new weights arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdatePolicy {
    /// In-flight sequences finish on the old weights; admission pauses until they have, then the
    /// update applies.
    #[default]
    Drain,
    /// In-flight sequences are discarded and re-queued (same sample indices, so the same draws);
    /// the update applies at once.
    AbortRequeue,
}

/// Engine settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Concurrent sequences (KV-cache slots).
    pub max_slots: usize,
    /// Longest sequence (prompt + completion) a slot holds.
    pub max_len: usize,
    /// Prompt tokens prefilled per step (at least one request is always admitted).
    pub max_prefill_tokens: usize,
    /// Default seed of requests that give none.
    pub seed: u64,
    pub update_policy: UpdatePolicy,
    /// LoRA: the engine applies adapters (updated by [`WeightUpdate::Adapters`]) on its weights,
    /// which stay as loaded (and may be shared with a trainer in the same process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<rlrun_model::LoraConfig>,
    /// Multi-turn: the KV cache of finished single-sample sequences is kept, up to this many
    /// tokens in all (the oldest dropped first), so that a request continuing one (its prompt
    /// starts with that sequence's prompt and generated tokens, as a conversation's next turn
    /// does) prefills only its new tokens. 0 (default): off. Dropped at every weight update.
    #[serde(default)]
    pub prefix_cache_tokens: usize,
}

/// The prefill budget (prompt tokens per prefill step) a run's generators use: what
/// `rlrun bench generate` measures too.
pub const RUN_PREFILL_TOKENS: usize = 16_384;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_slots: 64,
            max_len: 1024,
            max_prefill_tokens: 8192,
            seed: 0,
            update_policy: UpdatePolicy::Drain,
            lora: None,
            prefix_cache_tokens: 0,
        }
    }
}

/// New weights for the engine.
pub enum WeightUpdate {
    /// A flat buffer in the engine's parameter layout (any device/dtype; copied in).
    Flat(Tensor),
    /// HF-named tensors (a subset is allowed); each is copied into its view.
    Named(Vec<(String, Tensor)>),
    /// A version published in shared memory: mapped zero-copy and used in place of the current
    /// buffer when it is on the CPU in the engine's dtype (copied in otherwise); LoRA adapters
    /// (`adapters` set) are copied into the engine's adapters.
    Shared(rlrun_weights_sync::shm::WeightsRef),
    /// LoRA adapters: a flat buffer in the adapters' layout (copied in).
    Adapters(Tensor),
}

/// Counters reported by `stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineStats {
    pub queue_depth: usize,
    pub active: usize,
    pub slots: usize,
    /// Fraction of KV-cache positions in use by active sequences.
    pub kv_utilization: f64,
    /// Bytes allocated for the KV cache (it grows to what admitted requests need).
    pub kv_cache_bytes: i64,
    /// Bytes of the KV cache holding active sequences' positions now.
    #[serde(default)]
    pub kv_cache_used_bytes: i64,
    /// The most bytes of the KV cache in use at once since it was last released.
    #[serde(default)]
    pub kv_cache_peak_used_bytes: i64,
    pub generated_tokens: u64,
    pub prefill_tokens: u64,
    pub decode_steps: u64,
    /// Rows the decode forwards computed, summed over steps; equal to the tokens they decoded
    /// when finished sequences are compacted away (no row is spent on a free slot).
    #[serde(default)]
    pub decode_rows: u64,
    /// Tokens the decode steps produced (the first token of each sample comes from its prefill).
    #[serde(default)]
    pub decode_tokens: u64,
    /// Generated tokens per second of engine busy time.
    pub tokens_per_s: f64,
    pub busy_s: f64,
    pub policy_version: u64,
    /// Prompt tokens not prefilled because a kept prefix held them (see
    /// [`EngineConfig::prefix_cache_tokens`]).
    #[serde(default)]
    pub prefix_hit_tokens: u64,
    /// Seconds per decode phase, summed over steps, when `RLRUN_PROFILE=1` (each phase is
    /// synchronized on CUDA, which itself costs time: for diagnosis only).
    pub profile: std::collections::BTreeMap<String, f64>,
}

/// Optional per-phase timing of the decode step (`RLRUN_PROFILE=1`).
struct Profiler {
    device: tch::Device,
    last: std::cell::Cell<Instant>,
    on: bool,
}

impl Profiler {
    fn new(device: tch::Device) -> Self {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var("RLRUN_PROFILE").is_ok_and(|v| v == "1"));
        let p = Profiler {
            device,
            last: std::cell::Cell::new(Instant::now()),
            on,
        };
        p.sync();
        p.last.set(Instant::now());
        p
    }

    fn sync(&self) {
        if let (true, tch::Device::Cuda(i)) = (self.on, self.device) {
            tch::Cuda::synchronize(i as i64);
        }
    }

    fn mark(&self, stats: &mut EngineStats, phase: &str) {
        if !self.on {
            return;
        }
        self.sync();
        let now = Instant::now();
        *stats.profile.entry(phase.to_string()).or_insert(0.0) +=
            (now - self.last.get()).as_secs_f64();
        self.last.set(now);
    }
}

struct ReqState {
    id: u64,
    prompt: Vec<i64>,
    params: SamplingParams,
    stop_ids: Vec<i64>,
    seed: u64,
    key: DrawKey,
    submitted: Instant,
}

struct Pending {
    req: Arc<ReqState>,
    samples: Vec<usize>,
}

/// The KV cache of a finished sequence, kept for a request that continues it.
struct KeptPrefix {
    /// The tokens whose keys and values `kv` holds (prompt and all but the last sampled token).
    tokens: Vec<i64>,
    kv: Vec<Tensor>,
    /// The experts of each of those tokens (mixture-of-experts models).
    routes: Vec<i16>,
    version: u64,
}

struct Seq {
    req: Arc<ReqState>,
    sample: usize,
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    /// Tokens of this sequence already in the cache (prompt + all but the last sampled token).
    pos: i64,
    admitted: Instant,
    first_token: f64,
    /// The experts of each token in the cache (mixture-of-experts models), see [`Completion::routes`].
    routes: Vec<i16>,
}

/// The continuous-batching engine. Single-threaded; the actor runs it on its own thread.
pub struct Engine {
    cfg: EngineConfig,
    config: Arc<Config>,
    weights: Weights,
    /// LoRA adapters, applied in the model's forward or merged into `weights`.
    lora: Option<Lora>,
    model: Model,
    version: u64,
    cache: KvCache,
    slots: Vec<Option<Seq>>,
    queue: VecDeque<Pending>,
    eos: Vec<i64>,
    tokenizer: Option<Arc<Tokenizer>>,
    pending_update: Option<(u64, WeightUpdate)>,
    /// The shared-memory mapping (or pulled buffer) the weights currently live in, if any.
    mapped: Option<rlrun_weights_sync::shm::MappedWeights>,
    /// `net` sync: the buffer of the version before the current one, reused as the staging
    /// buffer of the next pull (a fresh 0.5 GB buffer costs more in page faults than the copy).
    spare: Option<Tensor>,
    aborted: HashSet<u64>,
    stats: EngineStats,
    /// Kept prefixes, oldest first, and their tokens in all.
    prefixes: VecDeque<KeptPrefix>,
    prefix_tokens: usize,
}

impl Engine {
    /// An engine over `weights` (owned: updates are copied into them in place).
    /// `eos` are the default stop ids; `tokenizer` enables stop strings.
    pub fn new(
        config: Arc<Config>,
        weights: Weights,
        eos: Vec<i64>,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
    ) -> Result<Self> {
        if cfg.max_slots == 0 || cfg.max_len < 2 {
            return Err(GenError::InvalidRequest(
                "engine needs max_slots >= 1 and max_len >= 2".into(),
            ));
        }
        let (weights, lora) = match &cfg.lora {
            Some(l) => {
                let l = l.resolved()?;
                let adapters =
                    rlrun_model::lora::init_adapters(&config, &l, cfg.seed, weights.device())?
                        .to(weights.kind(), weights.device())?;
                let scale = l.scale();
                if l.merge {
                    // The loaded weights stay pristine (they may be a trainer's base); the
                    // model reads a merged copy.
                    let merged = weights.to(weights.kind(), weights.device())?;
                    rlrun_model::lora::merge(&merged, &weights, &adapters, scale)?;
                    let lora = Lora {
                        adapters,
                        scale,
                        base: Some(weights),
                    };
                    (merged, Some(lora))
                } else {
                    let lora = Lora {
                        adapters,
                        scale,
                        base: None,
                    };
                    (weights, Some(lora))
                }
            }
            None => (weights, None),
        };
        let model = build(&config, &weights, lora.as_ref())?;
        // Empty: it grows to what admitted requests need (see `admit`).
        let cache = KvCache::new(&config, 0, 0, weights.kind(), weights.device())?;
        let mut stats = EngineStats {
            slots: cfg.max_slots,
            kv_cache_bytes: cache.bytes(),
            ..Default::default()
        };
        stats.policy_version = 0;
        Ok(Engine {
            slots: (0..cfg.max_slots).map(|_| None).collect(),
            cfg,
            config,
            weights,
            lora,
            model,
            version: 0,
            cache,
            queue: VecDeque::new(),
            eos,
            tokenizer,
            pending_update: None,
            mapped: None,
            spare: None,
            aborted: HashSet::new(),
            stats,
            prefixes: VecDeque::new(),
            prefix_tokens: 0,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn weights(&self) -> &Weights {
        &self.weights
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    /// Sets the version tag of the current weights (e.g. after loading a checkpoint).
    pub fn set_version(&mut self, v: u64) {
        self.version = v;
        self.stats.policy_version = v;
    }

    /// Element ranges of the HF tensors (of the adapters, with LoRA), for per-tensor checksums.
    pub fn chunk_ranges(&self) -> Vec<(i64, i64)> {
        self.lora
            .as_ref()
            .map_or(&self.weights, |l| &l.adapters)
            .layout
            .params()
            .iter()
            .map(|p| (p.offset, p.numel))
            .collect()
    }

    /// True when nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.slots.iter().all(Option::is_none)
    }

    /// Frees the KV cache while the engine is idle (it grows back on the next admission), so
    /// that a trainer sharing the device can use the memory; returns the bytes freed (0 when
    /// requests are in flight: nothing is released then).
    pub fn release_cache(&mut self) -> Result<i64> {
        if !self.is_idle() {
            return Ok(0);
        }
        let freed = self.cache.bytes();
        self.spare = None;
        self.prefixes.clear();
        self.prefix_tokens = 0;
        self.cache = KvCache::new(
            &self.config,
            0,
            0,
            self.weights.kind(),
            self.weights.device(),
        )?;
        self.stats.kv_cache_bytes = 0;
        self.stats.kv_cache_peak_used_bytes = 0;
        Ok(freed)
    }

    /// Queues a request after validating it.
    pub fn submit(&mut self, req: Request) -> Result<()> {
        let vocab = self.config.vocab_size;
        req.params.validate(vocab)?;
        if req.prompt.is_empty() {
            return Err(GenError::InvalidRequest(format!(
                "request {}: empty prompt",
                req.id
            )));
        }
        if req.prompt.len() + 1 > self.cfg.max_len {
            return Err(GenError::InvalidRequest(format!(
                "request {}: prompt of {} tokens does not fit the context of {} tokens (max_len)",
                req.id,
                req.prompt.len(),
                self.cfg.max_len
            )));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(GenError::InvalidRequest(format!(
                "request {}: token id {t} is outside the vocabulary (size {vocab})",
                req.id
            )));
        }
        if req.params.n > self.cfg.max_slots {
            return Err(GenError::InvalidRequest(format!(
                "request {}: n = {} exceeds the engine's {} slots",
                req.id, req.params.n, self.cfg.max_slots
            )));
        }
        if self.slots.iter().flatten().any(|s| s.req.id == req.id)
            || self.queue.iter().any(|p| p.req.id == req.id)
        {
            return Err(GenError::InvalidRequest(format!(
                "request id {} is already in flight",
                req.id
            )));
        }
        self.aborted.remove(&req.id);
        let stop_ids = req
            .params
            .stop_token_ids
            .clone()
            .unwrap_or_else(|| self.eos.clone());
        let seed = req.params.seed.unwrap_or(self.cfg.seed);
        let key = req.draw_key();
        let n = req.params.n;
        self.queue.push_back(Pending {
            req: Arc::new(ReqState {
                id: req.id,
                prompt: req.prompt,
                params: req.params,
                stop_ids,
                seed,
                key,
                submitted: Instant::now(),
            }),
            samples: (0..n).collect(),
        });
        Ok(())
    }

    /// Aborts requests: queued ones are dropped and running ones stop; each unfinished sample is
    /// returned as a completion with reason `Abort` (with the tokens it had).
    pub fn abort(&mut self, ids: &[u64]) -> Vec<Completion> {
        let ids: HashSet<u64> = ids.iter().copied().collect();
        let mut out = Vec::new();
        let version = self.version;
        self.queue.retain(|p| {
            if ids.contains(&p.req.id) {
                for &s in &p.samples {
                    out.push(Completion {
                        request_id: p.req.id,
                        index: s,
                        prompt_len: p.req.prompt.len(),
                        token_ids: vec![],
                        logprobs: vec![],
                        finish_reason: FinishReason::Abort,
                        policy_version: version,
                        timings: Timings::default(),
                        routes: vec![],
                    });
                }
                false
            } else {
                true
            }
        });
        for slot in self.slots.iter_mut() {
            if slot.as_ref().is_some_and(|s| ids.contains(&s.req.id)) {
                if let Some(seq) = slot.take() {
                    out.push(finish(seq, FinishReason::Abort, version));
                }
            }
        }
        self.aborted.extend(ids);
        out
    }

    /// Schedules new weights. Applied at once when idle or with [`UpdatePolicy::AbortRequeue`]
    /// (in-flight sequences re-queued); with [`UpdatePolicy::Drain`] once in-flight sequences end.
    pub fn update_weights(&mut self, version: u64, update: WeightUpdate) -> Result<()> {
        self.pending_update = Some((version, update));
        if self.cfg.update_policy == UpdatePolicy::AbortRequeue {
            self.requeue_active();
        }
        self.maybe_apply_update()
    }

    fn requeue_active(&mut self) {
        let mut by_req: HashMap<u64, Pending> = HashMap::new();
        let mut order = Vec::new();
        for slot in self.slots.iter_mut() {
            if let Some(seq) = slot.take() {
                let e = by_req.entry(seq.req.id).or_insert_with(|| {
                    order.push(seq.req.id);
                    Pending {
                        req: seq.req.clone(),
                        samples: Vec::new(),
                    }
                });
                e.samples.push(seq.sample);
            }
        }
        for id in order.into_iter().rev() {
            if let Some(p) = by_req.remove(&id) {
                self.queue.push_front(p);
            }
        }
    }

    fn maybe_apply_update(&mut self) -> Result<()> {
        if self.pending_update.is_none() || self.slots.iter().any(Option::is_some) {
            return Ok(());
        }
        let Some((version, update)) = self.pending_update.take() else {
            return Ok(());
        };
        let _guard = tch::no_grad_guard();
        let adapters = self.lora.as_ref().map(|l| l.adapters.shallow_clone());
        match (update, &adapters) {
            (WeightUpdate::Shared(r), Some(a)) if r.adapters => {
                if r.numel as i64 != a.layout.numel() {
                    return Err(GenError::Weights(format!(
                        "{}: {} adapter elements, the engine's adapters have {}",
                        r.location(),
                        r.numel,
                        a.layout.numel()
                    )));
                }
                let ranges = self.chunk_ranges();
                let (mapped, _) =
                    rlrun_weights_sync::receive(&r, Some(&ranges), None, self.weights.device())
                        .map_err(|e| GenError::Weights(e.to_string()))?;
                self.set_adapters(a, &mapped.tensor)?;
            }
            (WeightUpdate::Adapters(t), Some(a)) => self.set_adapters(a, &t)?,
            (WeightUpdate::Adapters(_), None) => {
                return Err(GenError::Weights(
                    "LoRA adapters sent to an engine without adapters (no [model.lora])".into(),
                ))
            }
            (WeightUpdate::Shared(r), _) if r.adapters => {
                return Err(GenError::Weights(format!(
                    "{}: LoRA adapters sent to an engine without adapters (no [model.lora])",
                    r.location()
                )))
            }
            (_, Some(_)) => {
                return Err(GenError::Weights(
                    "full weights sent to an engine that applies LoRA adapters: send adapters"
                        .into(),
                ))
            }
            (WeightUpdate::Shared(r), None) => {
                if r.numel as i64 != self.weights.layout.numel() {
                    return Err(GenError::Weights(format!(
                        "{}: {} elements, the model has {}",
                        r.location(),
                        r.numel,
                        self.weights.layout.numel()
                    )));
                }
                let ranges = self.chunk_ranges();
                let (mapped, _) = rlrun_weights_sync::receive(
                    &r,
                    Some(&ranges),
                    self.spare.take(),
                    self.weights.device(),
                )
                .map_err(|e| GenError::Weights(e.to_string()))?;
                if self.weights.device() == tch::Device::Cpu && self.weights.kind() == r.kind {
                    // Swap: the model now reads the new buffer; the previous mapping is released
                    // (a previous pulled buffer becomes the next pull's staging buffer).
                    self.weights.flat = mapped.tensor.shallow_clone();
                    self.model = build(&self.config, &self.weights, None)?;
                    self.spare = self
                        .mapped
                        .replace(mapped)
                        .and_then(rlrun_weights_sync::shm::MappedWeights::into_spare);
                } else {
                    self.weights.flat.f_copy_(&mapped.tensor)?;
                    self.mapped = None;
                    self.spare = mapped.into_spare();
                }
            }
            (WeightUpdate::Flat(t), None) => {
                if t.size() != self.weights.flat.size() {
                    return Err(GenError::Weights(format!(
                        "flat buffer of {:?} elements, the model has {}",
                        t.size(),
                        self.weights.layout.numel()
                    )));
                }
                self.weights.flat.f_copy_(&t)?;
            }
            (WeightUpdate::Named(list), None) => {
                for (name, t) in list {
                    let spec = self
                        .weights
                        .layout
                        .param(&name)
                        .ok_or_else(|| GenError::Weights(format!("unknown tensor `{name}`")))?
                        .clone();
                    if t.size() != spec.shape {
                        return Err(GenError::Weights(format!(
                            "tensor `{name}` has shape {:?}, expected {:?}",
                            t.size(),
                            spec.shape
                        )));
                    }
                    let mut view = self.weights.layout.param_view(&self.weights.flat, &spec)?;
                    view.f_copy_(&t)?;
                }
            }
        }
        self.version = version;
        self.stats.policy_version = version;
        self.prefixes.clear();
        self.prefix_tokens = 0;
        Ok(())
    }

    /// Copies a flat adapter buffer into the engine's adapters `a` (and re-merges, if merging).
    fn set_adapters(&mut self, a: &Weights, t: &Tensor) -> Result<()> {
        if t.size() != a.flat.size() {
            return Err(GenError::Weights(format!(
                "adapter buffer of {:?} elements, the engine's adapters have {}",
                t.size(),
                a.layout.numel()
            )));
        }
        a.flat.shallow_clone().f_copy_(t)?;
        self.merge_adapters()
    }

    /// With merged adapters: the weights recomputed from the base and the current adapters.
    fn merge_adapters(&mut self) -> Result<()> {
        if let Some(Lora {
            adapters,
            scale,
            base: Some(base),
        }) = &self.lora
        {
            rlrun_model::lora::merge(&self.weights, base, adapters, *scale)?;
        }
        Ok(())
    }

    /// Runs one scheduling step; returns the completions that finished in it.
    pub fn step(&mut self) -> Result<Vec<Completion>> {
        let t0 = Instant::now();
        let _guard = tch::no_grad_guard();
        self.maybe_apply_update()?;
        let mut done = Vec::new();
        if self.pending_update.is_none() {
            self.admit(&mut done)?;
        }
        self.decode(&mut done)?;
        self.stats.busy_s += t0.elapsed().as_secs_f64();
        Ok(done)
    }

    /// Steps until every queued and running request has finished.
    pub fn run_to_completion(&mut self) -> Result<Vec<Completion>> {
        let mut out = Vec::new();
        while !self.is_idle() || self.pending_update.is_some() {
            out.extend(self.step()?);
            if self.is_idle() {
                self.maybe_apply_update()?;
                break;
            }
        }
        Ok(out)
    }

    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        s.queue_depth = self.queue.iter().map(|p| p.samples.len()).sum();
        s.active = self.slots.iter().flatten().count();
        let used: i64 = self.slots.iter().flatten().map(|q| q.pos + 1).sum();
        s.kv_cache_used_bytes = used * self.cache.bytes_per_position();
        let capacity = self.cache.slots() as f64 * self.cache.max_len() as f64;
        s.kv_utilization = if capacity > 0.0 {
            used as f64 / capacity
        } else {
            0.0
        };
        s.tokens_per_s = if s.busy_s > 0.0 {
            s.generated_tokens as f64 / s.busy_s
        } else {
            0.0
        };
        s
    }

    /// Admits queued requests into free slots and prefills them.
    fn admit(&mut self, done: &mut Vec<Completion>) -> Result<()> {
        let mut free: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_none())
            .collect();
        let mut groups: Vec<(Pending, Vec<usize>)> = Vec::new();
        let mut budget = self.cfg.max_prefill_tokens;
        while let Some(p) = self.queue.front() {
            let need = p.samples.len();
            let len = p.req.prompt.len();
            if need > free.len() || (!groups.is_empty() && len > budget) {
                break;
            }
            let p = self.queue.pop_front().expect("front exists");
            let assigned: Vec<usize> = free.drain(..need).collect();
            budget = budget.saturating_sub(len);
            groups.push((p, assigned));
        }
        if groups.is_empty() {
            return Ok(());
        }
        // Room for the longest prompt plus its completion (capped by the context length).
        let need = groups
            .iter()
            .map(|(p, _)| p.req.prompt.len() + p.req.params.max_tokens)
            .max()
            .unwrap_or(0)
            .min(self.cfg.max_len);
        let need = need.div_ceil(CACHE_LEN_STEP) * CACHE_LEN_STEP;
        // Slots up to the highest one assigned (free slots are taken lowest first).
        let slots = groups
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .chain(self.slots.iter().rposition(Option::is_some))
            .max()
            .map_or(0, |s| s + 1);
        let slots = slots.div_ceil(CACHE_SLOT_STEP) * CACHE_SLOT_STEP;
        self.cache.reserve(
            slots.min(self.cfg.max_slots) as i64,
            need.min(self.cfg.max_len) as i64,
        )?;
        self.stats.kv_cache_bytes = self.cache.bytes();
        let device = self.weights.device();
        // Prompts that continue a kept prefix start after it, its keys and values copied in.
        let mut start = Vec::with_capacity(groups.len());
        let mut kept_routes = Vec::with_capacity(groups.len());
        for (p, slots) in &groups {
            match self.take_prefix(&p.req.prompt) {
                Some(k) => {
                    self.cache.import_prefix(slots[0] as i64, &k.kv)?;
                    start.push(k.tokens.len() as i64);
                    self.stats.prefix_hit_tokens += k.tokens.len() as u64;
                    kept_routes.push(k.routes);
                }
                None => {
                    start.push(0);
                    kept_routes.push(Vec::new());
                }
            }
        }
        let g = groups.len() as i64;
        let t = groups
            .iter()
            .zip(&start)
            .map(|((p, _), &s)| p.req.prompt.len() - s as usize)
            .max()
            .unwrap_or(1) as i64;
        let mut ids = vec![0i64; (g * t) as usize];
        let mut lens = Vec::with_capacity(groups.len());
        let mut primaries = Vec::with_capacity(groups.len());
        for (r, (p, slots)) in groups.iter().enumerate() {
            let new = &p.req.prompt[start[r] as usize..];
            ids[r * t as usize..r * t as usize + new.len()].copy_from_slice(new);
            lens.push(new.len() as i64);
            primaries.push(slots[0] as i64);
        }
        let ids_t = Tensor::from_slice(&ids)
            .f_view([g, t])?
            .f_to_device(device)?;
        let slots_t = Tensor::from_slice(&primaries).f_to_device(device)?;
        let routing = Routing::default();
        let hidden = self.model.forward_cached_routed(
            &ids_t,
            &mut self.cache,
            &CacheWrite {
                slots: &slots_t,
                slots_host: &primaries,
                start: &start,
                lens: &lens,
            },
            &routing,
        )?; // (G, T, H)
        let prompt_routes = routes_by_row(&routing, groups.len())?;
        let last = Tensor::from_slice(&lens.iter().map(|l| l - 1).collect::<Vec<_>>())
            .f_to_device(device)?
            .f_view([g, 1, 1])?
            .f_expand([g, 1, hidden.size()[2]], false)?;
        let last_h = hidden.f_gather(1, &last, false)?.f_squeeze_dim(1)?; // (G, H)
        let logits = self.model.logits(&last_h)?; // (G, V)
        self.stats.prefill_tokens += lens.iter().sum::<i64>() as u64;
        // Share the prompt's cache with the group's other slots; one logits row per sample.
        let mut row_of_sample = Vec::new();
        let mut rows = Vec::new();
        let now = Instant::now();
        for (r, (p, slots)) in groups.iter().enumerate() {
            if slots.len() > 1 {
                let dst: Vec<i64> = slots[1..].iter().map(|&s| s as i64).collect();
                self.cache
                    .copy_prefix(slots[0] as i64, &dst, start[r] + lens[r])?;
            }
            for &s in &p.samples {
                row_of_sample.push(r as i64);
                rows.push(row_params(&p.req, s, 0));
            }
        }
        let sel = Tensor::from_slice(&row_of_sample).f_to_device(device)?;
        let (tokens, lps) = sample(&logits.f_index_select(0, &sel)?, &rows)?;
        let (tokens, lps) = to_host(&tokens, &lps)?;
        let mut k = 0;
        for (((p, slots), routes), mut kept) in
            groups.into_iter().zip(prompt_routes).zip(kept_routes)
        {
            // Only the prompt's valid tokens (the row is padded to the longest prompt), after
            // those of a kept prefix.
            let per_token = routes.len() / t as usize;
            let new = p.req.prompt.len() - kept.len() / per_token.max(1);
            kept.extend_from_slice(&routes[..per_token * new.min(t as usize)]);
            let routes = &kept[..];
            for (&sample_idx, &slot) in p.samples.iter().zip(&slots) {
                let seq = Seq {
                    routes: routes.to_vec(),
                    req: p.req.clone(),
                    sample: sample_idx,
                    tokens: vec![tokens[k]],
                    logprobs: vec![lps[k]],
                    pos: p.req.prompt.len() as i64,
                    admitted: now,
                    first_token: p.req.submitted.elapsed().as_secs_f64(),
                };
                k += 1;
                self.stats.generated_tokens += 1;
                match self.finish_reason(&seq) {
                    Some(reason) => {
                        self.keep_prefix(slot, &seq, reason)?;
                        done.push(finish(seq, reason, self.version));
                    }
                    None => self.slots[slot] = Some(seq),
                }
            }
        }
        Ok(())
    }

    /// Decodes one token for every active sequence.
    fn decode(&mut self, done: &mut Vec<Completion>) -> Result<()> {
        self.compact()?;
        let Some(last_active) = self.slots.iter().rposition(Option::is_some) else {
            return Ok(());
        };
        let b = last_active + 1;
        let device = self.weights.device();
        let mut ids = vec![0i64; b];
        let mut start = vec![0i64; b];
        let mut active_rows = Vec::new();
        let mut params = Vec::new();
        for (i, slot) in self.slots[..b].iter().enumerate() {
            if let Some(seq) = slot {
                ids[i] = *seq.tokens.last().expect("a sequence has a token");
                start[i] = seq.pos;
                active_rows.push(i as i64);
                params.push(row_params(&seq.req, seq.sample, seq.tokens.len() as u64));
            }
        }
        let profile = Profiler::new(device);
        rlrun_model::profile::start(device);
        let ident: Vec<i64> = (0..b as i64).collect();
        let ident_t = Tensor::f_arange(b as i64, (Kind::Int64, device))?;
        // The step's tokens and the sampling settings go to the device in one copy (f64 holds
        // token ids exactly).
        let vocab = self.model.lm_head_weight().size()[0];
        let mut host: Vec<f64> = ids.iter().map(|&t| t as f64).collect();
        host.extend(crate::sampling::pack(&params, vocab));
        let up = Tensor::from_slice(&host).f_to_device(device)?;
        let ids_t = up
            .f_narrow(0, 0, b as i64)?
            .f_to_kind(Kind::Int64)?
            .f_view([b as i64, 1])?;
        let packed = up.f_narrow(0, b as i64, host.len() as i64 - b as i64)?;
        let routing = Routing::default();
        let hidden = self.model.forward_cached_routed(
            &ids_t,
            &mut self.cache,
            &CacheWrite {
                slots: &ident_t,
                slots_host: &ident,
                start: &start,
                lens: &vec![1; b],
            },
            &routing,
        )?; // (B, 1, H)
        let mut routes = routes_by_row(&routing, b)?;
        let mut h = hidden.f_squeeze_dim(1)?;
        if active_rows.len() < b {
            h = h.f_index_select(0, &Tensor::from_slice(&active_rows).f_to_device(device)?)?;
        }
        profile.mark(&mut self.stats, "decode/forward_s");
        let logits = self.model.logits(&h)?;
        profile.mark(&mut self.stats, "decode/logits_s");
        let (tokens, lps) = crate::sampling::sample_packed(&logits, &params, &packed)?;
        profile.mark(&mut self.stats, "decode/sample_s");
        let (tokens, lps) = to_host(&tokens, &lps)?;
        profile.mark(&mut self.stats, "decode/to_host_s");
        for (k, v) in rlrun_model::profile::take() {
            *self.stats.profile.entry(k).or_insert(0.0) += v;
        }
        self.stats.decode_steps += 1;
        self.stats.decode_rows += b as u64;
        self.stats.decode_tokens += active_rows.len() as u64;
        let used: i64 = self.slots.iter().flatten().map(|q| q.pos + 1).sum();
        self.stats.kv_cache_peak_used_bytes = self
            .stats
            .kv_cache_peak_used_bytes
            .max(used * self.cache.bytes_per_position());
        for (k, &row) in active_rows.iter().enumerate() {
            let slot = row as usize;
            let Some(seq) = self.slots[slot].as_mut() else {
                continue;
            };
            seq.pos += 1;
            seq.routes.append(&mut routes[slot]);
            seq.tokens.push(tokens[k]);
            seq.logprobs.push(lps[k]);
            self.stats.generated_tokens += 1;
            if let Some(reason) = self.finish_reason(self.slots[slot].as_ref().expect("active")) {
                if let Some(seq) = self.slots[slot].take() {
                    self.keep_prefix(slot, &seq, reason)?;
                    done.push(finish(seq, reason, self.version));
                }
            }
        }
        Ok(())
    }

    /// Moves the highest sequences down into the free low slots that finished sequences left,
    /// so each decode step runs over a dense prefix of exactly the active sequences (the cache
    /// is read as a view, not gathered): a finished sequence costs no more forward rows while
    /// the longest ones finish. Each move copies one sequence's cache prefix once.
    fn compact(&mut self) -> Result<()> {
        let active = self.slots.iter().flatten().count();
        let Some(last) = self.slots.iter().rposition(Option::is_some) else {
            return Ok(());
        };
        if last < active {
            return Ok(()); // already dense
        }
        let mut free: Vec<usize> = (0..active).filter(|&i| self.slots[i].is_none()).collect();
        free.reverse();
        for src in (active..=last).rev() {
            if self.slots[src].is_none() {
                continue;
            }
            let Some(dst) = free.pop() else { break };
            let len = self.slots[src].as_ref().map(|s| s.pos).unwrap_or(0);
            self.cache.copy_prefix(src as i64, &[dst as i64], len)?;
            self.slots[dst] = self.slots[src].take();
        }
        Ok(())
    }

    /// Keeps the cache of a finished single-sample sequence (see
    /// [`EngineConfig::prefix_cache_tokens`]).
    fn keep_prefix(&mut self, slot: usize, seq: &Seq, reason: FinishReason) -> Result<()> {
        let budget = self.cfg.prefix_cache_tokens;
        let len = seq.pos as usize;
        if budget == 0 || seq.req.params.n != 1 || reason == FinishReason::Abort || len > budget {
            return Ok(());
        }
        let prompt = &seq.req.prompt;
        let tokens = [prompt.as_slice(), &seq.tokens[..len - prompt.len()]].concat();
        let kv = self.cache.export_prefix(slot as i64, seq.pos)?;
        while self.prefix_tokens + len > budget {
            let Some(old) = self.prefixes.pop_front() else {
                break;
            };
            self.prefix_tokens -= old.tokens.len();
        }
        self.prefix_tokens += len;
        self.prefixes.push_back(KeptPrefix {
            tokens,
            kv,
            routes: seq.routes.clone(),
            version: self.version,
        });
        Ok(())
    }

    /// Takes the longest kept prefix of `prompt` (shorter than it: at least one token is
    /// prefilled), from these weights.
    fn take_prefix(&mut self, prompt: &[i64]) -> Option<KeptPrefix> {
        let i = self
            .prefixes
            .iter()
            .enumerate()
            .filter(|(_, k)| {
                k.version == self.version
                    && k.tokens.len() < prompt.len()
                    && prompt.starts_with(&k.tokens)
            })
            .max_by_key(|(_, k)| k.tokens.len())?
            .0;
        let k = self.prefixes.remove(i)?;
        self.prefix_tokens -= k.tokens.len();
        Some(k)
    }

    fn finish_reason(&self, seq: &Seq) -> Option<FinishReason> {
        let last = *seq.tokens.last()?;
        if seq.req.stop_ids.contains(&last) {
            return Some(FinishReason::Stop);
        }
        if !seq.req.params.stop.is_empty() {
            if let Some(tok) = &self.tokenizer {
                let tail: Vec<u32> = seq.tokens[seq.tokens.len().saturating_sub(32)..]
                    .iter()
                    .map(|&t| t as u32)
                    .collect();
                if let Ok(text) = tok.decode(&tail, false) {
                    if seq
                        .req
                        .params
                        .stop
                        .iter()
                        .any(|s| text.contains(s.as_str()))
                    {
                        return Some(FinishReason::Stop);
                    }
                }
            }
        }
        if seq.tokens.len() >= seq.req.params.max_tokens || seq.pos + 1 >= self.cache.max_len() {
            return Some(FinishReason::Length);
        }
        None
    }
}

fn row_params(req: &ReqState, sample: usize, position: u64) -> RowParams {
    RowParams {
        temperature: req.params.temperature,
        top_p: req.params.top_p,
        top_k: req.params.top_k,
        min_p: req.params.min_p,
        uniform: req.key.uniform(req.seed, sample as u64, position),
    }
}

/// The sampled tokens and their log-probs on the host, in one copy (f64 holds both exactly).
fn to_host(tokens: &Tensor, lps: &Tensor) -> Result<(Vec<i64>, Vec<f32>)> {
    let both = Tensor::f_cat(
        &[
            tokens.f_to_kind(Kind::Double)?,
            lps.f_to_kind(Kind::Double)?,
        ],
        0,
    )?;
    let both = Vec::<f64>::try_from(both.f_to_device(tch::Device::Cpu)?)?;
    let (t, l) = both.split_at(tokens.numel());
    Ok((
        t.iter().map(|&x| x as i64).collect(),
        l.iter().map(|&x| x as f32).collect(),
    ))
}

fn finish(seq: Seq, reason: FinishReason, version: u64) -> Completion {
    let total = seq.req.submitted.elapsed().as_secs_f64();
    Completion {
        request_id: seq.req.id,
        index: seq.sample,
        prompt_len: seq.req.prompt.len(),
        token_ids: seq.tokens,
        logprobs: seq.logprobs,
        finish_reason: reason,
        policy_version: version,
        timings: Timings {
            queued_s: (seq.admitted - seq.req.submitted).as_secs_f64(),
            first_token_s: seq.first_token,
            total_s: total,
        },
        routes: seq.routes,
    }
}

/// The recorded experts of a forward, `(B, T, moe_layers, k)`, on the host as one `Vec` per row
/// (empty for dense models).
fn routes_by_row(routing: &Routing, rows: usize) -> Result<Vec<Vec<i16>>> {
    let Some(r) = routing.recorded(0)? else {
        return Ok(vec![Vec::new(); rows]);
    };
    let r = r
        .f_to_kind(tch::Kind::Int16)?
        .f_to_device(tch::Device::Cpu)?;
    let width = r.numel() / rows.max(1);
    let flat = Vec::<i16>::try_from(r.f_reshape([-1])?)?;
    Ok(flat.chunks(width.max(1)).map(<[i16]>::to_vec).collect())
}

/// An engine's LoRA adapters.
struct Lora {
    /// The adapters (engine dtype); updates are copied into them.
    adapters: Weights,
    scale: f64,
    /// When merging: the pristine base the merged weights are recomputed from at each update.
    base: Option<Weights>,
}

/// The model over `weights`, with the adapters of `lora` applied in the forward unless they are
/// merged into `weights`.
fn build(config: &Arc<Config>, weights: &Weights, lora: Option<&Lora>) -> Result<Model> {
    Ok(match lora {
        Some(l) if l.base.is_none() => {
            rlrun_model::build_model_with_lora(config.clone(), weights, &l.adapters, l.scale)?
        }
        _ => rlrun_model::build_model(config.clone(), weights)?,
    })
}
