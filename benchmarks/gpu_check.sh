#!/usr/bin/env bash
# loraplex GPU check: LoRA and QLoRA training in bf16 on the embedded default model and on a random-init
# Llama-3-8B-shaped model, with isolation / loss / held-out checks and tokens/s and peak memory against a
# notebook-style HF Trainer + PEFT baseline (see benchmarks/gpu_check.py). Offline; no model downloads.
#
#   bash benchmarks/gpu_check.sh                  # on a machine with one CUDA GPU (H200: a few minutes)
#   bash benchmarks/gpu_check.sh --layers 8       # the 8B shape cut to 8 layers
#   bash benchmarks/gpu_check.sh --dry-run        # on a CPU: the same code path on a tiny model, in seconds
#
# Where two GPUs exist, benchmarks/gpu_check_fsdp.py first checks distributed.strategy: fsdp and deepspeed
# (memory against DDP, adapters against one process, QLoRA with FSDP); with fewer it prints one SKIP line.
# The last line is `gpu_check: N passed, M failed`; the exit status is non-zero if a check failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
else
    PYTHON=python3
fi
export PYTHONUNBUFFERED=1
status=0
"$PYTHON" benchmarks/gpu_check_fsdp.py || status=1
"$PYTHON" benchmarks/gpu_check.py "$@" || status=1
exit $status
