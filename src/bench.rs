//! `rlrun bench`: our figure and the peer's (transformers / PyTorch via `benches/peer.py`) measured
//! in the same invocation on the same machine, printed with their ratio (ours / peer).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rlrun_generator::{Engine, EngineConfig, Request, SamplingParams};
use rlrun_model::{build_model, CacheWrite, ChatMessage, KvCache, ModelFiles};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::{DeviceArg, DtypeArg};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill throughput (tokens/s): forward of a batch into a KV cache, last-position logits.
    Forward {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 8)]
        batch: i64,
        #[arg(long, default_value_t = 256)]
        seq: i64,
        #[arg(long, default_value_t = 3)]
        iters: usize,
    },
    /// Training throughput (tokens/s): forward + backward + clipping + AdamW step.
    Train(TrainArgs),
    /// Generation throughput (tokens/s): prompts × samples at temperature 1 on the production
    /// decode path (each sequence ends at the model's EOS, the run's prefill budget).
    Generate {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 32)]
        prompts: usize,
        #[arg(long, default_value_t = 8)]
        n: usize,
        /// Measure at each of these batch sizes (sequences decoded together: `size / n` prompts
        /// of `n` samples) instead of `--prompts`, e.g. `--sizes 1,4,16,64,256`.
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 128)]
        max_new: usize,
        /// Random prompts of this many tokens instead of chat prompts (for random-weight models).
        #[arg(long)]
        prompt_len: Option<usize>,
        /// Decode every sequence to `--max-new` tokens, ignoring EOS, on both sides.
        #[arg(long)]
        no_eos: bool,
    },
    /// Weight sync through shared memory to a generator in another process (publish, map,
    /// acknowledge), against a plain memcpy of the same bytes.
    Sync {
        /// Model directory (its f32 weights are what is synced).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Per-tensor checksums, verified by the receiver.
        #[arg(long)]
        checksum: bool,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// `net` weight sync to a generator in another process over loopback (publish into the
    /// weight store, pull as checksummed chunks, swap, acknowledge), against a plain TCP socket
    /// copy of the same bytes to another process.
    NetSync {
        /// Model directory (its f32 weights are what is synced).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The receiving end of `net-sync`'s socket copy (internal): connects to `addr`, reads
    /// `bytes` into one buffer `iters` times, answering one byte after each.
    #[command(hide = true)]
    SocketSink {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        bytes: usize,
        #[arg(long)]
        iters: usize,
    },
    /// Frugal training, in one run: LoRA adapter-only weight sync against full sync (bytes and
    /// time through shared memory to a generator process), and activation checkpointing on
    /// against off (peak memory and time of a training step, each in its own process).
    Memory {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// LoRA rank (all seven projections).
        #[arg(long, default_value_t = 16)]
        rank: i64,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Rows × tokens of the training batch for the checkpointing comparison.
        #[arg(long, default_value_t = 8)]
        batch: i64,
        #[arg(long, default_value_t = 1024)]
        seq: i64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// LoRA on a model that full fine-tuning cannot fit in this machine's memory: a random
    /// Qwen2.5-3B architecture (f32), generator and trainer in this process sharing the frozen
    /// base; a few steps of generation, a LoRA update and an adapter sync, each timed, and the
    /// process's peak memory.
    LoraLarge {
        #[arg(long, default_value_t = 2)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        prompts: usize,
        #[arg(long, default_value_t = 2)]
        n: usize,
        #[arg(long, default_value_t = 16)]
        max_new: usize,
        #[arg(long, default_value_t = 16)]
        rank: i64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Wall time per step of a recipe with asynchronous rollouts (rollout.max_staleness = 1)
    /// against the same recipe on-policy (max_staleness = 0).
    Async {
        recipe: PathBuf,
        /// Overrides applied to both runs.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Multi-turn rollouts with a slow tool: wall time per step of a recipe with an
    /// `[environment]` whose every tool call waits `--latency-ms`, against the same recipe with
    /// instant tools (the waits overlap the other episodes' decoding).
    ToolLatency {
        recipe: PathBuf,
        #[arg(long, default_value_t = 200)]
        latency_ms: u64,
        /// Overrides applied to both runs.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 4)]
    batch: i64,
    #[arg(long, default_value_t = 256)]
    seq: i64,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Recompute each layer in the backward (trainer.activation_checkpointing).
    #[arg(long)]
    activation_checkpointing: bool,
    /// Train LoRA adapters of this rank (all seven projections) instead of all the weights.
    #[arg(long)]
    lora_rank: Option<i64>,
    /// Compute each token's entropy (the `actor/entropy` metric of a run) on both sides.
    #[arg(long)]
    entropy: bool,
}

#[derive(Args)]
pub struct Common {
    /// Model directory (HF layout; the peer loads the same files).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Skip the peer (ours only).
    #[arg(long)]
    no_peer: bool,
    /// Write the result as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure ours and the peer this many times, alternating, and report the medians (each
    /// round is printed): on a shared machine whose speed drifts, drift then hits both sides
    /// alike.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// Tokens/s of ours and of each peer, measured alternately `c.rounds` times.
struct Compared {
    /// Median of ours.
    ours: f64,
    /// Each of ours.
    ours_rounds: Vec<f64>,
    /// Per peer (in the order given): its label, the JSON of its median round, and the ratio
    /// ours / peer of each round. Empty with `--no-peer`.
    peers: Vec<PeerResult>,
}

struct PeerResult {
    label: String,
    median: Value,
    round_ratios: Vec<f64>,
}

impl PeerResult {
    fn rate(&self) -> f64 {
        self.median["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
    }
}

/// Runs `ours` (one measurement, tokens/s) and each peer `(label, args)` alternately.
fn compare(
    c: &Common,
    mut ours: impl FnMut() -> anyhow::Result<f64>,
    peers: &[(&str, Vec<String>)],
) -> anyhow::Result<Compared> {
    let mut mine = Vec::new();
    let mut theirs: Vec<Vec<Value>> = vec![Vec::new(); peers.len()];
    for _ in 0..c.rounds {
        mine.push(ours()?);
        if !c.no_peer {
            for (k, (_, args)) in peers.iter().enumerate() {
                theirs[k].push(peer(args)?);
            }
        }
    }
    let rate = |v: &Value| v["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let results = peers
        .iter()
        .zip(theirs)
        .filter(|(_, runs)| !runs.is_empty())
        .map(|((label, _), mut runs)| {
            let round_ratios = mine.iter().zip(&runs).map(|(m, p)| m / rate(p)).collect();
            runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
            PeerResult {
                label: label.to_string(),
                median: runs[runs.len() / 2].clone(),
                round_ratios,
            }
        })
        .collect();
    Ok(Compared {
        ours: median(mine.clone()),
        ours_rounds: mine,
        peers: results,
    })
}

fn peer(args: &[String]) -> anyhow::Result<Value> {
    let script = Path::new("benches/peer.py");
    if !script.exists() {
        bail!("benches/peer.py not found: run rlrun bench from the repository root");
    }
    // The same torch threads and glibc allocator settings as this process (`tune_allocator`).
    let out = Command::new(rlrun::python())
        .arg(script)
        .args(args)
        .arg(format!("--threads={}", tch::get_num_threads()))
        .envs(rlrun::allocator_env())
        .output()
        .context("running the peer")?;
    if !out.status.success() {
        bail!("peer failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("peer output: {text}"))
}

/// A one-line description of this machine.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let gpu = if tch::Cuda::is_available() {
        format!(", {} CUDA device(s)", tch::Cuda::device_count())
    } else {
        String::new()
    };
    format!(
        "{cpu}, {cores} cores, torch threads {}{gpu}",
        tch::get_num_threads()
    )
}

fn report(
    name: &str,
    unit: &str,
    r: &Compared,
    mut extra: Value,
    json_path: Option<&Path>,
) -> anyhow::Result<Value> {
    let rounds = r.ours_rounds.len().max(1);
    let median_of = if rounds > 1 { "median " } else { "" };
    let each = |v: &[f64]| -> String {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("{name}");
    println!("  machine: {}", machine());
    println!(
        "  rlrun: {median_of}{:.1} {unit} (rounds: {})",
        r.ours,
        each(&r.ours_rounds)
    );
    for p in &r.peers {
        println!(
            "  peer {}: {median_of}{:.1} {unit} ({}; threads {}{})",
            p.label,
            p.rate(),
            p.median["peer"].as_str().unwrap_or("?"),
            p.median["threads"],
            p.median
                .get("settings")
                .and_then(Value::as_str)
                .map(|s| format!("; {s}"))
                .unwrap_or_default()
        );
        println!(
            "  ratio rlrun / {}: {:.2}x (each of {rounds} alternating rounds: {})",
            p.label,
            r.ours / p.rate(),
            each(&p.round_ratios)
        );
    }
    let first = r.peers.first();
    extra["peers"] = json!(r
        .peers
        .iter()
        .map(|p| json!({"label": p.label, "median": p.median, "round_ratios": p.round_ratios}))
        .collect::<Vec<_>>());
    extra["bench"] = json!(name);
    extra["machine"] = json!(machine());
    extra["rlrun_tokens_per_s"] = json!(r.ours);
    extra["rlrun_rounds"] = json!(r.ours_rounds);
    extra["peer_tokens_per_s"] = json!(first.map(PeerResult::rate));
    extra["ratio"] = json!(first.map(|p| r.ours / p.rate()));
    if let Some(path) = json_path {
        std::fs::write(path, serde_json::to_string_pretty(&extra)?)?;
    }
    Ok(extra)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub fn run(what: BenchCommand) -> anyhow::Result<()> {
    match what {
        BenchCommand::Forward {
            common,
            batch,
            seq,
            iters,
        } => forward(&common, batch, seq, iters),
        BenchCommand::Generate {
            common,
            prompts,
            n,
            sizes,
            max_new,
            prompt_len,
            no_eos,
        } => {
            let shapes: Vec<(usize, usize)> = if sizes.is_empty() {
                vec![(prompts, n)]
            } else {
                sizes
                    .iter()
                    .map(|&s| (s.div_ceil(n).max(1), n.min(s.max(1))))
                    .collect()
            };
            generate(&common, &shapes, max_new, prompt_len, !no_eos)
        }
        BenchCommand::Train(a) => train(&a),
        BenchCommand::Sync {
            model,
            iters,
            checksum,
            json,
        } => shm_sync(&model, iters, checksum, json.as_deref()),
        BenchCommand::NetSync { model, iters, json } => net_sync(&model, iters, json.as_deref()),
        BenchCommand::SocketSink { addr, bytes, iters } => socket_sink(&addr, bytes, iters),
        BenchCommand::Async { recipe, set, json } => async_rollouts(&recipe, &set, json.as_deref()),
        BenchCommand::ToolLatency {
            recipe,
            latency_ms,
            set,
            json,
        } => tool_latency(&recipe, latency_ms, &set, json.as_deref()),
        BenchCommand::Memory {
            model,
            rank,
            iters,
            batch,
            seq,
            json,
        } => crate::bench_memory::memory(&model, rank, iters, batch, seq, json.as_deref()),
        BenchCommand::LoraLarge {
            steps,
            prompts,
            n,
            max_new,
            rank,
            json,
        } => crate::bench_memory::lora_large(steps, prompts, n, max_new, rank, json.as_deref()),
    }
}

fn dtype_name(k: Kind) -> &'static str {
    match k {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

fn forward(c: &Common, batch: i64, seq: i64, iters: usize) -> anyhow::Result<()> {
    let device = c.device.device();
    let kind = c.dtype.kind();
    let files = ModelFiles::open(&c.model)?;
    let weights = files.load_weights(kind, device)?;
    let model = build_model(files.config.clone(), &weights)?;
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let ids = Tensor::randint(files.config.vocab_size, [batch, seq], (Kind::Int64, device));
    let mut cache = KvCache::new(&files.config, batch, seq, kind, device)?;
    let slots_host: Vec<i64> = (0..batch).collect();
    let slots = Tensor::from_slice(&slots_host).to_device(device);
    let start = vec![0i64; batch as usize];
    let lens = vec![seq; batch as usize];
    let mut once = || -> anyhow::Result<()> {
        let h = model.forward_cached(
            &ids,
            &mut cache,
            &CacheWrite {
                slots: &slots,
                slots_host: &slots_host,
                start: &start,
                lens: &lens,
            },
        )?;
        let _ = model.logits(&h.narrow(1, seq - 1, 1))?;
        Ok(())
    };
    once()?;
    let measure = || -> anyhow::Result<f64> {
        sync(device);
        let t = Instant::now();
        for _ in 0..iters {
            once()?;
        }
        sync(device);
        Ok((batch * seq) as f64 * iters as f64 / t.elapsed().as_secs_f64())
    };
    let r = compare(
        c,
        measure,
        &[(
            "transformers",
            vec![
                "forward".into(),
                c.model.display().to_string(),
                format!("--batch={batch}"),
                format!("--seq={seq}"),
                format!("--iters={iters}"),
                format!("--dtype={}", dtype_name(kind)),
                format!("--device={}", if device.is_cuda() { "cuda" } else { "cpu" }),
            ],
        )],
    )?;
    report(
        &format!(
            "prefill, batch {batch} x {seq} tokens, {:?} on {device:?}",
            kind
        ),
        "tokens/s",
        &r,
        json!({"batch": batch, "seq": seq, "seconds": (batch * seq) as f64 / r.ours}),
        c.json.as_deref(),
    )
    .map(drop)
}

/// Generation at each `(prompts, n)` shape; one report per shape (and one JSON array).
fn generate(
    c: &Common,
    shapes: &[(usize, usize)],
    max_new: usize,
    prompt_len: Option<usize>,
    eos: bool,
) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for &(n_prompts, n) in shapes {
        all.push(generate_one(c, n_prompts, n, max_new, prompt_len, eos)?);
    }
    if let Some(path) = &c.json {
        let v = if all.len() == 1 {
            all.remove(0)
        } else {
            json!(all)
        };
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

fn generate_one(
    c: &Common,
    n_prompts: usize,
    n: usize,
    max_new: usize,
    prompt_len: Option<usize>,
    eos: bool,
) -> anyhow::Result<Value> {
    let device = c.device.device();
    let kind = c.dtype.kind();
    let files = ModelFiles::open(&c.model)?;
    let prompts: Vec<Vec<i64>> = match prompt_len {
        Some(len) => {
            tch::manual_seed(1);
            let ids = Tensor::randint(
                files.config.vocab_size,
                [n_prompts as i64, len as i64],
                (Kind::Int64, Device::Cpu),
            );
            (0..n_prompts as i64)
                .map(|i| Vec::<i64>::try_from(ids.get(i)).unwrap_or_default())
                .collect()
        }
        None => {
            let tpl = files
                .chat_template()?
                .context("model has no chat template")?;
            (0..n_prompts)
                .map(|i| {
                    let q = format!(
                        "What is {} + {}? Think step by step, then give the answer.",
                        17 + 7 * i,
                        38 + 13 * i
                    );
                    let text = tpl.render(&[ChatMessage::new("user", q)], true)?;
                    Ok(files
                        .tokenizer
                        .encode(&text, false)?
                        .into_iter()
                        .map(i64::from)
                        .collect())
                })
                .collect::<anyhow::Result<_>>()?
        }
    };
    let max_prompt = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let weights = files.load_weights(kind, device)?;
    // The production engine: the run's prefill budget and the model's EOS (unless --no-eos).
    let mut engine = Engine::new(
        files.config.clone(),
        weights,
        files.eos_ids(),
        None,
        EngineConfig {
            max_slots: n_prompts * n,
            max_len: max_prompt + max_new + 1,
            max_prefill_tokens: rlrun_generator::RUN_PREFILL_TOKENS,
            ..Default::default()
        },
    )?;
    let params = SamplingParams {
        n,
        temperature: 1.0,
        max_tokens: max_new,
        stop_token_ids: if eos { None } else { Some(vec![]) },
        seed: Some(0),
        ..Default::default()
    };
    // Warm-up on one short request.
    engine.submit(Request {
        id: u64::MAX,
        prompt: prompts[0].clone(),
        params: SamplingParams {
            n: 1,
            max_tokens: 2,
            ..params.clone()
        },
        key: None,
    })?;
    engine.run_to_completion()?;
    let mut tokens = 0;
    let measure = || -> anyhow::Result<f64> {
        sync(device);
        let t = Instant::now();
        for (i, p) in prompts.iter().enumerate() {
            engine.submit(Request {
                id: i as u64,
                prompt: p.clone(),
                params: params.clone(),
                key: None,
            })?;
        }
        let done = engine.run_to_completion()?;
        sync(device);
        let dt = t.elapsed().as_secs_f64();
        tokens = done.iter().map(|c| c.token_ids.len()).sum();
        Ok(tokens as f64 / dt)
    };
    let tmp = std::env::temp_dir().join(format!("rlrun-bench-prompts-{}.json", std::process::id()));
    std::fs::write(&tmp, json!({ "prompts": prompts }).to_string())?;
    let mut peer_args = vec![
        "generate".into(),
        c.model.display().to_string(),
        format!("--prompts={}", tmp.display()),
        format!("--n={n}"),
        format!("--max-new={max_new}"),
        format!("--dtype={}", dtype_name(kind)),
        format!("--device={}", if device.is_cuda() { "cuda" } else { "cpu" }),
    ];
    if eos {
        peer_args.push("--eos".into());
    }
    let r = compare(c, measure, &[("transformers", peer_args)]);
    let _ = std::fs::remove_file(&tmp);
    let r = r?;
    let stats = engine.stats();
    if !stats.profile.is_empty() {
        println!(
            "  rlrun decode phases (s, summed over {} steps): {:?}",
            stats.decode_steps, stats.profile
        );
    }
    let seqs = n_prompts * n;
    let ends = if eos {
        "ends at EOS"
    } else {
        "runs all tokens"
    };
    let extra = json!({"prompts": n_prompts, "n": n, "batch": seqs, "max_new": max_new, "eos": eos,
        "tokens": tokens, "mean_len": tokens as f64 / seqs as f64, "seconds": tokens as f64 / r.ours,
        "prefill_budget": rlrun_generator::RUN_PREFILL_TOKENS});
    report(
        &format!("generation, batch {seqs} ({n_prompts} prompts x {n} samples), ≤ {max_new} new tokens, {ends}, temperature 1, {kind:?} on {device:?}"),
        "tokens/s",
        &r,
        extra,
        None,
    )
    .inspect(|_| {
        println!(
        "  settings, both sides: temperature 1, top-p 1, top-k off, each sequence {ends} (≤ {max_new} new tokens); rlrun mean length {:.1}, peer {:.1}; rlrun prefill budget {} tokens",
        tokens as f64 / seqs as f64,
        r.peers.first().and_then(|p| p.median["mean_len"].as_f64()).unwrap_or(f64::NAN),
        rlrun_generator::RUN_PREFILL_TOKENS
    );
    })
}

fn train(a: &TrainArgs) -> anyhow::Result<()> {
    use rlrun_trainer::loss::{Aggregation, LossConfig, PolicyLossConfig};
    use rlrun_trainer::{OptimConfig, TrainBatch, TrainSequence, Trainer, TrainerConfig};
    let c = &a.common;
    let device = c.device.device();
    let kind = c.dtype.kind();
    let files = ModelFiles::open(&c.model)?;
    let lora = a.lora_rank.map(|rank| rlrun_model::LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        ..Default::default()
    });
    anyhow::ensure!(
        lora.is_none() || c.no_peer,
        "--lora-rank: the peer here trains all the weights; pass --no-peer"
    );
    // LoRA trains on the base in the compute dtype; full fine-tuning keeps an f32 master.
    let master = files.load_weights(if lora.is_some() { kind } else { Kind::Float }, device)?;
    let cfg = TrainerConfig {
        optim: OptimConfig {
            lr: 1e-6,
            ..Default::default()
        },
        loss: PolicyLossConfig {
            loss: LossConfig::Pg {},
            aggregation: Aggregation::TokenMean,
            ..Default::default()
        },
        micro_batch_tokens: (a.batch * a.seq) as usize,
        activation_checkpointing: a.activation_checkpointing,
        entropy_metric: a.entropy,
        lora,
        ..Default::default()
    };
    let mut trainer = Trainer::new(files.config.clone(), &master, kind, None, cfg)?;
    drop(master);
    // Next-token log-likelihood of random sequences: the first token is the prompt, the rest the
    // response (advantage 1), i.e. the same loss as the peer's `-mean(log p)`.
    tch::manual_seed(0);
    let ids = Tensor::randint(
        files.config.vocab_size,
        [a.batch, a.seq],
        (Kind::Int64, Device::Cpu),
    );
    let batch = TrainBatch {
        sequences: (0..a.batch)
            .map(|i| {
                let row = Vec::<i64>::try_from(ids.get(i)).unwrap_or_default();
                TrainSequence {
                    prompt: row[..1].to_vec(),
                    response: row[1..].to_vec(),
                    advantages: vec![1.0; row.len() - 1],
                    ..Default::default()
                }
            })
            .collect(),
        max_response_len: a.seq as usize,
    };
    trainer.train_step(&batch)?;
    let mut phases = std::collections::BTreeMap::new();
    let steps = (a.iters * c.rounds as usize) as f64;
    let measure = || -> anyhow::Result<f64> {
        sync(device);
        let t = Instant::now();
        for _ in 0..a.iters {
            let m = trainer.train_step(&batch)?;
            for k in ["time/forward_backward_s", "time/optimizer_s"] {
                *phases.entry(k.to_string()).or_insert(0.0) +=
                    m.get(k).copied().unwrap_or(0.0) / steps;
            }
        }
        sync(device);
        Ok((a.batch * a.seq) as f64 * a.iters as f64 / t.elapsed().as_secs_f64())
    };
    // The peer as verl trains (f32 weights and AdamW, autocast to the compute dtype), and with a
    // 16-bit dtype also "pure" (weights and AdamW state in that dtype) as a second line.
    let peer_args = |mode: &str| -> Vec<String> {
        let mut v = vec![
            "train".into(),
            c.model.display().to_string(),
            format!("--batch={}", a.batch),
            format!("--seq={}", a.seq),
            format!("--iters={}", a.iters),
            format!("--dtype={}", dtype_name(kind)),
            format!("--device={}", if device.is_cuda() { "cuda" } else { "cpu" }),
            format!("--mode={mode}"),
        ];
        if a.entropy {
            v.push("--entropy".into());
        }
        v
    };
    let mut peers = vec![("transformers (verl-style)", peer_args("verl"))];
    if kind != Kind::Float {
        peers.push(("transformers (pure 16-bit)", peer_args("pure")));
    }
    let r = compare(c, measure, &peers)?;
    println!(
        "  settings: rlrun f32 master weights and AdamW (fused kernel), compute {kind:?}, entropy {}; peer as printed, entropy {}",
        if a.entropy { "computed" } else { "not computed" },
        if a.entropy { "computed" } else { "not computed" }
    );
    println!("  rlrun phases per step: {phases:?}");
    // This process's peak resident memory (host memory; the CUDA allocator's is not read here).
    let peak = rlrun::metrics::peak_rss();
    println!(
        "  rlrun peak resident memory: {:.2} GB (activation checkpointing {})",
        peak.unwrap_or(0) as f64 / 1e9,
        if a.activation_checkpointing {
            "on"
        } else {
            "off"
        }
    );
    report(
        &format!(
            "training step (forward+backward+AdamW), batch {} x {} tokens, {:?} on {device:?}",
            a.batch, a.seq, kind
        ),
        "tokens/s",
        &r,
        json!({"batch": a.batch, "seq": a.seq, "seconds": (a.batch * a.seq) as f64 / r.ours, "phases": phases,
               "activation_checkpointing": a.activation_checkpointing, "entropy": a.entropy, "peak_rss_bytes": peak}),
        c.json.as_deref(),
    )
    .map(drop)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A generator process of `model` (f32, CPU, one thread) that weight-sync benchmarks update.
fn generator_process(
    model: &Path,
) -> anyhow::Result<(rlrun::actors::ActorProcess, rlrun::actors::RemoteGenerator)> {
    let cfg = rlrun::actors::ActorConfig::cpu_generator(model);
    let proc = rlrun::actors::spawn(rlrun::actors::Role::Generator, &cfg, &[])?;
    let client = rlrun::actors::RemoteGenerator::connect(
        &proc.addr,
        None,
        std::time::Duration::from_secs(60),
    )?;
    Ok((proc, client))
}

/// Shared-memory sync to a generator process vs. memcpy of the same bytes (both single runs
/// timed `iters` times; medians).
fn shm_sync(
    model: &Path,
    iters: usize,
    checksum: bool,
    json_path: Option<&Path>,
) -> anyhow::Result<()> {
    use rlrun_generator::{GeneratorActor, WeightUpdate};
    let iters = iters.max(1);
    let files = ModelFiles::open(model)?;
    let weights = files.load_weights(Kind::Float, Device::Cpu)?;
    let bytes = weights.flat.numel() as f64 * 4.0;
    let ranges: Vec<(i64, i64)> = weights
        .layout
        .params()
        .iter()
        .map(|p| (p.offset, p.numel))
        .collect();
    let (_proc, client) = generator_process(model)?;
    let mut publisher = rlrun_weights_sync::shm::ShmPublisher::new(
        &rlrun_weights_sync::shm::default_dir(),
        &format!("rlrun-bench-{}", std::process::id()),
    );
    let (mut total, mut publish) = (Vec::new(), Vec::new());
    // Two warm-up rounds create both double-buffer files.
    for v in 0..iters as u64 + 2 {
        let t = Instant::now();
        let (r, rep) =
            publisher.publish(v + 1, &weights.flat, checksum.then_some(ranges.as_slice()))?;
        client.update_weights(r.version, WeightUpdate::Shared(r))?;
        if v >= 2 {
            total.push(t.elapsed().as_secs_f64());
            publish.push(rep.seconds);
        }
    }
    // The peer: one memcpy of the same bytes into a buffer already faulted in.
    let src: &[u8] = {
        // SAFETY: `flat` is a contiguous CPU f32 tensor of `numel` elements that outlives `src`.
        unsafe { std::slice::from_raw_parts(weights.flat.data_ptr() as *const u8, bytes as usize) }
    };
    let mut dst = vec![1u8; src.len()];
    let mut copy = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        dst.copy_from_slice(src);
        copy.push(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    let (sync_s, copy_s, write_s) = (median(total), median(copy), median(publish));
    let (sync_gbs, copy_gbs) = (bytes / sync_s / 1e9, bytes / copy_s / 1e9);
    println!(
        "shared-memory weight sync, {} f32 ({:.0} MB), trainer -> 1 generator process",
        model.display(),
        bytes / 1e6
    );
    println!("  machine: {}", machine());
    println!(
        "  rlrun shm sync: {:.1} ms ({sync_gbs:.2} GB/s; writing {:.1} ms, map + acknowledge {:.1} ms){}",
        sync_s * 1e3,
        write_s * 1e3,
        (sync_s - write_s).max(0.0) * 1e3,
        if checksum { ", with checksums" } else { "" }
    );
    println!(
        "  memcpy:         {:.1} ms ({copy_gbs:.2} GB/s)",
        copy_s * 1e3
    );
    println!(
        "  ratio (sync GB/s / memcpy GB/s): {:.2}",
        sync_gbs / copy_gbs
    );
    if let Some(p) = json_path {
        let v = json!({"bench": "sync", "machine": machine(), "bytes": bytes, "sync_s": sync_s,
            "memcpy_s": copy_s, "sync_gb_per_s": sync_gbs, "memcpy_gb_per_s": copy_gbs,
            "ratio": sync_gbs / copy_gbs, "checksum": checksum});
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// `net` sync to a generator process over loopback vs. a plain socket copy of the same bytes to
/// another process (both timed `iters` times after a warm-up; medians).
fn net_sync(model: &Path, iters: usize, json_path: Option<&Path>) -> anyhow::Result<()> {
    use rlrun_generator::{GeneratorActor, WeightUpdate};
    use rlrun_weights_sync::net::{StoreServer, WeightStore};
    use std::io::{Read, Write};
    let iters = iters.max(1);
    let files = ModelFiles::open(model)?;
    let weights = files.load_weights(Kind::Float, Device::Cpu)?;
    let bytes = weights.flat.numel() * 4;
    let (proc, client) = generator_process(model)?;
    let store = WeightStore::new();
    let server = StoreServer::start(&store, "127.0.0.1:0", None)?;
    let (mut total, mut publish) = (Vec::new(), Vec::new());
    for v in 0..iters as u64 + 1 {
        let t = Instant::now();
        let (mut r, rep) = store.publish(v + 1, &weights.flat)?;
        r.source = Some(server.addr().to_string());
        client.update_weights(r.version, WeightUpdate::Shared(r))?;
        if v >= 1 {
            total.push(t.elapsed().as_secs_f64());
            publish.push(rep.seconds);
        }
    }
    drop(proc);
    // The peer: the same bytes written to a TCP socket on loopback, read by another process
    // into one buffer, which answers one byte when it has them all.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let mut sink = Command::new(rlrun::actors::rlrun_exe()?)
        .args(["bench", "socket-sink", "--addr", &addr])
        .arg(format!("--bytes={bytes}"))
        .arg(format!("--iters={}", iters + 1))
        .spawn()
        .context("starting the socket sink")?;
    let (mut sock, _) = listener.accept()?;
    sock.set_nodelay(true)?;
    // SAFETY: `flat` is a contiguous CPU f32 tensor of `bytes` bytes that outlives `src`.
    let src: &[u8] =
        unsafe { std::slice::from_raw_parts(weights.flat.data_ptr() as *const u8, bytes) };
    let mut copy = Vec::new();
    for i in 0..iters + 1 {
        let t = Instant::now();
        sock.write_all(src)?;
        let mut ack = [0u8; 1];
        sock.read_exact(&mut ack)?;
        if i >= 1 {
            copy.push(t.elapsed().as_secs_f64());
        }
    }
    let status = sink.wait()?;
    if !status.success() {
        bail!("the socket sink failed ({status})");
    }
    let (sync_s, copy_s, publish_s) = (median(total), median(copy), median(publish));
    let pull_s = (sync_s - publish_s).max(1e-9);
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    println!(
        "net weight sync, {} f32 ({:.0} MB), trainer -> 1 generator process over loopback",
        model.display(),
        bytes as f64 / 1e6
    );
    println!("  machine: {}", machine());
    println!(
        "  rlrun net sync: {:.1} ms ({:.2} GB/s): publish into the store {:.1} ms, pull + check + swap + acknowledge {:.1} ms ({:.2} GB/s)",
        sync_s * 1e3,
        gbs(sync_s),
        publish_s * 1e3,
        pull_s * 1e3,
        gbs(pull_s)
    );
    println!(
        "  plain socket copy to another process: {:.1} ms ({:.2} GB/s)",
        copy_s * 1e3,
        gbs(copy_s)
    );
    println!(
        "  ratio (net sync GB/s / socket GB/s): {:.2} whole sync, {:.2} transfer only",
        copy_s / sync_s,
        copy_s / pull_s
    );
    if let Some(p) = json_path {
        let v = json!({"bench": "net-sync", "machine": machine(), "bytes": bytes,
            "sync_s": sync_s, "publish_s": publish_s, "pull_s": pull_s, "socket_s": copy_s,
            "sync_gb_per_s": gbs(sync_s), "socket_gb_per_s": gbs(copy_s),
            "ratio": copy_s / sync_s, "ratio_transfer": copy_s / pull_s});
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

fn socket_sink(addr: &str, bytes: usize, iters: usize) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let mut buf = vec![0u8; bytes];
    for _ in 0..iters {
        sock.read_exact(&mut buf)?;
        std::hint::black_box(&buf);
        sock.write_all(&[1])?;
    }
    Ok(())
}

/// A recipe run with `rollout.max_staleness` = 0 and = 1 (same overrides otherwise); mean wall
/// time per step, the first step excluded (nothing to overlap yet).
/// Runs `recipe` with `overrides` (no evaluations) and returns the mean wall time per step and
/// the mean of each of `metrics` over steps 2.. (the first warms up).
fn per_step(
    recipe: &Path,
    overrides: &[String],
    metrics: &[&str],
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut overrides = overrides.to_vec();
    overrides.push("eval.before=false".into());
    overrides.push("eval.after=false".into());
    overrides.push("eval.every=0".into());
    let tmp = tempfile::tempdir()?;
    overrides.push(format!("logging.run_dir=\"{}\"", tmp.path().display()));
    let mut run = rlrun::Run::create(rlrun::Recipe::load(recipe, &overrides)?)?;
    let steps = run.recipe.config.steps;
    let t = Instant::now();
    let mut first = 0.0;
    let mut sums = vec![0.0; metrics.len()];
    for i in 0..steps {
        let m = run.step()?;
        if i == 0 {
            first = t.elapsed().as_secs_f64();
        } else {
            for (sum, k) in sums.iter_mut().zip(metrics) {
                *sum += m.get(*k).copied().unwrap_or(f64::NAN);
            }
        }
    }
    let later = steps.saturating_sub(1).max(1) as f64;
    let s = (t.elapsed().as_secs_f64() - first) / later;
    Ok((s, sums.into_iter().map(|x| x / later).collect()))
}

fn async_rollouts(recipe: &Path, set: &[String], json_path: Option<&Path>) -> anyhow::Result<()> {
    let mut per_step_s = Vec::new();
    for k in [0u64, 1] {
        let mut overrides = set.to_vec();
        overrides.push(format!("rollout.max_staleness={k}"));
        let (s, _) = per_step(recipe, &overrides, &[])?;
        println!("  max_staleness = {k}: {s:.2} s/step (steps after the first)");
        per_step_s.push(s);
    }
    let per_step = per_step_s;
    println!("asynchronous rollouts, {}", recipe.display());
    println!("  machine: {}", machine());
    println!(
        "  ratio (async / on-policy wall time per step): {:.2}",
        per_step[1] / per_step[0]
    );
    if let Some(p) = json_path {
        let v = json!({"bench": "async", "machine": machine(), "recipe": recipe, "overrides": set,
            "on_policy_s_per_step": per_step[0], "async_s_per_step": per_step[1],
            "ratio": per_step[1] / per_step[0]});
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

fn tool_latency(
    recipe: &Path,
    latency_ms: u64,
    set: &[String],
    json_path: Option<&Path>,
) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for ms in [0, latency_ms] {
        let mut overrides = set.to_vec();
        overrides.push(format!("environment.tool_latency_ms={ms}"));
        let (step_s, m) = per_step(
            recipe,
            &overrides,
            &["time/generate_s", "env/tool_calls_mean"],
        )?;
        let (rollout_s, calls) = (m[0], m[1]);
        println!(
            "  tool latency {ms:>4} ms: {step_s:.2} s/step, rollouts {rollout_s:.2} s/step, {calls:.2} tool calls per episode"
        );
        rows.push((step_s, rollout_s));
    }
    println!("multi-turn rollouts with a slow tool, {}", recipe.display());
    println!("  machine: {}", machine());
    println!(
        "  ratio ({latency_ms} ms tool / instant tool): step {:.2}, rollouts {:.2}",
        rows[1].0 / rows[0].0,
        rows[1].1 / rows[0].1
    );
    if let Some(p) = json_path {
        let v = json!({"bench": "tool-latency", "machine": machine(), "recipe": recipe,
            "overrides": set, "latency_ms": latency_ms,
            "instant_s_per_step": rows[0].0, "slow_s_per_step": rows[1].0,
            "instant_rollout_s": rows[0].1, "slow_rollout_s": rows[1].1,
            "step_ratio": rows[1].0 / rows[0].0, "rollout_ratio": rows[1].1 / rows[0].1});
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
