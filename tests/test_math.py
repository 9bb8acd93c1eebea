"""The math verifier: extraction that never scores the whole text, equivalence across answer
forms, and hostile model output that must come back False, fast, without blocking."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewards.math import MathVerifier, check, extract_answer, verify

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("response, expected", [
    ("<think>2+2</think><answer>4</answer>", "4"),
    ("<answer>3</answer> then <answer> 5 </answer>", "5"),  # the last one
    ("so \\boxed{\\frac{1}{2}} or rather \\boxed{\\frac{\\sqrt{3}}{\\{2\\}}}", "\\frac{\\sqrt{3}}{\\{2\\}}"),
    ("work\n#### 1,234\n", "1,234"),
    ("<answer>7</answer> and \\boxed{8}", "7"),  # tags win over boxes
    ("the answer is 42", None),  # no marked answer: never the whole text
    ("\\boxed{\\frac{1}{2", None),  # unterminated box
    ("", None),
    ("\\boxed{1}, \\boxed{2} and \\boxed{3}", "1, 2, 3"),  # boxes that give one answer together
    ("\\boxed{1}. Wait, that is wrong: \\boxed{2}", "2"),  # a correction stands alone
    ("\\boxed{6}. Final Answer: The final answer is $7$. I hope it is correct.", "$7$"),  # the later marker
    ("Final Answer: the area is $\\boxed{8}$.", "8"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("answer, gold", [
    ("42", "42"), ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"), ("1,000", "1000"), ("$5.00", "5"),
    ("\\$5", "5"), ("5 cm", "5"), ("50\\%", "50"), ("x = 3", "3"), ("(B)", "B"), ("-0.25", "-\\frac{1}{4}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("2\\pi", "2\\pi"), ("x^2+2x+1", "(x+1)^2"),
    ("(1,2)", "(1,2)"), ("\\{1,2\\}", "\\{2,1\\}"), ("[0,1)", "[0,1)"), ("3^{2}", "9"),
])
def test_equivalent_answers_are_correct(answer, gold):
    assert check(f"<answer>{answer}</answer>", gold) == (1.0, "correct")


@pytest.mark.parametrize("answer, gold", [
    ("41", "42"), ("3x", "3"), ("C", "B"), ("(1,2)", "(2,1)"), ("[0,1)", "[0,1]"), ("0.333", "1/3"),
    ("\\sqrt{2}", "2"), ("x+1", "x-1"),
])
def test_different_answers_are_wrong(answer, gold):
    score, reason = check(f"<answer>{answer}</answer>", gold)
    assert score == 0.0 and reason.startswith("wrong"), reason


@pytest.mark.parametrize("response, reason", [
    ("", "no answer"),
    ("<answer></answer>", "empty answer"),
    ("x" * 1_000_000, "no answer"),  # 1 MB
    ("<answer>" + "1" * 5000 + "</answer>", "answer too long"),
    (b"\xff\xfe\x00<answer>7\x00</answer>", "correct"),  # invalid UTF-8 and NUL bytes
    ("<answer>" + "{" * 400 + "1" + "}" * 400 + "</answer>", None),  # deep nesting
])
def test_hostile_output_is_scored_fast_with_a_reason(response, reason):
    start = time.monotonic()
    score, why = check(response, "7" if isinstance(response, bytes) else "1")
    assert time.monotonic() - start < 15  # unbounded, sympy takes minutes on some of these
    if reason is not None:
        assert why.startswith(reason), why


def test_a_runaway_verification_is_killed_and_the_pool_keeps_going():
    verifier = MathVerifier(workers=1)
    try:
        tower = "9^" * 40 + "9"  # sympy would try to evaluate this for a very long time
        start = time.monotonic()
        (score, reason), = verifier.check_many([(tower, "1")], timeout_s=2.0)
        assert (score, reason) == (0.0, "timeout: no verdict within 2s")
        assert time.monotonic() - start < 15
        # The killed worker was replaced: the next verdicts still come.
        assert verifier.check_many([("x^2+2x+1", "(x+1)^2"), ("x+1", "x")], timeout_s=10) == [
            (1.0, "correct"), (0.0, "wrong: got 'x+1'")]
    finally:
        verifier.close()


@pytest.mark.parametrize("response, gold", [
    ("the roots are \\boxed{-1}, \\boxed{4} and \\boxed{7}.", "\\{7, -1, 4\\}"),
    ("so x = \\boxed{0.5} or x = \\boxed{-2}", "-2, \\frac{1}{2}"),
    ("the pairs are \\boxed{(0, 5)} \\quad\\text{and}\\quad \\boxed{(5, 0)}", "(5, 0), (0, 5)"),
])
def test_several_boxes_give_one_answer_together(response, gold):
    assert check(response, gold) == (1.0, "correct")


def test_hedging_over_several_boxes_is_not_rewarded():
    assert check("\\boxed{11} or \\boxed{12}", "12")[0] == 0.0  # today the last box alone would count


@pytest.mark.parametrize("answer, gold, score", [
    ("y = 2, x = -1", "x = -1, y = 2", 1.0),
    ("b = \\frac{1}{3}; a = 6", "a = 6, b = 1/3", 1.0),
    ("x = 2, y = -1", "x = -1, y = 2", 0.0),
])
def test_a_set_of_equations_is_compared_in_any_order(answer, gold, score):
    assert check(f"<answer>{answer}</answer>", gold)[0] == score


def test_a_minerva_final_answer_line_is_read_but_bare_prose_is_not():
    minerva = "the area is 3/4 of the square.\nFinal Answer: The final answer is $\\frac{3}{4}$. I hope it is correct."
    assert check(minerva, "0.75") == (1.0, "correct")
    # A box earlier in the work is not the answer when the final line comes after it.
    assert check("the first leg is \\boxed{12} km. Final Answer: The final answer is $15$. I hope it is correct.",
                 "15") == (1.0, "correct")
    assert check("...\nFinal Answer: The final answer is 2,048.", "2048") == (1.0, "correct")
    for prose in ["The final answer is 15.", "so my final answer: 15", "15 is correct, I hope it is correct."]:
        assert check(prose, "15") == (0.0, "no answer")


def test_verify_is_the_boolean_of_check():
    assert verify("<answer>\\frac{2}{4}</answer>", "0.5") is True
    assert verify("0.5", "0.5") is False  # unmarked


@pytest.mark.parametrize("module", ["rewards.math", "rewards.language", "rewards.countdown", "rewards.knights",
                                    "rewards.code", "rewards.sandbox", "rewards.format", "rewards.arithmetic"])
def test_verifiers_import_neither_ray_nor_torch(module):
    code = f"import sys, {module}; print(sorted({{'ray', 'torch'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_crashed_worker_is_replaced():
    import os

    verifier = MathVerifier(workers=1)
    try:
        crash = verifier.pool.schedule(os._exit, args=(1,))  # a worker process dying outright
        with pytest.raises(Exception):
            crash.result(timeout=30)
        assert verifier.check_many([("x^2", "x*x")], timeout_s=10) == [(1.0, "correct")]
    finally:
        verifier.close()
