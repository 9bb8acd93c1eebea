"""Countdown: reach a target number from given numbers with + - * / (TinyZero's R1-Zero task).

    task = CountdownTask(num_numbers=4)
    problem = task.sample(random.Random(0))
    check("<answer>(25 - 5) * 3 + 1</answer>", problem)   # -> (1.0, "correct") if it is

Rules, as in the TV game: each given number may be used at most once, only + - * / and
parentheses, exact arithmetic (fractions are exact, division by zero is wrong). Every
generated problem is solvable: the target is the value of a random expression over the
numbers. The difficulty knob is how many numbers there are and how large.

Pure functions of strings: imports neither Ray nor torch.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from rewards.format import clean, final_answer

MAX_EXPRESSION_CHARS = 200
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


@dataclass(frozen=True)
class CountdownProblem:
    id: str
    numbers: tuple[int, ...]
    target: int

    @property
    def prompt(self) -> str:
        nums = ", ".join(map(str, self.numbers))
        return (f"Using the numbers [{nums}], each at most once, and + - * /, "
                f"write an expression equal to {self.target}.")


@dataclass(frozen=True)
class CountdownTask:
    num_numbers: int = 4
    """How many numbers a problem gives (the main difficulty knob)."""
    max_number: int = 25
    """Numbers are drawn from 1..max_number."""
    max_target: int = 1000

    def __post_init__(self):
        if not 2 <= self.num_numbers <= 8:
            raise ValueError(f"num_numbers={self.num_numbers} must be in 2..8")
        if self.max_number < 1:
            raise ValueError(f"max_number={self.max_number} must be at least 1")

    def sample(self, rng: random.Random) -> CountdownProblem:
        """A solvable problem: the target is the value of a random expression over the numbers."""
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            value = _random_value(rng, list(numbers))
            if value.denominator == 1 and 1 <= value <= self.max_target:
                numbers_t = tuple(numbers)
                return CountdownProblem(f"countdown-{'-'.join(map(str, numbers_t))}-{int(value)}",
                                        numbers_t, int(value))


def _random_value(rng: random.Random, numbers: list[int]) -> Fraction:
    """Combine the numbers pairwise with random operations until one value is left."""
    values = [Fraction(n) for n in numbers]
    while len(values) > 1:
        a, b = values.pop(rng.randrange(len(values))), values.pop(rng.randrange(len(values)))
        op = rng.choice([ast.Add, ast.Sub, ast.Mult] + ([ast.Div] if b else []))
        values.append(_OPS[op](a, b))
    return values[0]


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """The exact value of an arithmetic expression and the numbers it uses; ValueError if it is
    anything else (names, calls, powers, floats, ...)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None
    used: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        what = type(node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node).__name__
        raise ValueError(f"{what} is not allowed (only numbers, + - * / and parentheses)")

    try:
        return walk(tree.body), used
    except ZeroDivisionError:
        raise ValueError("division by zero") from None


def check(response: str, problem: CountdownProblem) -> tuple[float, str]:
    """(1.0 or 0.0, reason): does the last <answer> reach the target with the given numbers?"""
    answer = final_answer(clean(response))
    if answer is None:
        return 0.0, "no answer"
    expression = answer.split("=")[0]  # "3 * 4 = 12" is fine
    try:
        value, used = evaluate(expression)
    except ValueError as err:
        return 0.0, f"invalid: {err}"
    extra = Counter(used) - Counter(problem.numbers)
    if extra:
        return 0.0, f"uses {sorted(extra.elements())} beyond the given numbers"
    if value != problem.target:
        return 0.0, f"wrong: {expression.strip()[:40]} = {value}"
    return 1.0, "correct"
