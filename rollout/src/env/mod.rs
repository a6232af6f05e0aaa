//! Multi-turn environments: an episode opens with messages built from a dataset row, the model
//! answers, the environment replies with observation messages (tool results, game feedback) and
//! optionally a per-turn reward, until it says the episode is done; then a final reward.
//!
//! This is the environment side of multi-turn RL (issue 16). The rollout side that keeps
//! trajectories as token ids (generated tokens as sampled, observation tokens rendered once and
//! appended, with a loss mask so only the model's tokens carry loss: `TrainSequence::loss_mask` in
//! the trainer) is not wired into the controller yet.
//!
//! Environments are object-safe (`Box<dyn Environment>`), `Send + Sync`, and may be slow: the
//! caller runs episode steps off the decode loop with time limits (see [`run_step`]): a step that
//! panics or runs past its limit ends the episode with a failure, counted, never fatal.

pub mod tools;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::sample::{ChatMessage, Sample};
use tools::{ParsedCall, Tool, ToolCallFormat};

/// Why an environment could not start or step an episode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("{0}")]
    Failed(String),
    #[error("step panicked: {0}")]
    Panicked(String),
    #[error("step took longer than {0:?}")]
    TimedOut(Duration),
}

/// What the model said in one turn: its text, and the tool calls parsed from it (malformed
/// ones included, so the environment can answer them with an error).
#[derive(Debug, Clone)]
pub struct ModelTurn {
    pub text: String,
    pub tool_calls: Vec<ParsedCall>,
}

/// The environment's answer to a turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// Messages appended to the conversation (e.g. `tool` results); empty when done.
    pub observation: Vec<ChatMessage>,
    /// A reward for this turn (per-turn credit), if the environment gives one.
    pub reward: Option<f32>,
    /// The episode is over.
    pub done: bool,
    /// Tool calls of this turn that failed (an error answered to the model: unknown tool,
    /// malformed call, the tool's own error), for the `env/tool_errors` metric.
    pub tool_errors: usize,
}

/// One running episode.
pub trait Episode: Send {
    /// The messages that open the episode (the prompt).
    fn first_messages(&self) -> Vec<ChatMessage>;
    /// Answers the model's turn.
    fn step(&mut self, turn: &ModelTurn) -> Result<Step, EnvError>;
    /// The reward of the whole episode, once it is done (or cut by the turn limit).
    fn final_reward(&self) -> f32;
}

/// A multi-turn environment: starts episodes from dataset rows.
pub trait Environment: Send + Sync {
    /// A short name for logs and metrics.
    fn name(&self) -> &str;
    /// Tools the model may call, passed to the chat template as `tools`.
    fn tools(&self) -> Vec<&dyn Tool> {
        Vec::new()
    }
    /// The format tool calls are parsed in (the model family's own).
    fn tool_call_format(&self) -> ToolCallFormat {
        ToolCallFormat::Hermes
    }
    /// Starts an episode for `sample`.
    fn start(&self, sample: &Sample) -> Result<Box<dyn Episode>, EnvError>;
}

/// `[environment]` of a recipe: which environment runs the episodes.
///
/// ```toml
/// [environment]
/// name = "tools"              # or "guess-number", or "registered" (class = NAME)
/// tools = ["calculator"]
/// tool_call_format = "text"   # hermes (Qwen), llama3, text
/// max_turns = 3
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentConfig {
    /// `tools` ([`ToolEnv`]), `guess-number` ([`GuessNumber`]) or `registered` (an
    /// environment registered at run time, e.g. a Python class, named by `class`).
    pub name: String,
    /// `registered`: the name it was registered under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// `tools`: the tools offered (`calculator`).
    #[serde(default)]
    pub tools: Vec<String>,
    /// How tool calls are parsed from the model's text (default `hermes`).
    #[serde(default = "default_format")]
    pub tool_call_format: ToolCallFormat,
    /// Model turns per episode at most (default 4).
    #[serde(default = "default_max_turns")]
    pub max_turns: usize,
    /// Tokens per model turn at most (default: `rollout.max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_per_turn: Option<usize>,
    /// Wall-time limit of one environment step, seconds (default 30): a step past it fails its
    /// episode (scored 0, counted in `env/step_errors`).
    #[serde(default = "default_step_timeout")]
    pub step_timeout_s: f64,
    /// A turn that reaches its token limit without ending: closed with the end-of-turn token (as
    /// context, no loss) and passed to the environment (true), or the episode ends there, cut
    /// (false, default).
    #[serde(default)]
    pub close_cut_turns: bool,
    /// Add the environment's per-turn rewards to the episode's final reward (default true).
    #[serde(default = "yes")]
    pub turn_rewards: bool,
    /// Messages placed before each episode's first messages (after `data.system_prompt`), e.g. a
    /// worked example of a tool call.
    #[serde(default)]
    pub prelude: Vec<ChatMessage>,
    /// Limits of the `python` tool (`[environment.python]`), when `tools` lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<tools::PythonToolConfig>,
    /// Every tool call answers after this delay, in milliseconds (default 0): simulates a slow
    /// tool, for measuring how tool waits overlap generation (`rlrun bench tool-latency`).
    #[serde(default)]
    pub tool_latency_ms: u64,
}

fn default_format() -> ToolCallFormat {
    ToolCallFormat::Hermes
}
fn default_max_turns() -> usize {
    4
}
fn default_step_timeout() -> f64 {
    30.0
}
fn yes() -> bool {
    true
}

impl EnvironmentConfig {
    /// Builds the environment; an error names what is wrong (an unknown environment or tool).
    pub fn build(&self) -> Result<Arc<dyn Environment>, String> {
        if self.max_turns == 0 {
            return Err("max_turns must be at least 1".into());
        }
        if !(self.step_timeout_s > 0.0 && self.step_timeout_s.is_finite()) {
            return Err(format!(
                "step_timeout_s must be > 0, got {}",
                self.step_timeout_s
            ));
        }
        if self.python.is_some() && !self.tools.iter().any(|t| t == "python") {
            return Err("[environment.python] is set but `tools` does not list \"python\"".into());
        }
        if !self.tools.is_empty() && self.name != "tools" {
            return Err(format!(
                "`tools` are for name = \"tools\", not `{}`",
                self.name
            ));
        }
        match self.name.as_str() {
            "tools" => {
                let tools = self
                    .tools
                    .iter()
                    .map(|t| match t.as_str() {
                        "calculator" => Ok(Arc::new(tools::Calculator) as Arc<dyn Tool>),
                        "python" => Ok(Arc::new(tools::PythonTool {
                            config: self.python.clone().unwrap_or_default(),
                        }) as Arc<dyn Tool>),
                        other => Err(format!(
                            "unknown tool `{other}` (known: calculator, python)"
                        )),
                    })
                    .map(|t| {
                        t.map(|t| match self.tool_latency_ms {
                            0 => t,
                            ms => Arc::new(tools::Delayed {
                                inner: t,
                                delay: Duration::from_millis(ms),
                            }) as Arc<dyn Tool>,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if tools.is_empty() {
                    return Err("name = \"tools\" needs at least one tool in `tools`".into());
                }
                Ok(Arc::new(ToolEnv::new(
                    tools,
                    self.tool_call_format,
                    self.max_turns,
                )))
            }
            "guess-number" => Ok(Arc::new(GuessNumber {
                max_turns: self.max_turns,
            })),
            "registered" => {
                let class = self
                    .class
                    .as_deref()
                    .ok_or("name = \"registered\" needs `class`, the registered name")?;
                registry::get(class).ok_or_else(|| {
                    format!(
                        "no environment registered as `{class}` (registered: {}); register it \
                         first, e.g. with @rlrun.environment in Python",
                        registry::names().join(", ")
                    )
                })
            }
            other => Err(format!(
                "unknown environment `{other}` (known: tools, guess-number, registered)"
            )),
        }
    }

    /// The step time limit.
    pub fn step_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.step_timeout_s)
    }
}

/// Environments registered at run time under a name (e.g. Python classes), for recipes'
/// `[environment] name = "registered"`.
pub mod registry {
    use std::sync::Arc;

    use super::Environment;
    use crate::named::Named;

    static TABLE: Named<dyn Environment> = Named::new();

    /// Registers (or replaces) an environment under `name`.
    pub fn register(name: &str, env: Arc<dyn Environment>) {
        TABLE.register(name, env);
    }

    /// The environment registered under `name`.
    pub fn get(name: &str) -> Option<Arc<dyn Environment>> {
        TABLE.get(name)
    }

    /// Registered names, sorted.
    pub fn names() -> Vec<String> {
        TABLE.names()
    }
}

/// Runs one episode step on its own thread with a time limit: a panic or an overrun becomes an
/// error (the episode is then scored as failed and counted by the caller), never a crash or a
/// stall of the batch. A timed-out step's thread is left to finish on its own; the episode is
/// dropped with it.
pub fn run_step(
    mut episode: Box<dyn Episode>,
    turn: ModelTurn,
    limit: Duration,
) -> (Option<Box<dyn Episode>>, Result<Step, EnvError>) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| episode.step(&turn)));
        let _ = tx.send((episode, out));
    });
    match rx.recv_timeout(limit) {
        Ok((episode, Ok(step))) => (Some(episode), step),
        Ok((_, Err(panic))) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            (None, Err(EnvError::Panicked(msg)))
        }
        Err(_) => (None, Err(EnvError::TimedOut(limit))),
    }
}

/// A question answered with the help of tools: every turn with tool calls gets one `tool`
/// message per call (the result, or the error of an unknown tool or a malformed call); the first
/// turn without a call is the answer, and the episode scores 1 if the first number in it equals
/// the sample's ground truth, else 0. Cut after `max_turns` turns (scoring 0).
pub struct ToolEnv {
    tools: Vec<Arc<dyn Tool>>,
    format: ToolCallFormat,
    max_turns: usize,
}

impl ToolEnv {
    pub fn new(tools: Vec<Arc<dyn Tool>>, format: ToolCallFormat, max_turns: usize) -> Self {
        ToolEnv {
            tools,
            format,
            max_turns: max_turns.max(1),
        }
    }
}

struct ToolEpisode {
    tools: Vec<Arc<dyn Tool>>,
    messages: Vec<ChatMessage>,
    answer: Option<String>,
    truth: Option<String>,
    turns: usize,
    max_turns: usize,
}

impl Environment for ToolEnv {
    fn name(&self) -> &str {
        "tools"
    }
    fn tools(&self) -> Vec<&dyn Tool> {
        self.tools.iter().map(|t| t.as_ref()).collect()
    }
    fn tool_call_format(&self) -> ToolCallFormat {
        self.format
    }
    fn start(&self, sample: &Sample) -> Result<Box<dyn Episode>, EnvError> {
        let messages = match &sample.prompt {
            crate::Prompt::Messages(m) => m.clone(),
            crate::Prompt::Text(t) => vec![ChatMessage::user(t.clone())],
        };
        Ok(Box::new(ToolEpisode {
            tools: self.tools.clone(),
            messages,
            answer: None,
            truth: sample.ground_truth.clone(),
            turns: 0,
            max_turns: self.max_turns,
        }))
    }
}

impl ToolEpisode {
    /// The result message of one parsed call, and whether it is an error.
    fn answer_call(&self, call: &ParsedCall) -> (ChatMessage, bool) {
        let text = match call {
            Err(bad) => Err(format!("error: malformed tool call ({})", bad.reason)),
            Ok(c) => match self.tools.iter().find(|t| t.name() == c.name) {
                None => Err(format!("error: unknown tool `{}`", c.name)),
                Some(t) => t.call(&c.arguments).map_err(|e| format!("error: {e}")),
            },
        };
        let failed = text.is_err();
        (ChatMessage::new("tool", text.unwrap_or_else(|e| e)), failed)
    }
}

impl Episode for ToolEpisode {
    fn first_messages(&self) -> Vec<ChatMessage> {
        self.messages.clone()
    }
    fn step(&mut self, turn: &ModelTurn) -> Result<Step, EnvError> {
        self.turns += 1;
        if turn.tool_calls.is_empty() {
            self.answer = Some(turn.text.clone());
            return Ok(Step {
                done: true,
                ..Default::default()
            });
        }
        if self.turns >= self.max_turns {
            return Ok(Step {
                done: true,
                ..Default::default()
            });
        }
        let (observation, failed): (Vec<ChatMessage>, Vec<bool>) =
            turn.tool_calls.iter().map(|c| self.answer_call(c)).unzip();
        Ok(Step {
            observation,
            reward: None,
            done: false,
            tool_errors: failed.into_iter().filter(|&f| f).count(),
        })
    }
    fn final_reward(&self) -> f32 {
        let number = crate::reward::extract::first_number;
        match (&self.answer, &self.truth) {
            (Some(a), Some(t)) => match (number(a), number(t)) {
                (Some(x), Some(y)) if (x - y).abs() < 1e-9 => 1.0,
                _ => 0.0,
            },
            _ => 0.0,
        }
    }
}

/// Guess the number: a secret in `1..=100` (from the sample id), the model guesses, the
/// environment answers "higher", "lower" or "correct" (or asks for a number). Score 1 if found
/// within `max_turns`, with a per-turn reward of -0.05 for each wrong guess.
pub struct GuessNumber {
    pub max_turns: usize,
}

struct GuessEpisode {
    secret: i64,
    turns: usize,
    max_turns: usize,
    found: bool,
}

impl Environment for GuessNumber {
    fn name(&self) -> &str {
        "guess-number"
    }
    fn tool_call_format(&self) -> ToolCallFormat {
        ToolCallFormat::Text
    }
    fn start(&self, sample: &Sample) -> Result<Box<dyn Episode>, EnvError> {
        // A fixed hash of the id: the same sample always hides the same number.
        let secret = (sample.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) as i64 % 100 + 1;
        Ok(Box::new(GuessEpisode {
            secret,
            turns: 0,
            max_turns: self.max_turns.max(1),
            found: false,
        }))
    }
}

impl Episode for GuessEpisode {
    fn first_messages(&self) -> Vec<ChatMessage> {
        vec![ChatMessage::user(
            "I am thinking of a whole number from 1 to 100. Guess it: answer with one number. \
             I will say whether the number is higher or lower.",
        )]
    }
    fn step(&mut self, turn: &ModelTurn) -> Result<Step, EnvError> {
        self.turns += 1;
        let guess = crate::reward::extract::first_number(&turn.text).map(|g| g.round() as i64);
        let (reply, reward) = match guess {
            Some(g) if g == self.secret => {
                self.found = true;
                return Ok(Step {
                    done: true,
                    ..Default::default()
                });
            }
            Some(g) if g < self.secret => ("higher", -0.05),
            Some(_) => ("lower", -0.05),
            None => ("please answer with one number", -0.05),
        };
        Ok(Step {
            observation: vec![ChatMessage::user(reply)],
            reward: Some(reward),
            done: self.turns >= self.max_turns,
            tool_errors: 0,
        })
    }
    fn final_reward(&self) -> f32 {
        f32::from(u8::from(self.found))
    }
}

#[cfg(test)]
mod tests {
    use super::tools::{Calculator, ToolCallFormat};
    use super::*;
    use crate::Prompt;

    fn turn(format: ToolCallFormat, text: &str) -> ModelTurn {
        ModelTurn {
            text: text.into(),
            tool_calls: tools::parse_tool_calls(text, format),
        }
    }

    #[test]
    fn tool_episode_answers_calls_then_scores_the_answer() {
        let env = ToolEnv::new(vec![Arc::new(Calculator)], ToolCallFormat::Hermes, 4);
        let sample = Sample::new(0, Prompt::user("What is 123 * 456?")).with_ground_truth("56088");
        let mut ep = env.start(&sample).unwrap();
        assert_eq!(
            ep.first_messages(),
            vec![ChatMessage::user("What is 123 * 456?")]
        );
        let s = ep
            .step(&turn(
                ToolCallFormat::Hermes,
                "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"123 * 456\"}}\n</tool_call>\n<tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call><tool_call>{oops</tool_call>",
            ))
            .unwrap();
        assert!(!s.done);
        let texts: Vec<&str> = s.observation.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts[0], "56088");
        assert!(texts[1].contains("unknown tool `search`"), "{texts:?}");
        assert!(
            texts[2].starts_with("error: malformed tool call"),
            "{texts:?}"
        );
        assert!(s.observation.iter().all(|m| m.role == "tool"));
        assert_eq!(s.tool_errors, 2, "the unknown tool and the malformed call");
        let s = ep
            .step(&turn(ToolCallFormat::Hermes, "The answer is 56088."))
            .unwrap();
        assert!(s.done);
        assert_eq!(ep.final_reward(), 1.0);
        let mut wrong = env.start(&sample).unwrap();
        wrong.step(&turn(ToolCallFormat::Hermes, "56000")).unwrap();
        assert_eq!(wrong.final_reward(), 0.0);
    }

    #[test]
    fn tool_episode_is_cut_at_the_turn_limit() {
        let env = ToolEnv::new(vec![Arc::new(Calculator)], ToolCallFormat::Text, 2);
        let sample = Sample::new(0, Prompt::text("2+2?")).with_ground_truth("4");
        let mut ep = env.start(&sample).unwrap();
        let call = turn(ToolCallFormat::Text, "calculator(2+2)");
        assert!(!ep.step(&call).unwrap().done);
        assert!(ep.step(&call).unwrap().done);
        assert_eq!(ep.final_reward(), 0.0);
    }

    #[test]
    fn guess_the_number_gives_feedback_until_found() {
        let env = GuessNumber { max_turns: 10 };
        let sample = Sample::new(42, Prompt::text(""));
        let mut ep = env.start(&sample).unwrap();
        let (mut lo, mut hi) = (1, 100);
        let mut rewards = 0.0;
        for _ in 0..10 {
            let g = (lo + hi) / 2;
            let s = ep
                .step(&turn(ToolCallFormat::Text, &format!("{g}")))
                .unwrap();
            rewards += s.reward.unwrap_or(0.0);
            if s.done {
                break;
            }
            match s.observation[0].content.as_str() {
                "higher" => lo = g + 1,
                "lower" => hi = g - 1,
                other => panic!("{other}"),
            }
        }
        assert_eq!(
            ep.final_reward(),
            1.0,
            "binary search finds it in 7 guesses"
        );
        assert!(rewards < 0.0);
        let mut lost = env.start(&sample).unwrap();
        let s = lost.step(&turn(ToolCallFormat::Text, "no idea")).unwrap();
        assert_eq!(s.observation[0].content, "please answer with one number");
    }

    struct Slow;
    impl Episode for Slow {
        fn first_messages(&self) -> Vec<ChatMessage> {
            vec![]
        }
        fn step(&mut self, turn: &ModelTurn) -> Result<Step, EnvError> {
            match turn.text.as_str() {
                "hang" => std::thread::sleep(Duration::from_secs(30)),
                "crash" => panic!("tool crashed"),
                _ => {}
            }
            Ok(Step::default())
        }
        fn final_reward(&self) -> f32 {
            0.0
        }
    }

    #[test]
    fn a_hanging_or_crashing_step_is_an_error_not_a_stall() {
        let t = |text: &str| ModelTurn {
            text: text.into(),
            tool_calls: vec![],
        };
        let limit = Duration::from_millis(200);
        let start = std::time::Instant::now();
        let (ep, r) = run_step(Box::new(Slow), t("hang"), limit);
        assert!(ep.is_none() && r == Err(EnvError::TimedOut(limit)));
        assert!(start.elapsed() < Duration::from_secs(5));
        let (ep, r) = run_step(Box::new(Slow), t("crash"), limit);
        assert!(ep.is_none());
        assert_eq!(r, Err(EnvError::Panicked("tool crashed".into())));
        let (ep, r) = run_step(Box::new(Slow), t("fine"), limit);
        assert!(ep.is_some() && r.is_ok());
    }
}
