//! Multi-turn rollouts of a recipe with an `[environment]`: each prompt's `n` samples are
//! episodes run by [`crate::multiturn::run_episodes`]; each becomes one training sequence whose
//! observation tokens are masked out of the loss.

use std::sync::Arc;
use std::time::Instant;

use rlrun_generator::{Completion, DrawKey, FinishReason, GeneratorActor, SamplingParams, Timings};
use rlrun_model::{ChatMessage, ChatTemplate, ModelFiles, Tokenizer};
use rlrun_rollout::env::{Environment, EnvironmentConfig};
use rlrun_rollout::Sample;

use super::rollouts::{PromptEncoder, ScoredGroup};
use crate::error::{Error, Result};
use crate::multiturn::{run_episodes, Conversation, EpisodeLimits, EpisodeResult, EpisodeStats};
use crate::recipe::RecipeConfig;

/// End-of-turn tokens of the supported chat templates (ChatML, Gemma, Llama 3, Phi).
const END_OF_TURN: &[&str] = &["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"];

/// The run's environment and what episodes are rendered with.
pub(crate) struct Episodes {
    env: Arc<dyn Environment>,
    cfg: EnvironmentConfig,
    template: ChatTemplate,
    tokenizer: Arc<Tokenizer>,
    end_of_turn: String,
    prelude: Vec<ChatMessage>,
    tools: Option<serde_json::Value>,
    max_context: usize,
    max_tokens_per_turn: usize,
}

/// A batch of episodes as groups of the step, with their counts.
pub(crate) struct EpisodeBatch {
    pub groups: Vec<ScoredGroup>,
    pub stats: EpisodeStats,
}

impl Episodes {
    /// The recipe's environment, if it has one.
    pub fn new(
        c: &RecipeConfig,
        env: Option<Arc<dyn Environment>>,
        files: &ModelFiles,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<Option<Self>> {
        let (Some(cfg), Some(env)) = (&c.environment, env) else {
            return Ok(None);
        };
        let template = files.chat_template()?.ok_or_else(|| {
            Error::Usage("[environment] needs a model with a chat template".into())
        })?;
        let probe = [ChatMessage::new("user", "ok")];
        let end_of_turn = END_OF_TURN
            .iter()
            .find(|t| {
                tokenizer.encode(t, false).is_ok_and(|ids| ids.len() == 1)
                    && template.observation_suffix(&probe, t).is_ok()
            })
            .ok_or_else(|| {
                Error::Usage(format!(
                    "[environment]: the model's chat template ends assistant turns with none of {END_OF_TURN:?} (as one token)"
                ))
            })?
            .to_string();
        let mut prelude = Vec::new();
        if let Some(sys) = &c.data.system_prompt {
            prelude.push(ChatMessage::new("system", sys.clone()));
        }
        prelude.extend(
            cfg.prelude
                .iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone())),
        );
        let schemas: Vec<serde_json::Value> = env.tools().iter().map(|t| t.schema()).collect();
        Ok(Some(Episodes {
            tools: (!schemas.is_empty()).then_some(serde_json::Value::Array(schemas)),
            max_tokens_per_turn: cfg.max_tokens_per_turn.unwrap_or(c.rollout.max_tokens),
            // The generator's context (see placement::engine_config) less one.
            max_context: c.data.max_prompt_tokens
                + c.rollout.max_tokens.max(c.eval.max_tokens.unwrap_or(0)),
            cfg: cfg.clone(),
            env,
            template,
            tokenizer,
            end_of_turn,
            prelude,
        }))
    }

    /// Runs `n` episodes of each sample (group-major) with `sampling` and makes them groups.
    pub fn run(
        &self,
        generator: &dyn GeneratorActor,
        enc: &PromptEncoder,
        samples: &[Sample],
        n: usize,
        sampling: &SamplingParams,
        key: DrawKey,
    ) -> Result<EpisodeBatch> {
        let t = Instant::now();
        let episodes: Vec<Sample> = samples
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.clone(), n))
            .collect();
        let conv = Conversation {
            template: &self.template,
            tokenizer: &self.tokenizer,
            end_of_turn: &self.end_of_turn,
            sampling: sampling.clone(),
            limits: EpisodeLimits {
                max_turns: self.cfg.max_turns,
                max_tokens_per_turn: self.max_tokens_per_turn,
                max_context: self.max_context,
                step_timeout: self.cfg.step_timeout(),
                close_cut_turns: self.cfg.close_cut_turns,
            },
            prelude: self.prelude.clone(),
            tools: self.tools.clone(),
        };
        let results = run_episodes(generator, self.env.as_ref(), &episodes, &conv, key)
            .map_err(|e| Error::Usage(format!("multi-turn rollouts: {e:#}")))?;
        let stats = EpisodeStats::of(&results, t.elapsed().as_secs_f64());
        for r in &results {
            if let Some(e) = &r.error {
                tracing::debug!("episode failed: {e}");
            }
        }
        let mut groups = Vec::with_capacity(samples.len());
        for chunk in results.chunks(n.max(1)) {
            let mut g = ScoredGroup {
                prompt_ids: chunk.first().map(|r| r.prompt.clone()).unwrap_or_default(),
                prompt_text: String::new(),
                completions: Vec::new(),
                rewards: Vec::new(),
                texts: Vec::new(),
                episodes: Vec::new(),
            };
            g.prompt_text = enc.decode(&g.prompt_ids)?;
            for (j, r) in chunk.iter().enumerate() {
                g.completions.push(completion(r, j));
                g.rewards.push(r.reward(self.cfg.turn_rewards));
                g.texts.push(enc.decode(&r.response)?);
                g.episodes.push(super::rollouts::EpisodeTokens {
                    prompt: r.prompt.clone(),
                    loss_mask: r.loss_mask.clone(),
                    outcome: r.final_reward,
                    token_rewards: if self.cfg.turn_rewards {
                        r.token_rewards()
                    } else {
                        Vec::new()
                    },
                });
            }
            groups.push(g);
        }
        Ok(EpisodeBatch { groups, stats })
    }
}

/// An episode as the completion of its group's `j`-th sample (the response holds every turn
/// and observation).
fn completion(r: &EpisodeResult, j: usize) -> Completion {
    Completion {
        request_id: 0,
        index: j,
        prompt_len: r.prompt.len(),
        token_ids: r.response.clone(),
        logprobs: r.logprobs.clone(),
        finish_reason: if r.cut {
            FinishReason::Length
        } else {
            FinishReason::Stop
        },
        policy_version: r.policy_version,
        timings: Timings::default(),
        routes: r.routes.clone(),
    }
}
