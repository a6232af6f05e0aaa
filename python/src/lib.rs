//! `rlrun._rlrun`: the native half of `import rlrun` (see `python/rlrun/__init__.py`).
//!
//! Long calls (building a run, steps, evaluation, generation) release the GIL; Python rewards
//! re-acquire it when the reward runner calls them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3_tch::PyTensor;
use rlrun::{Recipe, Run};
use rlrun_generator::SamplingParams;
use rlrun_rollout::env::registry as env_registry;
use rlrun_rollout::env::tools::ToolCallFormat;
use rlrun_rollout::env::{EnvError, Environment, Episode, ModelTurn, Step};
use rlrun_rollout::reward::registry;
use rlrun_rollout::{ChatMessage, Completion, Prompt, Reward, RewardError, RewardFn, Sample};
use tch::Tensor;

fn runtime_err(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

/// Converts a run's error into `rlrun.RecipeError` when it is one, else `RuntimeError`.
fn to_pyerr(py: Python<'_>, e: rlrun::Error) -> PyErr {
    if let rlrun::Error::Recipe(r) = &e {
        return recipe_err(py, r);
    }
    runtime_err(e)
}

fn recipe_err(py: Python<'_>, r: &rlrun::RecipeError) -> PyErr {
    let made = py
        .import("rlrun.errors")
        .and_then(|m| m.getattr("RecipeError"))
        .and_then(|cls| {
            cls.call1((
                r.to_string(),
                r.key.clone(),
                r.line,
                r.column,
                r.file.clone(),
            ))
        });
    match made {
        Ok(obj) => PyErr::from_value(obj),
        Err(e) => e,
    }
}

/// A Python value as a TOML literal for `--set`-style overrides.
fn toml_literal(v: &Bound<'_, PyAny>) -> PyResult<String> {
    let json = v
        .py()
        .import("json")?
        .call_method1("dumps", (v,))?
        .extract::<String>()?;
    let value: serde_json::Value = serde_json::from_str(&json).map_err(runtime_err)?;
    let value = toml::Value::try_from(value).map_err(runtime_err)?;
    Ok(value.to_string())
}

/// A validated recipe.
#[pyclass(name = "Recipe", module = "rlrun._rlrun")]
#[derive(Clone)]
struct PyRecipe {
    inner: Recipe,
}

#[pymethods]
impl PyRecipe {
    /// Loads and validates a recipe file; `overrides` maps dotted keys to values.
    #[staticmethod]
    #[pyo3(signature = (path, overrides = None))]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        overrides: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let mut sets = Vec::new();
        if let Some(o) = overrides {
            for (k, v) in o.iter() {
                sets.push(format!("{}={}", k.extract::<String>()?, toml_literal(&v)?));
            }
        }
        Recipe::load(&path, &sets)
            .map(|inner| PyRecipe { inner })
            .map_err(|e| recipe_err(py, &e))
    }

    /// The resolved recipe as TOML.
    #[getter]
    fn resolved(&self) -> String {
        self.inner.resolved.clone()
    }

    /// The resolved recipe as JSON text (the Python wrapper turns it into a dict).
    fn to_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.config).map_err(runtime_err)
    }
}

fn metrics_dict<'py>(py: Python<'py>, m: &BTreeMap<String, f64>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in m {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// A training run.
#[pyclass(name = "Run", module = "rlrun._rlrun")]
struct PyRun {
    inner: Run,
}

#[pymethods]
impl PyRun {
    #[new]
    fn new(py: Python<'_>, recipe: &PyRecipe) -> PyResult<Self> {
        let r = recipe.inner.clone();
        py.allow_threads(|| Run::create(r))
            .map(|inner| PyRun { inner })
            .map_err(|e| to_pyerr(py, e))
    }

    /// Continues a run from its latest checkpoint.
    #[staticmethod]
    fn resume(py: Python<'_>, run_dir: PathBuf) -> PyResult<Self> {
        py.allow_threads(|| Run::resume(&run_dir))
            .map(|inner| PyRun { inner })
            .map_err(|e| to_pyerr(py, e))
    }

    /// One training step; returns its metrics.
    fn step<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let run = &mut self.inner;
        let m = py
            .allow_threads(|| run.step())
            .map_err(|e| to_pyerr(py, e))?;
        metrics_dict(py, &m)
    }

    /// `steps` more steps (default: to the recipe's `steps`) with a progress bar on a terminal.
    #[pyo3(signature = (steps = None, progress = true))]
    fn train<'py>(
        &mut self,
        py: Python<'py>,
        steps: Option<u64>,
        progress: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let run = &mut self.inner;
        let n = steps.unwrap_or_else(|| run.recipe.config.steps.saturating_sub(run.step_index()));
        let all = py
            .allow_threads(|| run.train_steps(n, progress))
            .map_err(|e| to_pyerr(py, e))?;
        let list = PyList::empty(py);
        for m in &all {
            list.append(metrics_dict(py, m)?)?;
        }
        Ok(list)
    }

    /// Greedy evaluation on the recipe's held-out set.
    fn evaluate<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let run = &mut self.inner;
        let e = py
            .allow_threads(|| run.evaluate())
            .map_err(|e| to_pyerr(py, e))?;
        let d = PyDict::new(py);
        d.set_item("step", e.step)?;
        d.set_item("problems", e.problems)?;
        d.set_item("accuracy", e.accuracy)?;
        d.set_item("mean_reward", e.mean_reward)?;
        d.set_item("mean_response_len", e.mean_response_len)?;
        d.set_item("pass_at_k", e.pass_at_k)?;
        d.set_item("seconds", e.seconds)?;
        Ok(d)
    }

    /// Writes a checkpoint; returns its directory.
    fn save(&mut self, py: Python<'_>) -> PyResult<String> {
        let run = &mut self.inner;
        py.allow_threads(|| run.save())
            .map(|p| p.display().to_string())
            .map_err(|e| to_pyerr(py, e))
    }

    /// The scored completions of the last step.
    fn rollouts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for r in &self.inner.last_rollouts {
            let d = PyDict::new(py);
            d.set_item("prompt", &r.prompt)?;
            d.set_item("completion", &r.completion)?;
            d.set_item("prompt_ids", PyTensor(Tensor::from_slice(&r.prompt_ids)))?;
            d.set_item("token_ids", PyTensor(Tensor::from_slice(&r.token_ids)))?;
            d.set_item("logprobs", PyTensor(Tensor::from_slice(&r.logprobs)))?;
            d.set_item("advantages", PyTensor(Tensor::from_slice(&r.advantages)))?;
            d.set_item("reward", r.reward)?;
            d.set_item("policy_version", r.policy_version)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Samples from the current policy; each prompt is text (rendered with the chat template as a
    /// user message when `chat`) and gets `n` completions.
    #[pyo3(signature = (prompts, n = 1, temperature = 1.0, top_p = 1.0, top_k = 0, min_p = 0.0, max_tokens = 64, seed = None, chat = true))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<String>,
        n: usize,
        temperature: f64,
        top_p: f64,
        top_k: i64,
        min_p: f64,
        max_tokens: usize,
        seed: Option<u64>,
        chat: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let prompts: Vec<Prompt> = prompts
            .into_iter()
            .map(|p| {
                if chat {
                    Prompt::user(p)
                } else {
                    Prompt::text(p)
                }
            })
            .collect();
        let params = SamplingParams {
            n,
            temperature,
            top_p,
            top_k,
            min_p,
            max_tokens,
            seed,
            ..Default::default()
        };
        let run = &self.inner;
        let ids = prompts
            .iter()
            .map(|p| run.encode_prompt(p))
            .collect::<rlrun::Result<Vec<_>>>()
            .map_err(|e| to_pyerr(py, e))?;
        let out = py
            .allow_threads(|| run.generate_prompts(&prompts, params))
            .map_err(|e| to_pyerr(py, e))?;
        let list = PyList::empty(py);
        for (group, pids) in out.into_iter().zip(ids) {
            let g = PyList::empty(py);
            for (text, c) in group {
                let d = PyDict::new(py);
                d.set_item("text", text)?;
                d.set_item("prompt_ids", PyTensor(Tensor::from_slice(&pids)))?;
                d.set_item("token_ids", PyTensor(Tensor::from_slice(&c.token_ids)))?;
                d.set_item("logprobs", PyTensor(Tensor::from_slice(&c.logprobs)))?;
                d.set_item(
                    "finish_reason",
                    format!("{:?}", c.finish_reason).to_lowercase(),
                )?;
                d.set_item("policy_version", c.policy_version)?;
                g.append(d)?;
            }
            list.append(g)?;
        }
        Ok(list)
    }

    /// Log-probs of `response` token ids after `prompt` ids under the current policy
    /// (1-D int64 tensors in, a 1-D float32 tensor out).
    fn logprobs(&self, py: Python<'_>, prompt: PyTensor, response: PyTensor) -> PyResult<PyTensor> {
        let p = Vec::<i64>::try_from(
            prompt
                .0
                .to_kind(tch::Kind::Int64)
                .to_device(tch::Device::Cpu),
        )
        .map_err(runtime_err)?;
        let r = Vec::<i64>::try_from(
            response
                .0
                .to_kind(tch::Kind::Int64)
                .to_device(tch::Device::Cpu),
        )
        .map_err(runtime_err)?;
        let run = &self.inner;
        let lp = py
            .allow_threads(|| run.logprobs(p, r))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(PyTensor(Tensor::from_slice(&lp)))
    }

    /// Metrics of every step so far.
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for m in self.inner.history() {
            list.append(metrics_dict(py, m)?)?;
        }
        Ok(list)
    }

    #[getter]
    fn run_dir(&self) -> String {
        self.inner.run_dir.display().to_string()
    }

    #[getter]
    fn step_index(&self) -> u64 {
        self.inner.step_index()
    }
}

/// A Python function used as a reward: `f(prompt, completion, ground_truth, **meta)` returning a
/// float or a dict with `value` and other metrics.
struct PyReward {
    name: String,
    func: Py<PyAny>,
}

fn prompt_text(p: &Prompt) -> String {
    match p {
        Prompt::Text(t) => t.clone(),
        Prompt::Messages(m) => m
            .iter()
            .rev()
            .find(|x| x.role == "user")
            .or(m.last())
            .map(|x| x.content.clone())
            .unwrap_or_default(),
    }
}

impl RewardFn for PyReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        let result: PyResult<Reward> = Python::with_gil(|py| {
            let kwargs = PyDict::new(py);
            kwargs.set_item("data_source", &sample.data_source)?;
            kwargs.set_item("token_ids", completion.token_ids.to_vec())?;
            kwargs.set_item(
                "finish_reason",
                format!("{:?}", completion.finish_reason).to_lowercase(),
            )?;
            let extra = py
                .import("json")?
                .call_method1("loads", (sample.extra.to_string(),))?;
            kwargs.set_item("extra", extra)?;
            let out = self.func.bind(py).call(
                (
                    prompt_text(&sample.prompt),
                    completion.text,
                    sample.ground_truth.clone(),
                ),
                Some(&kwargs),
            )?;
            if let Ok(v) = out.extract::<f64>() {
                return Ok(Reward::new(v as f32));
            }
            let d = out.downcast::<PyDict>().map_err(|_| {
                PyRuntimeError::new_err("a reward must return a float or a dict with a `value` key")
            })?;
            let value: f64 = d
                .get_item("value")?
                .ok_or_else(|| PyRuntimeError::new_err("the reward's dict has no `value`"))?
                .extract()?;
            let mut r = Reward::new(value as f32);
            for (k, v) in d.iter() {
                let k: String = k.extract()?;
                if k != "value" {
                    if let Ok(x) = v.extract::<f64>() {
                        r = r.with_metric(&k, x as f32);
                    }
                }
            }
            Ok(r)
        });
        // An exception is an error: the sample scores the failure value and is counted in
        // `reward/errors`.
        result.map_err(|e| RewardError::new(format!("Python reward `{}` raised {e}", self.name)))
    }
}

/// Registers a Python callable as a reward usable by recipes in this process
/// (`reward = { name = "registered", function = NAME }`).
#[pyfunction]
fn register_reward(name: String, func: Py<PyAny>) {
    registry::register(
        &name,
        Arc::new(PyReward {
            name: name.clone(),
            func,
        }),
    );
}

/// Names of the registered rewards.
#[pyfunction]
fn registered_rewards() -> Vec<String> {
    registry::names()
}

/// A Python class used as a multi-turn environment: each episode is an instance,
/// `cls(prompt, ground_truth, *, data_source, extra)`, with `step(text, tool_calls)` answering
/// a model turn (a dict with `observation` (a string, a message dict or a list of them),
/// optional `reward` and `done`), `final_reward()`, and optionally `first_messages()` (default:
/// the sample's prompt messages).
struct PyEnvironment {
    name: String,
    class: Py<PyAny>,
}

struct PyEpisode {
    env: String,
    obj: Py<PyAny>,
    first: Vec<ChatMessage>,
}

fn env_err(env: &str, what: &str, e: PyErr) -> EnvError {
    EnvError::Failed(format!("Python environment `{env}`: {what} raised {e}"))
}

/// A message from a Python dict `{"role": ..., "content": ...}`, or a string (a `tool` message).
fn py_message(v: &Bound<'_, PyAny>, default_role: &str) -> PyResult<ChatMessage> {
    if let Ok(text) = v.extract::<String>() {
        return Ok(ChatMessage::new(default_role, text));
    }
    let d = v.downcast::<PyDict>()?;
    let get = |k: &str| -> PyResult<Option<String>> {
        d.get_item(k)?.map(|x| x.extract::<String>()).transpose()
    };
    Ok(ChatMessage::new(
        get("role")?.unwrap_or_else(|| default_role.to_string()),
        get("content")?.unwrap_or_default(),
    ))
}

fn py_messages(v: &Bound<'_, PyAny>, default_role: &str) -> PyResult<Vec<ChatMessage>> {
    if v.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(list) = v.downcast::<PyList>() {
        return list.iter().map(|m| py_message(&m, default_role)).collect();
    }
    Ok(vec![py_message(v, default_role)?])
}

impl Environment for PyEnvironment {
    fn name(&self) -> &str {
        &self.name
    }
    fn tool_call_format(&self) -> ToolCallFormat {
        Python::with_gil(|py| {
            self.class
                .bind(py)
                .getattr("tool_call_format")
                .and_then(|f| f.extract::<String>())
                .ok()
                .and_then(|f| serde_json::from_value(serde_json::Value::String(f)).ok())
                .unwrap_or(ToolCallFormat::Hermes)
        })
    }
    fn start(&self, sample: &Sample) -> Result<Box<dyn Episode>, EnvError> {
        Python::with_gil(|py| {
            let kwargs = PyDict::new(py);
            kwargs.set_item("data_source", &sample.data_source)?;
            let extra = py
                .import("json")?
                .call_method1("loads", (sample.extra.to_string(),))?;
            kwargs.set_item("extra", extra)?;
            let obj = self.class.bind(py).call(
                (prompt_text(&sample.prompt), sample.ground_truth.clone()),
                Some(&kwargs),
            )?;
            let first = if obj.hasattr("first_messages")? {
                py_messages(&obj.call_method0("first_messages")?, "user")?
            } else {
                match &sample.prompt {
                    Prompt::Messages(m) => m.clone(),
                    Prompt::Text(t) => vec![ChatMessage::user(t.clone())],
                }
            };
            Ok(Box::new(PyEpisode {
                env: self.name.clone(),
                obj: obj.unbind(),
                first,
            }) as Box<dyn Episode>)
        })
        .map_err(|e: PyErr| env_err(&self.name, "starting an episode", e))
    }
}

impl Episode for PyEpisode {
    fn first_messages(&self) -> Vec<ChatMessage> {
        self.first.clone()
    }
    fn step(&mut self, turn: &ModelTurn) -> Result<Step, EnvError> {
        Python::with_gil(|py| -> PyResult<Step> {
            let calls = PyList::empty(py);
            for c in &turn.tool_calls {
                let d = PyDict::new(py);
                match c {
                    Ok(call) => {
                        d.set_item("name", &call.name)?;
                        let args = py
                            .import("json")?
                            .call_method1("loads", (call.arguments.to_string(),))?;
                        d.set_item("arguments", args)?;
                    }
                    Err(bad) => {
                        d.set_item("error", &bad.reason)?;
                        d.set_item("raw", &bad.raw)?;
                    }
                }
                calls.append(d)?;
            }
            let out = self
                .obj
                .bind(py)
                .call_method1("step", (turn.text.clone(), calls))?;
            let d = out.downcast::<PyDict>().map_err(|_| {
                PyRuntimeError::new_err(
                    "step must return a dict with `observation`, `reward` and `done`",
                )
            })?;
            let observation = match d.get_item("observation")? {
                Some(o) => py_messages(&o, "tool")?,
                None => Vec::new(),
            };
            let reward = match d.get_item("reward")? {
                Some(r) if !r.is_none() => Some(r.extract::<f64>()? as f32),
                _ => None,
            };
            let done = match d.get_item("done")? {
                Some(x) => x.extract::<bool>()?,
                None => false,
            };
            Ok(Step {
                observation,
                reward,
                done,
                tool_errors: 0,
            })
        })
        .map_err(|e| env_err(&self.env, "step", e))
    }
    fn final_reward(&self) -> f32 {
        Python::with_gil(|py| {
            self.obj
                .bind(py)
                .call_method0("final_reward")
                .and_then(|r| r.extract::<f64>())
        })
        .map(|r| r as f32)
        .unwrap_or_else(|e| {
            eprintln!(
                "Python environment `{}`: final_reward raised {e}; scored 0",
                self.env
            );
            0.0
        })
    }
}

/// Registers a Python class as a multi-turn environment usable by recipes in this process
/// (`[environment] name = "registered", class = NAME`).
#[pyfunction]
fn register_environment(name: String, class: Py<PyAny>) {
    env_registry::register(
        &name,
        Arc::new(PyEnvironment {
            name: name.clone(),
            class,
        }),
    );
}

/// Names of the registered environments.
#[pyfunction]
fn registered_environments() -> Vec<String> {
    env_registry::names()
}

#[pymodule]
fn _rlrun(m: &Bound<'_, PyModule>) -> PyResult<()> {
    rlrun::tune_allocator();
    m.add_class::<PyRecipe>()?;
    m.add_class::<PyRun>()?;
    m.add_function(wrap_pyfunction!(register_reward, m)?)?;
    m.add_function(wrap_pyfunction!(registered_rewards, m)?)?;
    m.add_function(wrap_pyfunction!(register_environment, m)?)?;
    m.add_function(wrap_pyfunction!(registered_environments, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
