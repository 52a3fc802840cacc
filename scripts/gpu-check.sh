#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (about 10 minutes on one GPU): the `gpu`-marked tests (learners
# with every model on the GPU: ZeRO-3, bf16, each algorithm; with 2 GPUs, streamed NCCL weight sync from GPU memory
# to GPU memory) and the vLLM generator tests (the live reload of streamed buckets among them), which use the GPU
# build of vLLM where one is installed. On a machine without CUDA every test here is skipped, saying why.
#   scripts/gpu-check.sh            # from the repository root, after `make setup`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi: the gpu tests will skip"
exec "$PY" -m pytest -ra --timeout=600 tests/test_gpu_learner.py tests/test_generator.py "$@"
