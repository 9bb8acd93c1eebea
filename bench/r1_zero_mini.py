"""R1-Zero in miniature (configs/r1-zero-mini.yaml): does pure RL raise accuracy, response length
and the share of answers that check their work together, and are the longer answers the right
ones? One real `r1ray train` run, then its curves as a table and a plot.

    .venv/bin/python bench/r1_zero_mini.py                    # run the config, then report
    .venv/bin/python bench/r1_zero_mini.py --run runs/x       # report on a finished run
    .venv/bin/python bench/r1_zero_mini.py --set algorithm.seed=1 --plot bench/r1_zero_mini.png
    .venv/bin/python bench/r1_zero_mini.py --run runs/r1-zero-x --window 8   # any run, e.g. configs/r1-zero.yaml's

The table: per window of steps, the training reward's correct and format parts, the mean
response length in tokens, `rollout/reflection_rate` (answers whose reasoning says "wait", "let me check", ...:
here the checked traces' "wait, check:") and the held-out evaluations that fall in the window
(greedy and sampled pass@1, `eval.every`). Then held-out accuracy by answer length before RL
and after (the k sampled answers per problem, `eval.length_buckets`).
"""

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

CONFIG = REPO / "configs/r1-zero-mini.yaml"


def train(overrides: list[str], runs_dir: Path) -> Path:
    """Run the config; returns the run folder."""
    name = f"r1-zero-mini-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "r1ray", "train", "--config", str(CONFIG), *overrides, f"cluster.runs_dir={runs_dir}",
           f"logging.run_name={name}", "logging.wandb_mode=disabled"]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return runs_dir / name


def curve_table(rows: list[dict], results: dict, window: int) -> str:
    lines = ["| steps | correct | format | response tokens | reflection rate | held-out greedy "
             "| held-out pass@1 (sampled) |",
             "|---|---|---|---|---|---|---|",
             f"| before RL | | | | | {results.get('accuracy/before_rl', float('nan')):.3f} "
             f"| {results.get('accuracy/before_rl/pass@1', float('nan')):.3f} |"]
    for start in range(0, len(rows), window):
        part = rows[start:start + window]

        def mean(key, digits):
            values = [r[key] for r in part if key in r]
            return f"{statistics.fmean(values):.{digits}f}" if values else ""

        lines.append(f"| {part[0]['step']}-{part[-1]['step']} | {mean('reward/correct', 3)} "
                     f"| {mean('reward/format', 3)} | {mean('response_length/mean', 1)} "
                     f"| {mean('rollout/reflection_rate', 3)} | {mean('eval/pass@1/greedy', 3)} "
                     f"| {mean('eval/pass@1', 3)} |")
    return "\n".join(lines)


def length_table(results: dict) -> str:
    buckets = sorted({k.split("/")[3] for k in results if "/by_length/" in k}, key=lambda b: int(b.split("-")[0]))
    lines = ["| answer tokens | share before RL | accuracy before RL | share after RL | accuracy after RL |",
             "|---|---|---|---|---|"]
    for b in buckets:
        cells = []
        for when in ("before_rl", "after_rl"):
            share, acc = results.get(f"accuracy/{when}/by_length/{b}/share"), results.get(
                f"accuracy/{when}/by_length/{b}/pass@1")
            cells += [f"{share:.3f}" if share is not None else "",
                      f"{acc:.3f}" if acc is not None and acc == acc else "-"]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    for when in ("before_rl", "after_rl"):
        lines.append("")
        lines.append(f"{when}: greedy {results.get(f'accuracy/{when}', float('nan')):.3f}, sampled pass@1 "
                     f"{results.get(f'accuracy/{when}/pass@1', float('nan')):.3f}")
    return "\n".join(lines)


def main() -> None:
    from bench.machine import describe
    from cluster.plot import plot

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="", help="a finished run folder to report on (default: run the config)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for the run (key=value)")
    parser.add_argument("--runs-dir", default="runs/bench-r1-zero-mini")
    parser.add_argument("--window", type=int, default=10, help="steps per table row")
    parser.add_argument("--plot", default="", help="also write the run's curves here (a PNG)")
    args = parser.parse_args()
    start = time.monotonic()
    run = Path(args.run) if args.run else train(args.set, Path(args.runs_dir).resolve())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    results = json.loads((run / "results.json").read_text())
    print()
    print(describe("r1ray bench/r1_zero_mini.py " + " ".join(sys.argv[1:])))
    if not args.run:
        print(f"run {run.name}: {(time.monotonic() - start) / 60:.1f} min end to end")
    print()
    print(curve_table(rows, results, args.window))
    print()
    print(length_table(results))
    if args.plot:
        print(f"plot: {plot(run, Path(args.plot))}")


if __name__ == "__main__":
    main()
