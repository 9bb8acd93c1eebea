"""r1ray against Hugging Face TRL's GRPOTrainer on the same work, one after the other.

    .venv/bin/pip install --no-deps trl==1.16.0   # bench-only (pyproject extra "bench")
    .venv/bin/python bench/vs_trl.py              # both settings in fp32, 25-40 minutes on 2 cores
    .venv/bin/python bench/vs_trl.py --dtype float32,bfloat16   # each setting in both precisions
    .venv/bin/python bench/vs_trl.py --settings tiny --steps 10

Settings (same model, prompts, reward, G, prompts per step, max new tokens, temperature,
learning rate, KL coefficient, number of steps and precision for both systems):
- "tiny": the default job's 4.4M-parameter Llama, warm-started by r1ray's cold-start SFT
  (built once into the cache), the R1 template, 16 prompts x 8 answers x 32 new tokens;
  r1ray samples with its transformers engine (see SETTINGS), TRL with transformers too.
- "smollm2": SmolLM2-135M-Instruct in its own chat template (default system prompt
  included), 4 prompts x 8 answers x 96 new tokens; the answer is the last number; r1ray
  samples with vLLM.
Both systems get the same prompt text, rendered once by r1ray's PromptFormat (TRL is
handed plain strings, so it applies no template of its own), in the same order, and the
same reward: 1 if the task's checker accepts the answer, else 0.

Precision (`--dtype`, one row group per setting and dtype): both systems run in it, each
in its own way. r1ray sets `learner.dtype`: fp32, or DeepSpeed's bf16 (bf16 weights and
matmuls, fp32 master weights in the optimizer) with its engine loaded in bf16 too. TRL
loads the model in fp32 and sets `bf16` (its default is True, on CPU as well): accelerate's
autocast, bf16 matmuls over fp32 weights, in generation as in learning (trl 1.16.0 on CPU).
What each system ran is in the table's "ran" column; for TRL it is measured, by a hook on
a Linear of the model that records its weight and output dtypes while generating and while
learning. bf16 rows are skipped, with the reason printed, on a CPU without bf16 matmul
instructions (AMX or AVX512-BF16; bench/machine.py): there torch emulates bf16 about 100x
slower than fp32, and the rows would time the emulation, not the systems. `--force-bf16`
runs them anyway.

How TRL's options map to one r1ray step (one optimizer update on B*G fresh answers):
    per_device_train_batch_size = B*G, gradient_accumulation_steps = 1,
    steps_per_generation = 1, num_generations = G, num_iterations = 1 (r1ray:
    algorithm.updates_per_step = 1), beta = algorithm.kl_beta, epsilon = clip 0.2,
    loss_type "dapo" (r1ray: aggregation token), scale_rewards "group" (normalize_std),
    lr_scheduler constant, no warm-up, shuffle_dataset False (prompts in r1ray's order),
    gradient_checkpointing False (TRL's default is True, which recomputes the forward in
    the backward; r1ray keeps activations), transformers generation (TRL's vLLM paths need
    a GPU). Each system runs in a fresh process with 2 torch threads.

Systems: "trl"; "r1ray", the synchronous loop (the same algorithm as TRL's, but for groups
whose G rewards are all equal: r1ray leaves them out of the learner's batch, learner/grpo.py
point 8, where TRL computes their zero gradient; "groups learned" is the share each system
learned from); and "r1ray-async", r1ray with algorithm.max_staleness=1 (the next step
generates while this one learns, with the importance-sampling correction) and a core each
for engine and learner.

Per system: median step, generate and learn wall time (learn 0 for an r1ray step with no
group to learn from), generated tokens/s (every answer) and trained (prompt + answer)
tokens/s over the steps, the learner's useful GFLOP/s (the same count for both systems:
cluster/metrics.py `learn_flops` over the learned tokens and the learn time; per token,
so a smaller batch does not flatter it), total wall time of the process (start-up
included), mean reward over the first and last quarter of the steps, and peak memory (the
summed resident memory of the process and all its children, Ray's included, sampled every
0.2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import bf16_native, describe  # noqa: E402  (bench/machine.py, beside this script)

# name: (config file, overrides) for r1ray; every shared knob is an override here.
SETTINGS = {
    # A 4.4M model is too small for vLLM: its per-step scheduling costs more than the model
    # (0.88 s against 0.77 s per step's generation here), so r1ray uses its transformers engine.
    "tiny": dict(model="4.4M Llama", prompts=16, group=8, max_new=32, temperature=1.0, lr=5e-5, kl=0.0, steps=30,
                 overrides=["task.arithmetic.max_digits=2", "rollout.engine=transformers"]),
    "smollm2": dict(model="SmolLM2-135M-Instruct", prompts=4, group=8, max_new=96, temperature=0.7, lr=1e-5,
                    kl=0.0, steps=6, config="configs/smollm2-arithmetic.yaml", overrides=[]),
}
DTYPES = ("float32", "bfloat16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
CACHE = os.path.expanduser("~/.cache/r1ray")


def r1ray_overrides(name: str, steps: int, model: str, run_dir: Path, dtype: str = "float32") -> list[str]:
    s = SETTINGS[name]
    return [*s["overrides"], f"model.path={model}", f"learner.dtype={dtype}", f"algorithm.steps={steps}",
            f"algorithm.prompts_per_step={s['prompts']}", f"algorithm.group_size={s['group']}",
            f"rollout.max_new_tokens={s['max_new']}", f"rollout.temperature={s['temperature']}",
            f"learner.lr={s['lr']}", "learner.warmup_steps=0", f"algorithm.kl_beta={s['kl']}",
            "algorithm.updates_per_step=1", "cold_start.steps=0", "task.eval_prompts=0",
            "rewards.format_weight=0", "rewards.correct_weight=1", "logging.wandb_mode=disabled",
            "logging.samples_every=0", "logging.progress=false", "checkpoint.every=0",
            f"cluster.runs_dir={run_dir.parent}", f"logging.run_name={run_dir.name}"]


def load(name: str, overrides: list[str]):
    from cluster.config import load_config

    return load_config(SETTINGS[name].get("config"), overrides)


def warm_tiny() -> str:
    """The default tiny model after r1ray's cold-start SFT, built once into the cache."""
    out = Path(CACHE) / "models" / "tiny-warm-default"
    if (out / "config.json").exists():
        return str(out)
    from cluster.config import load_config
    from cluster.train import train

    with tempfile.TemporaryDirectory() as tmp:
        train(load_config(None, ["algorithm.steps=0", "task.eval_prompts=0", "logging.wandb_mode=disabled",
                                 f"cluster.runs_dir={tmp}", "logging.run_name=warm"]))
        os.replace(Path(tmp) / "warm" / "model", out)
    return str(out)


def model_for(name: str) -> str:
    if name == "tiny":
        return warm_tiny()
    from learner.models import smollm2_path

    return str(smollm2_path(CACHE))


def prompts(name: str, model: str, steps: int):
    """The problems r1ray's driver draws, in its order, and their rendered prompt text."""
    from cluster.prompts import prompt_format
    from rewards.tasks import build_mixture

    cfg = load(name, r1ray_overrides(name, steps, model, Path("/tmp/unused")))
    tasks, rng, fmt = build_mixture(cfg.task), random.Random(cfg.algorithm.seed), prompt_format(cfg, model)
    problems = [p for _ in range(steps) for p in tasks.sample(rng, cfg.algorithm.prompts_per_step)]
    return cfg, tasks, problems, [fmt.render(p.prompt) for p in problems]


# ---- one system, in its own process -----------------------------------------------------------

# r1ray-async: one step of staleness, generation overlapping learning, a core each.
ASYNC = ["algorithm.max_staleness=1", "rollout.threads=1", "learner.threads=1"]


def run_r1ray(name: str, steps: int, dtype: str, extra: list[str]) -> dict:
    from cluster.train import train
    from cluster.plot import read_metrics

    model = model_for(name)
    run_dir = Path(tempfile.mkdtemp(prefix="vs-trl-")) / "run"
    cfg = load(name, [*r1ray_overrides(name, steps, model, run_dir, dtype), *extra])
    train(cfg)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in r]
    learner = short(cfg.learner.dtype) + (" (fp32 master)" if cfg.learner.dtype == "bfloat16" else "")
    ran = (f"learner {learner} ZeRO-{cfg.learner.zero_stage}; {cfg.rollout.engine} engine {short(cfg.learner.dtype)}"
           + ("; staleness 1, 1 thread each" if cfg.algorithm.max_staleness else ""))
    # r1ray leaves groups whose rewards are all equal out of the learner's batch (learner/grpo.py,
    # point 8): a step's learn metrics are its batch's, absent when no group had signal.
    G = cfg.algorithm.group_size
    return {"step_s": [r["timing/step"] for r in rows], "generate_s": [r["timing/generate"] for r in rows],
            "learn_s": [r.get("timing/learn", 0.0) for r in rows], "rewards": [r["reward/mean"] for r in rows],
            "generated": [r["response_length/mean"] * r["groups/generated"] * G for r in rows],
            "trained": [r.get("rollout/response_tokens", 0) + r.get("rollout/prompt_tokens", 0) for r in rows],
            "trained_answers": [r.get("rollout/response_tokens", 0) for r in rows],
            "groups": [r["groups/trained"] / r["groups/generated"] for r in rows], "ran": ran}


def run_trl(name: str, steps: int, dtype: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(2)
    s, model_path = SETTINGS[name], model_for(name)
    cfg, tasks, problems, texts = prompts(name, model_path, steps)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    # fp32 weights in both precisions: TRL's bf16 is mixed precision (autocast), as in transformers' Trainer.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    phase, seen = ["learn"], set()  # (phase, weight dtype, output dtype) of a Linear in the body
    probe = next(m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    probe.register_forward_hook(lambda mod, inputs, out: seen.add((phase[0], mod.weight.dtype, out.dtype)))
    if name == "tiny":  # r1ray stops at the stop string "</answer>", one token of this tokenizer
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</answer>")]

    def reward(prompts, completions, index, **_) -> list[float]:
        return [tasks.tasks[problems[i].task].check(c, problems[i])[0] for c, i in zip(completions, index)]

    record = {"step_s": [], "generate_s": [], "rewards": [], "generated": [], "trained": []}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start, phase[0] = time.perf_counter(), "generate"
            batch = super()._generate_and_score_completions(inputs)
            record["generate_s"].append(time.perf_counter() - start)
            phase[0] = "learn"
            answers = int(batch["completion_mask"].sum())
            record["generated"].append(answers)
            record["trained"].append(answers + int(batch["prompt_mask"].sum()))
            return batch

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            record["step_s"].append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                record["rewards"].append(logs["reward"])

    n = s["prompts"] * s["group"]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs-trl-"), use_cpu=True, bf16=dtype == "bfloat16", report_to="none",
        gradient_checkpointing=False,
        per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=s["group"], num_iterations=1, max_completion_length=s["max_new"],
        temperature=s["temperature"], top_p=1.0, top_k=0, learning_rate=s["lr"], beta=s["kl"], epsilon=0.2,
        loss_type="dapo", scale_rewards="group", lr_scheduler_type="constant", warmup_steps=0,
        max_steps=steps, shuffle_dataset=False, logging_steps=1, save_strategy="no", seed=cfg.algorithm.seed,
        dataloader_num_workers=0, disable_dropout=True, weight_decay=cfg.learner.weight_decay,
        max_grad_norm=cfg.learner.grad_clip)
    # Each prompt once per step: TRL's sampler repeats every prompt num_generations times.
    data = Dataset.from_dict({"prompt": texts, "index": list(range(len(texts)))})
    trainer = Timed(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
                    callbacks=[Clock()])
    trainer.train()
    record["learn_s"] = [t - g for t, g in zip(record["step_s"], record["generate_s"])]
    record["trained_answers"], record["groups"] = record["generated"], [1.0] * len(record["step_s"])  # TRL learns all
    ran = "; ".join(ran_dtypes(seen, p) for p in ("learn", "generate"))
    record["ran"] = f"bf16={args.bf16}: {ran}; transformers generate"
    return record


def ran_dtypes(seen: set, phase: str) -> str:
    """What the probed Linear did in `phase`, e.g. "learn bf16 matmuls on fp32 weights"."""
    pairs = sorted({(short(w), short(o)) for p, w, o in seen if p == phase})
    if not pairs:
        return f"{phase} not seen"
    return f"{phase} " + ", ".join(w if w == o else f"{o} matmuls on {w} weights" for w, o in pairs)


def short(dtype) -> str:
    """fp32 for float32 or torch.float32, bf16 for bfloat16."""
    name = str(dtype).removeprefix("torch.")
    return SHORT.get(name, name)


# ---- the comparison ---------------------------------------------------------------------------

def peak_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total / 2**30)
        except psutil.Error:
            pass
        stop.wait(0.2)


def measure(system: str, name: str, dtype: str, steps: int, r1ray_set: list[str]) -> dict:
    """Run one system in a fresh process; its record, total wall time and peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--one", system, "--settings", name, "--dtype", dtype,
                                 "--steps", str(steps), "--record", str(out), "--r1ray-set", *r1ray_set],
                                env=env, cwd=ROOT)
        stop, peak = threading.Event(), [0.0]
        watcher = threading.Thread(target=peak_rss, args=(proc.pid, stop, peak), daemon=True)
        watcher.start()
        code = proc.wait()
        stop.set()
        watcher.join()
        if code != 0:
            raise SystemExit(f"{system} on {name} in {dtype} failed with exit code {code}")
        record = json.loads(out.read_text())
        return {**record, "total_s": time.perf_counter() - start, "peak_gib": peak[0]}


def summarize(r: dict, flop_params: tuple[int, int]) -> dict:
    from cluster.metrics import learn_flops

    quarter = max(1, len(r["rewards"]) // 4)
    gflops = [learn_flops(t, a, *flop_params) / s / 1e9
              for t, a, s in zip(r["trained"], r["trained_answers"], r["learn_s"]) if s > 0]
    return {"steps": len(r["step_s"]), "ran": r["ran"], "groups": statistics.mean(r["groups"]),
            "step": statistics.median(r["step_s"]),
            "generate": statistics.median(r["generate_s"]), "learn": statistics.median(r["learn_s"]),
            "gen_tps": sum(r["generated"]) / sum(r["generate_s"]),
            "train_tps": sum(r["trained"]) / max(sum(r["learn_s"]), 1e-9),
            "gflops": statistics.median(gflops) if gflops else 0.0,
            "total": r["total_s"], "first": statistics.mean(r["rewards"][:quarter]),
            "last": statistics.mean(r["rewards"][-quarter:]), "peak": r["peak_gib"]}


def skip_reason(dtype: str, force: bool) -> str | None:
    """Why a dtype's rows are not run on this CPU (None: run them)."""
    native, why = bf16_native()
    if dtype != "bfloat16" or native or force:
        return None
    return f"skipped: {why}; bf16 runs ~100x slower than fp32 here and would time the emulation (--force-bf16)"


def print_table(rows: list) -> None:
    print("\n| setting | dtype | system | ran | steps | groups learned | median step s | generate s | learn s "
          "| generate tok/s | train tok/s | learner GFLOP/s | total s | reward first q -> last q | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, dtype, got in rows:
        s = SETTINGS[name]
        label = f"{name}: {s['model']}, {s['prompts']}x{s['group']}x{s['max_new']}"
        if isinstance(got, str):
            print(f"| {label} | {dtype} | all | {got} |" + " |" * 11)
            continue
        for system, m in got.items():
            print(f"| {label} | {dtype} | {system} | {m['ran']} | {m['steps']} | {m['groups']:.0%} | {m['step']:.2f} "
                  f"| {m['generate']:.2f} | {m['learn']:.2f} | {m['gen_tps']:,.0f} | {m['train_tps']:,.0f} "
                  f"| {m['gflops']:.0f} | {m['total']:.0f} | {m['first']:.3f} -> {m['last']:.3f} | {m['peak']:.2f} |")
        t = got.get("trl")
        for system, r in got.items():
            if t is None or system == "trl":
                continue
            print(f"| {label} | {dtype} | **{system} / TRL** | same dtype | | | **{r['step'] / t['step']:.2f}x** | "
                  f"{r['generate'] / t['generate']:.2f}x | {r['learn'] / t['learn']:.2f}x | "
                  f"{r['gen_tps'] / t['gen_tps']:.2f}x | {r['train_tps'] / t['train_tps']:.2f}x | "
                  f"{r['gflops'] / t['gflops']:.2f}x | {r['total'] / t['total']:.2f}x | | "
                  f"{r['peak'] / t['peak']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--dtype", default="float32",
                        help="comma-separated: float32, bfloat16 (both systems run in each)")
    parser.add_argument("--force-bf16", action="store_true",
                        help="run bfloat16 rows on a CPU without bf16 matmul instructions")
    parser.add_argument("--steps", type=int, help="steps per run (default: the setting's)")
    parser.add_argument("--systems", default="trl,r1ray,r1ray-async", help="comma-separated: trl, r1ray, r1ray-async")
    parser.add_argument("--r1ray-set", nargs="*", default=[], metavar="key=value",
                        help="extra r1ray config overrides, e.g. rollout.engine=transformers")
    parser.add_argument("--one", choices=("r1ray", "r1ray-async", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names, dtypes = args.settings.split(","), args.dtype.split(",")
    if unknown := set(dtypes) - set(DTYPES):
        parser.error(f"--dtype: {', '.join(sorted(unknown))} is not one of {', '.join(DTYPES)}")
    if args.one:  # a child: run one system and write its record
        if args.one == "trl":
            record = run_trl(names[0], args.steps, dtypes[0])
        else:
            extra = [*args.r1ray_set, *(ASYNC if args.one == "r1ray-async" else [])]
            record = run_r1ray(names[0], args.steps, dtypes[0], extra)
        Path(args.record).write_text(json.dumps(record))
        return

    import torch
    import transformers
    import trl

    from learner.models import flop_parameters

    for name in names:  # build shared models before anything is timed
        model_for(name)
    rows = []
    for name in names:
        steps, flop_params = args.steps or SETTINGS[name]["steps"], flop_parameters(model_for(name))
        for dtype in dtypes:
            if reason := skip_reason(dtype, args.force_bf16):
                rows.append((name, dtype, reason))
                continue
            rows.append((name, dtype, {system: summarize(measure(system, name, dtype, steps, args.r1ray_set),
                                                         flop_params) for system in args.systems.split(",")}))
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    print(f"\nMachine: {describe(versions)}")
    print_table(rows)


if __name__ == "__main__":
    main()
