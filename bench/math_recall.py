"""Recall of the math verifier on math-verify's own regression cases: how often
`rewards.math.verify` reaches the verdict math-verify's tests expect, next to math-verify
itself. Prints a markdown table, every disagreement, and the machine.

    .venv/bin/python bench/math_recall.py         # tests of the installed math-verify's sdist (PyPI)
    .venv/bin/python bench/math_recall.py PATH    # a checkout of huggingface/Math-Verify, or its tests/

The cases are the parametrized ones whose test compares with math-verify's default extraction
and nothing else, `compare_strings(gold, pred, match_types=["latex", "expr"])`: 127 in the
0.9.0 sdist, 121 on GitHub's main branch (six percent cases fewer). They are read from the
test files' syntax tree at run time, never imported or stored here. A prediction
that marks its own answer (a box, a "Final Answer:" line) is scored as written; any other is
wrapped in <answer> tags, as a policy on the R1 template writes it. Gold strings go to
`verify` as they are. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402  (bench/machine.py, beside this script)

DEFAULT_EXTRACTION = ["latex", "expr"]
# Verdicts, not speed, are measured here (bench/rewards.py times the verifier): time limits
# are generous so that a loaded machine does not turn slow verdicts into wrong ones.
TIMEOUT_S = 60


def sdist_tests() -> dict[str, str]:
    """{file name: source} of the tests in the PyPI sdist of the installed math-verify."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", f"math-verify=={version('math-verify')}",
                        "--no-binary", ":all:", "--no-deps", "--quiet", "-d", tmp], check=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as sdist:
            return {Path(m.name).name: sdist.extractfile(m).read().decode()
                    for m in sdist.getmembers() if m.isfile() and Path(m.name).parent.name == "tests"
                    and Path(m.name).name.startswith("test_") and m.name.endswith(".py")}


def checkout_tests(path: Path) -> dict[str, str]:
    folder = path / "tests" if (path / "tests").is_dir() else path
    return {f.name: f.read_text() for f in sorted(folder.glob("test_*.py"))}


def default_cases(sources: dict[str, str]) -> list[tuple[str, str, str, bool]]:
    """(test, gold, pred, expected) of every parametrized case compared with the default
    extraction only."""
    cases = []
    for name, source in sorted(sources.items()):
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, ast.FunctionDef) or not _compares_by_default(fn):
                continue
            for deco in fn.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize":
                    fields = [f.strip() for f in ast.literal_eval(deco.args[0]).split(",")]
                    for values in ast.literal_eval(deco.args[1]):
                        row = dict(zip(fields, values))
                        cases.append((f"{name}::{fn.name}", row["gold"], row["pred"], bool(row["expected"])))
    return cases


def _compares_by_default(fn: ast.FunctionDef) -> bool:
    """Whether the test's one comparison is `compare_strings(gold, pred, match_types=[latex, expr])`."""
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "compare_strings"]
    if len(calls) != 1:
        return False
    keywords = {k.arg: k.value for k in calls[0].keywords}
    match_types = keywords.get("match_types")
    return (len(calls[0].args) == 2 and set(keywords) <= {"match_types"}
            and (match_types is None or ast.literal_eval(match_types) == DEFAULT_EXTRACTION))


def math_verify_verdict(gold: str, pred: str) -> bool:
    """math-verify with the default extraction (boxes first), as its tests call it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    targets = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed, pred_parsed = (parse(text, targets, parsing_timeout=TIMEOUT_S) for text in (gold, pred))
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=TIMEOUT_S))


def main() -> None:
    import logging

    from rewards.math import check, extract_answer

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    origin = sys.argv[1] if len(sys.argv) > 1 else f"tests of the math-verify {version('math-verify')} sdist (PyPI)"
    sources = checkout_tests(Path(sys.argv[1])) if len(sys.argv) > 1 else sdist_tests()
    cases = default_cases(sources)
    if not cases:
        sys.exit(f"no test of math-verify's compares by default in {origin}")
    per_test: dict[str, list[int]] = {}
    missed = []
    for test, gold, pred, expected in cases:
        response = pred if extract_answer(pred) is not None else f"<answer>{pred}</answer>"
        score, reason = check(response, gold, timeout_s=TIMEOUT_S)
        ours, theirs = (score == 1.0) == expected, math_verify_verdict(gold, pred) == expected
        counts = per_test.setdefault(test, [0, 0, 0])
        counts[0] += 1
        counts[1] += ours
        counts[2] += theirs
        if not ours:
            missed.append((test, gold, pred, expected, reason))
    software = f"math-verify {version('math-verify')}, sympy {version('sympy')}"
    print(f"machine: {describe(software)}\n")
    print(f"### Agreement with math-verify's expected verdicts\n\ncases: {origin}\n")
    print("| test | cases | rewards.math.verify | math-verify |\n|---|---|---|---|")
    for test, (n, ours, theirs) in per_test.items():
        print(f"| {test} | {n} | {ours} | {theirs} |")
    totals = [sum(c[i] for c in per_test.values()) for i in range(3)]
    print(f"| **all** | **{totals[0]}** | **{totals[1]}** | **{totals[2]}** |")
    print("\n### Disagreements of rewards.math.verify\n\n| test | gold | prediction (end) | expected | verdict |\n"
          "|---|---|---|---|---|")
    for test, gold, pred, expected, reason in missed:
        cells = [test.split("::")[1], _cell(gold[:50]), _cell(pred[-70:]), str(int(expected)), _cell(reason)]
        print(f"| {' | '.join(cells)} |")


def _cell(text: str) -> str:
    """`text` as one markdown table cell."""
    return "`" + " ".join(text.split()).replace("|", "\\|").replace("`", "'") + "`"


if __name__ == "__main__":
    main()
