"""Chaos: the default job run twice with the same seed, once untouched and once while its actors
are killed at random moments, as the OOM killer would (SIGKILL); does the faulted run finish,
with the same numbers, and at what cost in time?

    .venv/bin/python bench/chaos.py                          # 10 kills of engines and reward workers
    .venv/bin/python bench/chaos.py --kinds engine,reward,learner --kills 6
    .venv/bin/python bench/chaos.py --set algorithm.steps=60 cold_start.steps=50   # a shortened job

The reference run goes first; its RL phase's wall time T sets the moments of the faulted run's
kills: `--kills` moments drawn uniformly (seed `--seed`) in the first 85% of T after the first
step is logged. At each, one actor of a kind drawn from `--kinds` is chosen at random among the
run's live processes of that kind (found by walking the driver's process tree for Ray's process
titles: ray::RolloutActor, ray::RewardWorker, ray::Learner) and sent SIGKILL. Its phase is read
from the same title, which names the method the actor is in (ray::RolloutActor.generate_stream,
.stage_weights, .commit_weights ...; no method: idle).

The table: kills by kind and phase; whether the run finished; the wall time of each run (start
to exit, the same command) and the faulted run's overhead; steps of work lost (a learner's death
resumes from the newest checkpoint: the steps logged since it are done again; an engine's or
worker's death redoes part of one step, counted as 0); whether every metric the runs log is
identical but for the clock and the fault counts (tests/test_e2e.py, `same_work`), and so
are the held-out accuracies (results.json). Both runs have the same config but for
`rollout.max_restarts`, `rewards.max_restarts` and `cluster.auto_resume`, set to the number
of kills (restart budgets change no number).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TITLES = {"engine": "ray::RolloutActor", "reward": "ray::RewardWorker", "learner": "ray::Learner"}
TIMED = ("time", "timing/", "throughput/", "sync/gb_per_s", "faults/")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, walking /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return ""


def actors_of(driver: int, kind: str) -> list[tuple[int, str]]:
    """(pid, phase) of the driver's live actors of `kind`; phase: the method in the title, or idle."""
    prefix = TITLES[kind]
    out = []
    for pid in descendants(driver):
        name = title(pid)
        if name == prefix or name.startswith(prefix + "."):
            method = name.removeprefix(prefix).lstrip(".").split("(")[0].strip()
            out.append((pid, method or "idle"))
    return out


def run(name: str, runs_dir: Path, overrides: list[str], killer=None) -> dict:
    """One `r1ray train` of the default job; `killer(proc, run_dir)` runs beside it."""
    cmd = [sys.executable, "-m", "r1ray", "train", *overrides, f"cluster.runs_dir={runs_dir}",
           f"logging.run_name={name}", "logging.wandb_mode=disabled", "logging.progress=false"]
    log = (runs_dir / f"{name}.log").open("w")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    kills = killer(proc, runs_dir / name) if killer else []
    proc.wait()
    log.close()
    rows = []
    metrics = runs_dir / name / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    results = runs_dir / name / "results.json"  # held-out accuracy before and after RL
    return {"returncode": proc.returncode, "seconds": time.monotonic() - start, "rows": rows, "kills": kills,
            "results": json.loads(results.read_text()) if results.exists() else None,
            "log": (runs_dir / f"{name}.log").read_text()}


def first_step_time(proc: subprocess.Popen, run_dir: Path) -> float | None:
    """When the run logged its first step (time.monotonic()), or None if it ended first."""
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and metrics.stat().st_size:
            return time.monotonic()
        time.sleep(0.2)
    return None


def last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def chaos(kills: int, kinds: list[str], span: float, rng: random.Random):
    """A killer for `run`: `kills` SIGKILLs at moments drawn in [0, span] after the first step."""
    def killer(proc: subprocess.Popen, run_dir: Path) -> list[dict]:
        t0 = first_step_time(proc, run_dir)
        if t0 is None:  # the run ended before its first step
            return []
        moments = sorted(rng.uniform(0, span) for _ in range(kills))
        done = []
        for moment in moments:
            while proc.poll() is None and time.monotonic() < t0 + moment:
                time.sleep(0.05)
            if proc.poll() is not None:
                break
            kind = rng.choice(kinds)
            live = actors_of(proc.pid, kind)
            if not live:
                continue
            pid, phase = rng.choice(live)
            step = last_step(run_dir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            done.append({"kind": kind, "phase": phase, "after_step": step, "at_s": time.monotonic() - t0})
            print(f"chaos: SIGKILL {kind} (pid {pid}, {phase}) after step {step}", flush=True)
        return done
    return killer


def same_work(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in rows]


def steps_lost(result: dict) -> int:
    """Steps logged before a learner's death that the resumed run did again."""
    lost = 0
    resumes = [int(line.split("resuming from step-")[1][:6]) for line in result["log"].splitlines()
               if "resuming from step-" in line and "fault: learner" in line]
    deaths = [k["after_step"] for k in result["kills"] if k["kind"] == "learner"]
    for died_after, resumed_from in zip(deaths, resumes):
        lost += max(0, died_after - resumed_from)
    return lost


def main() -> None:
    from bench.machine import describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--kinds", default="engine,reward", help="comma-separated: engine, reward, learner")
    parser.add_argument("--seed", type=int, default=0, help="of the kill moments and victims")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides for both runs")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / time.strftime("chaos-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    bad = [k for k in kinds if k not in TITLES]
    if bad:
        parser.error(f"--kinds: {', '.join(bad)} not one of {', '.join(TITLES)}")
    args.out.mkdir(parents=True)
    budget = [f"rollout.max_restarts={args.kills}", f"rewards.max_restarts={args.kills}",
              f"cluster.auto_resume={args.kills}"]
    overrides = [*args.set, *budget]

    print(f"chaos: reference run ({args.out}/reference.log)", flush=True)
    first: dict = {}

    def clock(proc, run_dir):  # the reference's RL phase: from its first step to its exit
        first["t"] = first_step_time(proc, run_dir)
        return []

    reference = run("reference", args.out, overrides, clock)
    rl_seconds = time.monotonic() - first["t"] if first.get("t") else reference["seconds"]
    print(f"chaos: faulted run, {args.kills} kills of {', '.join(kinds)} ({args.out}/faulted.log)", flush=True)
    faulted = run("faulted", args.out, overrides, chaos(args.kills, kinds, 0.85 * rl_seconds,
                                                         random.Random(args.seed)))

    by = Counter((k["kind"], k["phase"]) for k in faulted["kills"])
    finished = faulted["returncode"] == 0 and reference["returncode"] == 0
    identical = finished and same_work(faulted["rows"]) == same_work(reference["rows"]) \
        and faulted["results"] == reference["results"]
    overhead = faulted["seconds"] / reference["seconds"] - 1
    logged = faulted["log"].count("r1ray: fault: ")  # a line of Ray's output may precede one
    status = "yes" if finished else f"no (exit {faulted['returncode']})"
    print()
    print("| kills (kind: phase x count) | finished | reference (s) | faulted (s) | overhead | steps lost "
          "| metrics identical |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {'; '.join(f'{k}: {p} x{n}' for (k, p), n in sorted(by.items())) or 'none'} "
          f"| {status} | {reference['seconds']:.0f} "
          f"| {faulted['seconds']:.0f} | {overhead:+.1%} | {steps_lost(faulted)} | {'yes' if identical else 'no'} |")
    print()
    print(f"faults the run reported: {logged} (r1ray: fault: lines in {args.out}/faulted.log)")
    print(f"steps: {len(reference['rows'])} reference, {len(faulted['rows'])} faulted; "
          f"overrides: {' '.join(overrides)}; kill seed {args.seed}")
    print(f"machine: {describe('r1ray bench/chaos.py')}")


if __name__ == "__main__":
    main()
