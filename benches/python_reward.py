#!/usr/bin/env python3
"""Overhead of a Python reward function against the same reward in Rust, within a training step.

1,024 samples per step (128 prompts x 8) on the tiny test model (so the reward's share of a step is
as large as it gets); the Rust side is the built-in `regex-match` reward, the Python side the same
check written in Python and registered with @rlrun.reward. Prints the reward time and the step time
of both and the ratio. Run from the repository root after `make python` and `make fixtures`:

    .venv/bin/python benches/python_reward.py
"""
import os
import platform
import re
import statistics
import tempfile

import rlrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERN = r"\A\s*(-?\d+)\s*\z"
PY_PATTERN = re.compile(r"\s*(-?\d+)\s*")


@rlrun.reward("py_first_line_number")
def py_first_line_number(prompt, completion, ground_truth, **meta):
    m = PY_PATTERN.fullmatch(completion)
    return float(m is not None and m.group(1) == ground_truth.strip())


def measure(reward, steps=4):
    with tempfile.TemporaryDirectory() as d:
        recipe = rlrun.Recipe.load(os.path.join(ROOT, "recipes/quickstart.toml"), overrides={
            "model.path": os.path.join(ROOT, ".fixtures/tiny-llama3"),
            "data.prompts_per_step": 128, "rollout.n": 8, "rollout.max_tokens": 8,
            "logging.run_dir": d, "logging.tensorboard": False, "reward": reward,
        })
        run = rlrun.Run(recipe)
        run.step()  # warm-up
        ms = [run.step() for _ in range(steps)]
    return statistics.median(m["time/step_s"] for m in ms), statistics.median(m["time/reward_s"] for m in ms)


rust = measure({"name": "regex-match", "pattern": PATTERN, "mode": "capture-equals-ground-truth"})
py = measure({"name": "registered", "function": "py_first_line_number"})
print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
print(f"1,024 samples per step; median over 4 steps")
print(f"  Rust reward:   step {rust[0]:.3f} s, reward {1000 * rust[1]:.1f} ms")
print(f"  Python reward: step {py[0]:.3f} s, reward {1000 * py[1]:.1f} ms")
print(f"  step time ratio (Python / Rust): {py[0] / rust[0]:.3f} (goal <= 1.20)")
print(f"  reward time added by Python: {1000 * (py[1] - rust[1]):.1f} ms = {100 * (py[1] - rust[1]) / rust[0]:.1f}% of the Rust step")
