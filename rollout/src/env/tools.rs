//! Tools a model calls in its own chat format, and the calculator.
//!
//! Tool calls are parsed from the model's text in the format of its family:
//! - [`ToolCallFormat::Hermes`] (Qwen2.5, Qwen3): `<tool_call>{"name": …, "arguments": {…}}</tool_call>`,
//!   any number of them;
//! - [`ToolCallFormat::Llama3`]: the whole message is one JSON object `{"name": …, "parameters": {…}}`
//!   (optionally after `<|python_tag|>`), or several separated by `;`;
//! - [`ToolCallFormat::Text`] (a plain fallback): lines `name(argument text)`.
//!
//! A call that does not parse is kept as a [`MalformedCall`], so the environment can answer it
//! with an error observation instead of failing.

use serde_json::{json, Value};

/// A call of a tool by name with JSON arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

/// Text that looked like a tool call but did not parse.
#[derive(Debug, Clone, PartialEq)]
pub struct MalformedCall {
    pub raw: String,
    pub reason: String,
}

/// One call found in a model turn.
pub type ParsedCall = Result<ToolCall, MalformedCall>;

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToolCallFormat {
    Hermes,
    Llama3,
    Text,
}

/// A tool: its name, description and JSON-schema parameters (what chat templates receive as
/// `tools`), and the call itself. Tools must not execute model output unless a recipe asks for it.
pub trait Tool: Send + Sync {
    fn name(&self) -> &str;
    fn description(&self) -> &str;
    /// JSON schema of the arguments object.
    fn parameters(&self) -> Value;
    /// Runs the call; an `Err` is shown to the model as an error observation.
    fn call(&self, arguments: &Value) -> Result<String, String>;
    /// The tool as Hugging Face chat templates expect it in `tools`.
    fn schema(&self) -> Value {
        json!({"type": "function", "function": {
            "name": self.name(), "description": self.description(), "parameters": self.parameters()}})
    }
}

/// Every tool call in `text`, in order.
pub fn parse_tool_calls(text: &str, format: ToolCallFormat) -> Vec<ParsedCall> {
    match format {
        ToolCallFormat::Hermes => {
            let mut out = Vec::new();
            let mut rest = text;
            while let Some(start) = rest.find("<tool_call>") {
                let body_start = start + "<tool_call>".len();
                let (body, next) = match rest[body_start..].find("</tool_call>") {
                    Some(end) => (
                        &rest[body_start..body_start + end],
                        &rest[body_start + end + "</tool_call>".len()..],
                    ),
                    None => (&rest[body_start..], ""),
                };
                out.push(json_call(body.trim(), "arguments"));
                rest = next;
            }
            out
        }
        ToolCallFormat::Llama3 => {
            let t = text.trim();
            let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim();
            if !t.starts_with('{') {
                return Vec::new();
            }
            t.split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| json_call(s, "parameters"))
                .collect()
        }
        ToolCallFormat::Text => text
            .lines()
            .filter_map(|line| {
                let line = line.trim();
                let open = line.find('(')?;
                let name = &line[..open];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return None;
                }
                Some(match line.strip_suffix(')') {
                    Some(inner) => Ok(ToolCall {
                        name: name.to_string(),
                        arguments: json!({"input": &inner[open + 1..]}),
                    }),
                    None => Err(MalformedCall {
                        raw: line.to_string(),
                        reason: "no closing parenthesis".into(),
                    }),
                })
            })
            .collect(),
    }
}

/// A JSON object `{"name": …, <args_key>: {…}}` (arguments may also be a JSON string, as some
/// models write them).
fn json_call(body: &str, args_key: &str) -> ParsedCall {
    let bad = |reason: String| {
        Err(MalformedCall {
            raw: body.to_string(),
            reason,
        })
    };
    let v: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => return bad(format!("not JSON: {e}")),
    };
    let Some(name) = v.get("name").and_then(Value::as_str) else {
        return bad("no string `name`".into());
    };
    let arguments = match v.get(args_key).or_else(|| v.get("arguments")) {
        None => json!({}),
        Some(Value::String(s)) => match serde_json::from_str(s) {
            Ok(v) => v,
            Err(e) => return bad(format!("`{args_key}` is a string that is not JSON: {e}")),
        },
        Some(a) => a.clone(),
    };
    Ok(ToolCall {
        name: name.to_string(),
        arguments,
    })
}

/// Exact arithmetic on integers (`+ - * /`, parentheses): a parser, no code execution. Takes
/// `{"expression": "…"}` (or the plain text of a [`ToolCallFormat::Text`] call); answers the
/// integer, or the fraction with a 10-digit decimal.
pub struct Calculator;

impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }
    fn description(&self) -> &str {
        "Evaluates an arithmetic expression of integers with + - * / and parentheses."
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"expression": {"type": "string",
            "description": "for example (12 + 3) * 4"}}, "required": ["expression"]})
    }
    fn call(&self, arguments: &Value) -> Result<String, String> {
        let expr = arguments
            .get("expression")
            .or_else(|| arguments.get("input"))
            .and_then(Value::as_str)
            .ok_or("missing string argument `expression`")?;
        let (n, d) = crate::reward::evaluate_arithmetic(expr).map_err(|e| format!("{e:?}"))?;
        Ok(if d == 1 {
            n.to_string()
        } else {
            format!("{n}/{d} = {:.10}", n as f64 / d as f64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_calls_with_malformed_ones_kept() {
        let text = "Let me compute.\n<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2*3\"}}\n</tool_call>\n<tool_call>{\"name\": \"calculator\", \"arguments\": \"{\\\"expression\\\": \\\"1+1\\\"}\"}</tool_call><tool_call>{\"arguments\": {}}</tool_call><tool_call>{not json";
        let calls = parse_tool_calls(text, ToolCallFormat::Hermes);
        assert_eq!(calls.len(), 4);
        assert_eq!(
            calls[0],
            Ok(ToolCall {
                name: "calculator".into(),
                arguments: json!({"expression": "2*3"})
            })
        );
        assert_eq!(
            calls[1].as_ref().unwrap().arguments,
            json!({"expression": "1+1"})
        );
        assert!(calls[2].as_ref().unwrap_err().reason.contains("name"));
        assert!(calls[3].as_ref().unwrap_err().reason.contains("not JSON"));
        assert!(parse_tool_calls("no calls here", ToolCallFormat::Hermes).is_empty());
    }

    #[test]
    fn llama3_and_text_calls() {
        let calls = parse_tool_calls(
            "<|python_tag|>{\"name\": \"calculator\", \"parameters\": {\"expression\": \"7-9\"}}",
            ToolCallFormat::Llama3,
        );
        assert_eq!(calls[0].as_ref().unwrap().arguments["expression"], "7-9");
        assert!(parse_tool_calls("The answer is 4.", ToolCallFormat::Llama3).is_empty());
        let calls = parse_tool_calls(
            "ok\ncalculator(3 * (4 + 5))\ncalculator(1 +",
            ToolCallFormat::Text,
        );
        assert_eq!(calls.len(), 2);
        assert_eq!(
            Calculator.call(&calls[0].as_ref().unwrap().arguments),
            Ok("27".into())
        );
        assert!(calls[1].is_err());
    }

    #[test]
    fn calculator_is_exact_and_reports_errors() {
        let c = |e: &str| Calculator.call(&json!({"expression": e}));
        assert_eq!(c("123 * 456"), Ok("56088".into()));
        assert_eq!(c("2 + 3 * 4 - (6 - 8) / 2"), Ok("15".into()));
        assert_eq!(c("1/3"), Ok("1/3 = 0.3333333333".into()));
        assert!(c("1/0").unwrap_err().contains("DivisionByZero"));
        assert!(c("__import__('os')").is_err());
        assert!(Calculator
            .call(&json!({}))
            .unwrap_err()
            .contains("expression"));
        assert_eq!(Calculator.schema()["function"]["name"], "calculator");
    }
}
