"""`r1ray plot RUN_DIR`: reward, response length, reflection rate, KL and held-out curves from a run's metrics.jsonl,
drawn to a PNG with matplotlib (no W&B needed).

    r1ray plot runs/grpo-20261127-101500            # writes runs/grpo-.../curves.png
    r1ray plot runs/x --out x.png --smooth 20
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# (title, [(metric, label)]): one panel each; metrics a run did not log are left out.
PANELS = [
    ("reward", [("reward/mean", "mean"), ("reward/correct", "correct"), ("reward/format", "format")]),
    ("response length (tokens)", [("response_length/mean", "mean"), ("response_length/max", "max")]),
    ("reflection", [("rollout/reflection_rate", "answers that check their work")]),
    ("KL to the reference", [("learner/kl", "k3 KL")]),
    ("held-out evaluation", [("eval/pass@1/greedy", "pass@1 greedy"), ("eval/pass@1", "pass@1")]),
    # Reward hacking shows here as it happens: the reward model's score rising while the answers
    # that match the reference (which no reward reads) fall, in training and held out.
    ("general task: reward model against the reference", [
        ("reward/preference", "reward-model score"), ("task/general/correct", "matches the reference"),
        ("eval/pass@1/greedy/general", "held out, greedy")]),
]


def at_rl_start(metric: str) -> str:
    """The results.json key of a held-out curve's value as RL began ("" for a training curve):
    held-out curves start at step 0 with it, so a curve shows what RL changed, not only what it
    reached (results.json is written when the run finishes)."""
    if metric.startswith("eval/pass@1/greedy"):  # per task: eval/pass@1/greedy/<task>
        return "accuracy/before_rl" + metric.removeprefix("eval/pass@1/greedy")
    return "accuracy/before_rl/" + metric.removeprefix("eval/") if metric.startswith("eval/") else ""


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run folder (it holds metrics.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}: line {n} is not JSON") from None
    if not rows:
        raise ValueError(f"{path} has no steps yet")
    return rows


def series(rows: list[dict], metric: str, results: dict) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric`; a held-out curve begins with its value at RL's start (step 0),
    where `results` (results.json) has one."""
    points = [(r["step"], r[metric]) for r in rows if metric in r]
    start = results.get(at_rl_start(metric))
    if start is not None and start == start:  # NaN: no held-out set
        points.insert(0, (0, start))
    steps, values = np.array(points, dtype=float).T
    return steps, values


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (fewer at the start)."""
    if window <= 1:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def plot(run_dir: Path, out: Path | None = None, window: int = 10) -> Path:
    """Draw the run's curves; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    finished = Path(run_dir) / "results.json"
    results = json.loads(finished.read_text()) if finished.is_file() else {}
    tasks = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("task/")})
    panels = [(title, list(curves) + ([(f"task/{t}/reward", t) for t in tasks] if title == "reward" and len(tasks) > 1
                                      else [])) for title, curves in PANELS]
    panels = [(t, [(m, l) for m, l in s if any(m in r for r in rows)]) for t, s in panels]
    panels = [(t, s) for t, s in panels if s]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, curves) in zip(axes[:, 0], panels):
        for metric, label in curves:
            steps, values = series(rows, metric, results)
            sparse = metric.startswith("eval/")  # a few points: draw them as they are
            ax.plot(steps, values if sparse else smooth(values, window), marker="o" if sparse else None,
                    label=label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(f"GRPO step (trailing mean over {window} steps)" if window > 1 else "GRPO step")
    fig.suptitle(Path(run_dir).resolve().name)
    fig.tight_layout()
    out = out or Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
