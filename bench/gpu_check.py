"""Device check: the GPU path's numerics, memory and weight transport, with torch and
transformers alone (no vLLM, Ray or DeepSpeed, no network), run straight from the source tree.

    python bench/gpu_check.py --out gpu_check.json                  # one GPU: a few minutes on an H200
    python bench/gpu_check.py --device cpu --small --out check.json  # tiny shapes, to exercise it on a CPU

Writes a JSON report (and prints progress). Each section runs whatever happened to the others;
a section that fails is recorded with its error and traceback.

1. grpo_math: learner/grpo.py's functions (advantages, importance weights, k3 KL, the clipped
   loss with both aggregations, its gradient) on the device in fp32 and bf16, against float64
   on the CPU from the same rounded inputs: max abs error and max error relative to the
   reference's largest magnitude, within GRPO_BOUNDS.
2. learner_logprobs: the learner's log-prob function (learner/learner.py) on a small Llama, in
   fp32 and bf16 on the device against fp32 on the CPU; the LM head in chunks against all at
   once (values and gradients); one GRPO step with torch's AdamW (no DeepSpeed): the
   device's gradient against the CPU's.
3. memory: torch.cuda.max_memory_allocated over one micro-batch's forward + backward (the
   learner's log-prob path and loss) of a model of Qwen2.5-1.5B's shapes (random weights,
   bf16), with and without gradient checkpointing (the learner's `checkpoint_layers`), the LM
   head whole or in chunks (`learner.logprob_chunk`), at two sequence lengths.
4. bf16_noise: |difference| of the log-probs of one fixed random sequence under the same
   weights in fp32 and bf16, bf16 with eager vs SDPA attention, bf16 alone vs in a batch of 4:
   mean, p99 and max, the statistics the weight-sync check compares, each against its bounds
   for the dtype (cluster/weight_sync.py, `CHECK`). The model's final norm is scaled so its logits spread like a trained model's (std ~3); a
   random model's near-uniform outputs would hide the noise.
5. engine: the transformers rollout engine (actors/hf_engine.py) generates and scores on the
   device; its sampling log-probs against the learner's recompute of them.
6. broadcast: the broadcast weight-sync transport (cluster/weight_sync.py's group, sender and
   WeightReceiver) between two processes on this machine (gloo, host buffers); a small model's
   weights, fp32 then bf16, must arrive bit-exact in a transformers engine on the device.
7. cuda_ipc: the colocated transport (`sync.transport=cuda_ipc`): one process shares a bf16
   model's weights on the GPU as CUDA IPC handles (`share_weights`), another stages them
   (`WeightReceiver.stage_ipc`, a copy on the device) and loads them into a transformers
   engine on the same GPU: bit-exact. CUDA only (recorded as skipped on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Largest error accepted in grpo_math, relative to the float64 reference's largest magnitude.
GRPO_BOUNDS = {"float32": 1e-5, "bfloat16": 5e-2}
# Largest |device - CPU| fp32 log-prob on the small Llama (learner_logprobs).
LOGPROB_BOUND_FP32 = 1e-4

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
QWEN_TINY = dict(QWEN25_15B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (minutes on 2 CPU cores)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    report = {"args": vars(args), "machine": machine(args.device), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as cache:
        args.cache = cache
        for name in args.sections.split(","):
            report["sections"][name] = run_section(name, SECTIONS[name], args)
            Path(args.out).write_text(json.dumps(report, indent=2))  # a report so far, should one hang
    report["ok"] = all(s["ok"] for s in report["sections"].values())
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"gpu_check: {'all sections ok' if report['ok'] else 'FAILED'}; report in {args.out}", flush=True)
    sys.exit(0 if report["ok"] else 1)


def run_section(name: str, fn, args) -> dict:
    print(f"gpu_check: {name} ...", flush=True)
    start = time.perf_counter()
    try:
        result = {"ok": True, **fn(args)}
    except Exception as err:  # recorded: the other sections still run
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["ok"] = result["ok"] and not result.get("failures")
    result["seconds"] = round(time.perf_counter() - start, 2)
    if args.device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"gpu_check: {name} {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s"
          + (f": {result.get('error') or result.get('failures')}" if not result["ok"] else ""), flush=True)
    return result


def machine(device: str) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device == "cuda":
        info.update(cuda=torch.version.cuda, gpu=None)  # None: torch sees no GPU (every section will fail)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


# ---- helpers ------------------------------------------------------------------------------

def quiet() -> None:
    """No progress bars from transformers' loading and saving: the progress lines are ours."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |got - ref| and that over max |ref| (float64, on the CPU)."""
    got, ref = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    diff = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return {"max_abs": diff, "max_rel": diff / scale if scale > 0 else diff}


def noise(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """mean, p99 and max of |a - b|: what a sync check compares."""
    from cluster.weight_sync import spread

    diff = (a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64)).abs().flatten()
    return dict(zip(("mean", "p99", "max"), spread(diff.numpy())))


def learner_logprobs(model, input_ids: np.ndarray, attention_mask: np.ndarray, sampling, targets=None,
                     chunk: int = 0):
    """Log-probs [n, L-1] of tokens 1.. through the learner's own function, the LM head `chunk`
    answer tokens at a time (0: all at once)."""
    from learner.learner import _next_token_logprobs

    return _next_token_logprobs(model, input_ids, attention_mask, sampling, targets, chunk=chunk)[0]


def small_llama(args) -> str:
    """A small Llama folder with its tokenizer (learner/models.py: built here, no hub)."""
    from learner.models import TinyLlamaSpec, tiny_llama_path

    spec = (TinyLlamaSpec() if args.small else
            TinyLlamaSpec(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048, vocab_size=2048))
    return str(tiny_llama_path(spec, args.cache))


def qwen(args, dtype, attention: str = "sdpa"):
    """Random model with Qwen2.5-1.5B's shapes (tiny ones with --small), built on the device."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**(QWEN_TINY if args.small else QWEN25_15B))
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)


def padded_batch(vocab: int, n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input ids [n, L], attention mask [n, L], targets [n, L-1]): random tokens, right-padded
    to lengths from L/2 to L, the second half of each sequence as its response."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(n, length), dtype=np.int64)
    lengths = rng.integers(length // 2, length + 1, size=n)
    lengths[0] = length
    attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    ids[attention == 0] = 0
    targets = ((np.arange(length - 1)[None] >= lengths[:, None] // 2)
               & (np.arange(length - 1)[None] < lengths[:, None] - 1)).astype(np.float32)
    return ids, attention, targets


# ---- 1. GRPO math -------------------------------------------------------------------------

def check_grpo_math(args) -> dict:
    from learner import grpo

    B, G, T = (2, 4, 16) if args.small else (16, 8, 512)  # prompts, answers per prompt, tokens
    gen = torch.Generator().manual_seed(args.seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 2, (B * G,), generator=gen).double()  # [N]
    rewards[:G] = 1.0  # one group without signal: its advantages must be exactly 0
    lengths = torch.randint(T // 4, T + 1, (B * G,), generator=gen)  # [N]
    mask = (torch.arange(T)[None] < lengths[:, None]).double()  # [N, T]
    lp = -4 * torch.rand(B * G, T, **f64)  # [N, T]
    inputs = dict(rewards=rewards, lp=lp.masked_fill(mask == 0, float("nan")),  # padding may hold NaN
                  old=lp + 0.3 * torch.randn(B * G, T, **f64),  # ratios spread past the clip range
                  ref=lp + 0.3 * torch.randn(B * G, T, **f64), behaviour=lp + 0.5 * torch.randn(B * G, T, **f64))
    result, failures = {"shape": [B, G, T]}, []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        rounded = {k: v.to(dtype) for k, v in inputs.items()}
        want = grpo_terms(grpo, {k: v.double() for k, v in rounded.items()}, mask, G)
        got = grpo_terms(grpo, {k: v.to(args.device) for k, v in rounded.items()}, mask.to(args.device, dtype), G)
        result[name] = {term: errors(got[term], want[term]) for term in want if term != "finite"}
        result[name]["finite"] = got["finite"]
        result[name]["exact_zero_advantages"] = bool((got["advantages"][:G] == 0).all())
        worst = max(e["max_rel"] for e in result[name].values() if isinstance(e, dict))
        result[name]["worst_rel"] = worst
        if worst > GRPO_BOUNDS[name] or not got["finite"] or not result[name]["exact_zero_advantages"]:
            failures.append(f"{name}: worst relative error {worst:.2e} (bound {GRPO_BOUNDS[name]:.0e}), "
                            f"finite {got['finite']}")
    return {**result, "bounds": GRPO_BOUNDS, "failures": failures}


LOSS_VARIANTS = [("grpo", "token"), ("grpo", "sequence"), ("grpo", "constant"), ("gspo", "sequence"),
                 ("cispo", "token")]
"""(loss, aggregation) pairs the check takes value and gradient of (learner/grpo.py, points 1, 9)."""


def grpo_terms(grpo, x: dict, mask: torch.Tensor, group_size: int) -> dict:
    """Every GRPO quantity the learner uses, on x's device and dtype; value and gradient of each
    loss variant (with its KL term by a different estimator each)."""
    keep = mask.bool()
    adv = grpo.group_advantages(x["rewards"], group_size)  # [N]
    weights = grpo.importance_weights(x["old"], x["behaviour"], mask, cap=2.0)  # [N, T]
    out = {"advantages": adv, "is_weights": weights[keep]}
    for estimator in grpo.KL_ESTIMATORS:
        out[f"kl_{estimator}"] = grpo.kl_estimate(x["lp"], x["ref"], estimator)[keep]
    finite = True
    for i, (loss_name, aggregation) in enumerate(LOSS_VARIANTS):
        lp = x["lp"].clone().requires_grad_(True)
        loss, _ = grpo.policy_loss(lp, x["old"], adv, mask, loss=loss_name, clip_low=0.2, clip_high=0.28,
                                   ref_logprobs=x["ref"], kl_beta=0.04,
                                   kl_estimator=grpo.KL_ESTIMATORS[i % len(grpo.KL_ESTIMATORS)],
                                   aggregation=aggregation, max_tokens=mask.shape[1], is_weights=weights)
        loss.backward()
        name = f"{loss_name}_{aggregation}"
        out[f"loss_{name}"], out[f"grad_{name}"] = loss.detach(), lp.grad[keep]
        finite = finite and bool(torch.isfinite(loss)) and bool(torch.isfinite(lp.grad).all())
    out["finite"] = finite
    return out


# ---- 2. the learner's log-probs and one optimizer step -----------------------------------

def check_learner_logprobs(args) -> dict:
    from transformers import AutoModelForCausalLM

    from common.records import Sampling
    from learner import grpo

    path = small_llama(args)
    cpu_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    ids, attention, targets = padded_batch(cpu_model.config.vocab_size, 4, 32 if args.small else 256, args.seed)
    sampling = Sampling(n=1, seed=0, temperature=0.8)
    keep = torch.as_tensor(targets).bool()
    with torch.no_grad():
        want = learner_logprobs(cpu_model, ids, attention, sampling, targets)[keep]  # [m]
    result, failures = {}, []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = copy.deepcopy(cpu_model).to(args.device, dtype)
        with torch.no_grad():
            got = learner_logprobs(model, ids, attention, sampling, targets).cpu()[keep]
        result[f"logprobs_{name}_vs_cpu_fp32"] = {**noise(got, want), "finite": bool(torch.isfinite(got).all())}
    if result["logprobs_float32_vs_cpu_fp32"]["max"] > LOGPROB_BOUND_FP32:
        failures.append(f"fp32 log-probs differ from the CPU's by {result['logprobs_float32_vs_cpu_fp32']['max']:.2e}")

    # The LM head in chunks of 7 answer tokens (learner.logprob_chunk) against all at once, fp32.
    model, runs = copy.deepcopy(cpu_model).to(args.device), []
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    for chunk in (0, 7):
        lp = learner_logprobs(model, ids, attention, sampling, targets, chunk=chunk)  # [n, L-1]
        (lp * weights).sum().backward()
        runs.append((lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
        model.zero_grad(set_to_none=True)
    chunked = result["chunked_vs_whole"] = {"logprobs": errors(runs[1][0], runs[0][0]),
                                            "grads": errors(runs[1][1], runs[0][1])}
    if max(chunked["logprobs"]["max_rel"], chunked["grads"]["max_rel"]) > 1e-4:
        failures.append(f"chunked log-probs differ from whole ones: {chunked}")

    # One GRPO step with torch's AdamW, on the device and on the CPU from the same weights.
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    steps = {}
    for device in (args.device, "cpu"):
        model = copy.deepcopy(cpu_model).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device == "cuda")
        mask = torch.as_tensor(targets, device=device)
        losses, old = [], None
        for _ in range(2):  # the loss before and after the step, against the policy before it
            lp = learner_logprobs(model, ids, attention, sampling, targets)
            old = lp.detach() if old is None else old
            loss, _ = grpo.policy_loss(lp, old, advantages.to(device), mask)
            losses.append(loss.item())
            if len(losses) == 1:
                loss.backward()
                grads = torch.cat([p.grad.flatten().cpu() for p in model.parameters()])
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        params = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        steps[device] = dict(losses=losses, grads=grads, norm=norm, params=params)
    dev, cpu = steps[args.device], steps["cpu"]
    result["step"] = {"loss_before_after": dev["losses"], "cpu_loss_before_after": cpu["losses"],
                      "grad_norm": dev["norm"], "cpu_grad_norm": cpu["norm"],
                      "grad_vs_cpu": errors(dev["grads"], cpu["grads"]),
                      "params_vs_cpu_after_step": errors(dev["params"], cpu["params"]),
                      "finite": bool(torch.isfinite(dev["params"]).all())}
    if not result["step"]["finite"] or result["step"]["grad_vs_cpu"]["max_rel"] > 1e-3:
        failures.append(f"optimizer step: {result['step']['grad_vs_cpu']} (finite {result['step']['finite']})")
    if not dev["losses"][1] < dev["losses"][0]:
        failures.append(f"the step did not lower the loss: {dev['losses']}")
    return {**result, "failures": failures}


# ---- 3. peak memory of one micro-batch --------------------------------------------------

def check_memory(args) -> dict:
    from learner import grpo
    from learner.rank import checkpoint_layers

    model = qwen(args, torch.bfloat16).eval()  # the learner trains in eval mode: no dropout
    micro, lengths, chunk = (2, (32, 64), 16) if args.small else (4, (1024, 4096), 1024)
    weights = torch.cuda.memory_allocated() if args.device == "cuda" else None
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            checkpoint_layers(model)  # as `learner.gradient_checkpointing` does
        for length in lengths:
            for logprob_chunk in (0, chunk):
                rows.append(micro_batch_peak(model, grpo, micro, length, logprob_chunk, args.device))
                rows[-1].update(gradient_checkpointing=checkpointing, above_weights_gib=None if weights is None
                                else round(rows[-1]["peak_gib"] - weights / 2**30, 2))
                print(f"  memory: {rows[-1]}", flush=True)
    params = sum(p.numel() for p in model.parameters())
    return {"model": "Qwen2.5-1.5B shapes" if not args.small else "tiny Qwen2", "parameters": params,
            "dtype": "bfloat16", "weights_gib": None if weights is None else round(weights / 2**30, 2), "rows": rows}


def micro_batch_peak(model, grpo, micro: int, length: int, chunk: int, device: str) -> dict:
    """Peak allocated memory (None on a CPU) and time of one micro-batch's forward + backward
    through the learner's log-prob path and the GRPO loss: `micro` full rows of `length`
    tokens, the last three quarters of each an answer, the LM head `chunk` tokens at a time."""
    from common.records import Sampling

    ids, attention, targets = padded_batch(model.config.vocab_size, micro, length, seed=0)
    attention[:] = 1  # full rows: the worst case of the length
    targets[:] = 0
    targets[:, length // 4:] = 1  # a quarter prompt, three quarters answer
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    lp = learner_logprobs(model, ids, attention, Sampling(n=1, seed=0), targets, chunk=chunk)  # [n, L-1]
    mask = torch.as_tensor(targets, device=device)
    loss, _ = grpo.policy_loss(lp, lp.detach(), torch.linspace(-1, 1, micro, device=device), mask)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return {"micro_batch": micro, "seq_len": length, "logprob_chunk": chunk,
            "peak_gib": None if peak is None else round(peak / 2**30, 2), "seconds": round(seconds, 3)}


# ---- 4. the bf16 noise a weight-sync check must tolerate --------------------------------

def check_bf16_noise(args) -> dict:
    from cluster.weight_sync import CHECK
    from common.records import Sampling

    model = qwen(args, torch.float32).eval()
    length = 64 if args.small else 1024
    ids = np.random.default_rng(args.seed).integers(3, model.config.vocab_size, size=(1, length), dtype=np.int64)
    ones = np.ones_like(ids)
    raw = Sampling(n=1, seed=0)  # temperature 1, no cut: what the sync check scores
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, device=args.device)).logits.float()
        model.model.norm.weight.mul_(3.0 / logits.std().item())  # spread like a trained model's logits
        logit_std = model(input_ids=torch.as_tensor(ids, device=args.device)).logits.float().std().item()
        runs = {"fp32_sdpa": learner_logprobs(model, ids, ones, raw)[0]}
        model.set_attn_implementation("eager")
        runs["fp32_eager"] = learner_logprobs(model, ids, ones, raw)[0]
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        runs["bf16_eager"] = learner_logprobs(bf16, ids, ones, raw)[0]
        bf16.set_attn_implementation("sdpa")
        runs["bf16_sdpa"] = learner_logprobs(bf16, ids, ones, raw)[0]
        four = np.repeat(ids, 4, axis=0)
        runs["bf16_sdpa_batch4"] = learner_logprobs(bf16, four, np.ones_like(four), raw)[0]
    pairs = {"fp32_vs_bf16": ("fp32_sdpa", "bf16_sdpa"), "fp32_sdpa_vs_fp32_eager": ("fp32_sdpa", "fp32_eager"),
             "bf16_sdpa_vs_bf16_eager": ("bf16_sdpa", "bf16_eager"),
             "bf16_batch1_vs_batch4": ("bf16_sdpa", "bf16_sdpa_batch4")}
    stats = {name: noise(runs[a], runs[b]) for name, (a, b) in pairs.items()}
    # What the sync check would say of each pair, by the bounds of the dtype it runs in.
    checked = {name: "bfloat16" if "bf16" in name else "float32" for name in pairs}
    for name, s in stats.items():
        bound = CHECK[checked[name]]
        s["within_sync_check"] = {"mean": s["mean"] <= bound.mean, "p99": s["p99"] <= bound.p99}
        print(f"  bf16_noise {name}: mean {s['mean']:.2e} p99 {s['p99']:.2e} max {s['max']:.2e}", flush=True)
    return {"model": "Qwen2.5-1.5B shapes" if not args.small else "tiny Qwen2", "seq_len": length,
            "logit_std": logit_std, "mean_logprob": runs["fp32_sdpa"].mean().item(), "abs_diff": stats,
            "sync_check_bounds": {dtype: dataclasses.asdict(b) for dtype, b in CHECK.items()}}


# ---- 5. the transformers rollout engine -------------------------------------------------

def check_engine(args) -> dict:
    from actors.hf_engine import TransformersEngine
    from common.records import Sampling

    path = small_llama(args)
    result = {}
    for dtype in ("float32", "bfloat16"):
        engine = TransformersEngine(path, dtype=dtype, device=args.device)
        prompts = [engine.tokenizer.encode(text) for text in ("User: What is 12+34?", "User: 7-5 and 3*4?")]
        sampling = Sampling(n=4, seed=1, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=16 if args.small else 64)
        start = time.perf_counter()
        groups = engine.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        again = engine.generate(prompts, sampling)
        answers = [a for group in groups for a in group]
        assert [len(g) for g in groups] == [4, 4], "every prompt gets n answers"
        assert all(len(a["logprobs"]) == len(a["response_ids"]) > 0 for a in answers), "one log-prob per token"
        engine_lp, learner_lp = [], []
        for prompt, group in zip(prompts, groups):
            for a in group:  # the learner's recompute of the engine's sampling log-probs
                ids = np.asarray([prompt + a["response_ids"].tolist()], dtype=np.int64)
                targets = np.zeros((1, ids.shape[1] - 1), dtype=np.float32)
                targets[0, len(prompt) - 1:] = 1
                with torch.no_grad():
                    lp = learner_logprobs(engine.model, ids, np.ones_like(ids), sampling, targets)[0, len(prompt) - 1:]
                engine_lp.append(a["logprobs"])
                learner_lp.append(lp.float().cpu().numpy())
        engine_lp, learner_lp = np.concatenate(engine_lp), np.concatenate(learner_lp)
        both = np.isfinite(engine_lp) & np.isfinite(learner_lp)  # the cut may differ where logits do
        sequence = np.asarray([prompts[0] + answers[0]["response_ids"].tolist()], dtype=np.int64)
        score = engine.score(sequence[0])
        with torch.no_grad():
            raw = learner_logprobs(engine.model, sequence, np.ones_like(sequence), Sampling(n=1, seed=0))[0]
        result[dtype] = {"tokens": sum(len(a["response_ids"]) for a in answers), "seconds": round(seconds, 3),
                         "same_tokens_same_seed": all(np.array_equal(a["response_ids"], b["response_ids"])
                                                      for g, h in zip(groups, again) for a, b in zip(g, h)),
                         "finish_reasons": sorted({a["finish_reason"] for a in answers}),
                         "engine_vs_learner_logprob": noise(torch.as_tensor(engine_lp[both]),
                                                            torch.as_tensor(learner_lp[both])),
                         "tokens_outside_learner_cut": int((~both).sum()),
                         "score_vs_learner_max_abs": float(np.abs(score - raw.float().cpu().numpy()).max()),
                         "score_finite": bool(np.isfinite(score).all())}
    failures = [f"{d}: {r}" for d, r in result.items() if not (r["score_finite"] and r["same_tokens_same_seed"])]
    fp32 = result["float32"]
    if max(fp32["engine_vs_learner_logprob"]["max"], fp32["score_vs_learner_max_abs"]) > LOGPROB_BOUND_FP32:
        failures.append("fp32 engine log-probs differ from the learner's recompute")
    return {**result, "failures": failures}


# ---- 6. the broadcast weight-sync transport, two processes --------------------------------

def check_broadcast(args) -> dict:
    from common.net import free_port

    path, port = small_llama(args), free_port()
    with tempfile.TemporaryDirectory(prefix="gpu-check-sync-") as out:
        run_pair(broadcast_rank, (path, port, args.device, args.seed, out))
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]
    failures = [f"{r['dtype']}: {r['mismatched'][:3]}" for r in ranks[1]["rounds"] if r["mismatched"]]
    return {"sender": ranks[0], "receiver": ranks[1], "failures": failures}


def broadcast_rank(rank: int, path: str, port: int, device: str, seed: int, out: str) -> None:
    """Rank 0 is the learner's end (a model on `device`, sending from host buffers), rank 1 an
    engine's (a transformers engine on `device`, receiving through WeightReceiver)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from actors.hf_engine import TransformersEngine
    from common import weight_sync

    quiet()
    torch.set_num_threads(1)
    timeout, bucket = 60.0, 1 << 20  # 1 MiB buckets: several per model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rounds = []
    if rank == 0:
        end = weight_sync.BroadcastEnd(weight_sync.join_group("127.0.0.1", port, 0, 2, timeout, "cpu"), "cpu")
    else:
        engine = TransformersEngine(path, dtype="float32", device=device)
        receiver = weight_sync.WeightReceiver(path, engine.load_weights)
        receiver.join("127.0.0.1", port, 1, 2, timeout, "cpu")
    for version, dtype in enumerate((torch.float32, torch.bfloat16), start=1):
        sent = trained(model, seed + version).to(device, dtype)  # new weights, unlike the folder's
        start = time.perf_counter()
        if rank == 0:
            nbytes = weight_sync.send_weights(SimpleNamespace(module=sent), 0, 0, end, bucket, timeout)
        else:
            manifest = weight_sync.learner_manifest(SimpleNamespace(module=sent))
            nbytes = receiver.receive(version, manifest, bucket, timeout)
            receiver.commit(version)
        seconds = time.perf_counter() - start
        mismatched = []
        if rank == 1:
            served = dict(engine.model.named_parameters())
            mismatched = [name for name, p in sent.named_parameters()
                          if not torch.equal(served[name].detach().cpu(), p.detach().cpu().float())]
        rounds.append({"dtype": str(dtype).removeprefix("torch."), "bytes": nbytes, "seconds": round(seconds, 4),
                       "mismatched": mismatched})
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rounds": rounds}))


# ---- 7. the CUDA IPC weight-sync transport, two processes on one GPU ---------------------

def check_cuda_ipc(args) -> dict:
    if args.device != "cuda":
        return {"skipped": "CUDA IPC needs a GPU", "failures": []}
    path = small_llama(args)
    with tempfile.TemporaryDirectory(prefix="gpu-check-ipc-") as out:
        run_pair(ipc_rank, (path, args.seed, out))
        result = json.loads((Path(out) / "rank1.json").read_text())
    return {**result, "failures": [f"mismatched: {result['mismatched'][:3]}"] if result["mismatched"] else []}


def ipc_rank(rank: int, path: str, seed: int, out: str) -> None:
    """Rank 0 is a colocated learner rank (a bf16 model on the GPU, sharing its weights), rank
    1 the engine beside it (a transformers engine on the same GPU, staging them)."""
    import pickle
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from actors.hf_engine import TransformersEngine
    from common import weight_sync

    quiet()
    handles, done = Path(out, "handles.pkl"), Path(out, "rank1.json")
    model = trained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), seed).to("cuda", torch.bfloat16)
    if rank == 0:
        tmp = handles.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(weight_sync.share_weights(SimpleNamespace(module=model))))
        tmp.rename(handles)
        while not done.exists():  # the tensors must live until the engine has copied them
            time.sleep(0.1)
        return
    engine = TransformersEngine(path, dtype="bfloat16", device="cuda")
    receiver = weight_sync.WeightReceiver(path, engine.load_weights)
    while not handles.exists():
        time.sleep(0.1)
    start = time.perf_counter()
    nbytes = receiver.stage_ipc(1, pickle.loads(handles.read_bytes()))
    receiver.commit(1)
    seconds = time.perf_counter() - start
    served = dict(engine.model.named_parameters())
    mismatched = [name for name, p in model.named_parameters() if not torch.equal(served[name], p)]
    done.write_text(json.dumps({"bytes": nbytes, "seconds": round(seconds, 4), "mismatched": mismatched}))


def run_pair(fn, args: tuple, timeout_s: float = 300) -> None:
    """`fn(rank, *args)` in two spawned processes (ranks 0 and 1); both killed after `timeout_s`."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the two processes of {fn.__name__} did not finish within {timeout_s:g} s")


def trained(model, seed: int):
    """A copy of `model` with every weight moved by seeded noise (the same in both processes)."""
    gen = torch.Generator().manual_seed(seed)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return moved


SECTIONS = {"grpo_math": check_grpo_math, "learner_logprobs": check_learner_logprobs, "memory": check_memory,
            "bf16_noise": check_bf16_noise, "engine": check_engine, "broadcast": check_broadcast,
            "cuda_ipc": check_cuda_ipc}

if __name__ == "__main__":
    main()
