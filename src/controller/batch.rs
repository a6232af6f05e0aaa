//! Batch building: pure functions from scored rollouts to the trainer's batch.

use rlrun_rollout::AdvantageOutput;
use rlrun_trainer::{SeqValues, TrainSequence};

use super::rollouts::ScoredGroup;
use super::Rollout;

/// The sequences of a step, flat (group-major), with what advantages and metrics need.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepBatch {
    pub seqs: Vec<TrainSequence>,
    /// Which group (prompt) each sequence belongs to.
    pub group_ids: Vec<u64>,
    pub rewards: Vec<f32>,
    /// (prompt, completion) texts.
    pub texts: Vec<(String, String)>,
    /// The policy version that generated each sequence.
    pub versions: Vec<u64>,
    pub lengths: Vec<usize>,
    /// Multi-turn episodes: the final rewards (`rewards` hold the episodes' totals), the
    /// per-turn rewards per token, and which tokens are the model's (observations are not: no
    /// advantage, left out of the estimators' statistics). None without episodes.
    pub outcomes: Option<Vec<f32>>,
    pub token_rewards: Option<Vec<Vec<f32>>>,
    pub response_mask: Option<Vec<Vec<bool>>>,
}

/// One training sequence per completion of `groups`, carrying the generator's log-probs.
pub(crate) fn build(groups: &[ScoredGroup]) -> StepBatch {
    let mut b = StepBatch::default();
    for (gi, g) in groups.iter().enumerate() {
        for (j, ((comp, &reward), text)) in g
            .completions
            .iter()
            .zip(&g.rewards)
            .zip(&g.texts)
            .enumerate()
        {
            let episode = g.episodes.get(j);
            b.seqs.push(TrainSequence {
                prompt: episode.map_or_else(|| g.prompt_ids.clone(), |e| e.prompt.clone()),
                response: comp.token_ids.clone(),
                advantages: Vec::new(),
                behavior_logprobs: Some(comp.logprobs.clone()),
                routes: comp.routes.clone(),
                loss_mask: episode.map(|e| e.loss_mask.clone()).unwrap_or_default(),
                ..Default::default()
            });
            if let Some(e) = episode {
                let len = comp.token_ids.len();
                b.token_rewards.get_or_insert_with(Vec::new).push(
                    if e.token_rewards.len() == len {
                        e.token_rewards.clone()
                    } else {
                        vec![0.0; len]
                    },
                );
                b.response_mask
                    .get_or_insert_with(Vec::new)
                    .push(e.loss_mask.iter().map(|&m| m == 1).collect());
            }
            if let Some(e) = episode {
                b.outcomes.get_or_insert_with(Vec::new).push(e.outcome);
            }
            b.group_ids.push(gi as u64);
            b.rewards.push(reward);
            b.texts.push((g.prompt_text.clone(), text.clone()));
            b.versions.push(comp.policy_version);
            b.lengths.push(comp.token_ids.len());
        }
    }
    b
}

/// Puts the estimator's advantages (and, with a critic, returns and old values) on the sequences.
pub(crate) fn set_advantages(
    seqs: &mut [TrainSequence],
    adv: AdvantageOutput,
    values: Option<SeqValues>,
) {
    let mut returns = adv.returns.into_iter();
    let mut values = values.map(Vec::into_iter);
    for (s, a) in seqs.iter_mut().zip(adv.advantages) {
        s.advantages = a;
        let r = returns.next();
        if let Some(v) = values.as_mut().and_then(Iterator::next) {
            s.returns = r;
            s.old_values = Some(v);
        }
    }
}

/// The step's rollouts for inspection ([`super::Run::last_rollouts`]).
pub(crate) fn rollouts(b: &StepBatch) -> Vec<Rollout> {
    b.seqs
        .iter()
        .zip(&b.texts)
        .zip(&b.rewards)
        .zip(&b.versions)
        .map(
            |(((s, (prompt, completion)), &reward), &policy_version)| Rollout {
                prompt: prompt.clone(),
                completion: completion.clone(),
                prompt_ids: s.prompt.clone(),
                token_ids: s.response.clone(),
                logprobs: s.behavior_logprobs.clone().unwrap_or_default(),
                reward,
                advantages: s.advantages.clone(),
                policy_version,
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlrun_generator::{Completion, FinishReason, Timings};

    fn completion(tokens: Vec<i64>, version: u64) -> Completion {
        Completion {
            request_id: 0,
            index: 0,
            prompt_len: 2,
            logprobs: tokens.iter().map(|&t| -(t as f32)).collect(),
            token_ids: tokens,
            finish_reason: FinishReason::Stop,
            policy_version: version,
            timings: Timings::default(),
            routes: vec![],
        }
    }

    fn group(prompt: Vec<i64>, comps: Vec<Completion>, rewards: Vec<f32>) -> ScoredGroup {
        ScoredGroup {
            prompt_text: format!("{prompt:?}"),
            prompt_ids: prompt,
            texts: comps.iter().map(|c| format!("{:?}", c.token_ids)).collect(),
            completions: comps,
            rewards,
            episodes: Vec::new(),
        }
    }

    #[test]
    fn one_sequence_per_completion_group_major() {
        let groups = vec![
            group(
                vec![1, 2],
                vec![completion(vec![3], 0), completion(vec![4, 5], 1)],
                vec![0.0, 1.0],
            ),
            group(vec![6], vec![completion(vec![7, 8, 9], 1)], vec![0.5]),
        ];
        let b = build(&groups);
        assert_eq!(b.group_ids, vec![0, 0, 1]);
        assert_eq!(b.rewards, vec![0.0, 1.0, 0.5]);
        assert_eq!(b.lengths, vec![1, 2, 3]);
        assert_eq!(b.versions, vec![0, 1, 1]);
        assert_eq!(b.seqs[1].prompt, vec![1, 2]);
        assert_eq!(b.seqs[2].response, vec![7, 8, 9]);
        assert_eq!(b.seqs[2].behavior_logprobs, Some(vec![-7.0, -8.0, -9.0]));
        assert_eq!(b.texts[2], ("[6]".to_string(), "[7, 8, 9]".to_string()));
    }

    #[test]
    fn episodes_carry_their_prompts_masks_outcomes_and_turn_rewards() {
        let mut g = group(
            vec![1, 2],
            vec![completion(vec![3, 4, 5, 6], 0), completion(vec![7, 8], 0)],
            vec![1.5, 0.0],
        );
        g.episodes = vec![
            super::super::rollouts::EpisodeTokens {
                prompt: vec![1, 2, 9],
                loss_mask: vec![1, 0, 0, 1],
                outcome: 1.0,
                token_rewards: vec![0.5, 0.0, 0.0, 0.0],
            },
            super::super::rollouts::EpisodeTokens {
                prompt: vec![1, 2],
                loss_mask: vec![1, 1],
                outcome: 0.0,
                token_rewards: Vec::new(),
            },
        ];
        let b = build(&[g]);
        assert_eq!(b.seqs[0].prompt, vec![1, 2, 9]);
        assert_eq!(b.seqs[0].loss_mask, vec![1, 0, 0, 1]);
        // Totals for metrics and sampling; outcomes and per-token rewards for the estimators.
        assert_eq!(b.rewards, vec![1.5, 0.0]);
        assert_eq!(b.outcomes, Some(vec![1.0, 0.0]));
        assert_eq!(
            b.token_rewards,
            Some(vec![vec![0.5, 0.0, 0.0, 0.0], vec![0.0, 0.0]])
        );
        assert_eq!(
            b.response_mask,
            Some(vec![vec![true, false, false, true], vec![true, true]])
        );
        assert!(
            build(&[group(vec![1], vec![completion(vec![2], 0)], vec![1.0])])
                .outcomes
                .is_none()
        );
    }

    #[test]
    fn advantages_and_critic_targets_land_on_their_sequences() {
        let groups = vec![group(
            vec![1],
            vec![completion(vec![3], 0), completion(vec![4, 5], 0)],
            vec![0.0, 1.0],
        )];
        let mut b = build(&groups);
        let mut adv = AdvantageOutput::default();
        adv.advantages = vec![vec![-1.0], vec![1.0, 1.0]];
        adv.returns = vec![vec![0.0], vec![1.0, 1.0]];
        set_advantages(&mut b.seqs, adv.clone(), None);
        assert_eq!(b.seqs[1].advantages, vec![1.0, 1.0]);
        assert!(b.seqs[1].returns.is_none() && b.seqs[1].old_values.is_none());
        set_advantages(&mut b.seqs, adv, Some(vec![vec![0.1], vec![0.2, 0.3]]));
        assert_eq!(b.seqs[1].returns, Some(vec![1.0, 1.0]));
        assert_eq!(b.seqs[1].old_values, Some(vec![0.2, 0.3]));
        let r = rollouts(&b);
        assert_eq!(r[1].advantages, vec![1.0, 1.0]);
        assert_eq!(r[1].token_ids, vec![4, 5]);
    }
}
