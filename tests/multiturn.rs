//! Multi-turn episodes (issue 16) on the tiny Llama model through the generator actor: the ids
//! the trainer sees are exactly those the generator sampled plus the observations rendered once
//! (every turn's request is a prefix of the final trajectory, and the trainer's log-probs of the
//! model's tokens equal the generator's); observation tokens are masked out; a step that hangs
//! forever and one that panics fail their own episodes (scored 0, counted) while the rest of the
//! batch finishes; later turns continue the generator's kept caches. And a recipe with an
//! `[environment]` trains end to end.

use std::sync::Mutex;
use std::time::Duration;

mod common;

use rlrun::multiturn::{run_episodes, Conversation, EpisodeLimits, EpisodeStats};
use rlrun_generator::{
    CompletionStream, DrawKey, Engine, EngineConfig, EngineStats, GeneratorActor, LocalGenerator,
    Request, SamplingParams, WeightUpdate,
};
use rlrun_model::{ChatMessage, Device, Kind, ModelFiles};
use rlrun_rollout::env::tools::ToolCallFormat;
use rlrun_rollout::env::{EnvError, Environment, Episode, ModelTurn, Step};
use rlrun_rollout::{AdvantageEstimator, AdvantageInput, Prompt, ReinforcePp, Sample};
use rlrun_testkit::{fixtures, tempdir};
use rlrun_trainer::{TrainSequence, Trainer, TrainerConfig};

/// Records every request it forwards.
struct Recording {
    inner: LocalGenerator,
    requests: Mutex<Vec<Request>>,
}

impl GeneratorActor for Recording {
    fn generate(&self, requests: Vec<Request>) -> rlrun_generator::Result<CompletionStream> {
        self.requests
            .lock()
            .unwrap()
            .extend(requests.iter().cloned());
        self.inner.generate(requests)
    }
    fn update_weights(&self, version: u64, update: WeightUpdate) -> rlrun_generator::Result<()> {
        self.inner.update_weights(version, update)
    }
    fn abort(&self, ids: Vec<u64>) -> rlrun_generator::Result<()> {
        self.inner.abort(ids)
    }
    fn stats(&self) -> rlrun_generator::Result<EngineStats> {
        self.inner.stats()
    }
    fn health(&self) -> rlrun_generator::Result<()> {
        self.inner.health()
    }
}

/// Episode 0's first step never returns; episode 1's panics; the others get two observations
/// (per-turn reward 0.5 each) and end after their third turn with final reward 1.
struct Scripted;

struct ScriptedEpisode {
    id: u64,
    turns: usize,
}

impl Environment for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn tool_call_format(&self) -> ToolCallFormat {
        ToolCallFormat::Text
    }
    fn start(&self, sample: &Sample) -> Result<Box<dyn Episode>, EnvError> {
        Ok(Box::new(ScriptedEpisode {
            id: sample.id,
            turns: 0,
        }))
    }
}

impl Episode for ScriptedEpisode {
    fn first_messages(&self) -> Vec<rlrun_rollout::ChatMessage> {
        vec![rlrun_rollout::ChatMessage::user(format!(
            "episode {}",
            self.id
        ))]
    }
    fn step(&mut self, _turn: &ModelTurn) -> Result<Step, EnvError> {
        self.turns += 1;
        match self.id {
            0 => loop {
                std::thread::park();
            },
            1 => panic!("the tool crashed"),
            _ => {}
        }
        if self.turns == 3 {
            return Ok(Step {
                done: true,
                ..Default::default()
            });
        }
        Ok(Step {
            observation: vec![rlrun_rollout::ChatMessage::new(
                "tool",
                format!("result {} of turn {}", self.id, self.turns),
            )],
            reward: Some(0.5),
            done: false,
            tool_errors: usize::from(self.turns == 2),
        })
    }
    fn final_reward(&self) -> f32 {
        1.0
    }
}

#[test]
fn episodes_are_token_exact_masked_and_survive_hanging_and_crashing_steps() {
    let files = ModelFiles::open(&fixtures().join("tiny-llama3")).unwrap();
    let weights = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    let engine = Engine::new(
        files.config.clone(),
        weights.to(Kind::Float, Device::Cpu).unwrap(),
        vec![],
        None,
        EngineConfig {
            max_slots: 16,
            max_len: 256,
            prefix_cache_tokens: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let generator = Recording {
        inner: LocalGenerator::spawn(engine),
        requests: Mutex::new(Vec::new()),
    };
    let template = files.chat_template().unwrap().unwrap();
    let conv = Conversation {
        template: &template,
        tokenizer: &files.tokenizer,
        end_of_turn: "<|im_end|>",
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(5),
            ..Default::default()
        },
        limits: EpisodeLimits {
            max_turns: 4,
            max_tokens_per_turn: 6,
            max_context: 255,
            step_timeout: Duration::from_millis(1500),
            close_cut_turns: true,
        },
        prelude: vec![ChatMessage::new("system", "be brief")],
        tools: None,
    };
    let samples: Vec<Sample> = (0..8)
        .map(|i| Sample::new(i, Prompt::user(format!("episode {i}"))))
        .collect();
    let results = run_episodes(
        &generator,
        &Scripted,
        &samples,
        &conv,
        DrawKey::train(1, 0, 0),
    )
    .expect("the batch finishes");
    assert!(matches!(results[0].error, Some(EnvError::TimedOut(_))));
    assert!(matches!(&results[1].error, Some(EnvError::Panicked(m)) if m.contains("crashed")));
    for r in &results[..2] {
        assert_eq!((r.turns, r.final_reward, r.reward(true)), (1, 0.0, 0.0));
    }
    // Later turns continued the kept caches of earlier ones (only their new tokens prefilled).
    let engine = generator.stats().unwrap();
    assert!(engine.prefix_hit_tokens > 0, "{engine:?}");
    let stats = EpisodeStats::of(&results, 0.0);
    assert_eq!((stats.timeouts, stats.panics, stats.step_errors), (1, 1, 2));
    assert_eq!(stats.tool_errors, 6, "one per finished episode");
    let eot = files.tokenizer.encode("<|im_end|>", false).unwrap()[0] as i64;
    let requests = generator.requests.lock().unwrap().clone();
    for (i, r) in results.iter().enumerate().skip(2) {
        assert!(r.error.is_none(), "episode {i}: {:?}", r.error);
        assert_eq!(r.turns, 3);
        assert_eq!(r.turn_rewards, vec![0.5, 0.5]);
        assert_eq!(r.reward(true), 2.0);
        assert_eq!(r.reward(false), 1.0);
        assert!(!r.cut);
        // Every request of this episode is a prefix of its final trajectory: nothing earlier was
        // ever re-tokenized.
        let full = [r.prompt.as_slice(), r.response.as_slice()].concat();
        let mine: Vec<&Request> = requests
            .iter()
            .filter(|q| q.key.map(|k| k.prompt / rlrun::multiturn::KEY_TURNS) == Some(i as u64))
            .collect();
        assert_eq!(mine.len(), 3, "episode {i}: one request per turn");
        for q in &mine {
            assert!(
                full.starts_with(&q.prompt),
                "episode {i}: a turn's prompt diverges"
            );
        }
        // Loss mask: the model's tokens are 1, and each observation is exactly the template's
        // suffix (after the turn's end-of-turn token), masked 0.
        assert_eq!(r.loss_mask.len(), r.response.len());
        assert_eq!(r.logprobs.len(), r.response.len());
        for (turn, q) in mine.iter().enumerate().skip(1) {
            let obs = [ChatMessage::new(
                "tool",
                format!("result {i} of turn {turn}"),
            )];
            let suffix: Vec<i64> = files
                .tokenizer
                .encode(
                    &template.observation_suffix(&obs, "<|im_end|>").unwrap(),
                    false,
                )
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect();
            let next = q.prompt.len();
            assert_eq!(&full[next - suffix.len()..next], suffix.as_slice());
            assert_eq!(
                full[next - suffix.len() - 1],
                eot,
                "a turn ends with <|im_end|>"
            );
            let start = next - suffix.len() - r.prompt.len();
            assert!(r.loss_mask[start..start + suffix.len()]
                .iter()
                .all(|&m| m == 0));
        }
        let sampled = r.loss_mask.iter().filter(|&&m| m == 1).count();
        assert!(sampled >= 3, "episode {i}: {sampled} sampled tokens");
        // Per-turn rewards sit on their turns' last sampled tokens, each followed by the end of
        // the turn; REINFORCE++ (mask given) credits every model token with the rewards at or
        // after it, observation tokens with nothing.
        let tr = r.token_rewards();
        assert_eq!(r.turn_reward_positions.len(), 2);
        for &p in &r.turn_reward_positions {
            assert_eq!((r.loss_mask[p], r.response[p + 1], tr[p]), (1, eot, 0.5));
        }
        let mask: Vec<Vec<bool>> = vec![r.loss_mask.iter().map(|&m| m == 1).collect()];
        let trs = vec![tr.clone()];
        let (outcome, len) = ([r.final_reward], [r.response.len()]);
        let input = AdvantageInput::new(&outcome, &[0], &len)
            .with_token_rewards(&trs)
            .with_response_mask(&mask);
        let out = ReinforcePp::default().compute(&input).unwrap();
        for t in 0..r.response.len() {
            if r.loss_mask[t] == 1 {
                let want = r.final_reward + tr[t..].iter().sum::<f32>();
                assert!((out.returns[0][t] - want).abs() < 1e-6, "token {t}");
            } else {
                assert_eq!(out.advantages[0][t], 0.0);
            }
        }
    }
    // The trainer, given the trajectories, computes the generator's log-probs on every token
    // the model sampled.
    let trainer = Trainer::new(
        files.config.clone(),
        &weights,
        Kind::Float,
        None,
        TrainerConfig::default(),
    )
    .unwrap();
    let seqs: Vec<TrainSequence> = results[2..]
        .iter()
        .map(|r| TrainSequence {
            prompt: r.prompt.clone(),
            response: r.response.clone(),
            advantages: vec![1.0; r.response.len()],
            behavior_logprobs: Some(r.logprobs.clone()),
            loss_mask: r.loss_mask.clone(),
            ..Default::default()
        })
        .collect();
    let lps = trainer.compute_logprobs(&seqs).unwrap();
    let mut worst = 0f32;
    let mut compared = 0;
    for (r, lp) in results[2..].iter().zip(&lps) {
        for ((&m, &g), &t) in r.loss_mask.iter().zip(&r.logprobs).zip(lp) {
            if m == 1 {
                worst = worst.max((g - t).abs());
                compared += 1;
            }
        }
    }
    eprintln!("generator vs trainer on {compared} sampled tokens: max |Δ logprob| {worst:e}");
    assert!(worst <= 1e-5, "{worst:e}");
}

/// A recipe with an `[environment]` (the calculator recipe on the tiny model, playing
/// guess-the-number, whose feedback keeps episodes going): episodes run, train and are counted
/// in the step's `env/*` metrics and the evaluation's.
#[test]
fn environment_recipe_trains_and_logs_episode_metrics() {
    let tmp = tempdir();
    let mut args = vec!["recipes/multiturn_calculator.toml".to_string()];
    args.extend(common::set_args(&[
        format!("model.path={}", fixtures().join("tiny-llama3").display()),
        format!("logging.run_dir={}", tmp.path().display()),
        "steps=1".into(),
        "data.prompts_per_step=2".into(),
        "rollout.n=2".into(),
        "eval.size=4".into(),
        "environment.close_cut_turns=true".into(),
        "environment.name=guess-number".into(),
        "environment.tools=[]".into(),
    ]));
    let out = common::rlrun(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("tool calls per held-out episode"),
        "{stdout}"
    );
    let lines = common::metrics(&common::run_dir(tmp.path()));
    let step = lines
        .iter()
        .find(|l| l.get("env/turns_mean").is_some())
        .expect("a step with env metrics");
    // Wrong guesses and closed cut turns go on to the next turn: with 3 turns allowed, the tiny
    // model's episodes take more than one.
    assert!(step["env/turns_mean"].as_f64().unwrap() > 1.0, "{step}");
    for k in [
        "env/tool_calls_mean",
        "env/step_errors",
        "env/cut",
        "actor/entropy",
    ] {
        assert!(step.get(k).is_some(), "{k} missing: {step}");
    }
    assert!(lines.iter().any(|l| l.get("eval/env/turns_mean").is_some()));
}

/// The tools the chat template receives are the tools' schemas: the Qwen3 template rendered with
/// the calculator's schema equals transformers' `apply_chat_template(..., tools=[...])` (the
/// fixture's cases, checked in `model/tests/tokenizer.rs`), and that schema is this one.
#[test]
fn calculator_schema_is_the_one_the_template_fixtures_render() {
    use rlrun_rollout::env::tools::{Calculator, Tool};
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("qwen3-tokenizer-cases.json")).unwrap(),
    )
    .unwrap();
    let with_tools: Vec<&serde_json::Value> = cases["chats"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("tools").is_some())
        .collect();
    assert!(!with_tools.is_empty());
    for c in with_tools {
        assert_eq!(c["tools"][0], Calculator.schema());
        assert!(c["text"]
            .as_str()
            .unwrap()
            .contains("\"name\": \"calculator\""));
    }
}
