#!/usr/bin/env bash
# Peak memory of the first step of every shipped recipe (full fine-tuning, as shipped; evaluation
# off), as one Markdown table: the process's peak resident memory while generating and while
# training, the KV cache allocated and the most of it used, the step's time and its longest
# response. Run from the repository root after `make build` (and the SmolLM2 import that
# `make quickstart` or `make test` does):
#
#   bash benches/memory.sh > benches/results/memory-cpu.md
#
# RECIPES="quickstart grpo_countdown" limits the recipes; EXTRA="--set k=v ..." adds overrides.
set -euo pipefail
BIN=${BIN:-target/release/rlrun}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
recipes=${RECIPES:-$(for f in recipes/*.toml; do basename "$f" .toml; done)}

echo "# First-step memory of the shipped recipes"
echo
echo "Machine: $(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1e6}' /proc/meminfo) RAM, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); $(date -u +%Y-%m-%d)."
echo "Commit $(git rev-parse --short HEAD). Each recipe as shipped (f32, full fine-tuning, activation checkpointing as the recipe says), \`steps=1\`, evaluation off."
echo
echo "| recipe | peak RSS generating | peak RSS training | KV cache allocated | KV cache used at most | step time | longest response |"
echo "|---|---|---|---|---|---|---|"
for r in $recipes; do
  # shellcheck disable=SC2086
  "$BIN" "recipes/$r.toml" --set steps=1 --set eval.before=false --set eval.after=false \
    --set "logging.run_dir=\"$OUT/$r\"" ${EXTRA:-} > "$OUT/$r.log" 2>&1 || { echo "| $r | failed: see below | | | | | |"; tail -5 "$OUT/$r.log" >&2; continue; }
  python3 - "$r" "$OUT/$r" <<'EOF'
import glob, json, sys
name, base = sys.argv[1], sys.argv[2]
lines = [json.loads(l) for l in open(glob.glob(base + "/*/metrics.jsonl")[0])]
m = next(l for l in lines if l.get("step") == 1)
gb = lambda k: f"{m[k] / 1e9:.1f} GB" if k in m else "n/a"
print(f"| {name} | {gb('memory/peak_rss_generate_bytes')} | {gb('memory/peak_rss_train_bytes')} | "
      f"{gb('memory/kv_cache_bytes')} | {gb('memory/kv_cache_peak_used_bytes')} | "
      f"{m.get('time/step_s', float('nan')):.0f} s | {m.get('response_length/max', 0):.0f} |")
EOF
done
