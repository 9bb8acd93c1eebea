"""Knights and knaves: every generated puzzle has one solution, and the checker wants all of it."""

import itertools
import random

import pytest

from rewards.knights import KnightsProblem, KnightsTask, check


def _consistent(problem, assignment):
    """Re-derive each statement's truth from its text, independently of the generator."""
    kinds = dict(zip(problem.names, assignment))
    truths = []
    for s in problem.statements:
        words = s.split()
        a, b = words[0], words[2] if words[1] in ("and", "or") else None
        if b is None:
            truths.append(kinds[a] if s.endswith("knight") else not kinds[a])
        elif "both knights" in s:
            truths.append(kinds[a] and kinds[b])
        elif "is a knave" in s:
            truths.append(not kinds[a] or not kinds[b])
        elif "same kind" in s:
            truths.append(kinds[a] == kinds[b])
        else:
            truths.append(kinds[a] != kinds[b])
    return all(k == t for k, t in zip(assignment, truths))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_generated_puzzles_have_exactly_their_one_solution(n):
    rng = random.Random(n)
    for _ in range(20):
        p = KnightsTask(num_people=n).sample(rng)
        solutions = [a for a in itertools.product((True, False), repeat=n) if _consistent(p, a)]
        assert solutions == [p.knights]
        for name, s in zip(p.names, p.statements):  # never about oneself alone
            assert s not in (f"{name} is a knight", f"{name} is a knave")


P = KnightsProblem("p", ("Alice", "Bob", "Cara"), ("Bob is a knave", "Alice and Cara are of the same kind",
                                                    "Alice is a knight"), (True, False, True))


@pytest.mark.parametrize("answer, expected", [
    ("Alice is a knight, Bob is a knave, Cara is a knight", (1.0, "correct")),
    ("alice: knight; bob: knave; cara: knight", (1.0, "correct")),
    ("Alice is a knight, Bob is a knight, Cara is a knight", (0.0, "wrong about Bob")),
    ("Alice is a knight, Bob is a knave", (0.0, "says nothing about Cara")),
    ("Alice is a knight, Alice is a knave, Bob is a knave, Cara is a knight", (0.0, "contradicts itself about Alice")),
])
def test_checker(answer, expected):
    assert check(f"<think>...</think><answer>{answer}</answer>", P) == expected


def test_no_answer_and_bad_sizes():
    assert check("Alice is a knight, Bob is a knave, Cara is a knight", P) == (0.0, "no answer")
    with pytest.raises(ValueError, match="num_people=9 must be in 2..8"):
        KnightsTask(num_people=9)
