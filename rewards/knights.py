"""Knights and knaves: a logic-puzzle family with a unique answer and an exact checker.

Knights always tell the truth, knaves always lie. Each inhabitant makes one statement about
the others; the solver says who is which:

    <answer>Alice is a knight, Bob is a knave, Cara is a knight</answer>

Every generated puzzle has exactly one consistent assignment (checked by trying all 2^n).
The difficulty knob is the number of inhabitants (2 to 8). Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import Callable

from rewards.format import clean, final_answer

NAMES = ("Alice", "Bob", "Cara", "Dan", "Eve", "Finn", "Gina", "Hugo")
_CLAIM = re.compile(r"\b([A-Z][a-z]+)\b[^A-Za-z]*(?:is\s+)?(?:an?\s+)?\b(knight|knave)s?\b", re.IGNORECASE)


@dataclass(frozen=True)
class KnightsProblem:
    id: str
    names: tuple[str, ...]
    statements: tuple[str, ...]
    """What each inhabitant says, in order of `names`."""
    knights: tuple[bool, ...]
    """The unique solution: True for a knight."""

    @property
    def prompt(self) -> str:
        said = " ".join(f'{n} says: "{s}"' for n, s in zip(self.names, self.statements))
        return (f"Knights always tell the truth and knaves always lie. {said} "
                f"Who is a knight and who is a knave?")


def _statements(n: int) -> list[tuple[str, Callable[[tuple[bool, ...]], bool], set[int]]]:
    """Candidate statements over inhabitants 0..n-1: (text with {i} slots filled, truth, subjects)."""
    out = []
    for i in range(n):
        out.append((f"{NAMES[i]} is a knight", lambda a, i=i: a[i], {i}))
        out.append((f"{NAMES[i]} is a knave", lambda a, i=i: not a[i], {i}))
    for i, j in itertools.combinations(range(n), 2):
        out += [
            (f"{NAMES[i]} and {NAMES[j]} are both knights", lambda a, i=i, j=j: a[i] and a[j], {i, j}),
            (f"{NAMES[i]} or {NAMES[j]} is a knave", lambda a, i=i, j=j: not a[i] or not a[j], {i, j}),
            (f"{NAMES[i]} and {NAMES[j]} are of the same kind", lambda a, i=i, j=j: a[i] == a[j], {i, j}),
            (f"{NAMES[i]} and {NAMES[j]} are of different kinds", lambda a, i=i, j=j: a[i] != a[j], {i, j}),
        ]
    return out


@dataclass(frozen=True)
class KnightsTask:
    num_people: int = 3
    """Inhabitants per puzzle (2 to 8): the difficulty knob."""

    def __post_init__(self):
        if not 2 <= self.num_people <= len(NAMES):
            raise ValueError(f"num_people={self.num_people} must be in 2..{len(NAMES)}")

    def sample(self, rng: random.Random) -> KnightsProblem:
        """A puzzle with exactly one solution (statements redrawn until it is unique)."""
        n = self.num_people
        pool = _statements(n)
        while True:
            # Nobody speaks of themselves alone ("I am a knight" says nothing; "I am a knave" is
            # a paradox), but "Bob and I are of the same kind" is fine.
            chosen = [rng.choice([s for s in pool if s[2] != {i}]) for i in range(n)]
            solutions = [a for a in itertools.product((True, False), repeat=n)
                         if all(a[i] == truth(a) for i, (_, truth, _) in enumerate(chosen))]
            if len(solutions) == 1:
                knights = solutions[0]
                key = "".join("K" if k else "N" for k in knights)
                return KnightsProblem(f"knights-{n}-{rng.getrandbits(32):08x}-{key}", NAMES[:n],
                                      tuple(text for text, _, _ in chosen), knights)


def check(response: str, problem: KnightsProblem) -> tuple[float, str]:
    """(1.0 or 0.0, reason): does the last <answer> name everyone's kind correctly?"""
    answer = final_answer(clean(response))
    if answer is None:
        return 0.0, "no answer"
    said: dict[str, bool] = {}
    for name, kind in _CLAIM.findall(answer[:2000]):
        name = name.capitalize()
        if name in problem.names:
            if name in said and said[name] != (kind.lower() == "knight"):
                return 0.0, f"contradicts itself about {name}"
            said[name] = kind.lower() == "knight"
    missing = [n for n in problem.names if n not in said]
    if missing:
        return 0.0, f"says nothing about {', '.join(missing)}"
    wrong = [n for n, k in zip(problem.names, problem.knights) if said[n] != k]
    return (0.0, f"wrong about {', '.join(wrong)}") if wrong else (1.0, "correct")
