#!/usr/bin/env bash
# The GPU benchmark in one go: a TinyLlama-shaped random checkpoint (2048 wide, 22 layers, 32/4 heads,
# 5632 SwiGLU, 32000 vocab, bf16); then the engine's batch-1 decode step with CUDA graphs and without, against
# the memory-bandwidth floor (bench/decode_step.py); then the real server over HTTP and the engine alone on
# CUDA at 1, 32, 128 and 256 concurrent streams (16-token prompts, 128 greedy tokens each, ignore_eos), one
# table. About 4-6 minutes on one H100/H200; stops itself at 8.
#
#   [GPU_BANDWIDTH=bytes/s] bench/gpu.sh [CHECKPOINT_DIR=/tmp/tinyllama-shape] [PYTHON=.venv/bin/python]
#
# GPU_BANDWIDTH: the device's memory bandwidth for the floor; unset, 4.8e12 on an H200 and 3.35e12 on an
# H100 SXM (set 2.0e12 for an H100 PCIe).
#
# The checkpoint is written once and reused. Its tokenizer has 8000 pieces (quick to train): ids past
# it decode to no text, so fewer SSE events than tokens reach the clients; tokens are counted from usage.
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:-/tmp/tinyllama-shape}
python=${2:-${PYTHON:-.venv/bin/python}}
deadline=$((SECONDS + 480))

"$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this is the GPU benchmark")'
"$python" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
if [ ! -f "$ckpt/model.safetensors" ]; then
  "$python" -m bench.make_checkpoint tinyllama-shape "$ckpt" --dtype bfloat16 --tokenizer-vocab 8000
fi
left=$((deadline - SECONDS))
# A failure here is reported and the HTTP table still runs: the two measure different things.
timeout --signal=INT "$left" "$python" -m bench.decode_step "$ckpt" --device cuda --tokens 256 \
  || echo "bench.decode_step failed (exit $?)"
echo
left=$((deadline - SECONDS))
timeout --signal=INT "$left" "$python" -m bench.http_bench "$ckpt" --device cuda \
  --concurrency 1,32,128,256 --tokens 128 --prompt-tokens 16 --temperature 0
