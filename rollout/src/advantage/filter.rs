//! Group filtering for DAPO's dynamic sampling.
//!
//! Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv
//! 2503.14476, §3.2: groups whose completions all got the same reward (all right or all wrong)
//! have zero advantage under group-relative estimators and only dilute the batch. They are dropped,
//! and more prompts are sampled until the batch has enough informative groups.
//!
//! [`filter_zero_variance_groups`] does one batch; [`DynamicSampler`] accumulates kept groups over
//! several generation rounds and tells the caller how many more prompts to request.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The result of [`filter_zero_variance_groups`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupFilter {
    /// Indices (into the input) of the sequences kept, in input order.
    pub kept_sequences: Vec<usize>,
    /// Ids of the groups kept, in order of first appearance.
    pub kept_groups: Vec<u64>,
    /// Ids of the groups dropped, in order of first appearance.
    pub dropped_groups: Vec<u64>,
    /// Number of sequences dropped.
    pub dropped_sequences: usize,
}

/// Whether a group's rewards have zero variance (all exactly equal; a group of one counts).
pub fn is_zero_variance(rewards: &[f32]) -> bool {
    rewards.windows(2).all(|w| w[0] == w[1])
}

/// Keeps the groups whose rewards are not all equal. `rewards` and `group_ids` are per sequence,
/// of equal length (extra entries of the longer one are ignored); groups need not be contiguous.
///
/// ```
/// use rlrun_rollout::advantage::filter::filter_zero_variance_groups;
/// let f = filter_zero_variance_groups(&[1.0, 1.0, 0.0, 1.0, 0.0, 0.0], &[1, 1, 2, 2, 3, 3]);
/// assert_eq!(f.kept_groups, vec![2]);
/// assert_eq!(f.dropped_groups, vec![1, 3]);
/// assert_eq!(f.kept_sequences, vec![2, 3]);
/// ```
pub fn filter_zero_variance_groups(rewards: &[f32], group_ids: &[u64]) -> GroupFilter {
    let n = rewards.len().min(group_ids.len());
    let mut order: Vec<u64> = Vec::new();
    let mut members: HashMap<u64, Vec<f32>> = HashMap::new();
    for i in 0..n {
        members
            .entry(group_ids[i])
            .or_insert_with(|| {
                order.push(group_ids[i]);
                Vec::new()
            })
            .push(rewards[i]);
    }
    let mut out = GroupFilter::default();
    let mut keep: HashMap<u64, bool> = HashMap::new();
    for g in order {
        let k = !is_zero_variance(&members[&g]);
        keep.insert(g, k);
        if k {
            out.kept_groups.push(g);
        } else {
            out.dropped_groups.push(g);
        }
    }
    for i in 0..n {
        if keep[&group_ids[i]] {
            out.kept_sequences.push(i);
        } else {
            out.dropped_sequences += 1;
        }
    }
    out
}

/// Totals of a [`DynamicSampler`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DynamicSamplingStats {
    /// Generation rounds added.
    pub rounds: usize,
    /// Groups seen.
    pub groups_seen: usize,
    /// Groups kept (at most the target).
    pub groups_kept: usize,
    /// Zero-variance groups dropped.
    pub groups_dropped: usize,
    /// Informative groups beyond the target, discarded.
    pub groups_surplus: usize,
    /// Whether the target was reached.
    pub full: bool,
}

impl DynamicSamplingStats {
    /// Fraction of seen groups that were informative (1 if none seen).
    pub fn keep_rate(&self) -> f64 {
        if self.groups_seen == 0 {
            1.0
        } else {
            (self.groups_kept + self.groups_surplus) as f64 / self.groups_seen as f64
        }
    }
}

/// Accumulates informative groups over generation rounds until `target_groups` are kept or
/// `max_rounds` rounds were added (DAPO's `max_num_gen_batches`).
///
/// `T` is whatever the caller uses for a group of rollouts.
///
/// ```
/// use rlrun_rollout::advantage::filter::DynamicSampler;
/// let mut s = DynamicSampler::new(2, 5);
/// s.add_round(vec![("a", vec![1.0, 1.0]), ("b", vec![0.0, 1.0])]);
/// assert_eq!(s.groups_needed(), 1);
/// assert_eq!(s.suggested_prompts(), 2); // half the groups were informative
/// s.add_round(vec![("c", vec![1.0, 0.0]), ("d", vec![0.0, 1.0])]);
/// assert!(s.is_done());
/// let (kept, stats) = s.finish();
/// assert_eq!(kept, vec!["b", "c"]);
/// assert_eq!(stats.groups_surplus, 1);
/// ```
#[derive(Clone, Debug)]
pub struct DynamicSampler<T> {
    target_groups: usize,
    max_rounds: usize,
    kept: Vec<T>,
    stats: DynamicSamplingStats,
}

impl<T> DynamicSampler<T> {
    /// A sampler that wants `target_groups` informative groups within `max_rounds` rounds
    /// (0 = unlimited).
    pub fn new(target_groups: usize, max_rounds: usize) -> Self {
        Self {
            target_groups,
            max_rounds,
            kept: Vec::with_capacity(target_groups),
            stats: DynamicSamplingStats {
                full: target_groups == 0,
                ..DynamicSamplingStats::default()
            },
        }
    }

    /// Adds one round of generated groups with their per-sequence rewards; keeps the informative
    /// ones up to the target. Returns how many of this round's groups were kept.
    pub fn add_round(&mut self, groups: impl IntoIterator<Item = (T, Vec<f32>)>) -> usize {
        self.stats.rounds += 1;
        let mut kept_now = 0;
        for (group, rewards) in groups {
            self.stats.groups_seen += 1;
            if is_zero_variance(&rewards) {
                self.stats.groups_dropped += 1;
            } else if self.kept.len() < self.target_groups {
                self.kept.push(group);
                self.stats.groups_kept += 1;
                kept_now += 1;
            } else {
                self.stats.groups_surplus += 1;
            }
        }
        self.stats.full = self.kept.len() >= self.target_groups;
        kept_now
    }

    /// Informative groups still missing (0 when full).
    pub fn groups_needed(&self) -> usize {
        self.target_groups.saturating_sub(self.kept.len())
    }

    /// Prompts to request for the next round: the groups needed divided by the keep rate seen
    /// so far (at least the groups needed, at most 10× it).
    pub fn suggested_prompts(&self) -> usize {
        let needed = self.groups_needed();
        let rate = self.stats.keep_rate().max(0.1);
        ((needed as f64 / rate).ceil() as usize).clamp(needed, needed.saturating_mul(10))
    }

    /// Whether to stop: the target is reached or the round limit is hit.
    pub fn is_done(&self) -> bool {
        self.stats.full || (self.max_rounds > 0 && self.stats.rounds >= self.max_rounds)
    }

    /// The running totals.
    pub fn stats(&self) -> &DynamicSamplingStats {
        &self.stats
    }

    /// The kept groups (in arrival order) and the totals.
    pub fn finish(self) -> (Vec<T>, DynamicSamplingStats) {
        (self.kept, self.stats)
    }
}
