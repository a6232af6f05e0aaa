#!/usr/bin/env python3
"""Collects the JSON files scripts/device-check.sh wrote under OUT into results.json and a
Markdown table results.md (committed as benches/results/<gpu>-<date>.md).

Usage: device_report.py OUT
"""
import datetime
import glob
import json
import os
import sys

out = sys.argv[1]
res = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    if os.path.basename(f) == "results.json":
        continue
    with open(f) as fh:
        res[os.path.basename(f)[:-5]] = json.load(fh)
gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else "?"
res["gpu"] = gpu
json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=2)
lines = [f"# rlrun device check - {gpu} - {datetime.date.today()}", "",
         "Every figure and its peer's come from the same run of `scripts/device-check.sh` on this machine.", ""]
lines += ["## Benchmarks", "", "| benchmark | rlrun | peer (transformers) | ratio |", "|---|---|---|---|"]
for k in ("bench_generate", "bench_generate_smollm2", "bench_train", "bench_forward"):
    b = res.get(k)
    if not b:
        lines.append(f"| {k} | failed | | |")
        continue
    # A batch-size sweep is a list of results, one row each.
    for r in b if isinstance(b, list) else [b]:
        for p in r.get("peers") or [{}]:
            peer = (p.get("median") or {}).get("tokens_per_s")
            ratios = p.get("round_ratios") or []
            ratio = r["rlrun_tokens_per_s"] / peer if peer else None
            label = f" vs {p['label']}" if p.get("label") else ""
            lines.append(f"| {r['bench']}{label} | {r['rlrun_tokens_per_s']:,.0f} tok/s | "
                         f"{'%s tok/s' % format(peer, ',.0f') if peer else '-'} | "
                         f"{'%.2fx' % ratio if ratio else '-'} (rounds: {' '.join('%.2f' % x for x in ratios)}) |")
lines += ["", "## Checks", "", "| check | result | figures |", "|---|---|---|"]
for c in res.get("selftest", {}).get("checks", []):
    figs = {k: v for k, v in c["figures"].items() if k != "step_metrics"}
    lines.append(f"| {c['check']} | {'PASS' if c['pass'] else 'FAIL'} | `{json.dumps(figs)}` |")
a = res.get("actors")
if a:
    figs = {k: v for k, v in a.items() if k != "pass"}
    lines.append(f"| trainer + generator processes on CUDA (shm sync from the GPU, probe after each sync) | "
                 f"{'PASS' if a['pass'] else 'FAIL'} | `{json.dumps(figs)}` |")
q = res.get("quickstart_time", {})
if q:
    lines += ["", f"Quickstart recipe on the GPU: {q.get('quickstart_wall_s')} s wall time (process start to exit)."]
open(os.path.join(out, "results.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
