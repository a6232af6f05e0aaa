//! Step metrics: what one step reports (JSONL, TensorBoard scalars, histograms, sample texts).

use std::collections::BTreeMap;

use rlrun_generator::GeneratorActor;

use super::batch::StepBatch;
use super::rollouts::StepRollouts;
use crate::recipe::RecipeConfig;

pub(crate) type Metrics = BTreeMap<String, f64>;

/// Rewards (over everything generated, before any filter), dynamic sampling, generation and
/// reward timings of a step's rollouts.
pub(crate) fn rollouts(r: &StepRollouts, c: &RecipeConfig) -> Metrics {
    let mut m = Metrics::new();
    let n_all = r.all_rewards.len().max(1) as f64;
    let mean = r.all_rewards.iter().map(|&x| f64::from(x)).sum::<f64>() / n_all;
    let var = r
        .all_rewards
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n_all;
    m.insert("reward/mean".into(), mean);
    m.insert("reward/std".into(), var.sqrt());
    let correct = r
        .all_rewards
        .iter()
        .filter(|&&x| x >= c.eval.correct_threshold)
        .count();
    m.insert("reward/accuracy".into(), correct as f64 / n_all);
    // The reward runner's counters (errors, panics, timeouts, per-reward means), averaged over rounds.
    for s in &r.reward_stats {
        for (k, v) in s.to_metrics("reward") {
            if k != "reward/mean" {
                *m.entry(k).or_insert(0.0) += v / r.reward_stats.len() as f64;
            }
        }
    }
    if let Some(dropped) = r.dropped_groups {
        m.insert("dynamic_sampling/dropped_groups".into(), dropped as f64);
        m.insert("dynamic_sampling/rounds".into(), r.rounds as f64);
        m.insert("dynamic_sampling/kept_groups".into(), r.kept.len() as f64);
    }
    if let Some(e) = &r.episodes {
        m.extend(e.metrics("env"));
    }
    m.insert("prompts/skipped_too_long".into(), r.skipped as f64);
    m.insert("time/generate_s".into(), r.generate_s);
    // Generation time the controller waited for (the rest overlapped earlier steps' work).
    m.insert("time/generate_wait_s".into(), r.generate_wait_s);
    m.insert(
        "time/overlap_s".into(),
        (r.generate_s - r.generate_wait_s).max(0.0),
    );
    m.insert("time/reward_s".into(), r.reward_s);
    m.insert(
        "perf/generate_tokens_per_s".into(),
        r.tokens as f64 / r.generate_s.max(1e-9),
    );
    m
}

/// Peak RSS since the last reset under `rss_key`, the generator's KV cache (allocated) under
/// `kv_key` and, with `kv_used_key`, the most of it in use at once.
pub(crate) fn memory(
    m: &mut Metrics,
    rss_key: &str,
    kv_key: &str,
    kv_used_key: Option<&str>,
    generator: &dyn GeneratorActor,
) {
    if let Some(b) = crate::metrics::peak_rss() {
        m.insert(rss_key.into(), b as f64);
    }
    if let Ok(s) = generator.stats() {
        m.insert(kv_key.into(), s.kv_cache_bytes as f64);
        if let Some(k) = kv_used_key {
            m.insert(k.into(), s.kv_cache_peak_used_bytes as f64);
        }
    }
}

/// The CUDA caching allocator's peaks on `devices` during `phase` (since the last reading), as
/// `memory/cuda<d>_peak_allocated_<phase>_bytes` and `..._peak_reserved_...`; the peaks restart
/// for the next phase. Nothing on the CPU.
pub(crate) fn cuda_phase(m: &mut Metrics, phase: &str, devices: &[usize]) {
    for &d in devices {
        match rlrun_torch_ext::cuda_memory(d, true) {
            Ok(c) => {
                m.insert(
                    format!("memory/cuda{d}_peak_allocated_{phase}_bytes"),
                    c.peak_allocated as f64,
                );
                m.insert(
                    format!("memory/cuda{d}_peak_reserved_{phase}_bytes"),
                    c.peak_reserved as f64,
                );
            }
            Err(e) => tracing::debug!("CUDA allocator figures of cuda:{d}: {e}"),
        }
    }
}

/// Restarts the CUDA caching allocator's peaks on `devices` (a step's first phase starts here).
pub(crate) fn cuda_reset(devices: &[usize]) {
    for &d in devices {
        let _ = rlrun_torch_ext::cuda_memory(d, true);
    }
}

/// Response lengths and the staleness of the batch against the trainer's `version`.
pub(crate) fn batch(b: &StepBatch, version: u64) -> Metrics {
    let mut m = Metrics::new();
    let n = b.lengths.len().max(1) as f64;
    m.insert(
        "response_length/mean".into(),
        b.lengths.iter().sum::<usize>() as f64 / n,
    );
    m.insert(
        "response_length/max".into(),
        *b.lengths.iter().max().unwrap_or(&0) as f64,
    );
    let staleness = b
        .versions
        .iter()
        .map(|&v| version.saturating_sub(1).saturating_sub(v))
        .max()
        .unwrap_or(0);
    m.insert("policy/staleness_max".into(), staleness as f64);
    m.insert(
        "policy/rollout_version_min".into(),
        b.versions.iter().copied().min().unwrap_or(0) as f64,
    );
    m.insert("policy/version".into(), version as f64);
    m
}

/// Histograms of a step: rewards, advantages, response lengths.
pub(crate) fn histograms(
    all_rewards: &[f32],
    b: Option<&StepBatch>,
) -> Vec<(&'static str, Vec<f64>)> {
    let mut h = vec![(
        "reward",
        all_rewards.iter().map(|&r| f64::from(r)).collect(),
    )];
    if let Some(b) = b {
        let adv = b
            .seqs
            .iter()
            .flat_map(|s| s.advantages.iter().map(|&a| f64::from(a)))
            .collect();
        h.push(("advantage", adv));
        h.push((
            "response_length",
            b.lengths.iter().map(|&l| l as f64).collect(),
        ));
    }
    h
}

/// The first `n` samples of a step as Markdown (TensorBoard's text tab).
pub(crate) fn sample_texts(b: &StepBatch, n: usize) -> Vec<String> {
    b.texts
        .iter()
        .zip(&b.rewards)
        .take(n)
        .map(|((p, t), r)| {
            format!(
                "**reward {r}**\n\n**prompt**\n\n    {}\n\n**completion**\n\n    {}",
                p.replace('\n', "\n    "),
                t.replace('\n', "\n    ")
            )
        })
        .collect()
}

/// Peak memory of a run's steps (bytes; `None` when no step reported it).
#[derive(Debug, Clone, Default)]
pub struct MemorySummary {
    /// Peak resident memory of this process while generating, and while training.
    pub generate_peak_rss: Option<f64>,
    pub train_peak_rss: Option<f64>,
    /// The generator's KV cache: allocated, and the most of it in use at once.
    pub kv_cache: Option<f64>,
    pub kv_cache_peak_used: Option<f64>,
}

impl MemorySummary {
    pub(crate) fn of(history: &[Metrics]) -> Self {
        let max = |key: &str| {
            history
                .iter()
                .filter_map(|m| m.get(key).copied())
                .reduce(f64::max)
        };
        MemorySummary {
            generate_peak_rss: max("memory/peak_rss_generate_bytes"),
            train_peak_rss: max("memory/peak_rss_train_bytes"),
            kv_cache: max("memory/kv_cache_bytes"),
            kv_cache_peak_used: max("memory/kv_cache_peak_used_bytes"),
        }
    }
}

impl std::fmt::Display for MemorySummary {
    /// One line: `memory (peak resident, this process): generation 6.2 GB, training 9.9 GB; KV
    /// cache 1.5 GB allocated, 0.8 GB used at most`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |b: Option<f64>| match b {
            Some(b) => format!("{:.1} GB", b / 1e9),
            None => "n/a".into(),
        };
        write!(
            f,
            "memory (peak resident, this process): generation {}, training {}; KV cache {} allocated, {} used at most",
            gb(self.generate_peak_rss),
            gb(self.train_peak_rss),
            gb(self.kv_cache),
            gb(self.kv_cache_peak_used)
        )
    }
}
