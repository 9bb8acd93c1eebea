"""Scaling: GRPO step time against G, engines, model size and learner ranks; the learner's
achieved FLOP/s against the machine's matmul peak, measured in the same run and dtype.

    .venv/bin/python bench/scaling.py                  # about 20 minutes on 2 cores
    .venv/bin/python bench/scaling.py --steps 4 --only G
    .venv/bin/python bench/scaling.py --dtype bfloat16 # a CPU with bf16 instructions (AMX, AVX512-BF16)

Each row is a real run of `cluster.train.train` in a fresh process (its own local Ray
cluster) on a tiny Llama built on the fly, with a short cold start (20 SFT steps of 32
traces, so that rewards differ within groups: r1ray learns only from such groups) and no
evaluation, changing one thing from the base: the default 4.4M model, 8 prompts x G=8
answers x 32 new tokens, 1 vLLM engine, 1 learner rank, fp32 (`--dtype`: learner and
engine), one update per step. Times are medians over the GRPO steps after the first (which
pays one-off warm-ups); "groups learned" is the share of groups with signal, the learner's
batch (a step with none has no learn phase and counts 0 s).

Learner FLOP/s counts the matmul work the learner does usefully (cluster/metrics.py,
`learn_flops`): 6 x body parameters x (prompt + answer tokens) + 6 x LM-head parameters x
answer tokens, over the learn time. The body is every parameter but the input embedding (a
lookup); the head runs only where an answer token is predicted; padding is not counted, nor
are attention's score and value products, so the figure understates the work a little. With
one update per step and no KL there is no forward-only pass. The parameters are read from
the model each run saves.

Peak: the best of 5 timed square matmuls (n = 2048) in the learner's dtype with 2 torch
threads, 2 n^3 FLOP each, after a warm-up, measured at the start of the same invocation;
the last column is the learner's FLOP/s as a share of it. bf16 on a CPU without bf16
instructions is emulated ~100x slower than fp32 (bench/machine.py); `--dtype bfloat16`
refuses to run there unless `--force-bf16`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import bf16_native, describe  # noqa: E402  (bench/machine.py, beside this script)

# A short cold start: r1ray learns only from groups whose rewards differ (learner/grpo.py,
# point 8), and a random model's are all 0. After 20 SFT steps of 32 traces the default model
# writes the R1 format about half the time, so nearly every group has signal (2026-12-01).
BASE = ["algorithm.prompts_per_step=8", "algorithm.group_size=8", "rollout.max_new_tokens=32",
        "algorithm.updates_per_step=1", "cold_start.steps=20", "cold_start.batch_size=32", "task.eval_prompts=0",
        "logging.wandb_mode=disabled", "logging.progress=false", "logging.samples_every=0", "checkpoint.every=0",
        "learner.warmup_steps=0"]
# name: (hidden, layers, heads, intermediate)
MODELS = {"1M": (128, 4, 4, 512), "4.4M (default)": (256, 4, 4, 1024), "10M": (320, 6, 10, 1280),
          "50M": (704, 8, 11, 2816)}
ROWS = {  # dimension: [(label, overrides)]
    "G": [(f"G={g}", [f"algorithm.group_size={g}"]) for g in (4, 8, 16)],
    "engines": [(f"{n} engine(s)", [f"rollout.num_engines={n}", f"rollout.threads={2 // n}",
                                    f"rollout.num_cpus={0.9 / n:.2f}"]) for n in (1, 2)],
    "model": [(name, [f"model.hidden_size={h}", f"model.num_layers={l}", f"model.num_heads={a}",
                      f"model.intermediate_size={i}"]) for name, (h, l, a, i) in MODELS.items()],
    "ranks": [(f"{n} rank(s)", [f"learner.num_ranks={n}", f"learner.threads={2 // n}",
                                f"learner.num_cpus={1 / n:.2f}"]) for n in (1, 2)],
}


def matmul_peak(dtype: str) -> float:
    """GFLOP/s of the best of 5 timed n x n matmuls in `dtype` with 2 threads, after a warm-up."""
    import torch

    torch.set_num_threads(2)
    n = 2048
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_run(overrides: list[str], steps: int) -> dict:
    """A training run in a fresh process: medians of its per-step metrics after the first
    step, and the parameters of the model it saved."""
    from cluster.metrics import learn_flops
    from learner.models import count_parameters, flop_parameters

    with tempfile.TemporaryDirectory() as tmp:
        args = [*BASE, *overrides, f"algorithm.steps={steps}", f"cluster.runs_dir={tmp}", "logging.run_name=run"]
        proc = subprocess.run([sys.executable, "-m", "r1ray", "train", *args], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run {overrides} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
        model = Path(tmp) / "run" / "model"
        (body, head), params = flop_parameters(model), count_parameters(model)
    learned = [r for r in rows if "timing/learn" in r]  # a step with no group to learn from has no learn phase
    if not learned:
        raise SystemExit(f"run {overrides}: no step after the first had a group with signal to learn from")
    gflops = [learn_flops(r["rollout/prompt_tokens"] + r["rollout/response_tokens"], r["rollout/response_tokens"],
                          body, head) / r["timing/learn"] / 1e9 for r in learned]
    return {key: statistics.median(r.get(f"timing/{key}", 0.0) for r in rows)
            for key in ("step", "generate", "reward", "learn", "sync")} | {
        "gflops": statistics.median(gflops), "params": params, "body": body, "head": head,
        "groups": statistics.mean(r["groups/trained"] / r["groups/generated"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", help="comma-separated dimensions: " + ", ".join(ROWS))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="learner and engines")
    parser.add_argument("--force-bf16", action="store_true", help="run bfloat16 on a CPU without bf16 instructions")
    args = parser.parse_args()
    native, why = bf16_native()
    if args.dtype == "bfloat16" and not native and not args.force_bf16:
        raise SystemExit(f"--dtype bfloat16: {why}; it runs ~100x slower than fp32 here and would time the "
                         "emulation (--force-bf16 runs it anyway)")
    import ray
    import torch
    import vllm

    peak = matmul_peak(args.dtype)  # the learner's dtype, before any run, with the learner's 2 threads
    dims = args.only.split(",") if args.only else list(ROWS)
    print(f"Machine: {describe(f'torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}')}")
    print(f"Learner and engines in {args.dtype}. Matmul peak, {args.dtype}, 2 threads, n=2048: {peak:.0f} GFLOP/s\n")
    print("| varied | setting | params (body + head) | groups learned | step s | generate s | reward s | learn s "
          f"| sync s | learner GFLOP/s | of {args.dtype} peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dim in dims:
        for label, overrides in ROWS[dim]:
            m = one_run([f"learner.dtype={args.dtype}", *overrides], args.steps)
            print(f"| {dim} | {label} | {m['params'] / 1e6:.1f}M ({m['body'] / 1e6:.2f}M + {m['head'] / 1e6:.2f}M) "
                  f"| {m['groups']:.0%} | {m['step']:.2f} | {m['generate']:.2f} | {m['reward']:.3f} | {m['learn']:.2f} "
                  f"| {m['sync']:.2f} | {m['gflops']:.1f} | {m['gflops'] / peak:.0%} |", flush=True)


if __name__ == "__main__":
    main()
