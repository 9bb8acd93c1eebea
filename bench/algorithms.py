"""Which policy-optimisation variant works best here: each variant of learner/grpo.py on two
tasks, with two seeds, on the same wall-clock budget of RL; real `r1ray train` runs.

    .venv/bin/python bench/algorithms.py                # every variant, both tasks, 2 seeds
    .venv/bin/python bench/algorithms.py --variants grpo,gspo --tasks arithmetic --seeds 1 --minutes 1

Every run is the default job (configs/default.yaml: the tiny Llama, cold start, fp32) with the
task's and the variant's overrides and `algorithm.max_minutes=--minutes`: RL stops after the
step that passes the budget, then held-out accuracy is measured as after any run. The cold
start is run once per task and seed (`algorithm.steps=0`), and every variant starts RL from
its model: the same start, and its minutes are not spent again per variant. The budget is
RL's alone (start-up and the first evaluations are not in it); the held-out evaluations
every `--eval-every` steps are in it, greedy only (`eval.k=1`), the same problems for every
run.

`--step-time N` measures instead what each variant costs a step: N steps of the default
job per variant with learner.lr=1e-12, which leaves fp32 weights exactly as they are (an Adam
update of ~1e-12 is below their rounding), so every variant samples, scores and learns from the
same batches and the difference is the variant's own work: median `timing/learn` and
`timing/step` against GRPO's, in the same invocation, GRPO run first and again last (their
difference is the machine's noise); the "same samples" column checks that the rewards of every
step match GRPO's.

The table (means over seeds; +- half the range): held-out greedy accuracy before RL and after;
reward gained per minute of RL (mean reward of the last 10 steps minus the first 10, over RL's
minutes); response length and policy entropy over the last 10 steps; the median step time and
the steps done in the budget. The plot: held-out greedy accuracy against minutes of RL, one
line per variant (mean over seeds), one panel per task (--plot, a PNG); its last point is the
accuracy after the last step."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "grpo": [],
    "grpo + dynamic sampling": ["algorithm.dynamic_sampling=true"],
    "dr_grpo": ["algorithm.aggregation=constant", "algorithm.normalize_std=false"],
    "gspo": ["algorithm.loss=gspo"],
    "cispo": ["algorithm.loss=cispo"],
    "grpo + tis": ["algorithm.mismatch=tis"],
    "grpo + difficulty filter": ["algorithm.prompt_filter=skip"],
}
"""Each variant's overrides of the default job (learner/config.py documents every key)."""

COSTED = {**VARIANTS,
          "grpo + dual clip": ["algorithm.dual_clip=3"],
          "grpo + entropy bonus": ["algorithm.entropy_coef=0.001"],
          "grpo + kl k3 in the loss": ["algorithm.kl_beta=0.01"],
          "grpo + kl k1 in the reward": ["algorithm.kl_beta=0.01", "algorithm.kl_in=reward",
                                         "algorithm.kl_estimator=k1"],
          "grpo + mis_token": ["algorithm.mismatch=mis_token"],
          "grpo + geo_mask": ["algorithm.mismatch=geo_mask"]}
"""--step-time's variants: every option of the family, each alone."""

TASKS = {
    "arithmetic": [],  # the default job's: 2-digit sums
    "arithmetic-3digit": ["task.arithmetic.max_digits=3"],
}
"""Each task's overrides: the default job's, and a harder one that the cold-started model
solves 5-30% of the time (its `before RL` column says how often): 3-digit sums, 0.050 after the
default cold start (seed 0, 2026-12-03; with 3 operands of 2 or 3 digits it solved none)."""


def run(name: str, runs_dir: Path, overrides: list[str], reuse: bool = False) -> dict:
    """One `r1ray train`; its metrics rows, held-out results and wall time. With `reuse`, a run
    that finished before under the same name and overrides is read back, not run again."""
    folder = runs_dir / name
    done = folder / "bench.json"
    if reuse and done.exists() and json.loads(done.read_text())["overrides"] == overrides:
        return read(folder, 0, json.loads(done.read_text())["seconds"])
    cmd = [sys.executable, "-m", "r1ray", "train", "--config", str(REPO / "configs/default.yaml"), *overrides,
           f"cluster.runs_dir={runs_dir}", f"logging.run_name={name}", "logging.wandb_mode=disabled",
           "logging.progress=false"]
    log = runs_dir / f"{name}.log"
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - start
    if proc.returncode:
        print(f"algorithms: {name} failed (exit {proc.returncode}); see {log}", flush=True)
    else:
        done.write_text(json.dumps({"overrides": overrides, "seconds": seconds}))
    return read(folder, proc.returncode, seconds)


def read(folder: Path, returncode: int, seconds: float) -> dict:
    """A run folder's metrics rows and held-out results."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()] \
        if (folder / "metrics.jsonl").exists() else []
    results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else {}
    return {"returncode": returncode, "seconds": seconds, "rows": rows, "results": results}


def summary(result: dict) -> dict:
    """One run's figures for the table and the plot."""
    rows = result["rows"]
    rl_start = rows[0]["time"] - rows[0]["timing/step"]  # the first step began RL
    minutes = (rows[-1]["time"] - rl_start) / 60
    first, last = rows[:10], rows[-10:]

    def mean(key, part):
        values = [r[key] for r in part if key in r]
        return statistics.fmean(values) if values else float("nan")

    curve = [(0.0, result["results"].get("accuracy/before_rl"))] + [
        ((r["time"] - rl_start) / 60, r["eval/pass@1/greedy"]) for r in rows if "eval/pass@1/greedy" in r]
    return {"before": result["results"].get("accuracy/before_rl"), "after": result["results"].get("accuracy/after_rl"),
            "gain_per_min": (mean("reward/mean", last) - mean("reward/mean", first)) / minutes,
            "length": mean("response_length/mean", last), "entropy": mean("learner/entropy", last),
            "step_s": statistics.median(r["timing/step"] for r in rows), "steps": len(rows), "minutes": minutes,
            "curve": curve}


def spread(values: list[float], digits: int) -> str:
    """mean +- half the range (a single value alone)."""
    mean = statistics.fmean(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.{digits}f}" + (f" +- {half:.{digits}f}" if len(values) > 1 else "")


def table(summaries: dict, minutes: float, seeds: int) -> str:
    lines = [f"RL budget {minutes:g} min per run, {seeds} seed(s) per cell (mean +- half the range); held-out "
             "greedy accuracy on the task's held-out split",
             "",
             "| task | variant | accuracy before RL | after | reward gained / min | response length | entropy "
             "| step (s) | steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (task, variant), runs in summaries.items():
        if not runs:
            lines.append(f"| {task} | {variant} | failed | | | | | | |")
            continue
        col = {k: [r[k] for r in runs] for k in runs[0] if k != "curve"}
        lines.append(f"| {task} | {variant} | {spread(col['before'], 3)} | {spread(col['after'], 3)} "
                     f"| {spread(col['gain_per_min'], 4)} | {spread(col['length'], 1)} | {spread(col['entropy'], 3)} "
                     f"| {spread(col['step_s'], 2)} | {spread(col['steps'], 0)} |")
    return "\n".join(lines)


def plot(summaries: dict, path: Path) -> None:
    """Held-out greedy accuracy against minutes of RL: one panel per task, a line per variant
    (the mean over seeds at each evaluation, at the seeds' mean time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for task, _ in summaries})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, variant), runs in summaries.items():
            if t != task or not runs:
                continue
            n = min(len(r["curve"]) for r in runs)  # the evaluations every seed reached
            xs = [statistics.fmean(r["curve"][i][0] for r in runs) for i in range(n)]
            ys = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(n)]
            xs.append(statistics.fmean(r["minutes"] for r in runs))  # after the last step: the same problems
            ys.append(statistics.fmean(r["after"] for r in runs))
            ax.plot(xs, ys, marker="o", markersize=3, label=variant)
        ax.set(title=task, xlabel="minutes of RL", ylabel="held-out accuracy (greedy)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def step_times(variants: list[str], steps: int, runs_dir: Path, extra: list[str]) -> str:
    """The --step-time table: each variant's median learn and step time against GRPO's."""
    got = {}
    # GRPO first and again last: the two runs' difference is the noise of the machine.
    for variant in ["grpo", *[v for v in variants if v != "grpo"], "grpo (again)"]:
        name = "steptime-" + variant.replace(" + ", "+").replace(" ", "_").replace("(", "").replace(")", "")
        result = run(name, runs_dir, [*COSTED[variant.removesuffix(" (again)")], f"algorithm.steps={steps}",
                                      "learner.lr=1e-12", "task.eval_prompts=0", "checkpoint.every=0", *extra])
        if result["returncode"] or not result["rows"]:
            continue
        rows = result["rows"][1:]  # the first step warms up
        got[variant] = {"learn": statistics.median(r["timing/learn"] for r in rows),
                        "step": statistics.median(r["timing/step"] for r in rows),
                        "rewards": [r["reward/mean"] for r in result["rows"]]}
    base = got["grpo"]
    lines = [f"{steps} steps per variant (the first left out), learner.lr=1e-12: the same batches for all",
             "", "| variant | learn (s) | vs grpo | step (s) | vs grpo | same samples |", "|---|---|---|---|---|---|"]
    for variant, g in got.items():
        lines.append(f"| {variant} | {g['learn']:.3f} | {g['learn'] / base['learn'] - 1:+.1%} | {g['step']:.3f} "
                     f"| {g['step'] / base['step'] - 1:+.1%} | {'yes' if g['rewards'] == base['rewards'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    from bench.machine import describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="", help=f"comma-separated, of: {', '.join(COSTED)} (default: "
                        f"{', '.join(VARIANTS)}; with --step-time, all)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of: {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=4.0, help="RL's wall-clock budget per run")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every this many steps")
    parser.add_argument("--runs-dir", default="runs/bench-algorithms")
    parser.add_argument("--plot", default="", help="write the accuracy-against-time plot here (a PNG)")
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for every run (key=value)")
    parser.add_argument("--reuse", action="store_true",
                        help="read back the runs that finished before in --runs-dir with the same overrides")
    parser.add_argument("--step-time", type=int, default=0, metavar="N",
                        help="measure each variant's step time over N steps instead (module docstring)")
    args = parser.parse_args()
    variants = args.variants.split(",") if args.variants else list(COSTED if args.step_time else VARIANTS)
    tasks = args.tasks.split(",")
    for name, known in (*((v, COSTED) for v in variants), *((t, TASKS) for t in tasks)):
        if name not in known:
            parser.error(f"{name!r} is not one of {', '.join(known)}")
    runs_dir = Path(args.runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    if args.step_time:
        print(describe("r1ray bench/algorithms.py " + " ".join(sys.argv[1:])))
        print(step_times(variants, args.step_time, runs_dir, args.set))
        return
    summaries = {}
    for task in tasks:
        starts = {}  # seed -> the cold-started model every variant's RL starts from
        for seed in range(args.seeds):
            start = run(f"{task}-start-{seed}", runs_dir, [*TASKS[task], f"algorithm.seed={seed}", "algorithm.steps=0",
                                                           *args.set], args.reuse)
            if start["returncode"]:
                sys.exit(f"algorithms: the cold start of {task} (seed {seed}) failed")
            starts[seed] = runs_dir / f"{task}-start-{seed}" / "model"
        runs = {variant: [] for variant in variants}
        # Seed by seed, the variants in turn, reversed for every other seed: a machine that speeds
        # up or slows down over the hours favours no variant.
        for seed in range(args.seeds):
            for variant in variants if seed % 2 == 0 else variants[::-1]:
                name = f"{task}-{variant}-{seed}".replace(" + ", "+").replace(" ", "_")
                overrides = [*TASKS[task], *COSTED[variant], f"algorithm.seed={seed}", f"model.path={starts[seed]}",
                             "cold_start.steps=0", f"algorithm.max_minutes={args.minutes}", "algorithm.steps=100000",
                             f"eval.every={args.eval_every}", "eval.k=1", "checkpoint.every=0", *args.set]
                result = run(name, runs_dir, overrides, args.reuse)
                if result["returncode"] == 0 and result["rows"]:
                    got = summary(result)
                    runs[variant].append(got)
                    print(f"algorithms: {name}: {got['steps']} steps in {got['minutes']:.1f} min of RL, "
                          f"accuracy {got['before']} -> {got['after']} ({result['seconds']:.0f} s in all)", flush=True)
        summaries.update({(task, variant): runs[variant] for variant in variants})
    print()
    print(describe("r1ray bench/algorithms.py " + " ".join(sys.argv[1:])))
    print(table(summaries, args.minutes, args.seeds))
    (runs_dir / "summaries.json").write_text(json.dumps({f"{t} | {v}": s for (t, v), s in summaries.items()}))
    if args.plot:
        plot(summaries, Path(args.plot))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
