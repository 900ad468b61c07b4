#!/usr/bin/env bash
# The training benchmark's GPU figures in one call of a lent GPU machine (docs/benchmarks.md,
# "GPU: owed"): the device, what its image has (flash_attn, bitsandbytes), QLoRA's message
# where bitsandbytes is missing, then bench/train_bench.py on a Llama-3.2-1B-shaped model,
# bf16, recipe vs Trainer baseline: tokens/s, TFLOP/s, MFU, peak GPU memory, eval loss.
#   here:   bench/gpu_wheels.sh                      (the .whl/ that image lacks)
#   there:  bash bench/gpu_check.sh                  (carry .whl; about 5 minutes)
# Results land in $OUT (the device tool's folder), else .bench/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.bench/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LORAFLEET_CACHE=${LORAFLEET_CACHE:-/tmp/lorafleet-cache}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import importlib.util

import peft
import torch
import transformers

from lorafleet.errors import LorafleetError
from lorafleet.train.flops import device_peak_tflops
from lorafleet.train.recipe import _check_qlora

print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("transformers", transformers.__version__, "peft", peft.__version__)
print("peak bf16 TFLOP/s used for MFU:", device_peak_tflops("cuda:0"))
for name in ("flash_attn", "bitsandbytes"):
    print(name, "installed" if importlib.util.find_spec(name) else "missing")
try:
    _check_qlora()
    print("qlora: available")
except LorafleetError as exc:
    print("qlora:", exc)
PY
# 16 CPU threads there: 8 per side is plenty for the host side of a GPU step.
timeout 480 python3 bench/train_bench.py --model llama-1b --epochs 2 --threads 8 --workdir /tmp/lorafleet-bench \
  > "$OUT/train_bench.json" 2> "$OUT/train_bench.err"
echo "train_bench exit $?"
tail -n 30 "$OUT/train_bench.err"
cat "$OUT/train_bench.json"
