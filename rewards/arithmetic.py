"""Synthetic multi-digit arithmetic: problems with exact answers, their checker, SFT traces.

The smallest reasoning task with an exact verifier, sized for a ~3M-parameter policy trained
on a CPU: a cold-start SFT on `ArithmeticTask.reference_trace`, then GRPO with `check` (and
`rewards.format.format_reward`) as rule rewards. Difficulty is set by the digits per operand
and the number of operands.

Prompts are compact (`47+38=?`) because tokens drive speed. The template around them lives
in `rewards.format`.

Train/eval split: an operand tuple is held out for "eval" iff
`zlib.crc32(",".join(sorted operands)) % EVAL_BUCKETS == 0` (about 10%). The key is sorted so
that 38+47 is held out with 47+38 (addition commutes; seeing one would leak the other).
Both splits sample by rejection, so they are disjoint for every seed and every task config,
and crc32 (unlike `hash`) is stable across processes and Python versions.

Pure functions of strings: imports neither Ray nor torch (STYLE.md point 9).
"""

import random
import re
import zlib
from dataclasses import dataclass

from rewards.format import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, last_boxed

EVAL_BUCKETS = 10  # one operand tuple in EVAL_BUCKETS is held out
MAX_DIGITS = 20
MAX_OPERANDS = 8
OPERATIONS = ("+", "-")
SPLITS = ("train", "eval")
_MAX_REJECTIONS = 100_000  # per draw; only hit by configs with (almost) no valid tuples


@dataclass(frozen=True)
class ArithmeticProblem:
    """One question. `answer` is the exact gold integer as a string, e.g. "85".

    `id` is derived from the content (`add-47-38`), so the same problem has the same id in
    every run; two draws of the same operands share it.
    """

    id: str
    prompt: str
    answer: str
    operands: tuple[int, ...]


def in_eval_split(operands: tuple[int, ...]) -> bool:
    """Whether this operand tuple belongs to the held-out eval split (see module docstring)."""
    key = ",".join(str(x) for x in sorted(operands))
    return zlib.crc32(key.encode()) % EVAL_BUCKETS == 0


def check(response: str, problem_answer: str) -> tuple[float, str]:
    """1.0 iff the content of the LAST `<answer>...</answer>` (or, without one, of the last
    `\\boxed{}`: the chat template's answer) is the gold integer, else 0.0.

    The content must be an ASCII integer after stripping whitespace: an optional sign, then
    digits (leading zeros are fine). No commas, spaces or decimals: the task never needs
    them, and a strict parser cannot be gamed. Text outside the answer is never scored.
    The last answer counts because a model may restate or correct itself.
    """
    end = response.rfind(ANSWER_CLOSE)
    start = response.rfind(ANSWER_OPEN, 0, end) if end >= 0 else -1
    content = response[start + len(ANSWER_OPEN) : end] if start >= 0 else last_boxed(response)
    if content is None:
        return 0.0, "no answer tag"
    content = content.strip()
    if not _is_int(content):
        return 0.0, f"unparsable: {content[:30]!r}"
    if int(content) != int(problem_answer):
        return 0.0, f"wrong: got {int(content)}"
    return 1.0, "correct"


_NUMBER = re.compile(r"-?\d+")


def last_number(text: str) -> str | None:
    """The last integer anywhere in `text` (with its minus sign), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def check_last_number(response: str, problem_answer: str) -> tuple[float, str]:
    """1.0 iff the last integer anywhere in the response is the gold one: a lenient rule for
    models that do not mark their answers yet. Only the last number counts, so writing many
    numbers does not pay."""
    number = last_number(response)
    if number is None:
        return 0.0, "no number"
    if int(number) != int(problem_answer):
        return 0.0, f"wrong: last number {int(number)}"
    return 1.0, "correct"


def _is_int(text: str) -> bool:
    # Not int(): it also accepts "1_000" and non-ASCII digits such as "٨٥".
    digits = text[1:] if text[:1] in "+-" else text
    return digits.isascii() and digits.isdigit()


@dataclass(frozen=True)
class ArithmeticTask:
    """A generator of arithmetic problems. Each operand has between `min_digits` and
    `max_digits` digits (the count drawn uniformly, then the value; 1 digit includes 0)."""

    min_digits: int = 1
    """Fewest digits per operand, in [1, MAX_DIGITS]."""
    max_digits: int = 2
    """Most digits per operand, in [min_digits, MAX_DIGITS]."""
    num_operands: int = 2
    """Operands per problem, in [2, MAX_OPERANDS]."""
    operation: str = "+"
    """Either "+" or "-". For "-" the operands are ordered largest first and only tuples whose
    result is non-negative are kept, so answers are never negative."""
    direct_traces: float = 0.0
    """Share of problems whose reference trace states the answer at once, with no working
    (see `reference_trace`), in [0, 1]."""
    checked_traces: float = 0.0
    """Share whose trace states the hurried answer (`hurried_answer`: the columns without
    their carries or borrows), then checks it column by column and corrects it when the
    check disagrees; direct_traces + checked_traces <= 1, and the rest work it out column by
    column."""
    hurried_direct: bool = False
    """Whether direct traces state the hurried answer too (right only where no column
    carries or borrows) rather than the exact one: a corpus whose answers given at once are
    unreliable, as a base model's are on sums it cannot do in its head."""

    def __post_init__(self):
        if not 1 <= self.min_digits <= MAX_DIGITS:
            raise ValueError(
                f"min_digits={self.min_digits} is invalid; must be in [1, {MAX_DIGITS}]"
            )
        if not self.min_digits <= self.max_digits <= MAX_DIGITS:
            raise ValueError(
                f"max_digits={self.max_digits} is invalid; "
                f"must be in [min_digits={self.min_digits}, {MAX_DIGITS}]"
            )
        if not 2 <= self.num_operands <= MAX_OPERANDS:
            raise ValueError(
                f"num_operands={self.num_operands} is invalid; must be in [2, {MAX_OPERANDS}]"
            )
        if self.operation not in OPERATIONS:
            raise ValueError(
                f"operation={self.operation!r} is invalid; must be one of {OPERATIONS}"
            )
        for name in ("direct_traces", "checked_traces"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; must be in [0, 1]")
        if self.direct_traces + self.checked_traces > 1.0:
            raise ValueError(f"direct_traces={self.direct_traces} + checked_traces={self.checked_traces} "
                             "is above 1; they are shares of the same traces")

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[ArithmeticProblem]:
        """`n` problems drawn with replacement from `split`; deterministic given `rng`'s state."""
        _check_split(split)
        return [self._problem(self._draw(rng, split)) for _ in range(n)]

    def problems(self, seed: int, n: int, split: str) -> list[ArithmeticProblem]:
        """`n` distinct problems of `split`, the same list for the same seed and task.

        Distinct so that ids are unique within the list and an eval score is not weighted by
        repeats. Raises ValueError if the split has too few distinct problems; `sample`
        draws with replacement instead.
        """
        _check_split(split)
        rng = random.Random(seed)
        seen: set[tuple[int, ...]] = set()
        out: list[ArithmeticProblem] = []
        # Coupon collecting all k tuples of a small space takes ~k*ln(k) draws.
        for _ in range(50 * n + 1000):
            if len(out) == n:
                break
            operands = self._draw(rng, split)
            if operands not in seen:
                seen.add(operands)
                out.append(self._problem(operands))
        if len(out) < n:
            raise ValueError(
                f"found only {len(out)} distinct {split} problems for {self}, asked for n={n}; "
                "widen the task or use sample() to draw with replacement"
            )
        return out

    def reference_trace(self, problem: ArithmeticProblem) -> str:
        """A solution for cold-start SFT: what follows the prompt's `<think>`. Its style is a
        function of the problem's id (`trace_style`): a share `direct_traces` states the answer
        at once and commits to it, `85</think><answer>85</answer>` (with `hurried_direct`, the
        hurried answer `75</think><answer>75</answer>`); a share `checked_traces` states the
        hurried answer (`hurried_answer`: the columns without their carries), then checks it
        with the column-by-column working and keeps it where it was right (`46 wait, check:
        5+1=6 2+2=4 yes</think>...`) or corrects it (`75 wait, check: 7+8=15 4+3+1=8 no,
        85</think>...`); the rest are the working alone, described next.

        Column by column from the least significant digit, one step per column, separated by
        spaces. Addition writes the column's digits, then the carry if non-zero, and their
        sum; 47+38 gives `7+8=15 4+3+1=8</think><answer>85</answer>`, and the answer digits
        are the last digits of the step results read backwards, plus the final carry.
        Subtraction (first operand minus the rest) writes the top digit plus the 10s it
        borrows, the digits below it, then the borrow owed to the previous column if
        non-zero; 47-38 gives `17-8=9 4-3-1=0</think><answer>9</answer>`. Operands without a
        digit in a column are skipped; the answer has no leading zeros.
        """
        if _evaluate(self.operation, problem.operands) != int(problem.answer):
            raise ValueError(
                f"problem {problem.id} has answer {problem.answer}, which is not the result of "
                f"operation={self.operation!r} on {problem.operands}"
            )
        style = self.trace_style(problem)
        if style == "direct":
            stated = hurried_answer(self.operation, problem.operands) if self.hurried_direct else problem.answer
            return f"{stated}{THINK_CLOSE}{ANSWER_OPEN}{stated}{ANSWER_CLOSE}"
        answer = f"{THINK_CLOSE}{ANSWER_OPEN}{problem.answer}{ANSWER_CLOSE}"
        working = " ".join(_addition_steps(problem.operands) if self.operation == "+"
                           else _subtraction_steps(problem.operands))
        if style == "column":
            return working + answer
        guess = hurried_answer(self.operation, problem.operands)
        verdict = "yes" if guess == problem.answer else f"no, {problem.answer}"
        return f"{guess} wait, check: {working} {verdict}{answer}"

    def trace_style(self, problem: ArithmeticProblem) -> str:
        """"direct", "checked" or "column": which `reference_trace` the problem gets, drawn
        from the shares by a hash of its id (the same in every run and process)."""
        u = _unit_hash("style", problem.id)
        if u < self.direct_traces:
            return "direct"
        return "checked" if u < self.direct_traces + self.checked_traces else "column"

    def _draw(self, rng: random.Random, split: str) -> tuple[int, ...]:
        # Rejection sampling keeps the train distribution the same as without a split,
        # minus the held-out tuples.
        for _ in range(_MAX_REJECTIONS):
            operands = [self._draw_operand(rng) for _ in range(self.num_operands)]
            if self.operation == "-":
                operands.sort(reverse=True)
                if operands[0] < sum(operands[1:]):
                    continue
            if in_eval_split(tuple(operands)) == (split == "eval"):
                return tuple(operands)
        raise RuntimeError(f"no valid {split} problem in {_MAX_REJECTIONS} draws for {self}")

    def _draw_operand(self, rng: random.Random) -> int:
        # Digit count first, so 1-digit operands are as common as 2-digit ones.
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def _problem(self, operands: tuple[int, ...]) -> ArithmeticProblem:
        name = "add" if self.operation == "+" else "sub"
        return ArithmeticProblem(
            id=f"{name}-{'-'.join(str(x) for x in operands)}",
            prompt=f"{self.operation.join(str(x) for x in operands)}=?",
            answer=str(_evaluate(self.operation, operands)),
            operands=operands,
        )


def hurried_answer(operation: str, operands: tuple[int, ...]) -> str:
    """The answer of a solver who forgets carries and borrows: each column's result reduced to
    its last digit, except the leading column, written whole. 47+38 gives "75" (85), 47+68
    "105" (115), 52-38 "24" (14); it is right exactly when no column carries or borrows."""
    top = max(len(str(x)) for x in operands)
    digits = []
    for i in range(top):
        column = [d for d in (_column(x, i) for x in operands) if d is not None]
        result = sum(column) if operation == "+" else column[0] - sum(column[1:])
        digits.append(str(result if i == top - 1 else result % 10))
    return str(int("".join(reversed(digits))))


def _unit_hash(salt: str, key: str) -> float:
    """A number in [0, 1) fixed by `salt` and `key` (crc32: stable across processes)."""
    return zlib.crc32(f"{salt}:{key}".encode()) / 2**32


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; must be one of {SPLITS}")


def _evaluate(operation: str, operands: tuple[int, ...]) -> int:
    if operation == "+":
        return sum(operands)
    return operands[0] - sum(operands[1:])


def _column(x: int, i: int) -> int | None:
    """The digit of `x` in column `i` (0 = units), or None if `x` has fewer digits."""
    s = str(x)
    return int(s[-1 - i]) if i < len(s) else None


def _addition_steps(operands: tuple[int, ...]) -> list[str]:
    steps, carry = [], 0
    for i in range(max(len(str(x)) for x in operands)):
        terms = [d for d in (_column(x, i) for x in operands) if d is not None]
        if carry:
            terms.append(carry)
        total = sum(terms)
        steps.append(f"{'+'.join(str(t) for t in terms)}={total}")
        carry = total // 10  # can exceed 1 with three or more operands
    return steps


def _subtraction_steps(operands: tuple[int, ...]) -> list[str]:
    top, below = operands[0], operands[1:]
    steps, borrow = [], 0
    for i in range(len(str(top))):  # top >= sum(below), so it has the most digits
        terms = [d for d in (_column(x, i) for x in below) if d is not None]
        if borrow:
            terms.append(borrow)
        shortfall = sum(terms) - _column(top, i)
        borrow = max(0, -(-shortfall // 10))  # tens to borrow: ceil(shortfall / 10)
        minuend = _column(top, i) + 10 * borrow
        steps.append("-".join(str(t) for t in [minuend, *terms]) + f"={minuend - sum(terms)}")
    return steps
