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

/// A tool wrapped to answer after a fixed delay: a stand-in for a slow tool (a remote API, a
/// sandbox start-up) when measuring how well tool waits overlap generation
/// (`environment.tool_latency_ms`).
pub struct Delayed {
    pub inner: std::sync::Arc<dyn Tool>,
    pub delay: std::time::Duration,
}

impl Tool for Delayed {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn description(&self) -> &str {
        self.inner.description()
    }
    fn parameters(&self) -> Value {
        self.inner.parameters()
    }
    fn call(&self, arguments: &Value) -> Result<String, String> {
        std::thread::sleep(self.delay);
        self.inner.call(arguments)
    }
}

/// Limits of the [`PythonTool`] (`[environment.python]`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonToolConfig {
    /// The interpreter (default `python3` on the `PATH`).
    #[serde(default = "default_interpreter")]
    pub interpreter: String,
    /// CPU seconds (RLIMIT_CPU, default 5).
    #[serde(default = "default_cpu_seconds")]
    pub cpu_seconds: u64,
    /// Address space in MiB (RLIMIT_AS, default 1024).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Wall seconds before the process is killed (default 10).
    #[serde(default = "default_wall_seconds")]
    pub wall_seconds: f64,
    /// Characters of output kept (default 2000).
    #[serde(default = "default_max_output")]
    pub max_output: usize,
}

fn default_interpreter() -> String {
    "python3".into()
}
fn default_cpu_seconds() -> u64 {
    5
}
fn default_memory_mb() -> u64 {
    1024
}
fn default_wall_seconds() -> f64 {
    10.0
}
fn default_max_output() -> usize {
    2000
}

impl Default for PythonToolConfig {
    fn default() -> Self {
        PythonToolConfig {
            interpreter: default_interpreter(),
            cpu_seconds: default_cpu_seconds(),
            memory_mb: default_memory_mb(),
            wall_seconds: default_wall_seconds(),
            max_output: default_max_output(),
        }
    }
}

/// Runs the model's Python code, only when a recipe lists the `python` tool: in a child process
/// (isolated mode, empty environment, a fresh temporary working directory) with CPU-time, memory
/// and file-size limits, in its own network namespace with no interfaces up (no network, not
/// even loopback), killed after `wall_seconds`. Answers what it printed (stdout, then stderr),
/// cut to `max_output` characters. Where a network namespace cannot be made, the call fails
/// instead of running the code with network access.
pub struct PythonTool {
    pub config: PythonToolConfig,
}

impl Tool for PythonTool {
    fn name(&self) -> &str {
        "python"
    }
    fn description(&self) -> &str {
        "Runs a Python program and returns what it prints. No network, no files kept."
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"code": {"type": "string",
            "description": "the program, e.g. print(2 ** 100)"}}, "required": ["code"]})
    }
    fn call(&self, arguments: &Value) -> Result<String, String> {
        let code = arguments
            .get("code")
            .or_else(|| arguments.get("input"))
            .and_then(Value::as_str)
            .ok_or("missing string argument `code`")?;
        run_python(code, &self.config)
    }
}

fn run_python(code: &str, c: &PythonToolConfig) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!(
        "rlrun-python-{}-{}",
        std::process::id(),
        NEXT_SANDBOX.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("sandbox directory: {e}"))?;
    let (cpu, mem) = (c.cpu_seconds.max(1), c.memory_mb.max(16) << 20);
    let mut cmd = Command::new(&c.interpreter);
    cmd.args(["-I", "-c", code])
        .current_dir(&dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (setrlimit, unshare) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = |res, v: u64| {
                let r = libc::rlimit {
                    rlim_cur: v as libc::rlim_t,
                    rlim_max: v as libc::rlim_t,
                };
                if libc::setrlimit(res, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            limit(libc::RLIMIT_CPU, cpu)?;
            limit(libc::RLIMIT_AS, mem)?;
            limit(libc::RLIMIT_FSIZE, 1 << 20)?;
            limit(libc::RLIMIT_CORE, 0)?;
            // A new network namespace: no interfaces up. Unprivileged, it needs a user namespace too.
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0
                && libc::unshare(libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let result = (|| {
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "cannot start the sandboxed interpreter `{}`: {e}",
                c.interpreter
            )
        })?;
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let _ = out.read_to_end(&mut a);
            let _ = err.read_to_end(&mut b);
            (a, b)
        });
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs_f64(c.wall_seconds);
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if std::time::Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
                Err(e) => return Err(format!("waiting for the interpreter: {e}")),
            }
        };
        let (stdout, stderr) = reader.join().unwrap_or_default();
        let mut text = String::from_utf8_lossy(&stdout).into_owned();
        let stderr = String::from_utf8_lossy(&stderr);
        if !stderr.trim().is_empty() {
            text.push_str(&stderr);
        }
        let text: String = text.chars().take(c.max_output).collect();
        match status {
            None => Err(format!("killed after {} s", c.wall_seconds)),
            Some(s) if s.success() => Ok(text),
            Some(s) => {
                use std::os::unix::process::ExitStatusExt;
                let why = match s.signal() {
                    Some(libc::SIGXCPU) | Some(libc::SIGKILL) => {
                        format!("CPU-time limit of {} s reached", c.cpu_seconds)
                    }
                    Some(sig) => format!("killed by signal {sig}"),
                    None => format!("exit status {}", s.code().unwrap_or(-1)),
                };
                Err(format!("{why}\n{text}"))
            }
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

static NEXT_SANDBOX: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_tool_runs_code_without_network_and_within_limits() {
        let tool = PythonTool {
            config: PythonToolConfig {
                cpu_seconds: 1,
                memory_mb: 256,
                wall_seconds: 5.0,
                ..Default::default()
            },
        };
        let run = |code: &str| tool.call(&json!({ "code": code }));
        assert_eq!(
            run("print(2 ** 100)").unwrap().trim(),
            "1267650600228229401496703205376"
        );
        // No network: not even loopback is reachable (the namespace has no interface up).
        let net = run(
            "import socket\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', 9))\n    print('connected')\nexcept OSError as e:\n    print('errno', e.errno)",
        )
        .unwrap();
        assert!(net.starts_with("errno"), "{net}");
        let err = run("while True: pass").unwrap_err();
        assert!(err.contains("CPU-time limit"), "{err}");
        let err = run("x = bytearray(1 << 30)").unwrap_err();
        assert!(err.contains("MemoryError"), "{err}");
        let err = run("raise ValueError('bad')").unwrap_err();
        assert!(err.contains("ValueError: bad"), "{err}");
    }

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
