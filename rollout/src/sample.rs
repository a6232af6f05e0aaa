//! The data a reward sees: a prompt [`Sample`] and the model's [`Completion`] of it.

use serde::{Deserialize, Serialize};

/// One message of a chat prompt, as in the OpenAI / Hugging Face chat format.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or any role the chat template knows.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
}

/// A prompt: either chat messages (rendered by the controller with the model's chat template) or
/// plain text (tokenized as it is).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prompt {
    /// Chat messages, in order.
    Messages(Vec<ChatMessage>),
    /// Plain text, used verbatim.
    Text(String),
}

impl Prompt {
    /// A plain-text prompt.
    pub fn text(text: impl Into<String>) -> Self {
        Prompt::Text(text.into())
    }

    /// A chat prompt with a single `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Prompt::Messages(vec![ChatMessage::user(content)])
    }

    /// The text of the last `user` message (chat) or the whole text (plain), for logs and for
    /// rewards that want to look at the question.
    pub fn last_user_text(&self) -> &str {
        match self {
            Prompt::Text(text) => text,
            Prompt::Messages(messages) => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .or(messages.last())
                .map(|m| m.content.as_str())
                .unwrap_or(""),
        }
    }
}

/// One prompt of a dataset with what is needed to score completions of it.
///
/// Construct with [`Sample::new`] and the `with_*` methods (the struct is `#[non_exhaustive]` so
/// fields can be added without breaking user code); read the public fields directly.
///
/// ```
/// use rlrun_rollout::{Prompt, Sample};
/// let s = Sample::new(7, Prompt::user("What is 2 + 3?"))
///     .with_ground_truth("5")
///     .with_data_source("arithmetic");
/// assert_eq!(s.ground_truth.as_deref(), Some("5"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Sample {
    /// Stable index of the sample in its dataset (row order among valid rows for files; the
    /// generation index for generated tasks). The same dataset always gives the same id to the
    /// same prompt.
    pub id: u64,
    /// The prompt.
    pub prompt: Prompt,
    /// The reference answer, if the dataset has one (`reward_model.ground_truth` in verl's layout).
    /// Non-string values in files are stored as their compact JSON text.
    pub ground_truth: Option<String>,
    /// Where the sample comes from (`data_source` in verl's layout, e.g. `openai/gsm8k`); rewards and
    /// metrics can be keyed by it.
    pub data_source: String,
    /// Anything else the dataset carries (`extra_info` in verl's layout), for custom rewards.
    /// `Null` when absent.
    pub extra: serde_json::Value,
}

impl Sample {
    /// A sample with no ground truth, an empty data source and no extra data.
    pub fn new(id: u64, prompt: Prompt) -> Self {
        Self {
            id,
            prompt,
            ground_truth: None,
            data_source: String::new(),
            extra: serde_json::Value::Null,
        }
    }

    /// Sets the reference answer.
    pub fn with_ground_truth(mut self, ground_truth: impl Into<String>) -> Self {
        self.ground_truth = Some(ground_truth.into());
        self
    }

    /// Sets the data source.
    pub fn with_data_source(mut self, data_source: impl Into<String>) -> Self {
        self.data_source = data_source.into();
        self
    }

    /// Sets the extra data.
    pub fn with_extra(mut self, extra: serde_json::Value) -> Self {
        self.extra = extra;
        self
    }

    /// What makes two samples the same problem: the dataset's canonical form when it gives one
    /// (`extra.problem`: generated tasks make `a + b` and `b + a` one problem), else the prompt
    /// and the reference answer.
    pub fn problem_key(&self) -> String {
        match self.extra.get("problem").and_then(|p| p.as_str()) {
            Some(p) => p.to_string(),
            None => serde_json::json!([self.prompt, self.ground_truth]).to_string(),
        }
    }
}

/// Why generation of a completion stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// The token limit (`max_tokens`) was reached.
    Length,
    /// Generation was cut short (cancelled, weights changed mid-flight, error).
    Abort,
}

/// A model's completion of a prompt, borrowed from the rollout buffers.
///
/// ```
/// use rlrun_rollout::{Completion, FinishReason};
/// let ids = [11u32, 12, 13];
/// let c = Completion::new("The answer is 5.", &ids, FinishReason::Stop, 512);
/// assert_eq!(c.num_tokens(), 3);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Completion<'a> {
    /// The decoded response text (without the prompt).
    pub text: &'a str,
    /// The response token ids (without the prompt).
    pub token_ids: &'a [u32],
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// The response token limit the generator used (0 if unknown).
    pub max_tokens: usize,
}

impl<'a> Completion<'a> {
    /// A completion with all its fields.
    pub fn new(
        text: &'a str,
        token_ids: &'a [u32],
        finish_reason: FinishReason,
        max_tokens: usize,
    ) -> Self {
        Self {
            text,
            token_ids,
            finish_reason,
            max_tokens,
        }
    }

    /// A completion known only by its text (no token ids, finished by `Stop`, no limit): enough
    /// for answer-checking rewards and for tests.
    pub fn from_text(text: &'a str) -> Self {
        Self::new(text, &[], FinishReason::Stop, 0)
    }

    /// The response length in tokens.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// An owned [`Completion`], for handing completions to other threads (see
/// [`RewardRunner`](crate::RewardRunner)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct OwnedCompletion {
    /// The decoded response text.
    pub text: String,
    /// The response token ids.
    pub token_ids: Vec<u32>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// The response token limit (0 if unknown).
    pub max_tokens: usize,
}

impl OwnedCompletion {
    /// An owned completion with all its fields.
    pub fn new(
        text: impl Into<String>,
        token_ids: Vec<u32>,
        finish_reason: FinishReason,
        max_tokens: usize,
    ) -> Self {
        Self {
            text: text.into(),
            token_ids,
            finish_reason,
            max_tokens,
        }
    }

    /// An owned completion known only by its text (see [`Completion::from_text`]).
    pub fn from_text(text: impl Into<String>) -> Self {
        Self::new(text, Vec::new(), FinishReason::Stop, 0)
    }

    /// Borrows it as a [`Completion`].
    pub fn as_completion(&self) -> Completion<'_> {
        Completion::new(
            &self.text,
            &self.token_ids,
            self.finish_reason,
            self.max_tokens,
        )
    }
}

impl From<Completion<'_>> for OwnedCompletion {
    fn from(c: Completion<'_>) -> Self {
        Self::new(c.text, c.token_ids.to_vec(), c.finish_reason, c.max_tokens)
    }
}
