#!/usr/bin/env python3
"""Records a short run of every shipped recipe on this machine: the first steps with evaluation
off, as a new user would start them, and writes benches/results/recipes-<machine>-<date>.md.

Usage: .venv/bin/python scripts/record_recipes.py [--steps N] [--heavy-steps M] [recipe ...]

For each recipe: `rlrun <recipe> --set steps=N --set eval.before=false --set eval.after=false
--set eval.every=0` under /usr/bin/time; from the run's metrics.jsonl: each step's wall time
(time/step_s), the reward per step (reward/mean) and accuracy (reward/accuracy), the peak resident
memory of the process, and the wall time of the whole command (model load included).
"""
import argparse
import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Recipes whose steps take minutes on 2 cores: fewer steps.
HEAVY = {"grpo_arithmetic", "grpo_countdown", "dapo_arithmetic", "gsm8k_smollm2", "ppo_gae"}


def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def record(recipe, steps):
    name = os.path.splitext(os.path.basename(recipe))[0]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["/usr/bin/time", "-v", os.path.join(ROOT, "target/release/rlrun"), recipe,
               "--set", f"steps={steps}", "--set", "eval.before=false", "--set", "eval.after=false",
               "--set", "eval.every=0", "--set", f'logging.run_dir="{tmp}"']
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            return {"recipe": name, "error": p.stderr[-2000:]}
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", p.stderr)
        parts = [float(x) for x in wall.group(1).split(":")] if wall else []
        wall_s = sum(x * 60 ** i for i, x in enumerate(reversed(parts)))
        lines = []
        for f in glob.glob(os.path.join(tmp, "*", "metrics.jsonl")):
            lines += [json.loads(l) for l in open(f) if l.strip()]
        train = [l for l in lines if l.get("kind") == "train"]
        return {
            "recipe": name,
            "steps": len(train),
            "step_s": [round(l.get("time/step_s", float("nan")), 1) for l in train],
            "reward": [round(l.get("reward/mean", float("nan")), 3) for l in train],
            "accuracy": [round(l.get("reward/accuracy", float("nan")), 3) for l in train],
            "response_len": [round(l.get("response_length/mean", float("nan")), 1) for l in train],
            "peak_rss_gb": round(int(rss.group(1)) * 1024 / 1e9, 2) if rss else None,
            "wall_s": round(wall_s, 1),
        }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--heavy-steps", type=int, default=2)
    ap.add_argument("recipes", nargs="*")
    a = ap.parse_args()
    recipes = a.recipes or sorted(glob.glob(os.path.join(ROOT, "recipes", "*.toml")))
    results = []
    for r in recipes:
        name = os.path.splitext(os.path.basename(r))[0]
        res = record(r, a.heavy_steps if name in HEAVY else a.steps)
        print(json.dumps(res), flush=True)
        results.append(res)
    today = datetime.date.today().isoformat()
    cores = os.cpu_count()
    out = os.path.join(ROOT, "benches", "results", f"recipes-cpu-{today}.md")
    rows = ["| recipe | steps | time per step (s) | reward/mean per step | accuracy per step | "
            "mean response length | peak RSS | wall (load + steps) |", "|---|---|---|---|---|---|---|---|"]
    for x in results:
        if "error" in x:
            rows.append(f"| {x['recipe']} | failed | | | | | | |")
            continue
        j = lambda v: " / ".join(str(e) for e in v)
        rows.append(f"| {x['recipe']} | {x['steps']} | {j(x['step_s'])} | {j(x['reward'])} | "
                    f"{j(x['accuracy'])} | {j(x['response_len'])} | {x['peak_rss_gb']} GB | {x['wall_s']} s |")
    text = "\n".join([
        f"# Shipped recipes, first steps on {cores} CPU cores ({today})", "",
        f"Machine: {cpu()}, {cores} cores. Recorded by `scripts/record_recipes.py`: each recipe as shipped, "
        f"evaluation off, {a.steps} steps ({a.heavy_steps} for {', '.join(sorted(HEAVY))}); "
        "times from `time/step_s` in metrics.jsonl, peak RSS and wall time from /usr/bin/time.",
        "The first step includes warm-up (allocator, first generation); the recipes' headers quote these.", "",
    ] + rows + ["", "Raw records:", "", "```"] + [json.dumps(x) for x in results] + ["```", ""])
    open(out, "w").write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
