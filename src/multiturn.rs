//! Multi-turn episodes (issue 16): each episode's trajectory is kept as token ids, the model's
//! turns exactly as sampled (with their behaviour log-probs, loss mask 1) and each observation
//! rendered once by the chat template ([`ChatTemplate::observation_suffix`]) and appended (loss
//! mask 0). No earlier turn is ever re-tokenized, so the ids the trainer sees are the ids the
//! generator produced.
//!
//! Episodes advance independently: a model turn is one request to the generator, and as soon as
//! it completes, that episode's environment step runs on its own thread (with a time limit; a
//! step that hangs, panics or errs ends its episode as failed, scored 0 and counted) while the
//! generator keeps decoding every other episode's turn. The next turn is submitted when the step
//! returns. Each turn's request carries the whole conversation so far: the generator prefills it
//! again (no KV cache is kept across turns yet).

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rlrun_generator::{Completion, DrawKey, FinishReason, GeneratorActor, Request, SamplingParams};
use rlrun_model::{ChatMessage, ChatTemplate, Tokenizer};
use rlrun_rollout::env::tools::parse_tool_calls;
use rlrun_rollout::env::{run_step, EnvError, Environment, Episode, ModelTurn, Step};
use rlrun_rollout::Sample;

/// Draw keys of episode `i`'s turn `t` use `prompt = i * KEY_TURNS + t`.
pub const KEY_TURNS: u64 = 1024;

/// Limits of one episode.
#[derive(Debug, Clone)]
pub struct EpisodeLimits {
    /// Model turns at most.
    pub max_turns: usize,
    /// Tokens per model turn at most.
    pub max_tokens_per_turn: usize,
    /// Tokens of the whole conversation (first messages, turns and observations) at most: an
    /// episode whose next turn would not fit is cut.
    pub max_context: usize,
    /// Wall time of one environment step.
    pub step_timeout: Duration,
    /// A turn that reaches `max_tokens_per_turn` before its end-of-turn token: closed with that
    /// token (appended as context, loss mask 0) and passed to the environment (true), or the
    /// episode ends there, cut (false).
    pub close_cut_turns: bool,
}

/// What the episodes are rendered, tokenized and sampled with.
pub struct Conversation<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a Tokenizer,
    /// The token text the template ends model turns with (e.g. `<|im_end|>`); each turn stops
    /// at its id.
    pub end_of_turn: &'a str,
    /// Sampling of every turn (`n` and `max_tokens` are set per turn).
    pub sampling: SamplingParams,
    pub limits: EpisodeLimits,
    /// Messages placed before each episode's first messages (a system prompt, a worked example).
    pub prelude: Vec<ChatMessage>,
    /// The environment's tools as the chat template receives them (`tools`), if any.
    pub tools: Option<serde_json::Value>,
}

/// One finished episode.
#[derive(Debug, Clone, Default)]
pub struct EpisodeResult {
    /// Tokens of the rendered first messages (with the generation prompt).
    pub prompt: Vec<i64>,
    /// Everything after the prompt: model turns and observations, in order.
    pub response: Vec<i64>,
    /// 1 on the model's tokens, 0 on observation tokens.
    pub loss_mask: Vec<u8>,
    /// The generator's log-prob of each model token (0 on observation tokens).
    pub logprobs: Vec<f32>,
    /// Per-turn rewards the environment gave.
    pub turn_rewards: Vec<f32>,
    /// Where each of `turn_rewards` belongs: the index in `response` of the last token the
    /// model sampled in that turn.
    pub turn_reward_positions: Vec<usize>,
    /// The environment's final reward (0 for a failed episode).
    pub final_reward: f32,
    pub turns: usize,
    pub tool_calls: usize,
    pub malformed_calls: usize,
    /// Tool calls answered with an error (see [`Step::tool_errors`]).
    pub tool_errors: usize,
    /// Why the episode failed (a step that errored, panicked or timed out), if it did.
    pub error: Option<EnvError>,
    /// Cut by a limit (turns, context, or a turn that hit its token limit unclosed).
    pub cut: bool,
    /// Seconds spent in environment steps (the episode's own).
    pub env_seconds: f64,
    /// The oldest policy version among its turns.
    pub policy_version: u64,
    /// Mixture-of-experts routes of prompt + response but the last token (routing replay), when
    /// the last turn's generation covered all of them; else empty.
    pub routes: Vec<i16>,
}

impl EpisodeResult {
    /// The episode's reward: the final one, plus the per-turn ones when `turn_rewards`.
    pub fn reward(&self, turn_rewards: bool) -> f32 {
        self.final_reward
            + if turn_rewards {
                self.turn_rewards.iter().sum()
            } else {
                0.0
            }
    }

    /// The per-turn rewards as per-token rewards over `response`: each on its turn's last
    /// sampled token, 0 elsewhere (for estimators that credit tokens with the rewards after them).
    pub fn token_rewards(&self) -> Vec<f32> {
        let mut t = vec![0.0; self.response.len()];
        for (&p, &r) in self.turn_reward_positions.iter().zip(&self.turn_rewards) {
            t[p] += r;
        }
        t
    }
}

/// Counts over a batch of episodes, for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpisodeStats {
    pub episodes: usize,
    pub turns: usize,
    pub tool_calls: usize,
    pub malformed_calls: usize,
    pub tool_errors: usize,
    /// Episodes ended by a failed environment step (error, panic, time limit).
    pub step_errors: usize,
    pub timeouts: usize,
    pub panics: usize,
    pub cut: usize,
    /// Seconds in environment steps, summed over episodes.
    pub env_seconds: f64,
    /// Wall time of the whole batch.
    pub wall_seconds: f64,
}

impl EpisodeStats {
    pub fn of(results: &[EpisodeResult], wall_seconds: f64) -> Self {
        let mut s = EpisodeStats {
            episodes: results.len(),
            wall_seconds,
            ..Default::default()
        };
        for r in results {
            s.turns += r.turns;
            s.tool_calls += r.tool_calls;
            s.malformed_calls += r.malformed_calls;
            s.tool_errors += r.tool_errors;
            s.cut += usize::from(r.cut);
            s.env_seconds += r.env_seconds;
            match &r.error {
                Some(EnvError::TimedOut(_)) => s.timeouts += 1,
                Some(EnvError::Panicked(_)) => s.panics += 1,
                _ => {}
            }
            s.step_errors += usize::from(r.error.is_some());
        }
        s
    }

    /// Adds another batch's counts (dynamic-sampling rounds of one step).
    pub fn add(&mut self, o: &EpisodeStats) {
        self.episodes += o.episodes;
        self.turns += o.turns;
        self.tool_calls += o.tool_calls;
        self.malformed_calls += o.malformed_calls;
        self.tool_errors += o.tool_errors;
        self.step_errors += o.step_errors;
        self.timeouts += o.timeouts;
        self.panics += o.panics;
        self.cut += o.cut;
        self.env_seconds += o.env_seconds;
        self.wall_seconds += o.wall_seconds;
    }

    /// The `env/*` metrics of a step.
    pub fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        let n = self.episodes.max(1) as f64;
        [
            ("turns_mean", self.turns as f64 / n),
            ("tool_calls_mean", self.tool_calls as f64 / n),
            (
                "tool_call_rate",
                self.tool_calls as f64 / self.turns.max(1) as f64,
            ),
            ("malformed_calls", self.malformed_calls as f64),
            ("tool_errors", self.tool_errors as f64),
            ("step_errors", self.step_errors as f64),
            ("step_timeouts", self.timeouts as f64),
            ("step_panics", self.panics as f64),
            ("cut", self.cut as f64),
            ("env_seconds", self.env_seconds),
            ("wall_seconds", self.wall_seconds),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}/{k}"), v))
        .collect()
    }
}

enum Event {
    Turn(usize, rlrun_generator::Result<Completion>),
    Stepped(
        usize,
        Option<Box<dyn Episode>>,
        Result<Step, EnvError>,
        ModelTurnInfo,
        f64,
    ),
}

/// What the driver keeps of a turn while its step runs.
struct ModelTurnInfo {
    tool_calls: usize,
    malformed: usize,
    /// Index in the response of the turn's last sampled token.
    last_token: usize,
}

/// Runs one episode per entry of `episodes` (repeat a sample for several episodes of it) to its
/// end; results in the same order. Episode `i`'s turn `t` draws with
/// `key.with_prompt(i * KEY_TURNS + t)`.
pub fn run_episodes(
    generator: &dyn GeneratorActor,
    env: &dyn Environment,
    episodes: &[Sample],
    conv: &Conversation,
    key: DrawKey,
) -> anyhow::Result<Vec<EpisodeResult>> {
    let limits = &conv.limits;
    anyhow::ensure!(
        (limits.max_turns as u64) < KEY_TURNS,
        "max_turns must be below {KEY_TURNS}"
    );
    let ids = |text: &str| -> anyhow::Result<Vec<i64>> {
        Ok(conv
            .tokenizer
            .encode(text, false)?
            .into_iter()
            .map(i64::from)
            .collect())
    };
    let [eot] = ids(conv.end_of_turn)?[..] else {
        anyhow::bail!("end of turn `{}` is not one token", conv.end_of_turn);
    };
    let params = SamplingParams {
        n: 1,
        max_tokens: limits.max_tokens_per_turn,
        stop_token_ids: Some(vec![eot]),
        ..conv.sampling.clone()
    };
    let (tx, rx) = mpsc::channel::<Event>();
    let mut results = vec![EpisodeResult::default(); episodes.len()];
    let mut running: Vec<Option<Box<dyn Episode>>> = (0..episodes.len()).map(|_| None).collect();
    let mut in_flight: HashSet<u64> = HashSet::new();
    let base_id = NEXT_ID.fetch_add(
        episodes.len() as u64 * KEY_TURNS,
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut active = 0usize;
    let submit =
        |i: usize, r: &EpisodeResult, in_flight: &mut HashSet<u64>| -> anyhow::Result<bool> {
            let prompt = [r.prompt.as_slice(), r.response.as_slice()].concat();
            if prompt.len() + 2 > limits.max_context {
                return Ok(false);
            }
            let max_tokens = limits
                .max_tokens_per_turn
                .min(limits.max_context - prompt.len() - 1);
            let id = base_id + i as u64 * KEY_TURNS + r.turns as u64;
            let stream = generator.generate(vec![Request {
                id,
                prompt,
                params: SamplingParams {
                    max_tokens,
                    ..params.clone()
                },
                key: Some(key.with_prompt(i as u64 * KEY_TURNS + r.turns as u64)),
            }])?;
            in_flight.insert(id);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for c in stream {
                    let _ = tx.send(Event::Turn(i, c));
                }
            });
            Ok(true)
        };
    let outcome = (|| -> anyhow::Result<()> {
        let render = |messages: Vec<rlrun_rollout::ChatMessage>| -> anyhow::Result<Vec<i64>> {
            let mut first = conv.prelude.clone();
            first.extend(
                messages
                    .into_iter()
                    .map(|m| ChatMessage::new(m.role, m.content)),
            );
            let v = serde_json::to_value(&first)?;
            ids(&conv
                .template
                .render_json_with_tools(&v, conv.tools.as_ref(), true)?)
        };
        for (i, sample) in episodes.iter().enumerate() {
            match env.start(sample) {
                Ok(episode) => {
                    results[i].prompt = render(episode.first_messages())?;
                    results[i].policy_version = u64::MAX;
                    if submit(i, &results[i], &mut in_flight)? {
                        running[i] = Some(episode);
                        active += 1;
                    } else {
                        results[i].cut = true;
                    }
                }
                Err(e) => {
                    // Trained as its question with no turn (see below).
                    results[i].prompt = render(match &sample.prompt {
                        rlrun_rollout::Prompt::Messages(m) => m.clone(),
                        rlrun_rollout::Prompt::Text(t) => {
                            vec![rlrun_rollout::ChatMessage::user(t.clone())]
                        }
                    })?;
                    results[i].error = Some(e);
                }
            }
        }
        while active > 0 {
            match rx.recv().expect("the driver holds a sender") {
                Event::Turn(i, c) => {
                    let c = c?;
                    in_flight.remove(&c.request_id);
                    let r = &mut results[i];
                    r.turns += 1;
                    r.policy_version = r.policy_version.min(c.policy_version);
                    r.response.extend(&c.token_ids);
                    let last_token = r.response.len() - 1;
                    r.loss_mask
                        .extend(std::iter::repeat_n(1u8, c.token_ids.len()));
                    r.logprobs.extend(&c.logprobs);
                    r.routes = c.routes;
                    let episode = running[i].take().expect("a running episode");
                    let closed = c.token_ids.last() == Some(&eot);
                    if !closed {
                        if !limits.close_cut_turns || c.finish_reason != FinishReason::Length {
                            r.cut = true;
                            r.final_reward = episode.final_reward();
                            active -= 1;
                            continue;
                        }
                        r.response.push(eot);
                        r.loss_mask.push(0);
                        r.logprobs.push(0.0);
                        r.routes.clear();
                    }
                    let sampled = &c.token_ids[..c.token_ids.len() - usize::from(closed)];
                    let body: Vec<u32> = sampled.iter().map(|&t| t as u32).collect();
                    let text = conv.tokenizer.decode(&body, false)?;
                    let tool_calls = parse_tool_calls(&text, env.tool_call_format());
                    let info = ModelTurnInfo {
                        tool_calls: tool_calls.len(),
                        malformed: tool_calls.iter().filter(|c| c.is_err()).count(),
                        last_token,
                    };
                    let turn = ModelTurn { text, tool_calls };
                    let (tx, limit) = (tx.clone(), limits.step_timeout);
                    std::thread::spawn(move || {
                        let t = Instant::now();
                        let (episode, step) = run_step(episode, turn, limit);
                        let secs = t.elapsed().as_secs_f64();
                        let _ = tx.send(Event::Stepped(i, episode, step, info, secs));
                    });
                }
                Event::Stepped(i, episode, step, info, secs) => {
                    let r = &mut results[i];
                    r.env_seconds += secs;
                    r.tool_calls += info.tool_calls;
                    r.malformed_calls += info.malformed;
                    let (episode, step) = match (episode, step) {
                        (Some(e), Ok(s)) => (e, s),
                        (_, Err(e)) => {
                            r.error = Some(e);
                            r.final_reward = 0.0;
                            active -= 1;
                            continue;
                        }
                        (None, Ok(_)) => unreachable!("run_step returns the episode with its step"),
                    };
                    if let Some(reward) = step.reward {
                        r.turn_rewards.push(reward);
                        r.turn_reward_positions.push(info.last_token);
                    }
                    r.tool_errors += step.tool_errors;
                    if step.done || r.turns >= limits.max_turns {
                        r.cut = !step.done;
                        r.final_reward = episode.final_reward();
                        active -= 1;
                        continue;
                    }
                    let obs: Vec<ChatMessage> = step
                        .observation
                        .iter()
                        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                        .collect();
                    let suffix = ids(&conv.template.observation_suffix(&obs, conv.end_of_turn)?)?;
                    r.loss_mask.extend(std::iter::repeat_n(0u8, suffix.len()));
                    r.logprobs.extend(std::iter::repeat_n(0f32, suffix.len()));
                    r.response.extend(suffix);
                    r.routes.clear();
                    if submit(i, r, &mut in_flight)? {
                        running[i] = Some(episode);
                    } else {
                        r.cut = true;
                        r.final_reward = episode.final_reward();
                        active -= 1;
                    }
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        if !in_flight.is_empty() {
            let _ = generator.abort(in_flight.into_iter().collect());
        }
        return Err(e);
    }
    for r in &mut results {
        if r.policy_version == u64::MAX {
            r.policy_version = 0;
        }
        // An episode that never got a turn (its start failed, or its first messages do not fit
        // the context) still trains as one context token: no loss, reward 0.
        if r.response.is_empty() {
            r.response.push(eot);
            r.loss_mask.push(0);
            r.logprobs.push(0.0);
        }
    }
    Ok(results)
}

/// Request ids of episode turns: a range per batch, apart from other generation's ids.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 48);
