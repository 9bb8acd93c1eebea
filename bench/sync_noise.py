"""How far apart learner and engine log-probs are when a weight sync worked, and when it did
not: the numbers behind the weight-sync check's thresholds (cluster/weight_sync.py, CHECK).

For each dtype, one vLLM engine (in-process, the project's engine class and weight receiver)
and the learner's forward (transformers, eager attention, log-softmax in float32) score the
same sequences with the same weights: that difference is kernel noise. Then the engine is
given weights a broken sync could leave it with, through the real stage/commit path:
- "stale 1 step": the learner took one more Adam-like step (every weight moved by lr x
  sign, lr 1e-5) that the engine never got: not a broken sync, and below what any check
  on log-probs can see; listed to show where the line is;
- "one layer stale": one middle layer's weights from 50 such steps before;
- "q/k swapped": one layer's q and k projections exchanged (a mix-up of names or shards);
- "bf16 round trip": every weight cast to bf16 and back (a precision slip in transit);
- "one layer missing": one middle layer's weights zeroed (a load that stopped part-way).
Per case: mean, p99 and max |learner - engine| over every scored token.

    .venv/bin/python bench/sync_noise.py [--model smollm2|tiny] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXTS = [
    "User: What is 47 + 38? Show your work.\nAssistant: <think>7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8. "
    "So the sum is 85.</think><answer>85</answer>",
    "The weight-sync check scores a fixed sequence on the learner and on every engine after a sync, "
    "and compares the log-probabilities of each token given the ones before it.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Bonjour ! Je voudrais réserver une table pour quatre personnes ce soir à vingt heures, s'il vous plaît.",
]


def learner_scores(model, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """Raw log-probs of tokens 1.. given their prefix, as the learner computes them."""
    import torch

    out = []
    with torch.no_grad():
        for ids in seqs:
            t = torch.as_tensor(ids, dtype=torch.long)[None]
            logits = model(input_ids=t).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, t[0, 1:, None]).squeeze(-1).numpy())
    return out


def corrupt(weights: dict[str, np.ndarray], case: str, layers: int, rng: np.random.Generator) -> dict:
    """What a broken sync of `weights` (float32 arrays by HF name) could leave an engine with."""
    mid = f"model.layers.{layers // 2}."
    out = dict(weights)
    if case == "stale 1 step":
        out = {n: w + 1e-5 * np.sign(rng.standard_normal(w.shape)).astype(np.float32) for n, w in weights.items()}
    elif case == "one layer stale":
        for n in [n for n in weights if n.startswith(mid)]:
            out[n] = weights[n] + 50 * 1e-5 * np.sign(rng.standard_normal(weights[n].shape)).astype(np.float32)
    elif case == "q/k swapped":
        q, k = mid + "self_attn.q_proj.weight", mid + "self_attn.k_proj.weight"
        if out[q].shape != out[k].shape:  # grouped-query attention: swap what fits
            rows = out[k].shape[0]
            out[q] = out[q].copy()
            out[q][:rows], out[k] = weights[k], weights[q][:rows]
        else:
            out[q], out[k] = weights[k], weights[q]
    elif case == "bf16 round trip":
        import torch

        out = {n: torch.from_numpy(w).to(torch.bfloat16).float().numpy() for n, w in weights.items()}
    elif case == "one layer missing":
        for n in [n for n in weights if n.startswith(mid) and not n.endswith("norm.weight")]:
            out[n] = np.zeros_like(weights[n])
    return out


CASES = ["noise (same weights)", "stale 1 step", "one layer stale", "q/k swapped", "bf16 round trip",
         "one layer missing"]


def measure(model_dir: str, dtype: str, threads: int) -> list[tuple[str, float, float, float, int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.config import RolloutConfig
    from actors.vllm_engine import VLLMEngine
    from cluster.weight_sync import spread
    from common.weight_sync import agreed, model_weights

    torch.set_num_threads(threads)
    cfg = RolloutConfig(threads=threads, max_model_len=256)
    engine = VLLMEngine(model_dir, cfg, seed=0, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seqs = [np.asarray(tokenizer.encode(t), dtype=np.int64)[:200] for t in TEXTS]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="eager")
    reference = learner_scores(model, seqs)
    weights = {n: t.float().numpy() for n, t in model_weights(model_dir)}
    layers = model.config.num_hidden_layers
    rows = []
    for version, case in enumerate(CASES, start=1):
        sent = weights if version == 1 else corrupt(weights, case, layers, np.random.default_rng(0))
        named = {n: torch.from_numpy(w).to(getattr(torch, dtype)) for n, w in sent.items()}
        agreed(engine.weights("stage", version, list(named.items())))  # a failure is an answer: raise it
        agreed(engine.weights("commit", version))
        diff = np.abs(np.concatenate([engine.score(s) - r for s, r in zip(seqs, reference)]))
        rows.append((case, *spread(diff), diff.size))
        print(f"  {dtype} {case}: mean {rows[-1][1]:.2e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (SmolLM2-135M-Instruct) or tiny")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from bench.machine import describe
    from learner.models import TinyLlamaSpec, smollm2_path, tiny_llama_path

    cache = Path("~/.cache/r1ray").expanduser()
    model_dir = str(smollm2_path(cache) if args.model == "smollm2" else tiny_llama_path(TinyLlamaSpec(), cache))
    start = time.time()
    results = {dtype: measure(model_dir, dtype, args.threads) for dtype in args.dtypes.split(",")}
    import vllm

    print(f"\nMachine: {describe(f'vLLM {vllm.__version__}')}")
    print(f"Model: {args.model}; {len(TEXTS)} sequences; learner = transformers eager, engine = vLLM "
          f"in-process; {time.time() - start:.0f} s\n")
    print("| dtype | engine holds | tokens | mean abs diff | p99 | max |")
    print("|---|---|---|---|---|---|")
    for dtype, rows in results.items():
        for case, mean, p99, worst, n in rows:
            print(f"| {dtype} | {case} | {n} | {mean:.2e} | {p99:.2e} | {worst:.2e} |")


if __name__ == "__main__":
    main()
