#!/usr/bin/env bash
# The GPU check: this pipeline's training on CUDA against TRL and peft + transformers, on random
# weights of Llama-2-7B's shape (MHA, 32k vocabulary) and Llama-3.1-8B's (GQA, 128k vocabulary),
# 2,048-token examples, gradient checkpointing, LoRA in bf16 and QLoRA (benchmarks/bench_gpu.py).
# Writes gpu.json into $OUT (the device tool's folder) or benchmarks/results/ and prints the table.
#
#   bash benchmarks/gpu_wheels.sh                      # here, once: the wheels the device lacks
#   bash benchmarks/gpu_check.sh                       # on one GPU: under 8 minutes on an H100
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh     # the same steps, tiny shape, on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
results=${OUT:-benchmarks/results}
mkdir -p "$results"
"$PY" - <<'PYTHON'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for name in ("transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets"):
    print(name, md.version(name))
PYTHON
if [ -n "${GPU_CHECK_SMOKE:-}" ]; then
  "$PY" benchmarks/bench_gpu.py --shapes tiny --device cpu --seq-len 64 --steps 2 \
    --output "$results/gpu.json"
else
  # most telling runs first: the 7B shape, then 8B; runs left when the budget is spent are
  # listed as skipped
  "$PY" benchmarks/bench_gpu.py --shapes 7b,8b --seq-len 2048 --steps 4 --warmup 1 \
    --run-timeout 150 --budget 420 --output "$results/gpu.json"
fi
