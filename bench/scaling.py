"""Scaling: GRPO step time against G, engines, model size and learner ranks; the learner's
achieved FLOP/s against the machine's measured matmul peak.

    .venv/bin/python bench/scaling.py                  # about 12 minutes on 2 cores
    .venv/bin/python bench/scaling.py --steps 4 --only G

Each row is a real run of `cluster.train.train` in a fresh process (its own local Ray
cluster) on a tiny Llama built on the fly, with no cold start and no evaluation, changing
one thing from the base: the default 4.4M model, 8 prompts x G=8 answers x 32 new tokens,
1 vLLM engine, 1 learner rank, fp32, one update per step. Times are medians over the steps
after the first (which pays one-off warm-ups). Learner FLOP/s = 6 x parameters x (prompt +
answer tokens) / learn time, the usual forward + backward count (it leaves out attention
and the LM head's softmax, so it understates the work a little).

Peak: the best of 5 timed square matmuls (n = 2048) in fp32 and bf16 with 2 torch threads,
2 n^3 FLOP each, after a warm-up; the same threads the learner uses.
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

from machine import describe  # noqa: E402  (bench/machine.py, beside this script)

BASE = ["algorithm.prompts_per_step=8", "algorithm.group_size=8", "rollout.max_new_tokens=32",
        "algorithm.updates_per_step=1", "cold_start.steps=0", "task.eval_prompts=0", "logging.wandb_mode=disabled",
        "logging.progress=false", "logging.samples_every=0", "checkpoint.every=0", "learner.warmup_steps=0"]
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


def matmul_peak() -> dict[str, float]:
    import torch

    torch.set_num_threads(2)
    n, out = 2048, {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        best = min(_timed(lambda: a @ b) for _ in range(5))
        out[str(dtype).removeprefix("torch.")] = 2 * n**3 / best / 1e9
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_run(overrides: list[str], steps: int) -> dict:
    """A training run in a fresh process; per-step metrics after the first step."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [*BASE, *overrides, f"algorithm.steps={steps}", f"cluster.runs_dir={tmp}", "logging.run_name=run"]
        proc = subprocess.run([sys.executable, "-m", "cluster.train", *args], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run {overrides} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    return {key: statistics.median(r[f"timing/{key}"] for r in rows) for key in ("step", "generate", "reward", "learn",
                                                                                 "sync")} | {
        "gflops": statistics.median(r["throughput/learn_gflops"] for r in rows),
        "params": rows[0]["throughput/learn_gflops"] * 1e9 * rows[0]["timing/learn"]
        / (6 * (rows[0]["rollout/response_tokens"] + rows[0]["rollout/prompt_tokens"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", help="comma-separated dimensions: " + ", ".join(ROWS))
    args = parser.parse_args()
    import ray
    import torch
    import vllm

    peak = matmul_peak()
    dims = args.only.split(",") if args.only else list(ROWS)
    print(f"Machine: {describe(f'torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}')}")
    print(f"Matmul peak, 2 threads, n=2048: fp32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bfloat16']:.0f} GFLOP/s\n")
    print("| varied | setting | params | step s | generate s | reward s | learn s | sync s | learner GFLOP/s "
          "| of fp32 peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dim in dims:
        for label, overrides in ROWS[dim]:
            m = one_run(overrides, args.steps)
            print(f"| {dim} | {label} | {m['params'] / 1e6:.1f}M | {m['step']:.2f} | {m['generate']:.2f} | "
                  f"{m['reward']:.3f} | {m['learn']:.2f} | {m['sync']:.2f} | {m['gflops']:.1f} | "
                  f"{m['gflops'] / peak['float32']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
