"""r1ray against Hugging Face TRL's GRPOTrainer on the same work, one after the other.

    .venv/bin/pip install trl==1.16.0          # bench-only (pyproject extra "bench")
    .venv/bin/python bench/vs_trl.py           # both settings, about 25 minutes on 2 cores
    .venv/bin/python bench/vs_trl.py --settings tiny --steps 10

Settings (same model, prompts, reward, G, prompts per step, max new tokens, temperature,
learning rate, KL coefficient and number of steps for both systems):
- "tiny": the default job's 4.4M-parameter Llama, warm-started by r1ray's cold-start SFT
  (built once into the cache), the R1 template, 16 prompts x 8 answers x 32 new tokens;
  r1ray samples with its transformers engine (see SETTINGS), TRL with transformers too.
- "smollm2": SmolLM2-135M-Instruct in its own chat template (default system prompt
  included), 4 prompts x 8 answers x 96 new tokens; the answer is the last number.
Both systems get the same prompt text, rendered once by r1ray's PromptFormat (TRL is
handed plain strings, so it applies no template of its own), in the same order, and the
same reward: 1 if the task's checker accepts the answer, else 0.

How TRL's options map to one r1ray step (one optimizer update on B*G fresh answers):
    per_device_train_batch_size = B*G, gradient_accumulation_steps = 1,
    steps_per_generation = 1, num_generations = G, num_iterations = 1 (r1ray:
    algorithm.updates_per_step = 1), beta = algorithm.kl_beta, epsilon = clip 0.2,
    loss_type "dapo" (r1ray: aggregation token), scale_rewards "group" (normalize_std),
    lr_scheduler constant, no warm-up, shuffle_dataset False (prompts in r1ray's order),
    transformers generation (TRL's vLLM paths need a GPU). Each system runs in a fresh
    process with 2 torch threads; TRL in fp32 (its CPU default), r1ray with the settings
    of its own config for that model (bf16 learner and engine for SmolLM2).

Systems: "trl"; "r1ray", the synchronous loop (the same algorithm as TRL's); and
"r1ray-async", r1ray with algorithm.max_staleness=1 (the next step generates while this one
learns, with the importance-sampling correction) and a core each for engine and learner.

Per system: median step wall time, generated tokens/s and trained (prompt + answer)
tokens/s over the steps, total wall time of the process (start-up included), mean reward
over the first and last quarter of the steps, and peak memory (the summed resident memory
of the process and all its children, Ray's included, sampled every 0.2 s).
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

from machine import describe  # noqa: E402  (bench/machine.py, beside this script)

# name: (config file, overrides) for r1ray; every shared knob is an override here.
SETTINGS = {
    # A 4.4M model is too small for vLLM: its per-step scheduling costs more than the model
    # (0.88 s against 0.77 s per step's generation here), so r1ray uses its transformers engine.
    "tiny": dict(prompts=16, group=8, max_new=32, temperature=1.0, lr=5e-5, kl=0.0, steps=30,
                 overrides=["task.arithmetic.max_digits=2", "rollout.engine=transformers"]),
    "smollm2": dict(prompts=4, group=8, max_new=96, temperature=0.7, lr=1e-5, kl=0.0, steps=6,
                    config="configs/smollm2-arithmetic.yaml", overrides=[]),
}
CACHE = os.path.expanduser("~/.cache/r1ray")


def r1ray_overrides(name: str, steps: int, model: str, run_dir: Path) -> list[str]:
    s = SETTINGS[name]
    return [*s["overrides"], f"model.path={model}", f"algorithm.steps={steps}",
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


def run_r1ray(name: str, steps: int, extra: list[str]) -> dict:
    from cluster.train import train
    from cluster.plot import read_metrics

    model = model_for(name)
    run_dir = Path(tempfile.mkdtemp(prefix="vs-trl-")) / "run"
    cfg = load(name, [*r1ray_overrides(name, steps, model, run_dir), *extra])
    train(cfg)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in r]
    return {"step_s": [r["timing/step"] for r in rows], "generate_s": [r["timing/generate"] for r in rows],
            "learn_s": [r["timing/learn"] for r in rows], "rewards": [r["reward/mean"] for r in rows],
            "generated": [r["rollout/response_tokens"] for r in rows],
            "trained": [r["rollout/response_tokens"] + r["rollout/prompt_tokens"] for r in rows],
            "gflops": [r["throughput/learn_gflops"] for r in rows]}


def run_trl(name: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(2)
    s, model_path = SETTINGS[name], model_for(name)
    cfg, tasks, problems, texts = prompts(name, model_path, steps)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if name == "tiny":  # r1ray stops at the stop string "</answer>", one token of this tokenizer
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</answer>")]

    def reward(prompts, completions, index, **_) -> list[float]:
        return [tasks.tasks[problems[i].task].check(c, problems[i])[0] for c, i in zip(completions, index)]

    record = {"step_s": [], "generate_s": [], "rewards": [], "generated": [], "trained": []}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            batch = super()._generate_and_score_completions(inputs)
            record["generate_s"].append(time.perf_counter() - start)
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
        output_dir=tempfile.mkdtemp(prefix="vs-trl-"), use_cpu=True, bf16=False, report_to="none",
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
    return record


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


def measure(system: str, name: str, steps: int, r1ray_set: list[str]) -> dict:
    """Run one system in a fresh process; its record, total wall time and peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--one", system, "--settings", name,
                                 "--steps", str(steps), "--record", str(out), "--r1ray-set", *r1ray_set],
                                env=env, cwd=ROOT)
        stop, peak = threading.Event(), [0.0]
        watcher = threading.Thread(target=peak_rss, args=(proc.pid, stop, peak), daemon=True)
        watcher.start()
        code = proc.wait()
        stop.set()
        watcher.join()
        if code != 0:
            raise SystemExit(f"{system} on {name} failed with exit code {code}")
        record = json.loads(out.read_text())
        return {**record, "total_s": time.perf_counter() - start, "peak_gib": peak[0]}


def summarize(r: dict) -> dict:
    quarter = max(1, len(r["rewards"]) // 4)
    return {"step": statistics.median(r["step_s"]), "generate": statistics.median(r["generate_s"]),
            "learn": statistics.median(r["learn_s"]),
            "gen_tps": sum(r["generated"]) / sum(r["generate_s"]),
            "train_tps": sum(r["trained"]) / sum(r["learn_s"]), "total": r["total_s"],
            "first": statistics.mean(r["rewards"][:quarter]), "last": statistics.mean(r["rewards"][-quarter:]),
            "peak": r["peak_gib"], "gflops": statistics.median(r["gflops"]) if "gflops" in r else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--steps", type=int, help="steps per run (default: the setting's)")
    parser.add_argument("--systems", default="trl,r1ray,r1ray-async", help="comma-separated: trl, r1ray, r1ray-async")
    parser.add_argument("--r1ray-set", nargs="*", default=[], metavar="key=value",
                        help="extra r1ray config overrides, e.g. rollout.engine=transformers")
    parser.add_argument("--one", choices=("r1ray", "r1ray-async", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.settings.split(",")
    if args.one:  # a child: run one system and write its record
        if args.one == "trl":
            record = run_trl(names[0], args.steps)
        else:
            extra = [*args.r1ray_set, *(ASYNC if args.one == "r1ray-async" else [])]
            record = run_r1ray(names[0], args.steps, extra)
        Path(args.record).write_text(json.dumps(record))
        return

    import torch
    import transformers
    import trl

    for name in names:  # build shared models before anything is timed
        model_for(name)
    rows = []
    for name in names:
        steps = args.steps or SETTINGS[name]["steps"]
        got = {system: summarize(measure(system, name, steps, args.r1ray_set)) for system in args.systems.split(",")}
        rows.append((name, steps, got))
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    print(f"\nMachine: {describe(versions)}")
    print("\n| setting | steps | system | median step s | generate s | learn s | generate tok/s | train tok/s "
          "| learner GFLOP/s | total s | reward first q -> last q | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, steps, got in rows:
        s = SETTINGS[name]
        label = f"{name} ({s['prompts']}x{s['group']}x{s['max_new']})"
        for system, m in got.items():
            gflops = f"{m['gflops']:.0f}" if m["gflops"] is not None else "-"
            print(f"| {label} | {steps} | {system} | {m['step']:.2f} | {m['generate']:.2f} | {m['learn']:.2f} "
                  f"| {m['gen_tps']:,.0f} | {m['train_tps']:,.0f} | {gflops} | {m['total']:.0f} | {m['first']:.3f} -> "
                  f"{m['last']:.3f} | {m['peak']:.2f} |")
        t = got.get("trl")
        for system, r in got.items():
            if t is None or system == "trl":
                continue
            print(f"| {label} | {steps} | **{system} / TRL** | **{r['step'] / t['step']:.2f}x** | "
                  f"{r['generate'] / t['generate']:.2f}x | {r['learn'] / t['learn']:.2f}x | "
                  f"{r['gen_tps'] / t['gen_tps']:.2f}x | {r['train_tps'] / t['train_tps']:.2f}x | | "
                  f"{r['total'] / t['total']:.2f}x | | {r['peak'] / t['peak']:.2f}x |")


if __name__ == "__main__":
    main()
