"""Rollout benchmark: generation tokens/s per backend and engine count, weight-sync time per
transport and model size. Prints markdown tables and the machine they were measured on.

    .venv/bin/python bench/rollout.py                 # everything (about 20 minutes on 2 cores)
    .venv/bin/python bench/rollout.py --skip-sync     # generation only

Generation: the same batches (no stop strings, fp32, temperature 1) on the tiny default
model and a ~75M-parameter Llama: "short" is the default job's shape (16 prompts x 8
answers x up to 64 tokens), "long" an R1-style one (4 prompts x 8 answers x up to 448
tokens). 1 engine uses both threads, 2 engines one each; tokens/s counts the tokens
actually generated (answers that end early count only their own), after a warm-up.
Sync: a learner rank (ZeRO-2, fp32) pushes its weights to 2 vLLM engines through the real
driver path (`WeightSync.push`), median of --repeats pushes, for ~1M, ~10M, ~100M params.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402  (bench/machine.py, beside this script)

# name: (hidden, layers, heads, intermediate); parameter counts are printed from the files.
MODELS = {
    "tiny": (256, 4, 4, 1024),
    "75M": (768, 8, 12, 3072),
    "1M": (128, 4, 4, 512),
    "10M": (320, 6, 10, 1280),
    "100M": (1024, 6, 16, 4096),
}


def machine() -> str:
    import ray
    import torch
    import transformers
    import vllm

    return describe(f"torch {torch.__version__}, vllm {vllm.__version__}, "
                    f"transformers {transformers.__version__}, ray {ray.__version__}")


# name: (prompts, answers per prompt, max new tokens)
SHAPES = {"short": (16, 8, 64), "long": (4, 8, 448)}
MAX_MODEL_LEN = 512


def model_path(name: str, cache: str) -> str:
    from learner.models import TinyLlamaSpec, tiny_llama_path

    hidden, layers, heads, inter = MODELS[name]
    return str(tiny_llama_path(TinyLlamaSpec(hidden_size=hidden, num_layers=layers, num_heads=heads,
                                             intermediate_size=inter, max_position_embeddings=MAX_MODEL_LEN),
                               cache))


def config(overrides: list[str], cache: str):
    from cluster.config import load_config

    return load_config(None, ["cluster.num_cpus=4", "learner.num_cpus=1", "learner.threads=2",
                              "rollout.num_cpus=1", "logging.wandb_mode=disabled",
                              f"cluster.cache_dir={cache}", *overrides])


def generation(args) -> list[tuple]:
    """(model, params, shape, backend, engines, tokens, seconds, tokens/s) rows."""
    import ray

    from cluster.rollout_pool import RolloutPool
    from common.records import Sampling
    from learner.models import count_parameters

    rows = []
    for name in ("tiny", "75M"):
        path = model_path(name, args.cache)
        for backend in ("vllm", "transformers"):
            for engines in (1, 2):
                cfg = config([f"rollout.engine={backend}", f"rollout.num_engines={engines}",
                              f"rollout.threads={2 // engines}", f"rollout.max_model_len={MAX_MODEL_LEN}"],
                             args.cache)
                pool = RolloutPool(cfg, path)
                ray.get(pool.ready_refs(), timeout=600)
                pool.generate(["w0", "w1"], ["warm", "up"], Sampling(n=2, seed=1, max_new_tokens=8), 600)
                for shape, (prompts, group, new_tokens) in SHAPES.items():
                    texts = [f"User: {i}+{i * 7 % 100}=?\nAssistant: <think>" for i in range(prompts)]
                    sampling = Sampling(n=group, seed=0, temperature=1.0, max_new_tokens=new_tokens)
                    start = time.perf_counter()
                    samples = pool.generate([f"q{i}" for i in range(prompts)], texts, sampling, timeout_s=3600)
                    seconds = time.perf_counter() - start
                    tokens = sum(len(s.response_ids) for s in samples)
                    rows.append((name, count_parameters(path), shape, backend, engines, tokens, seconds,
                                 tokens / seconds))
                    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
                for actor in pool.actors:
                    ray.kill(actor)
    return rows


def sync(args) -> list[tuple]:
    """(model, params, transport, bytes, median seconds, GB/s) rows; 2 engines each."""
    import numpy as np
    import ray

    from cluster import placement
    from cluster.train import start_actors
    from learner.models import count_parameters
    from rewards.tasks import build_mixture

    rows = []
    for name in ("1M", "10M", "100M"):
        path = model_path(name, args.cache)
        for transport in ("object_store", "broadcast"):
            cfg = config(["rollout.num_engines=2", "rollout.threads=1", f"sync.transport={transport}",
                          "sync.timeout_s=600"], args.cache)
            placement.connect(cfg)  # a fresh cluster each time: nothing left over from the last
            actors = start_actors(cfg, path, build_mixture(cfg.task))
            times, sent = [], 0.0
            for version in range(1, args.repeats + 2):
                metrics = actors.sync.push(version)
                if version > 1:  # the first push pays one-off costs (group set-up, first load)
                    times.append(metrics["timing/sync"])
                sent = metrics["sync/bytes"]
            actors.sync.check(np.arange(1, 40))  # the pushed weights are the learner's
            seconds = statistics.median(times)
            rows.append((name, count_parameters(path), transport, sent, seconds, 2 * sent / seconds / 1e9))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
            ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=str(Path("~/.cache/r1ray").expanduser()))
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-sync", action="store_true")
    args = parser.parse_args()
    import ray

    from cluster import placement

    print(f"machine: {machine()}\n")
    if not args.skip_generate:
        placement.connect(config([], args.cache))
        rows = generation(args)
        ray.shutdown()
        print("### Generation (fp32, temperature 1, no stop strings)\n")
        print("| model | params | batch | backend | engines | tokens | seconds | tokens/s |")
        print("|---|---|---|---|---|---|---|---|")
        for name, params, shape, backend, engines, tokens, seconds, rate in rows:
            prompts, group, new_tokens = SHAPES[shape]
            print(f"| {name} | {params / 1e6:.1f}M | {shape}: {prompts}x{group}x{new_tokens} | {backend} | "
                  f"{engines} | {tokens} | {seconds:.2f} | {rate:,.0f} |")
        by = {(r[0], r[2], r[3], r[4]): r[7] for r in rows}
        print("\nvLLM / transformers tokens/s, 75M model:")
        for shape in SHAPES:
            for engines in (1, 2):
                ratio = by[("75M", shape, "vllm", engines)] / by[("75M", shape, "transformers", engines)]
                print(f"- {shape}, {engines} engine(s): {ratio:.2f}x")
        print()
    if not args.skip_sync:
        rows = sync(args)
        print(f"### Weight sync to 2 engines (fp32, median of {args.repeats})\n")
        print("| model | params | transport | MB per engine | seconds | GB/s (all engines) |")
        print("|---|---|---|---|---|---|")
        for name, params, transport, sent, seconds, rate in rows:
            print(f"| {name} | {params / 1e6:.1f}M | {transport} | {sent / 1e6:.0f} | {seconds:.3f} | {rate:.2f} |")


if __name__ == "__main__":
    main()
