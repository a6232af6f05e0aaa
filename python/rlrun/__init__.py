"""rlrun: reinforcement-learning post-training for LLMs, from Python.

The training loop, generator and trainer are the Rust ones (``rlrun._rlrun``); long calls release
the GIL. Typical use in a notebook::

    import rlrun

    @rlrun.reward("exact")
    def exact(prompt, completion, ground_truth, **meta):
        return float(completion.strip() == ground_truth)

    recipe = rlrun.Recipe.load("recipes/quickstart.toml",
                               overrides={"reward": {"name": "registered", "function": "exact"}})
    run = rlrun.Run(recipe)
    print(run.evaluate()["accuracy"])
    run.train(10)
    df = run.history_frame()        # pandas, when installed
"""

import json as _json

import torch as _torch  # noqa: F401  (loads libtorch and its Python bindings before the extension)

from . import _rlrun
from .errors import RecipeError

__all__ = ["Recipe", "Run", "RecipeError", "reward", "registered_rewards", "environment",
           "registered_environments", "__version__"]
__version__ = _rlrun.__version__


class Recipe:
    """A validated recipe (see the repository's ``recipes/`` for examples)."""

    def __init__(self, native):
        self._native = native

    @staticmethod
    def load(path, overrides=None):
        """Reads, overrides and validates a recipe file. ``overrides`` maps dotted keys
        (``"trainer.lr"``) to values. Raises :class:`RecipeError` naming the key and line."""
        return Recipe(_rlrun.Recipe.load(str(path), overrides or {}))

    def to_dict(self):
        """The resolved recipe (defaults filled in, overrides applied) as a dict."""
        return _json.loads(self._native.to_json())

    @property
    def toml(self):
        """The resolved recipe as TOML text."""
        return self._native.resolved

    def __repr__(self):
        return f"Recipe(name={self.to_dict().get('name')!r})"


class Run:
    """A training run: ``step()``, ``train(steps)``, ``evaluate()``, ``save()``,
    ``Run.resume(dir)``, ``rollouts()``, ``generate(prompts)``, ``history``."""

    def __init__(self, recipe, _native=None):
        self._native = _native if _native is not None else _rlrun.Run(recipe._native)

    @staticmethod
    def resume(run_dir):
        """Continues a run from its latest checkpoint."""
        return Run(None, _native=_rlrun.Run.resume(str(run_dir)))

    def step(self):
        """One training step; returns its metrics (a dict)."""
        return self._native.step()

    def train(self, steps=None, progress=True):
        """Trains ``steps`` more steps (default: up to the recipe's ``steps``); returns the list
        of step metrics."""
        return self._native.train(steps, progress)

    def evaluate(self):
        """Greedy accuracy on the recipe's held-out set: a dict with ``accuracy``,
        ``mean_reward``, ``problems``, ..."""
        return self._native.evaluate()

    def save(self):
        """Writes a checkpoint (atomically); returns its directory."""
        return self._native.save()

    def rollouts(self):
        """The last step's completions: dicts with ``prompt``, ``completion``, ``reward``,
        ``policy_version`` and torch tensors ``prompt_ids``, ``token_ids``, ``logprobs``,
        ``advantages``."""
        return self._native.rollouts()

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=64,
                 seed=None, chat=True):
        """Samples ``n`` completions of each prompt (text; a chat user message when ``chat``)
        from the current policy. Returns one list of dicts (``text``, ``token_ids``,
        ``logprobs``, ``finish_reason``, ``policy_version``) per prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._native.generate(list(prompts), n, temperature, top_p, top_k, min_p, max_tokens, seed, chat)

    def logprobs(self, prompt_ids, response_ids):
        """Log-probs (float32 tensor) of ``response_ids`` after ``prompt_ids`` (int64 tensors)
        under the current policy, computed by the trainer."""
        return self._native.logprobs(prompt_ids, response_ids)

    @property
    def history(self):
        """Metrics of every step so far (a list of dicts)."""
        return self._native.history

    def history_frame(self):
        """``history`` as a pandas DataFrame (requires pandas)."""
        import pandas as pd

        return pd.DataFrame(self.history)

    @property
    def run_dir(self):
        return self._native.run_dir

    @property
    def step_index(self):
        return self._native.step_index


def reward(name):
    """Registers the decorated function as a reward named ``name``, usable by recipes run in this
    process as ``reward = { name = "registered", function = "<name>" }``.

    The function is called as ``f(prompt, completion, ground_truth, *, data_source, token_ids,
    finish_reason, extra)`` and returns a float or a dict with ``value`` (other numeric keys become
    metrics). An exception scores the sample 0 and is counted in the step's ``reward/panics``; it
    never stops the run."""

    def wrap(func):
        _rlrun.register_reward(name, func)
        return func

    return wrap


def registered_rewards():
    """Names of the rewards registered in this process."""
    return _rlrun.registered_rewards()


def environment(name):
    """Registers the decorated class as a multi-turn environment named ``name``, usable by recipes
    run in this process as ``[environment] name = "registered", class = "<name>"``.

    Each episode is an instance, made as ``cls(prompt, ground_truth, *, data_source, extra)``.
    It may define ``first_messages()`` (a list of ``{"role", "content"}`` dicts; default: the
    sample's prompt). ``step(text, tool_calls)`` answers each model turn (``tool_calls``: dicts with
    ``name`` and ``arguments``, or ``error`` and ``raw`` for a malformed call, parsed in the class's
    ``tool_call_format``: ``"hermes"`` (default), ``"llama3"`` or ``"text"``) and returns a dict
    with ``observation`` (a string, a message dict or a list of them; strings become ``tool``
    messages), optional ``reward`` (per turn) and ``done``. ``final_reward()`` scores the episode.
    An exception in ``step`` fails that episode only (scored 0, counted in ``env/step_errors``)."""

    def wrap(cls):
        _rlrun.register_environment(name, cls)
        return cls

    return wrap


def registered_environments():
    """Names of the environments registered in this process."""
    return _rlrun.registered_environments()
