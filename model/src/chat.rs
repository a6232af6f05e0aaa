//! Chat templates: the Jinja templates of `tokenizer_config.json`, rendered with `minijinja` the
//! way transformers' `apply_chat_template` renders them with jinja2 (`trim_blocks`,
//! `lstrip_blocks`, Python string methods, `raise_exception`, `strftime_now`, a `tojson` like
//! Python's `json.dumps`).

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{ModelError, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the tokenizer's special-token strings.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    specials: serde_json::Map<String, Json>,
}

impl ChatTemplate {
    /// Compiles `source`; `specials` are the template variables `bos_token`, `eos_token`, ...
    pub fn new(source: &str, specials: serde_json::Map<String, Json>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                ModelError::Template(format!("cannot compile the chat template: {e:#}"))
            })?;
        Ok(ChatTemplate { env, specials })
    }

    /// Builds the template of a tokenizer (None when it has none).
    pub fn from_tokenizer(tok: &crate::tokenizer::Tokenizer) -> Result<Option<Self>> {
        let Some(source) = tok.chat_template() else {
            return Ok(None);
        };
        let mut specials = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(s) = tok.special_token(key) {
                specials.insert(key.to_string(), Json::String(s));
            }
        }
        Ok(Some(Self::new(&source, specials)?))
    }

    /// Renders `messages` (a JSON list of message objects).
    pub fn render_json(&self, messages: &Json, add_generation_prompt: bool) -> Result<String> {
        self.render_json_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders `messages` with `tools` (a JSON list of function schemas, see
    /// `rlrun_rollout::env::tools::Tool::schema`) passed to the template as `tools`, like
    /// `apply_chat_template(messages, tools=tools, ...)`; templates without tool support ignore it.
    pub fn render_json_with_tools(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut ctx = self.specials.clone();
        ctx.insert("messages".into(), messages.clone());
        if let Some(t) = tools {
            ctx.insert("tools".into(), t.clone());
        }
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(minijinja::Value::from_serialize(Json::Object(ctx)))
            .map_err(|e| ModelError::Template(format!("rendering failed: {e:#}")))
    }

    /// Renders a conversation, like `tokenizer.apply_chat_template(messages, tokenize=False, ...)`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let v = serde_json::to_value(messages).map_err(|e| ModelError::Invalid(e.to_string()))?;
        self.render_json(&v, add_generation_prompt)
    }

    /// Multi-turn rollouts: the text that follows a model turn which ended with `end_of_turn` (the
    /// stop token's text, e.g. `<|im_end|>`), carrying the `observation` messages and the next
    /// generation prompt, exactly as the template renders them after an assistant message.
    /// Tokenized alone and appended to the sampled tokens, it extends the trajectory without
    /// re-tokenizing (or re-rendering) any earlier turn. Found by rendering a conversation with a
    /// placeholder assistant turn with and without the observation; an error if the template
    /// does not end assistant turns with `end_of_turn` or renders the earlier part differently.
    pub fn observation_suffix(
        &self,
        observation: &[ChatMessage],
        end_of_turn: &str,
    ) -> Result<String> {
        const PLACEHOLDER: &str = "\u{1}rlrun-model-turn\u{1}";
        let head = [
            ChatMessage::new("user", "\u{1}rlrun-user\u{1}"),
            ChatMessage::new("assistant", PLACEHOLDER),
        ];
        let before = self.render(&head, false)?;
        let mut all = head.to_vec();
        all.extend_from_slice(observation);
        let after = self.render(&all, true)?;
        let err = |m: &str| ModelError::Template(format!("observation suffix: {m}"));
        let content_end = before
            .find(PLACEHOLDER)
            .map(|i| i + PLACEHOLDER.len())
            .ok_or_else(|| err("the template drops the assistant's content"))?;
        if !before[content_end..].starts_with(end_of_turn) {
            return Err(err(&format!(
                "the template does not end an assistant turn with `{end_of_turn}` (it writes {:?})",
                &before[content_end..before.len().min(content_end + 40)]
            )));
        }
        let cut = content_end + end_of_turn.len();
        if after.get(..cut) != Some(&before[..cut]) {
            return Err(err(
                "the template renders the turns before the observation differently once it follows",
            ));
        }
        Ok(after[cut..].to_string())
    }
}

/// `strftime_now` of HF templates: the current UTC date and time in `fmt`.
fn strftime_now(fmt: &str) -> String {
    jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .strftime(fmt)
        .to_string()
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)` (the `tojson` of HF templates).
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json: Json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_py_json(v: &Json, indent: Option<usize>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let (item_sep, key_sep) = if indent.is_some() {
        (",", ": ")
    } else {
        (", ", ": ")
    };
    match v {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(key_sep);
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        Json::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&n.to_string());
            }
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_trim_and_python_methods() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n<{{ m.role }}>{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}<a>{% endif %}",
            Default::default(),
        )
        .unwrap();
        let s = t
            .render(
                &[
                    ChatMessage::new("user", "  hi  "),
                    ChatMessage::new("assistant", "yo"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(s, "<user>hi\n<assistant>yo\n<a>");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('bad role') }}", Default::default()).unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("bad role"), "{e}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}",
            Default::default(),
        )
        .unwrap();
        let s = t
            .render_json(&serde_json::json!([{"a": 1, "b": [1.0, "é<"]}]), false)
            .unwrap();
        assert_eq!(s, "[{\"a\": 1, \"b\": [1.0, \"é<\"]}]|{\n  \"a\": 1,\n  \"b\": [\n    1.0,\n    \"é<\"\n  ]\n}");
    }
}
