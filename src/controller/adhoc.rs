//! Calls outside the training schedule, for notebooks and tools: ad-hoc generation, log-probs
//! under the current policy, and read access to the run's parts.

use std::collections::BTreeMap;
use std::sync::Arc;

use rlrun_generator::{Completion, DrawKey, GeneratorActor, SamplingParams};
use rlrun_model::Tokenizer;
use rlrun_rollout::{Prompt, RewardRunner, Sample};
use rlrun_trainer::TrainSequence;
use tch::Device;

use super::rollouts::{self, PromptItem};
use super::{EvalResult, Run};
use crate::error::Result;

impl Run {
    /// Samples completions of `prompts` from the current policy (ad hoc, outside training).
    pub fn generate_prompts(
        &self,
        prompts: &[Prompt],
        params: SamplingParams,
    ) -> Result<Vec<Vec<(String, Completion)>>> {
        let items = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(PromptItem {
                    sample: Arc::new(Sample::new(i as u64, p.clone())),
                    ids: self.prompts.encode(p)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let key = DrawKey {
            step: self.step,
            ..DrawKey::default()
        };
        let groups = rollouts::generate(self.actors.generator.as_ref(), &items, &params, key)?;
        groups
            .into_iter()
            .map(|g| {
                g.into_iter()
                    .map(|c| Ok((self.prompts.decode(&c.token_ids)?, c)))
                    .collect()
            })
            .collect()
    }

    /// Log-probs of `response` tokens after `prompt` under the current policy (trainer side).
    pub fn logprobs(&self, prompt: Vec<i64>, response: Vec<i64>) -> Result<Vec<f32>> {
        let n = response.len();
        let seq = TrainSequence {
            prompt,
            response,
            advantages: vec![0.0; n],
            ..Default::default()
        };
        Ok(self.actors.trainer.compute_logprobs(&[seq])?.remove(0))
    }

    /// Renders and tokenizes a prompt.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<i64>> {
        self.prompts.encode(prompt)
    }

    /// (prompt, completion, reward) of the last evaluation.
    pub fn last_eval_samples(&self) -> &[(String, String, f32)] {
        &self.last_eval
    }
    pub fn step_index(&self) -> u64 {
        self.step
    }
    pub fn history(&self) -> &[BTreeMap<String, f64>] {
        &self.history
    }
    pub fn evals(&self) -> &[EvalResult] {
        &self.evals
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.prompts.tokenizer
    }
    /// The reward runner (None when an environment scores episodes).
    pub fn rewards_mut(&mut self) -> Option<&mut RewardRunner> {
        self.rewards.as_mut()
    }
    pub fn generator(&self) -> &dyn GeneratorActor {
        self.actors.generator.as_ref()
    }
    pub fn device(&self) -> Device {
        self.actors.device
    }
}
