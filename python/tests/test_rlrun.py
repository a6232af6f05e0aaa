"""Tests of the Python bindings (run by `make test` after `make python`)."""
import json
import os
import pathlib

import pytest
import torch

import rlrun

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = pathlib.Path(os.environ.get("RLRUN_FIXTURES", ROOT / ".fixtures"))
QUICKSTART = ROOT / "recipes" / "quickstart.toml"


def tiny(tmp_path, **extra):
    o = {
        "model.path": str(FIXTURES / "tiny-llama3"),
        "steps": 2,
        "data.prompts_per_step": 2,
        "rollout.n": 2,
        "rollout.max_tokens": 4,
        "eval.size": 4,
        "eval.max_tokens": 4,
        "logging.run_dir": str(tmp_path),
    }
    o.update(extra)
    return o


def test_recipe_load_override_and_to_dict():
    r = rlrun.Recipe.load(QUICKSTART, overrides={"steps": 3, "trainer.lr": 2e-5, "rollout.stop": ["\n", "."]})
    d = r.to_dict()
    assert d["steps"] == 3 and d["trainer"]["lr"] == 2e-5 and d["rollout"]["stop"] == ["\n", "."]
    assert d["algorithm"]["advantage"]["name"] == "grpo"
    assert "[trainer]" in r.toml


def test_invalid_recipe_raises_recipe_error_with_key_and_line():
    with pytest.raises(rlrun.RecipeError) as e:
        rlrun.Recipe.load(QUICKSTART, overrides={"trainer.lr": -1.0})
    assert e.value.key == "trainer.lr" and e.value.line is not None and "must be > 0" in str(e.value)
    assert isinstance(e.value, ValueError)
    with pytest.raises(rlrun.RecipeError) as e:
        rlrun.Recipe.load(QUICKSTART, overrides={"trainer.lrr": 1.0})
    assert "did you mean `lr`" in str(e.value)


def test_two_tiny_steps_history_and_save(tmp_path):
    run = rlrun.Run(rlrun.Recipe.load(QUICKSTART, overrides=tiny(tmp_path)))
    m1 = run.step()
    assert m1["policy/version"] == 1.0 and "reward/mean" in m1 and "actor/grad_norm" in m1
    ms = run.train(1, progress=False)
    assert len(ms) == 1 and run.step_index == 2
    assert [h["policy/version"] for h in run.history] == [1.0, 2.0]
    df = run.history_frame()
    assert list(df["policy/version"]) == [1.0, 2.0]
    ckpt = run.save()
    assert pathlib.Path(ckpt, "trainer", "policy.safetensors").exists()
    ev = run.evaluate()
    assert ev["problems"] == 4 and 0.0 <= ev["accuracy"] <= 1.0
    resumed = rlrun.Run.resume(run.run_dir)
    assert resumed.step_index == 2


def test_python_reward_used_by_a_recipe(tmp_path):
    calls = []

    @rlrun.reward("len_reward")
    def len_reward(prompt, completion, ground_truth, **meta):
        calls.append((prompt, completion, ground_truth, meta["finish_reason"]))
        return {"value": len(meta["token_ids"]) / 4.0, "chars": len(completion)}

    assert "len_reward" in rlrun.registered_rewards()
    over = tiny(tmp_path, reward={"name": "registered", "function": "len_reward"})
    run = rlrun.Run(rlrun.Recipe.load(QUICKSTART, overrides=over))
    m = run.step()
    assert len(calls) == 4
    assert all("+" in p and gt is not None for p, _, gt, _ in calls)
    # Fixed-length completions (4 tokens) score 1.0 each; the extra key became a metric.
    assert m["reward/mean"] == pytest.approx(1.0)
    assert "reward/chars" in m and m["reward/panics"] == 0.0 and m["reward/errors"] == 0.0


MULTITURN = ROOT / "recipes" / "multiturn_calculator.toml"


def test_python_environment_trains(tmp_path):
    turns = []

    @rlrun.environment("say_twice")
    class SayTwice:
        tool_call_format = "text"

        def __init__(self, prompt, ground_truth, **meta):
            self.turns, self.last = 0, ""
            assert "data_source" in meta

        def first_messages(self):
            return [{"role": "user", "content": "Say something."}]

        def step(self, text, tool_calls):
            self.turns += 1
            turns.append(text)
            if self.turns == 1:
                return {"observation": "Once more.", "reward": 0.25, "done": False}
            self.last = text
            return {"done": True}

        def final_reward(self):
            return float(len(self.last) % 2)

    @rlrun.environment("broken")
    class Broken:
        def __init__(self, prompt, ground_truth, **meta):
            pass

        def step(self, text, tool_calls):
            raise RuntimeError("the environment fell over")

        def final_reward(self):
            return 1.0

    assert {"say_twice", "broken"} <= set(rlrun.registered_environments())
    over = tiny(tmp_path, **{"rollout.max_tokens": 32, "steps": 1})
    env = {"name": "registered", "class": "say_twice", "max_turns": 3, "max_tokens_per_turn": 4,
           "close_cut_turns": True}
    run = rlrun.Run(rlrun.Recipe.load(MULTITURN, overrides=dict(over, environment=env)))
    m = run.step()
    # 2 prompts x 2 episodes, each two turns; the update ran on them.
    assert len(turns) == 8 and m["env/turns_mean"] == 2.0 and m["env/step_errors"] == 0.0
    assert m["policy/version"] == 1.0 and "actor/grad_norm" in m
    rewards = [r["reward"] for r in run.rollouts()]
    assert len(rewards) == 4 and all(r in (0.25, 1.25) for r in rewards), rewards
    # An exception in step fails its episode (scored 0, counted), not the run.
    env = dict(env, **{"class": "broken"})
    run = rlrun.Run(rlrun.Recipe.load(MULTITURN, overrides=dict(over, environment=env)))
    m = run.step()
    assert m["env/step_errors"] == 4.0 and m["reward/mean"] == 0.0


def test_exception_in_python_reward_is_isolated(tmp_path):
    @rlrun.reward("broken")
    def broken(prompt, completion, ground_truth, **meta):
        raise RuntimeError("this reward is broken")

    over = tiny(tmp_path, reward={"name": "registered", "function": "broken"})
    run = rlrun.Run(rlrun.Recipe.load(QUICKSTART, overrides=over))
    m = run.step()  # the step completes
    # An exception is an error of the reward, counted as such (not a panic).
    assert m["reward/errors"] == 4.0 and m["reward/panics"] == 0.0
    assert m["reward/mean"] == 0.0
    m = run.step()  # and the run goes on
    assert m["reward/errors"] == 4.0


def test_unknown_registered_reward_is_a_clear_error(tmp_path):
    over = tiny(tmp_path, reward={"name": "registered", "function": "nope"})
    with pytest.raises(rlrun.RecipeError) as e:
        rlrun.Recipe.load(QUICKSTART, overrides=over)
    assert "no reward registered as `nope`" in str(e.value)


def test_tensors_round_trip_to_torch(tmp_path):
    run = rlrun.Run(rlrun.Recipe.load(QUICKSTART, overrides=tiny(tmp_path)))
    out = run.generate(["1 + 1 ="], n=3, max_tokens=5, chat=False, seed=3)
    assert len(out) == 1 and len(out[0]) == 3
    for s in out[0]:
        assert isinstance(s["token_ids"], torch.Tensor) and s["token_ids"].dtype == torch.int64
        assert s["logprobs"].dtype == torch.float32 and s["logprobs"].shape == s["token_ids"].shape
        # The trainer's log-probs of the same tokens (torch tensors in and out) equal the
        # generator's: same weights, same definition.
        lp = run.logprobs(s["prompt_ids"], s["token_ids"])
        assert isinstance(lp, torch.Tensor)
        assert torch.allclose(lp, s["logprobs"], atol=1e-4), (lp, s["logprobs"])
    run.step()
    ro = run.rollouts()
    assert len(ro) == 4
    assert all(isinstance(r["advantages"], torch.Tensor) and r["advantages"].shape == r["token_ids"].shape for r in ro)


def test_notebook_runs_headless(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "examples" / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook with outputs cleared"
    env_backup = dict(os.environ)
    os.environ.update({
        "RLRUN_NOTEBOOK_STEPS": "2",
        "RLRUN_NOTEBOOK_EVAL_SIZE": "8",
        "RLRUN_NOTEBOOK_MODEL": str(FIXTURES / "smollm2"),
        "RLRUN_NOTEBOOK_RUN_DIR": str(tmp_path),
        "RLRUN_NOTEBOOK_PROMPTS": "2",
    })
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    text = json.dumps(nb.dict())
    assert "held-out accuracy" in text and "image/png" in text
    # The Python-defined multi-turn environment trained.
    assert "multi-turn, Python environment: held-out accuracy" in text
    assert "tool calls per episode, by step" in text
