"""Learner memory: the peak memory of one micro-batch's forward and backward against answer
length and vocabulary size, with and without gradient checkpointing (learner.gradient_checkpointing)
and log-prob chunks (learner.logprob_chunk), on the CPU in float32.

    .venv/bin/python bench/memory.py                 # about 15 minutes on 2 cores
    .venv/bin/python bench/memory.py --only vocab
    .venv/bin/python bench/memory.py --timing        # chunk sizes against each other, 3 minutes
    .venv/bin/python bench/memory.py --estimate      # Qwen2.5-1.5B and 7B on a GPU, on paper

Each row runs in a fresh process: a small model of Qwen2's architecture (hidden 512, MLP 2048,
8 heads, 2 KV heads, 4 layers, tied embeddings: the shapes of Qwen2.5 scaled down so that a
row takes a minute on 2 cores), random weights, float32, SDPA attention (the learner's on a
GPU; eager attention keeps [heads, L, L] scores), built from its config, its gradients
allocated before measuring, as the learner's engine holds them. One sequence: a 64-token prompt
and an answer of A tokens; the learner's log-prob function (learner/learner.py,
`_next_token_logprobs`: temperature 1, with the entropy) and a token-mean loss on the answer,
then backward. Chunks of 256 tokens show at these lengths what the default 1024 does at 4x
them; the "chunk" rows compare chunk sizes.

Memory is measured as the operating system sees it: the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs just before the forward) minus its resident set then, i.e.
what the forward and backward add to the weights and gradients ("base"). The rows run with
glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), so that every tensor above it
goes back to the system when freed: with the default, sliding threshold, chunks of 64 tokens
(8 MB each) were served from the heap, which kept them, and the peak read 1.52 GiB instead of
0.38. What remains above torch's own peak is the allocator's and small tensors' slack.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402  (bench/machine.py, beside this script)

QWEN_VOCAB = 151936  # Qwen2.5's
PROMPT = 64
MODES = [(False, 0), (True, 0), (False, 256), (True, 256)]  # (gradient checkpointing, logprob chunk)
ROWS = {  # dimension: [(answer tokens, vocabulary, modes)]
    "length": [(a, 32768, MODES) for a in (512, 1024, 2048, 4096)],
    "vocab": [(1024, v, MODES) for v in (65536, QWEN_VOCAB)],
    "chunk": [(4096, 32768, [(True, c) for c in (64, 1024)])],
}


# ---- the estimate on paper, for a GPU -------------------------------------------------------

SHAPES = {  # name: (parameters, hidden, MLP, layers, KV heads x head size, vocabulary) of Qwen2.5's config.json
    "Qwen2.5-1.5B": (1.54e9, 1536, 8960, 28, 2 * 128, 151936),
    "Qwen2.5-7B": (7.62e9, 3584, 18944, 28, 4 * 128, 152064),
}


def estimate(name: str, stage: int, ranks: int, sequences: int, prompt: int, answer: int, checkpointing: bool,
             chunk: int, reference: bool = True) -> dict[str, float]:
    """Bytes per GPU of one micro-batch's forward and backward in bf16 under DeepSpeed ZeRO-`stage`
    over `ranks` GPUs, by the formulas of bench/RESULTS.md (learner memory)."""
    params, hidden, mlp, layers, kv, vocab = SHAPES[name]
    shard = lambda x, from_stage: x / ranks if stage >= from_stage else x  # noqa: E731
    state = shard(2 * params, 3) + shard(2 * params, 2) + 12 * params / ranks  # weights, grads, fp32 Adam + master
    ref = shard(2 * params, 3) if reference else 0.0  # the KL reference, held like the policy (bf16)
    tokens = sequences * (prompt + answer)
    per_layer = 20 * hidden + 4 * kv + 8 * mlp  # bytes a layer keeps per token (bf16, flash attention)
    kept = layers * 2 * hidden + per_layer if checkpointing else layers * per_layer  # per token
    logits = 23 * vocab * (min(chunk, sequences * answer) if chunk else sequences * answer)  # the forward's peak
    return {"state": state, "reference": ref, "activations": kept * tokens, "logits": logits,
            "total": state + ref + kept * tokens + logits}


def layer_bytes(name: str, tokens: int = 16) -> float:
    """Bytes per token that one layer of `name`'s shape saves for backward in bf16 with SDPA,
    counted: each distinct storage autograd saves (saved-tensor hooks), weights and rotary
    tables left out. The check of the estimate's 20H + 4kv + 8I."""
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    _, hidden, mlp, _, kv, _ = SHAPES[name]
    config = Qwen2Config(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=hidden // 128,
                         num_key_value_heads=kv // 128, attn_implementation="sdpa")
    layer = Qwen2DecoderLayer(config, 0).to(torch.bfloat16)
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    rotary = Qwen2RotaryEmbedding(config)(x, positions)
    skip = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *rotary]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    return sum(saved.values()) / tokens


def print_estimate(prompt: int = 512, answer: int = 4096) -> None:
    for name, (_, hidden, mlp, _, kv, _) in SHAPES.items():
        print(f"{name}: a layer keeps {layer_bytes(name):,.0f} bytes per token in bf16 (counted); "
              f"20H + 4kv + 8I = {20 * hidden + 4 * kv + 8 * mlp:,}")
    print(f"\nbf16, DeepSpeed ZeRO; each sequence {prompt} prompt + {answer} answer tokens; GB = 1e9 bytes\n")
    print("| model | ZeRO, GPUs | weights + grads + Adam | reference | sequences per micro-batch "
          "| activations: kept / checkpointed | logits: all / chunks of 1024 | peak: neither / both |")
    print("|---|---|---|---|---|---|---|---|")
    for name in SHAPES:
        for stage, ranks in [(2, 1), (2, 8), (3, 8)]:
            for sequences in (1, 4):
                plain = estimate(name, stage, ranks, sequences, prompt, answer, False, 0)
                both = estimate(name, stage, ranks, sequences, prompt, answer, True, 1024)
                gb = lambda x: f"{x / 1e9:.1f}"  # noqa: E731
                print(f"| {name} | {stage}, {ranks} | {gb(plain['state'])} | {gb(plain['reference'])} | {sequences} "
                      f"| {gb(plain['activations'])} / {gb(both['activations'])} | {gb(plain['logits'])} / "
                      f"{gb(both['logits'])} | {gb(plain['total'])} / {gb(both['total'])} |")


# ---- the measurement on this machine ---------------------------------------------------------


def _status(field: str) -> float:
    """A /proc/self/status memory field, in GiB."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 2**20


def _model_and_batch(answer: int, vocab: int):
    """The small Qwen2-architecture model (float32, eval mode, as the learner's) and one
    sequence: ids [1, L] and the answer's targets [1, L-1]."""
    import numpy as np
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=PROMPT + answer, attn_implementation="sdpa")
    ids = np.random.default_rng(0).integers(0, vocab, (1, PROMPT + answer))  # [1, L]
    targets = np.zeros((1, PROMPT + answer - 1), dtype=np.float32)  # [1, L-1]
    targets[:, PROMPT - 1:] = 1.0
    return Qwen2ForCausalLM(config).eval(), ids, targets


def _forward_backward(model, ids, targets, chunk: int) -> float:
    """Seconds of the learner's log-probs (with the entropy) and a token-mean loss, then backward."""
    import numpy as np

    from learner.learner import RAW, _next_token_logprobs

    start = time.perf_counter()
    logprobs, _, _ = _next_token_logprobs(model, ids, np.ones_like(ids), RAW, targets, entropy=True, chunk=chunk)
    (-logprobs.sum() / targets.sum()).backward()
    return time.perf_counter() - start


def one_run(answer: int, vocab: int, checkpointing: bool, chunk: int, threads: int) -> dict:
    """Build the model, measure one micro-batch's forward and backward (in this process)."""
    import torch

    from learner.rank import checkpoint_layers

    torch.set_num_threads(threads)
    model, ids, targets = _model_and_batch(answer, vocab)
    if checkpointing:
        checkpoint_layers(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here
    seconds = _forward_backward(model, ids, targets, chunk)
    return {"base_gib": base, "peak_gib": _status("VmHWM") - base, "seconds": seconds,
            "params": sum(p.numel() for p in model.parameters())}


def timing(answer: int, vocab: int, chunks: tuple[int, ...], rounds: int, threads: int) -> None:
    """Seconds of one forward and backward per logprob_chunk, in one process: the chunks take
    turns for `rounds` rounds and each keeps its fastest, so load from other processes on the
    machine weighs on all of them alike."""
    import torch

    torch.set_num_threads(threads)
    model, ids, targets = _model_and_batch(answer, vocab)
    best = {chunk: float("inf") for chunk in chunks}
    for _ in range(rounds):
        for chunk in chunks:
            model.zero_grad(set_to_none=True)
            best[chunk] = min(best[chunk], _forward_backward(model, ids, targets, chunk))
    print(f"| logprob_chunk | forward + backward s (best of {rounds}) | vs all at once |\n|---|---|---|")
    for chunk, seconds in best.items():
        print(f"| {chunk} | {seconds:.2f} | {seconds / best[chunks[0]]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated dimensions: " + ", ".join(ROWS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--estimate", action="store_true", help="print the estimate for Qwen2.5 on a GPU and stop")
    parser.add_argument("--timing", action="store_true", help="time chunk sizes against each other and stop")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one row, in a child process: JSON arguments
    args = parser.parse_args()
    if args.estimate:
        print_estimate()
        return
    import torch
    import transformers

    software = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if args.timing:
        print(f"Machine: {describe(software)}")
        print(f"answer 2048 tokens, vocabulary 65,536, float32, {args.threads} threads\n")
        timing(2048, 65536, (0, 1024, 256), rounds=3, threads=args.threads)
        return
    if args.run:
        print(json.dumps(one_run(**json.loads(args.run), threads=args.threads)))
        return
    print(f"Machine: {describe(software)}")
    print(f"float32, {args.threads} threads, prompt {PROMPT} tokens, one sequence per micro-batch\n")
    print("| varied | answer tokens | vocabulary | params | gradient checkpointing | logprob_chunk "
          "| base GiB (weights + grads) | peak above base GiB | forward + backward s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dim in args.only.split(",") if args.only else list(ROWS):
        for answer, vocab, modes in ROWS[dim]:
            for checkpointing, chunk in modes:
                spec = {"answer": answer, "vocab": vocab, "checkpointing": checkpointing, "chunk": chunk}
                proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--run",
                                       json.dumps(spec)], cwd=ROOT, capture_output=True, text=True,
                                      env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
                if proc.returncode != 0:
                    raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
                m = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"| {dim} | {answer} | {vocab:,} | {m['params'] / 1e6:.0f}M | {'on' if checkpointing else 'off'} "
                      f"| {chunk} | {m['base_gib']:.2f} | {m['peak_gib']:.2f} | {m['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
