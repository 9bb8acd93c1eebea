"""Countdown: generated problems are solvable, and the checker accepts only exact solutions
that use the given numbers at most once."""

import random
from fractions import Fraction

import pytest

from rewards.countdown import CountdownProblem, CountdownTask, check, evaluate

P = CountdownProblem("p", (25, 5, 3, 1), 61)


@pytest.mark.parametrize("answer, expected", [
    ("(25 - 5) * 3 + 1", (1.0, "correct")),
    ("3 * (25 - 5) + 1 = 61", (1.0, "correct")),
    ("25 * 3 - 5 * 3 + 1", (0.0, "uses [3] beyond the given numbers")),
    ("(25 - 5) * 3", (0.0, "wrong: (25 - 5) * 3 = 60")),
    ("61", (0.0, "uses [61] beyond the given numbers")),
    ("2 ** 6 - 3", (0.0, "invalid: Pow is not allowed (only numbers, + - * / and parentheses)")),
    ("__import__('os')", (0.0, "invalid: Call is not allowed (only numbers, + - * / and parentheses)")),
    ("-25 + 5 * 3 + 1", (0.0, "invalid: USub is not allowed (only numbers, + - * / and parentheses)")),
    ("25.0 + 36", (0.0, "invalid: Constant is not allowed (only numbers, + - * / and parentheses)")),
    ("25 +", (0.0, "invalid: not an arithmetic expression")),
    ("1" * 300, (0.0, "invalid: expression longer than 200 characters")),
])
def test_checker(answer, expected):
    assert check(f"<think>try</think><answer>{answer}</answer>", P) == expected


def test_no_answer_and_division_by_zero():
    assert check("(25 - 5) * 3 + 1", P) == (0.0, "no answer")
    assert check("<answer>25 / (3 - 3)</answer>", CountdownProblem("q", (25, 3, 3), 1)) == (
        0.0, "invalid: division by zero")
    assert evaluate("(25 - 5) / 3") == (pytest.approx(20 / 3), [25, 5, 3])


def _reachable(values, target):
    """Brute force, independent of the generator: can some of `values` combine to `target`?"""
    if any(v == target for v in values):
        return True
    for i in range(len(values)):
        for j in range(len(values)):
            if i == j:
                continue
            a, b, rest = values[i], values[j], [v for k, v in enumerate(values) if k not in (i, j)]
            results = [a + b, a - b, a * b] + ([a / b] if b else [])
            if any(_reachable(rest + [r], target) for r in results):
                return True
    return False


@pytest.mark.parametrize("num_numbers", [3, 4])
def test_generated_problems_can_be_solved(num_numbers):
    rng = random.Random(1)
    for _ in range(10):
        p = CountdownTask(num_numbers=num_numbers).sample(rng)
        assert _reachable([Fraction(n) for n in p.numbers], p.target), p


def test_bad_difficulty_names_the_value():
    with pytest.raises(ValueError, match="num_numbers=1 must be in 2..8"):
        CountdownTask(num_numbers=1)
    with pytest.raises(ValueError, match="max_number=0 must be at least 1"):
        CountdownTask(max_number=0)


@pytest.mark.parametrize("num_numbers", [3, 4, 6])
def test_generated_problems_are_deterministic_and_in_range(num_numbers):
    task = CountdownTask(num_numbers=num_numbers)
    a = [task.sample(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]  # the same seed, the same problem
    rng = random.Random(0)
    for _ in range(50):
        p = task.sample(rng)
        assert len(p.numbers) == num_numbers and 1 <= p.target <= task.max_target
        assert str(p.target) in p.prompt and all(str(n) in p.prompt for n in p.numbers)


def test_a_boxed_expression_is_read_like_a_tagged_one():
    assert check("so \\boxed{(25 - 5) * 3 + 1}", P) == (1.0, "correct")
