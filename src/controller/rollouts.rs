//! Rollout collection: prompts from the stream, rendered and tokenized; generation requests
//! with typed draw keys; scoring; the dynamic-sampling rounds of a step; and, with
//! `rollout.max_staleness > 0`, the first round of later steps generated ahead (prefetch) while
//! this step trains.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rlrun_generator::{
    Completion, CompletionStream, DrawKey, GeneratorActor, Request, SamplingParams,
};
use rlrun_model::{ChatMessage, ChatTemplate, Tokenizer};
use rlrun_rollout::{
    Cursor, DynamicSampler, OwnedCompletion, Prompt, PromptStream, RewardRunner, RewardStats,
    Sample, ScoreJob,
};

use super::episodes::Episodes;
use crate::error::{Error, Result};
use crate::multiturn::EpisodeStats;
use crate::recipe::RecipeConfig;

/// Renders prompts with the chat template and tokenizes them; decodes completions.
pub(crate) struct PromptEncoder {
    pub tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    system_prompt: Option<String>,
    max_prompt_tokens: usize,
}

/// One prepared prompt.
pub(crate) struct PromptItem {
    pub sample: Arc<Sample>,
    pub ids: Vec<i64>,
}

impl PromptEncoder {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        template: Option<ChatTemplate>,
        c: &RecipeConfig,
    ) -> Self {
        PromptEncoder {
            tokenizer,
            template,
            system_prompt: c.data.system_prompt.clone(),
            max_prompt_tokens: c.data.max_prompt_tokens,
        }
    }

    /// Renders and tokenizes a prompt.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<i64>> {
        let ids = match prompt {
            Prompt::Messages(msgs) => {
                let tpl = self.template.as_ref().ok_or_else(|| {
                    Error::Usage("chat prompts need a model with a chat template".into())
                })?;
                let mut conv: Vec<ChatMessage> = Vec::new();
                if let Some(sys) = &self.system_prompt {
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

    /// Encodes `samples`, dropping (and counting in `skipped`) those over `data.max_prompt_tokens`.
    pub fn prepare(&self, samples: Vec<Sample>, skipped: &mut usize) -> Result<Vec<PromptItem>> {
        let mut out = Vec::new();
        for s in samples {
            let ids = self.encode(&s.prompt)?;
            if ids.len() > self.max_prompt_tokens {
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

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        Ok(self.tokenizer.decode(&ids, true)?)
    }
}

/// Request ids only route completions and aborts: unique among requests in flight.
static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// Requests handed to the generator whose completions are still to be collected.
pub(crate) struct PendingGeneration {
    /// In a mutex only so that a `Run` is `Sync` (the Python bindings share it across threads).
    rx: Mutex<CompletionStream>,
    ids: Vec<u64>,
    n: usize,
    started: Instant,
}

/// Hands `items` to the generator without waiting; item `i` draws with `key.with_prompt(i)`.
pub(crate) fn submit(
    generator: &dyn GeneratorActor,
    items: &[PromptItem],
    params: &SamplingParams,
    key: DrawKey,
) -> Result<PendingGeneration> {
    let base = NEXT_REQUEST_ID.fetch_add(items.len() as u64, Ordering::Relaxed);
    let reqs: Vec<Request> = items
        .iter()
        .enumerate()
        .map(|(i, it)| Request {
            id: base + i as u64,
            prompt: it.ids.clone(),
            params: params.clone(),
            key: Some(key.with_prompt(i as u64)),
        })
        .collect();
    let ids = reqs.iter().map(|r| r.id).collect();
    Ok(PendingGeneration {
        rx: Mutex::new(generator.generate(reqs)?),
        ids,
        n: params.n,
        started: Instant::now(),
    })
}

/// Waits for submitted requests; their completions grouped per prompt in submission order,
/// each group in sample order.
pub(crate) fn collect(p: PendingGeneration) -> Result<Vec<Vec<Completion>>> {
    let mut groups: Vec<Vec<Completion>> = vec![Vec::new(); p.ids.len()];
    let base = p.ids.first().copied().unwrap_or(0);
    let rx =
        p.rx.into_inner()
            .map_err(|_| Error::Usage("a generation stream was poisoned".into()))?;
    for c in rx.iter().take(p.ids.len() * p.n) {
        let c = c?;
        groups[(c.request_id - base) as usize].push(c);
    }
    for g in &mut groups {
        g.sort_by_key(|c| c.index);
        if g.len() != p.n {
            return Err(Error::Usage(format!(
                "the generator returned {} of {} completions for a prompt",
                g.len(),
                p.n
            )));
        }
    }
    Ok(groups)
}

/// Generates completions for `items` and waits for them.
pub(crate) fn generate(
    generator: &dyn GeneratorActor,
    items: &[PromptItem],
    params: &SamplingParams,
    key: DrawKey,
) -> Result<Vec<Vec<Completion>>> {
    collect(submit(generator, items, params, key)?)
}

/// Scores of a batch of completions (flat, prompt-major), with the decoded texts.
pub(crate) struct Scored {
    pub rewards: Vec<f32>,
    pub stats: RewardStats,
    pub texts: Vec<String>,
}

/// Decodes and scores every completion of `groups` (one group per item).
pub(crate) fn score(
    rewards: &RewardRunner,
    enc: &PromptEncoder,
    items: &[PromptItem],
    groups: &[Vec<Completion>],
    max_tokens: usize,
) -> Result<Scored> {
    let mut jobs = Vec::new();
    let mut texts = Vec::new();
    for (it, g) in items.iter().zip(groups) {
        for c in g {
            let text = enc.decode(&c.token_ids)?;
            texts.push(text.clone());
            let finish = match c.finish_reason {
                rlrun_generator::FinishReason::Stop => rlrun_rollout::FinishReason::Stop,
                rlrun_generator::FinishReason::Length => rlrun_rollout::FinishReason::Length,
                rlrun_generator::FinishReason::Abort => rlrun_rollout::FinishReason::Abort,
            };
            let ids = c.token_ids.iter().map(|&t| t as u32).collect();
            jobs.push(ScoreJob::new(
                it.sample.clone(),
                OwnedCompletion::new(text, ids, finish, max_tokens),
            ));
        }
    }
    let (scores, stats) = rewards.score_batch(jobs);
    Ok(Scored {
        rewards: scores.iter().map(|r| r.value).collect(),
        stats,
        texts,
    })
}

/// A prompt with its scored completions.
pub(crate) struct ScoredGroup {
    pub prompt_ids: Vec<i64>,
    pub prompt_text: String,
    pub completions: Vec<Completion>,
    pub rewards: Vec<f32>,
    pub texts: Vec<String>,
    /// Multi-turn episodes: each completion's own prompt and loss mask (empty for single turns).
    pub episodes: Vec<EpisodeTokens>,
}

/// What a multi-turn episode adds to its completion.
pub(crate) struct EpisodeTokens {
    pub prompt: Vec<i64>,
    /// 1 on the model's tokens, 0 on observations.
    pub loss_mask: Vec<u8>,
    /// The environment's final reward (the group's `rewards` hold the episode's total).
    pub outcome: f32,
    /// Per-turn rewards on their turns' last sampled tokens (empty when they do not count).
    pub token_rewards: Vec<f32>,
}

/// What one step's collection produced.
pub(crate) struct StepRollouts {
    /// The groups to train on (after dynamic sampling's filter).
    pub kept: Vec<ScoredGroup>,
    /// Every reward of the step, before any filtering.
    pub all_rewards: Vec<f32>,
    /// Reward-runner statistics, one per round.
    pub reward_stats: Vec<RewardStats>,
    pub rounds: u64,
    /// Groups dropped by dynamic sampling (`None` without it).
    pub dropped_groups: Option<usize>,
    /// Prompts over `data.max_prompt_tokens`.
    pub skipped: usize,
    pub tokens: usize,
    /// Generation wall time, and the part of it the controller waited for.
    pub generate_s: f64,
    pub generate_wait_s: f64,
    pub reward_s: f64,
    /// Multi-turn episodes' counts (with an environment).
    pub episodes: Option<EpisodeStats>,
}

/// What collection reads of the rest of the run.
pub(crate) struct Context<'a> {
    pub generator: &'a dyn GeneratorActor,
    pub enc: &'a PromptEncoder,
    /// None when an environment scores episodes.
    pub rewards: Option<&'a RewardRunner>,
    pub episodes: Option<&'a Episodes>,
    pub config: &'a RecipeConfig,
}

impl Context<'_> {
    /// The reward runner (recipes without an environment have one).
    pub fn rewards(&self) -> Result<&RewardRunner> {
        self.rewards
            .ok_or_else(|| Error::Usage("this run has no [reward]".into()))
    }
}

/// The recipe's sampling settings for training rollouts.
pub(crate) fn sampling(c: &RecipeConfig) -> SamplingParams {
    let r = &c.rollout;
    SamplingParams {
        n: r.n,
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        min_p: r.min_p,
        max_tokens: r.max_tokens,
        stop_token_ids: None,
        stop: r.stop.clone(),
        seed: Some(c.seed),
    }
}

/// A generation round started ahead of its step.
struct Prefetch {
    step: u64,
    items: Vec<PromptItem>,
    skipped: usize,
    pending: PendingGeneration,
    /// The prompt stream's position before these prompts were drawn (what a checkpoint records,
    /// so that a resumed run draws them again).
    cursor_before: Cursor,
}

/// The prompt stream and generation started ahead.
pub(crate) struct Rollouts {
    pub stream: PromptStream,
    /// Oldest first.
    prefetched: VecDeque<Prefetch>,
    /// Prefetched rounds dropped for being too stale.
    pub stale_dropped: u64,
}

impl Rollouts {
    pub fn new(stream: PromptStream) -> Self {
        Rollouts {
            stream,
            prefetched: VecDeque::new(),
            stale_dropped: 0,
        }
    }

    /// Generates and scores the rollouts of `step`: one round, or with dynamic sampling rounds
    /// until enough groups have distinct rewards (DAPO). `trainer_version` is the policy version
    /// the trainer is at (for the staleness of prefetched rounds).
    pub fn collect_step(
        &mut self,
        cx: &Context<'_>,
        step: u64,
        trainer_version: u64,
    ) -> Result<StepRollouts> {
        let c = cx.config;
        let p = c.data.prompts_per_step;
        let dynamic = c.algorithm.dynamic_sampling;
        let mut sampler: DynamicSampler<ScoredGroup> =
            DynamicSampler::new(p, dynamic.map(|d| d.max_rounds).unwrap_or(1));
        let mut out = StepRollouts {
            kept: Vec::new(),
            all_rewards: Vec::new(),
            reward_stats: Vec::new(),
            rounds: 0,
            dropped_groups: None,
            skipped: 0,
            tokens: 0,
            generate_s: 0.0,
            generate_wait_s: 0.0,
            reward_s: 0.0,
            episodes: None,
        };
        loop {
            let round = out.rounds;
            let want = if dynamic.is_some() {
                sampler.suggested_prompts().max(1)
            } else {
                p
            };
            let round_groups = match cx.episodes {
                Some(ep) => self.episode_round(cx, ep, step, round, want, &mut out)?,
                None => self.completion_round(cx, step, round, want, trainer_version, &mut out)?,
            };
            out.rounds += 1;
            if dynamic.is_none() {
                out.kept = round_groups;
                return Ok(out);
            }
            sampler.add_round(round_groups.into_iter().map(|g| {
                let r = g.rewards.clone();
                (g, r)
            }));
            if sampler.is_done() {
                break;
            }
        }
        let (kept, stats) = sampler.finish();
        out.kept = kept;
        out.dropped_groups = Some(stats.groups_dropped);
        Ok(out)
    }

    /// One round of single completions: `want` prompts (or the prefetched round), generated
    /// and scored.
    fn completion_round(
        &mut self,
        cx: &Context<'_>,
        step: u64,
        round: u64,
        want: usize,
        trainer_version: u64,
        out: &mut StepRollouts,
    ) -> Result<Vec<ScoredGroup>> {
        let c = cx.config;
        let (items, groups) = match self.take_prefetched(cx, step, round, trainer_version)? {
            Some(pf) => {
                out.skipped += pf.skipped;
                out.generate_s += pf.wall_s;
                out.generate_wait_s += pf.wait_s;
                (pf.items, pf.groups)
            }
            None => {
                let items = cx
                    .enc
                    .prepare(self.stream.next_batch(want), &mut out.skipped)?;
                let t = Instant::now();
                let groups = generate(
                    cx.generator,
                    &items,
                    &sampling(c),
                    DrawKey::train(step, round, 0),
                )?;
                out.generate_s += t.elapsed().as_secs_f64();
                out.generate_wait_s += t.elapsed().as_secs_f64();
                (items, groups)
            }
        };
        out.tokens += groups
            .iter()
            .flatten()
            .map(|c| c.token_ids.len())
            .sum::<usize>();
        let t = Instant::now();
        let scored = score(cx.rewards()?, cx.enc, &items, &groups, c.rollout.max_tokens)?;
        out.reward_s += t.elapsed().as_secs_f64();
        out.all_rewards.extend(&scored.rewards);
        out.reward_stats.push(scored.stats);
        let n = c.rollout.n;
        let mut round_groups = Vec::new();
        for (gi, (it, g)) in items.into_iter().zip(groups).enumerate() {
            round_groups.push(ScoredGroup {
                prompt_text: cx.enc.decode(&it.ids)?,
                prompt_ids: it.ids,
                completions: g,
                rewards: scored.rewards[gi * n..(gi + 1) * n].to_vec(),
                texts: scored.texts[gi * n..(gi + 1) * n].to_vec(),
                episodes: Vec::new(),
            });
        }
        Ok(round_groups)
    }

    /// One round of multi-turn episodes: `rollout.n` episodes of each of `want` prompts.
    fn episode_round(
        &mut self,
        cx: &Context<'_>,
        ep: &Episodes,
        step: u64,
        round: u64,
        want: usize,
        out: &mut StepRollouts,
    ) -> Result<Vec<ScoredGroup>> {
        let samples = self.stream.next_batch(want);
        let t = Instant::now();
        let batch = ep.run(
            cx.generator,
            cx.enc,
            &samples,
            cx.config.rollout.n,
            &sampling(cx.config),
            DrawKey::train(step, round, 0),
        )?;
        out.generate_s += t.elapsed().as_secs_f64();
        out.generate_wait_s += t.elapsed().as_secs_f64();
        out.tokens += batch
            .groups
            .iter()
            .flat_map(|g| &g.episodes)
            .map(|e| e.loss_mask.iter().filter(|&&m| m == 1).count())
            .sum::<usize>();
        out.all_rewards
            .extend(batch.groups.iter().flat_map(|g| g.rewards.iter().copied()));
        match &mut out.episodes {
            Some(s) => s.add(&batch.stats),
            None => out.episodes = Some(batch.stats),
        }
        Ok(batch.groups)
    }

    /// The prefetched first round of `step`, if there is one and it is fresh enough: a round more
    /// than `max_staleness` versions (plus the sync interval) behind the trainer is dropped and
    /// counted, and the step generates afresh.
    fn take_prefetched(
        &mut self,
        cx: &Context<'_>,
        step: u64,
        round: u64,
        trainer_version: u64,
    ) -> Result<Option<Prefetched>> {
        // Generation for steps that are past (a step that failed and was not retried) is of no use.
        while let Some(old) = self.prefetched.front().filter(|p| p.step < step) {
            let _ = cx.generator.abort(old.pending.ids.clone());
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
        let groups = collect(pending)?;
        let c = cx.config;
        let oldest = groups
            .iter()
            .flatten()
            .map(|x| x.policy_version)
            .min()
            .unwrap_or(trainer_version);
        if trainer_version.saturating_sub(oldest) > c.rollout.max_staleness + c.sync.every - 1 {
            tracing::warn!("step {step}: prefetched rollouts of version {oldest} are too stale (trainer at {trainer_version}); regenerating");
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
    pub fn prefetch(&mut self, cx: &Context<'_>, step: u64) -> Result<()> {
        let c = cx.config;
        let last = (step + c.rollout.max_staleness).min(c.steps);
        let params = sampling(c);
        let mut next = self
            .prefetched
            .back()
            .map(|p| p.step + 1)
            .unwrap_or(step + 1);
        while next <= last {
            let cursor_before = self.stream.cursor();
            let batch = self.stream.next_batch(first_round_prompts(c));
            let mut skipped = 0;
            let items = cx.enc.prepare(batch, &mut skipped)?;
            let pending = submit(cx.generator, &items, &params, DrawKey::train(next, 0, 0))?;
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

    /// The prompt stream position a checkpoint records: before any prefetched prompts.
    pub fn checkpoint_cursor(&self) -> Cursor {
        match self.prefetched.front() {
            Some(p) => p.cursor_before,
            None => self.stream.cursor(),
        }
    }

    /// Abandons generation started for future steps (the end of training, or a checkpoint
    /// restore), putting its prompts back.
    pub fn discard_prefetched(&mut self, generator: &dyn GeneratorActor) -> Result<()> {
        if let Some(first) = self.prefetched.front() {
            let cursor = first.cursor_before;
            let ids: Vec<u64> = self
                .prefetched
                .iter()
                .flat_map(|p| p.pending.ids.iter().copied())
                .collect();
            self.prefetched.clear();
            let _ = generator.abort(ids);
            self.stream.restore(&cursor)?;
        }
        Ok(())
    }
}

/// A prefetched round, collected.
struct Prefetched {
    items: Vec<PromptItem>,
    groups: Vec<Vec<Completion>>,
    skipped: usize,
    wall_s: f64,
    wait_s: f64,
}

/// Prompts in a step's first generation round.
fn first_round_prompts(c: &RecipeConfig) -> usize {
    match c.algorithm.dynamic_sampling {
        // DynamicSampler::suggested_prompts() before any round.
        Some(_) => DynamicSampler::<()>::new(c.data.prompts_per_step, 1)
            .suggested_prompts()
            .max(1),
        None => c.data.prompts_per_step,
    }
}
