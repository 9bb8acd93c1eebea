"""A toy stand-in for R1's general (non-reasoning) data, sized for a tiny model: put a few
digits in ascending order.

    rows = sft_rows(random.Random(0), 2000)        # {"id", "prompt", "response", "answer"}
    pairs = preference_pairs(random.Random(1), 2000) # {"id", "prompt", "chosen", "rejected"}

R1 trained on writing, factual QA and translation, whose answers no rule can check; its final
RL stage scored them with a preference model. Sorting has a rule, which is why it suits a
miniature: the pipeline never uses it as a reward. The task enters RL as `task.general`
(scored by the reward model trained on `preference_pairs`), and only evaluation compares
answers with the rows' "answer" field, so the table can show what each stage did to it.
A rejected answer is a near miss: the right digits out of order, or one digit replaced.

Pure functions: imports neither Ray nor torch.
"""

from __future__ import annotations

import random

from rewards.format import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE

REASONING = "in order"
"""The short reasoning every answer carries (the R1 format asks for a non-empty think block)."""


def _question(rng: random.Random) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]


def answer_text(digits: list[int]) -> str:
    """What follows the prompt's <think> for the answer `digits`."""
    return f"{REASONING}{THINK_CLOSE}{ANSWER_OPEN}{' '.join(map(str, digits))}{ANSWER_CLOSE}"


def prompt_of(digits: list[int]) -> str:
    return "sort " + " ".join(map(str, digits))


def sft_rows(rng: random.Random, n: int) -> list[dict]:
    """`n` prompt/response rows with the right answer (and it again as "answer")."""
    rows = []
    for i in range(n):
        digits = _question(rng)
        right = sorted(digits)
        rows.append({"id": f"sort-{i}", "prompt": prompt_of(digits), "response": answer_text(right),
                     "answer": " ".join(map(str, right))})
    return rows


def near_miss(digits: list[int], rng: random.Random) -> list[int]:
    """A wrong answer close to the right one: the right digits with two out of order (when
    they differ), or in order but with one digit replaced, so that neither sortedness nor
    the digits alone tell the answers apart."""
    right = sorted(digits)
    wrong = list(right)
    if len(set(right)) > 1 and rng.random() < 0.5:
        while wrong == right:
            i, j = rng.sample(range(len(wrong)), 2)
            wrong[i], wrong[j] = wrong[j], wrong[i]
        return wrong
    i = rng.randrange(len(wrong))
    wrong[i] = rng.choice([d for d in range(10) if d != wrong[i]])
    return sorted(wrong)


def preference_pairs(rng: random.Random, n: int) -> list[dict]:
    """`n` (prompt, chosen, rejected) rows: the right answer against a near miss."""
    pairs = []
    for i in range(n):
        digits = _question(rng)
        pairs.append({"id": f"sort-pair-{i}", "prompt": prompt_of(digits),
                      "chosen": answer_text(sorted(digits)), "rejected": answer_text(near_miss(digits, rng))})
    return pairs
