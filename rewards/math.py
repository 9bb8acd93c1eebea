"""The math verifier: find the final answer in a response and decide if it equals the gold one.

    extract_answer(response) -> str | None      the last <answer>...</answer>, else the last
                                                \\boxed{...} (with the boxes just before it that
                                                complete it: "\\boxed{1}, \\boxed{2}") or Minerva
                                                "Final Answer: ..." line, whichever comes later,
                                                else a GSM8K "#### N" line
    verify(response, gold) -> bool              equivalence, within a hard time limit
    check(response, gold) -> (score, reason)    the same, with a short verdict
    canonical_answer(answer) -> str             one key per class of equal numbers or letters

No answer found means no answer: the whole text is never scored (models learn to spray
numbers when it is). Equivalence is decided in two steps:

1. A fast exact path in this process for the common cases: numbers (integers, decimals,
   fractions, thousands separators, currency and unit decorations, `x = 3`) compared as
   exact rationals, and multiple-choice letters.
2. Everything else (LaTeX, symbolic expressions, tuples, intervals, sets) goes to
   math-verify (sympy underneath) in a worker process that is killed when it overruns:
   math-verify's own time limits use `signal.alarm`, which does nothing in threads, and
   sympy can spin for minutes on a power tower. A killed worker is replaced and the answer
   scores False with the reason "timeout".

Model output is arbitrary: bytes are decoded with replacement, NUL bytes dropped, and
only the last `MAX_RESPONSE_CHARS` characters are searched, so a 1 MB response costs
milliseconds. Answers longer than `MAX_ANSWER_CHARS` are refused before any parsing.

Pure Python plus math-verify: imports neither Ray nor torch.
"""

from __future__ import annotations

import re
from fractions import Fraction

from rewards.format import MAX_RESPONSE_CHARS, clean, final_answer  # noqa: F401  (documented above)

MAX_ANSWER_CHARS = 1_000
TIMEOUT_S = 3.0

# A GSM8K-style final line, "#### 72" (also how GSM8K stores its gold answers).
GSM8K_RE = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_CHOICE_RE = re.compile(r"^\(?([A-J])\)?[.:]?$")


def extract_answer(response: str | bytes) -> str | None:
    """The response's final answer, or None when it gives none."""
    text = clean(response)
    marked = final_answer(text)
    if marked is not None:
        return marked.strip()
    gsm8k = GSM8K_RE.findall(text)
    return gsm8k[-1] if gsm8k else None


def check(response: str | bytes, gold: str, timeout_s: float = TIMEOUT_S, *,
          in_process: bool = False) -> tuple[float, str]:
    """(1.0 or 0.0, reason): is the response's final answer equivalent to `gold`?

    `in_process` runs math-verify here, with no time limit of its own: only for a caller
    that already runs this in a process it kills on overrun (the reward worker does).
    """
    answer = extract_answer(response)
    if answer is None:
        return 0.0, "no answer"
    if not answer:
        return 0.0, "empty answer"
    if len(answer) > MAX_ANSWER_CHARS:
        return 0.0, f"answer too long ({len(answer)} characters)"
    fast = _fast_equal(answer, gold)
    if fast is not None:
        return (1.0, "correct") if fast else (0.0, f"wrong: got {answer[:40]!r}")
    if in_process:
        _warm()
        return (1.0, "correct") if _sympy_equal(answer, gold) else (0.0, f"wrong: got {answer[:40]!r}")
    return _verifier().check(answer, gold, timeout_s)


def verify(response: str | bytes, gold: str, timeout_s: float = TIMEOUT_S) -> bool:
    """Whether the response's final answer is equivalent to `gold` (False on timeout)."""
    return check(response, gold, timeout_s)[0] == 1.0


def canonical_answer(answer: str) -> str:
    """A key shared by answers the fast path finds equal, for votes: a number as an exact
    rational ("0.5", "1/2", "\\frac{1}{2}" -> "1/2"), a choice letter ("(B)" -> "B"), any other
    answer without its whitespace. Equivalences only sympy sees ("2\\pi" vs "\\pi \\cdot 2")
    keep separate keys: a vote never waits on a worker process."""
    choice = _CHOICE_RE.match(answer.strip())
    if choice:
        return choice[1]
    number = _number(answer) if len(answer) <= MAX_ANSWER_CHARS else None
    return str(number) if number is not None else "".join(answer.split())


# ---- the fast exact path ---------------------------------------------------------------------

# Currency, percent, LaTeX spacing, \text{...} units, and a trailing unit word ("5 cm").
_DECORATION = re.compile(r"\\\$|\$|\\%|%|\\[,!;: ]|\\(?:text|mathrm)\{[^{}]*\}|\s[A-Za-z]+\.?$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


def _number(text: str) -> Fraction | None:
    """`text` as an exact rational if it is plainly a number (with decorations), else None."""
    s = text.strip()
    if s.count("=") == 1:  # "x = 3": the right-hand side; several equations go to sympy
        s = s.split("=")[1]
    s = _DECORATION.sub("", s).strip()
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)  # thousands separators
    s = s.replace(" ", "")
    frac = re.fullmatch(r"\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}", s)
    if frac:
        s = f"{frac[1]}/{frac[2]}"
    if not _NUMBER.match(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _fast_equal(answer: str, gold: str) -> bool | None:
    """True/False when both sides are plain numbers or choice letters; None to ask sympy."""
    choice = _CHOICE_RE.match(gold.strip())
    if choice:
        got = _CHOICE_RE.match(answer.strip())
        return bool(got) and got[1] == choice[1]
    a, g = _number(answer), _number(gold)
    if a is not None and g is not None:
        return a == g
    return None


# ---- math-verify in killable worker processes ----------------------------------------------

def _sympy_equal(answer: str, gold: str) -> bool:
    """math-verify's verdict, run inside a worker process (may take arbitrarily long)."""
    from math_verify import parse, verify as mv_verify

    def parsed(text: str):
        return parse(text if "$" in text or "\\boxed" in text else f"${text}$", parsing_timeout=None)

    target, reference = parsed(answer), parsed(gold)
    return bool(reference and target and mv_verify(reference, target, timeout_seconds=None))


def _warm() -> None:
    """Worker start: import math-verify once (~0.7 s) and silence its notes about the time
    limits we switched off (this process's lifetime is the time limit)."""
    import logging

    import math_verify  # noqa: F401

    logging.getLogger("math_verify").setLevel(logging.ERROR)


class MathVerifier:
    """A pool of worker processes for `_sympy_equal`, each call bounded by a hard timeout.

    A call that overruns has its worker killed (pebble replaces it); the others keep going.
    Workers are spawned, not forked (the parent may be a threaded Ray worker), so a script
    that verifies at top level needs the usual `if __name__ == "__main__":` guard.
    """

    def __init__(self, workers: int = 1):
        import multiprocessing

        from pebble import ProcessPool

        self.pool = ProcessPool(max_workers=workers, initializer=_warm,
                                context=multiprocessing.get_context("spawn"))

    def check(self, answer: str, gold: str, timeout_s: float = TIMEOUT_S) -> tuple[float, str]:
        return self.check_many([(answer, gold)], timeout_s)[0]

    def check_many(self, pairs: list[tuple[str, str]], timeout_s: float = TIMEOUT_S) -> list[tuple[float, str]]:
        """Verdicts for (answer, gold) pairs, run in parallel on the pool's workers."""
        from concurrent.futures import TimeoutError as FutureTimeout

        futures = [self.pool.schedule(_sympy_equal, args=pair, timeout=timeout_s) for pair in pairs]
        out = []
        for (answer, _), future in zip(pairs, futures):
            try:
                ok = future.result()
            except FutureTimeout:
                out.append((0.0, f"timeout: no verdict within {timeout_s:g}s"))
                continue
            except Exception as err:  # a worker that crashed, or a parser error
                out.append((0.0, f"error: {type(err).__name__}"))
                continue
            out.append((1.0, "correct") if ok else (0.0, f"wrong: got {answer[:40]!r}"))
        return out

    def close(self) -> None:
        self.pool.stop()
        self.pool.join()


_default: MathVerifier | None = None


def _verifier() -> MathVerifier:
    """This process's verifier pool, started on first use."""
    global _default
    if _default is None:
        _default = MathVerifier()
    return _default
