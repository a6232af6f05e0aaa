#!/usr/bin/env bash
# GPU checks and benchmarks, run on a CUDA machine (the `device` machine of a session) from the
# repository root. It builds nothing: it runs the binary carried in target/device/ (made here by
# `make device-build`), with the machine's torch (/opt/torch/.venv) as libtorch and python peer.
#
#   bash scripts/device-check.sh            # writes results under $OUT (default ./device-out)
#
# target/device/ holds: rlrun (stripped), fixtures/ (tiny models), and the SmolLM2 GGUF in parts
# (smollm2.gguf.part*; a part may already be in /tmp/rlrun-device from an earlier call).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
D=target/device
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
NCCL_LIB=$(python3 -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=$TORCH_LIB:${NCCL_LIB}:${LD_LIBRARY_PATH:-}
export RLRUN_PYTHON=python3 PYTHONUNBUFFERED=1 RLRUN_LOG=${RLRUN_LOG:-warn}
RL=$D/rlrun
W=/tmp/rlrun-device
mkdir -p $W
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
step() { echo "== $*"; }

# ONLY=actors runs just the actor-process checks (tiny model; needs no GGUF, seconds).
actors_check() {
  step "actors in processes on the GPU: trainer + generator processes, shm sync from CUDA, probe"
  rm -rf $W/runs-actors
  $RL recipes/quickstart.toml --set model.path=$D/fixtures/tiny-llama3 --set model.dtype=f32 \
    --set steps=3 --set data.prompts_per_step=4 --set rollout.n=4 --set rollout.max_tokens=8 \
    --set eval.size=4 --set eval.max_tokens=4 --set placement.trainer_process=true \
    --set placement.generator_processes=1 --set rollout.max_staleness=1 --set sync.probe=true \
    --set logging.run_dir=$W/runs-actors 2>&1 | tee "$OUT/actors.log" || status=1
  cp $W/runs-actors/*/metrics.jsonl "$OUT/actors_metrics.jsonl" 2>/dev/null || status=1
  python3 - "$OUT/actors_metrics.jsonl" > "$OUT/actors.json" <<'PY' || status=1
import json, sys
train = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"train"' in l]
probe = max(m["sync/probe_logprob_max_diff"] for m in train)
res = {"steps": len(train), "probe_logprob_max_diff": probe,
       "sync_gb_per_s": [m["sync/gb_per_s"] for m in train],
       "staleness_max": [m["policy/staleness_max"] for m in train],
       # f32 weights; TF32 matmuls on CUDA make generator and trainer differ by rounding only.
       "pass": len(train) == 3 and probe < 1e-2 and all(m["sync/backend_shm"] == 1 for m in train)}
print(json.dumps(res))
sys.exit(0 if res["pass"] else 1)
PY
  cat "$OUT/actors.json"
}
if [ "${ONLY:-}" = actors ]; then
  actors_check
  exit $status
fi

step "SmolLM2-135M-Instruct from its GGUF"
cp $D/smollm2.gguf.part* $W/ 2>/dev/null || true
if [ ! -f $W/smollm2/model.safetensors ]; then
  cat $W/smollm2.gguf.part* > $W/smollm2.gguf && ls -la $W/smollm2.gguf
  $RL model import $W/smollm2.gguf $W/smollm2 || status=1
fi

step "Qwen2.5-0.5B architecture, random bf16 weights"
if [ ! -f $W/qwen05/model.safetensors ]; then
python3 - <<'PY' || status=1
import torch, shutil
from transformers import Qwen2Config, Qwen2ForCausalLM
cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
torch.manual_seed(0)
with torch.device("cuda"):
    m = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained("/tmp/rlrun-device/qwen05")
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"target/device/fixtures/tiny-tokenizer/{f}", f"/tmp/rlrun-device/qwen05/{f}")
PY
fi

step "selftest (NCCL world size 1, model parity on CUDA, bf16 log-prob mismatch, bf16 trainer)"
$RL selftest --fixtures $D/fixtures --smollm2 $W/smollm2 --json "$OUT/selftest.json" 2>&1 | tee "$OUT/selftest.log" || status=1

step "quickstart GRPO recipe on the GPU"
start=$(date +%s.%N)
$RL recipes/quickstart.toml --set model.path=$W/smollm2 --set logging.run_dir=$W/runs 2>&1 | tee "$OUT/quickstart.log" || status=1
python3 -c "print('{\"quickstart_wall_s\": %.1f}' % ($(date +%s.%N) - $start))" > "$OUT/quickstart_time.json"
cp $W/runs/*/metrics.jsonl "$OUT/quickstart_metrics.jsonl" 2>/dev/null || true
# The caching allocator's peaks per phase (trainer and generator in this process, cuda:0).
python3 - "$OUT/quickstart_metrics.jsonl" > "$OUT/allocator.json" <<'PY' || status=1
import json, sys
train = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"train"' in l]
peaks = {f"{p}_{k}": max(m.get(f"memory/cuda0_peak_{k}_{p}_bytes", 0) for m in train)
         for p in ("generate", "train", "sync") for k in ("allocated", "reserved")}
res = dict(peaks, steps=len(train), **{"pass": len(train) > 0 and all(v > 0 for v in peaks.values())})
print(json.dumps(res))
sys.exit(0 if res["pass"] else 1)
PY
cat "$OUT/allocator.json"

step "quickstart with LoRA on the GPU (bf16 base shared by trainer and generator, adapters synced)"
$RL recipes/quickstart_lora.toml --set model.path=$W/smollm2 --set logging.run_dir=$W/runs-lora 2>&1 | tee "$OUT/quickstart_lora.log" || status=1
cp $W/runs-lora/*/metrics.jsonl "$OUT/quickstart_lora_metrics.jsonl" 2>/dev/null || true
step "bench: LoRA training step (rank 16, all projections), Qwen2.5-0.5B arch bf16, 8 x 1024"
$RL bench train --model $W/qwen05 --dtype bf16 --device cuda --batch 8 --seq 1024 --iters 5 --lora-rank 16 --no-peer --rounds 3 --json "$OUT/bench_train_lora.json" 2>&1 | tail -6 || status=1

step "bench: generation, Qwen2.5-0.5B arch bf16, 256 x (128 prompt + 256 new)"
$RL bench generate --model $W/qwen05 --dtype bf16 --device cuda --prompts 256 --n 1 --prompt-len 128 --max-new 256 --rounds 3 --json "$OUT/bench_generate.json" 2>&1 | tail -8 || status=1
step "bench: generation, SmolLM2 bf16, 32 prompts x 8 samples x 128"
$RL bench generate --model $W/smollm2 --dtype bf16 --device cuda --sizes 1,4,16,64,256 --n 1 --rounds 3 --json "$OUT/bench_generate_smollm2.json" 2>&1 | tail -60 || status=1
step "bench: training step, Qwen2.5-0.5B arch bf16, 8 x 1024"
$RL bench train --model $W/qwen05 --dtype bf16 --device cuda --batch 8 --seq 1024 --iters 5 --rounds 3 --json "$OUT/bench_train.json" 2>&1 | tail -8 || status=1
step "bench: prefill, Qwen2.5-0.5B arch bf16, 8 x 1024"
$RL bench forward --model $W/qwen05 --dtype bf16 --device cuda --batch 8 --seq 1024 --iters 5 --rounds 3 --json "$OUT/bench_forward.json" 2>&1 | tail -8 || status=1

actors_check

python3 scripts/device_report.py "$OUT" || status=1
exit $status
