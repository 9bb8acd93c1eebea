"""Tasks: a prompt source paired with its checker, and the weighted mixture a run samples from.

    mixture = build_mixture(cfg.task)                    # the tasks whose weight is above 0
    problems = mixture.sample(rng, 16)                   # [Problem], tasks drawn by weight
    score, reason = mixture.tasks[p.task].check(response, p)

A `Problem` is the one record a task hands on: the question the policy sees (rendered by
`rewards.format.render_prompt`) and the task module's own record as `reference`, which is
all its checker reads (the gold number, the Countdown numbers and target, the knights'
solution, the unit tests). Problems travel from the driver to the reward workers with the
samples; the workers hold the same task objects and look the checker up by `Problem.task`.

Every task has a train and an eval split that never share a question: the synthetic tasks
hold out the problems whose key hashes into one bucket of ten (as `rewards.arithmetic`
does), a dataset task uses its eval file or holds out a tenth of its questions the same way.
`task.held_out(question)` says whether a question text is in a task's eval split, and
`mixture.held_out` whether any task's: every stage that trains drops such questions from its
data (`rewards.data.drop_held_out`), so nothing a run is evaluated on is trained on.

Checkers are pure functions of strings. They may be slow or hostile (sympy on a power
tower, a program that never ends): the reward worker, not the task, bounds their time.
"""

from __future__ import annotations

import dataclasses
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Protocol

from common.config import ConfigError
from rewards import arithmetic, code, countdown, knights, math
from rewards.arithmetic import EVAL_BUCKETS, SPLITS
from rewards.config import TaskConfig
from rewards.format import clean, final_answer


@dataclass(frozen=True)
class Problem:
    id: str
    """Unique within a step; the same question has the same id in every run."""
    task: str
    """Name of the task that made it and checks its answers (a key of `Mixture.tasks`)."""
    prompt: str
    """The question, before the R1 template."""
    reference: Any
    """What the task's checker compares an answer with: the task module's own record."""


class Task(Protocol):
    name: str

    def sample(self, rng: random.Random, split: str) -> Problem:
        """One problem of `split`, drawn with `rng`."""

    def problems(self, seed: int, n: int) -> list[Problem]:
        """`n` distinct held-out problems (fewer if a fixed dataset has fewer), the same
        list for the same seed."""

    def check(self, response: str, problem: Problem) -> tuple[float, str]:
        """(score in [0, 1], short reason) for one response."""

    def held_out(self, question: str) -> bool:
        """Whether `question` (a prompt as this task writes it, before the template; whitespace
        aside) is in this task's eval split. False for anything this task does not ask."""


HeldOut = Callable[[str], bool]
"""A run's held-out split, as a test of a question text (`Mixture.held_out`, or the union a
pipeline stage gets: the questions it is evaluated on and those of its own mixture)."""


def in_eval_bucket(key: str) -> bool:
    """Whether a question belongs to the eval split: its key hashes into one bucket of ten."""
    return zlib.crc32(key.encode()) % EVAL_BUCKETS == 0


def canonical(question: str) -> str:
    """The form questions are compared in: runs of whitespace made one space, ends stripped."""
    return " ".join(question.split())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; must be one of {SPLITS}")


def _draw(make: Callable[[], Problem], key: Callable[[Problem], str], split: str) -> Problem:
    """A problem from `make` that falls in `split` (rejection sampling keeps the train
    distribution the generator's own, minus the held-out tenth)."""
    _check_split(split)
    for _ in range(10_000):
        problem = make()
        if in_eval_bucket(key(problem)) == (split == "eval"):
            return problem
    raise RuntimeError(f"no {split} problem in 10000 draws")


# ---- the tasks ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arithmetic:
    """Multi-digit addition or subtraction (`rewards.arithmetic`); has reference traces."""

    generator: arithmetic.ArithmeticTask
    last_number: bool = False
    """Without a marked answer (<answer> or \\boxed{}), take the response's last number: for
    models too weak to mark answers yet (task.answer=last_number)."""
    spelled_out: bool = False
    """Ask "What is 47+38?" instead of the compact "47+38=?" (for chat models)."""
    name: str = "arithmetic"

    def sample(self, rng: random.Random, split: str) -> Problem:
        (p,) = self.generator.sample(rng, 1, split)
        return self._wrap(p)

    def problems(self, seed: int, n: int) -> list[Problem]:
        try:
            drawn = self.generator.problems(seed, n, "eval")
        except ValueError as err:  # fewer distinct held-out problems than asked (as `_distinct` says)
            raise ConfigError(f"task {self.name}: {err}; lower task.eval_prompts or the task's weight") from None
        return [self._wrap(p) for p in drawn]

    def _wrap(self, p: arithmetic.ArithmeticProblem) -> Problem:
        question = f"What is {p.prompt.removesuffix('=?')}?" if self.spelled_out else p.prompt
        return Problem(p.id, self.name, question, p)

    def check(self, response: str, problem: Problem) -> tuple[float, str]:
        if self.last_number and final_answer(clean(response)) is None:
            return arithmetic.check_last_number(clean(response), problem.reference.answer)
        return arithmetic.check(response, problem.reference.answer)

    def reference_trace(self, problem: Problem) -> str:
        """A worked solution for cold-start SFT (see `ArithmeticTask.reference_trace`)."""
        return self.generator.reference_trace(problem.reference)

    def held_out(self, question: str) -> bool:
        # Either wording ("47+38=?", "What is 47+38?"): data may come from a run with the other template.
        q = canonical(question)
        expression = q[len("What is "):-1] if q.startswith("What is ") and q.endswith("?") else q.removesuffix("=?")
        op = self.generator.operation
        if expression == q or not re.fullmatch(rf"\d+(?:{re.escape(op)}\d+)+", expression):
            return False
        return arithmetic.in_eval_split(tuple(int(x) for x in expression.split(op)))


@dataclass(frozen=True)
class Countdown:
    """Reach a target from given numbers with + - * / (`rewards.countdown`)."""

    generator: countdown.CountdownTask
    name: str = "countdown"

    def sample(self, rng: random.Random, split: str) -> Problem:
        key = lambda q: _countdown_key(q.reference.numbers, q.reference.target)  # noqa: E731
        return _draw(lambda: self._wrap(self.generator.sample(rng)), key, split)

    def problems(self, seed: int, n: int) -> list[Problem]:
        return _distinct(self, seed, n)

    def _wrap(self, p: countdown.CountdownProblem) -> Problem:
        return Problem(p.id, self.name, p.prompt, p)

    def check(self, response: str, problem: Problem) -> tuple[float, str]:
        return countdown.check(response, problem.reference)

    def held_out(self, question: str) -> bool:
        q = canonical(question)
        found = re.search(r"\[([\d, ]+)\].* (\d+)\.$", q)
        if found is None:
            return False
        numbers, target = tuple(int(x) for x in re.findall(r"\d+", found[1])), int(found[2])
        # Only a question this task writes: it must read back as the same prompt.
        same = countdown.CountdownProblem("", numbers, target).prompt == q
        return same and in_eval_bucket(_countdown_key(numbers, target))


def _countdown_key(numbers: tuple[int, ...], target: int) -> str:
    # Keyed like arithmetic: the same numbers in another order are the same question.
    return f"{sorted(numbers)}->{target}"


@dataclass(frozen=True)
class Knights:
    """Knights-and-knaves puzzles with a unique solution (`rewards.knights`)."""

    generator: knights.KnightsTask
    name: str = "knights"

    def sample(self, rng: random.Random, split: str) -> Problem:
        def make() -> Problem:
            p = self.generator.sample(rng)
            # The id carries random bits; the same puzzle is the same statements.
            return Problem("knights-" + _digest(p.prompt), self.name, p.prompt, p)
        return _draw(make, lambda q: q.prompt, split)

    def problems(self, seed: int, n: int) -> list[Problem]:
        return _distinct(self, seed, n)

    def check(self, response: str, problem: Problem) -> tuple[float, str]:
        return knights.check(response, problem.reference)

    def held_out(self, question: str) -> bool:
        q = canonical(question)  # generated prompts have single spaces: the key is unchanged
        said = re.findall(r'(\w+) says: "([^"]*)"', q)
        if not said:
            return False
        names, statements = zip(*said)
        same = knights.KnightsProblem("", names, statements, ()).prompt == q  # a puzzle this task writes
        return same and in_eval_bucket(q)


@dataclass(frozen=True)
class MathDataset:
    """Math word problems from a dataset (`rewards.data`), checked by `rewards.math`."""

    train: tuple[Problem, ...]
    eval: tuple[Problem, ...]
    name: str = "math"

    def sample(self, rng: random.Random, split: str) -> Problem:
        _check_split(split)
        return rng.choice(self.train if split == "train" else self.eval)

    def problems(self, seed: int, n: int) -> list[Problem]:
        return list(self.eval[:n])  # in file order

    def check(self, response: str, problem: Problem) -> tuple[float, str]:
        # In-process: the reward worker already runs this in a process it kills on overrun.
        return math.check(response, problem.reference, in_process=True)

    def held_out(self, question: str) -> bool:
        return canonical(question) in self._eval_questions

    @cached_property
    def _eval_questions(self) -> frozenset[str]:
        return frozenset(canonical(p.prompt) for p in self.eval)


CODE_PROMPT = ("Complete the Python function below. Give the whole function in a ```python "
               "block.\n{prompt}")


@dataclass(frozen=True)
class Code:
    """Programs run against unit tests in the sandbox (`rewards.code`); HumanEval's problems."""

    bank: tuple[code.CodeProblem, ...]
    """HumanEval's problems, both splits."""
    partial_credit: bool = False
    timeout_s: float = 5.0
    memory_mb: int = 512
    name: str = "code"

    def sample(self, rng: random.Random, split: str) -> Problem:
        make = lambda: self._wrap(rng.choice(self.bank))  # noqa: E731
        return _draw(make, lambda q: q.id, split)

    def problems(self, seed: int, n: int) -> list[Problem]:
        return [self._wrap(p) for p in self.bank if in_eval_bucket(p.id)][:n]

    def held_out(self, question: str) -> bool:
        problem_id = self._ids.get(canonical(question))
        return problem_id is not None and in_eval_bucket(problem_id)

    @cached_property
    def _ids(self) -> dict[str, str]:
        """Problem ids by question, as asked (CODE_PROMPT) and bare (HumanEval's own prompt)."""
        return {canonical(text): p.id for p in self.bank for text in (p.prompt, CODE_PROMPT.format(prompt=p.prompt))}

    def _wrap(self, p: code.CodeProblem) -> Problem:
        return Problem(p.id, self.name, CODE_PROMPT.format(prompt=p.prompt), p)

    def check(self, response: str, problem: Problem) -> tuple[float, str]:
        return code.check(response, problem.reference, fraction=self.partial_credit,
                          timeout_s=self.timeout_s, memory_mb=self.memory_mb)


@dataclass(frozen=True)
class General:
    """Prompts with no rule verifier (R1's general data: writing, QA, ...), from a JSONL of
    prompt/response rows. In RL the preference model scores their answers (`verifier` is
    False); `check` compares the final answer with a row's optional "answer" field, which
    only evaluation reads."""

    train: tuple[Problem, ...]
    eval: tuple[Problem, ...]
    name: str = "general"
    verifier: bool = False

    def sample(self, rng: random.Random, split: str) -> Problem:
        _check_split(split)
        return rng.choice(self.train if split == "train" else self.eval)

    def problems(self, seed: int, n: int) -> list[Problem]:
        return list(self.eval[:n])

    def check(self, response: str, problem: Problem) -> tuple[float, str]:
        if problem.reference is None:
            return 0.0, "no reference answer"
        got = final_answer(clean(response))
        if got is None:
            return 0.0, "no answer tag"
        if got.strip() != problem.reference:
            return 0.0, f"differs: {got.strip()[:30]!r}"
        return 1.0, "matches the reference"

    def held_out(self, question: str) -> bool:
        return canonical(question) in self._eval_questions

    @cached_property
    def _eval_questions(self) -> frozenset[str]:
        return frozenset(canonical(p.prompt) for p in self.eval)


def _digest(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


# ---- the mixture -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mixture:
    """Tasks with sampling weights; each prompt's task is drawn by weight."""

    tasks: dict[str, Task]
    weights: dict[str, float]
    exclude: HeldOut | None = None
    """Questions held out beyond the tasks' own eval splits (a pipeline's evaluation set):
    never drawn for training."""

    def sample(self, rng: random.Random, n: int, split: str = "train", names: list[str] | None = None,
               weights: dict[str, float] | None = None) -> list[Problem]:
        """`n` problems of `split`, drawn with replacement (from `names` only, if given; by
        `weights` instead of the mixture's, if given)."""
        names = names or list(self.tasks)
        if len(names) == 1:  # no draw: a single task's problems do not depend on the mixture
            return [self._draw(rng, names[0], split) for _ in range(n)]
        weights = weights or self.weights
        picks = rng.choices(names, [weights[t] for t in names], k=n)
        return [self._draw(rng, t, split) for t in picks]

    def held_out(self, question: str) -> bool:
        """Whether `question` is in the eval split of any task of the mixture."""
        return any(task.held_out(question) for task in self.tasks.values())

    def excluded(self, question: str) -> bool:
        """Whether `question` may not be trained on: held out here or by `exclude`."""
        return self.held_out(question) or (self.exclude is not None and self.exclude(question))

    def _draw(self, rng: random.Random, name: str, split: str) -> Problem:
        # A task's own train split never holds its own eval questions; another task's (or the
        # pipeline's) may, rarely: such a draw is drawn again.
        for _ in range(10_000):
            problem = self.tasks[name].sample(rng, split)
            if split == "eval" or not self.excluded(problem.prompt):
                return problem
        raise RuntimeError(f"task {name}: no train problem outside the held-out split in 10000 draws")

    def eval_problems(self, seed: int, n: int, avoid: HeldOut | None = None) -> list[Problem]:
        """`n` distinct held-out problems, shared out over the tasks by weight (each task at
        least one), the same list for the same seed and config. `avoid`: questions left out,
        each task's list drawn on past them (a pipeline's RL stage validates on held-out
        problems its table does not report; fewer where a fixed dataset runs out)."""
        total = sum(self.weights.values())
        names = list(self.tasks)
        counts = Counter({t: max(1, round(n * self.weights[t] / total)) for t in names}) if n else Counter()
        return [p for t in names for p in self._held_out_problems(t, seed, counts[t], avoid)]

    def _held_out_problems(self, name: str, seed: int, n: int, avoid: HeldOut | None) -> list[Problem]:
        # A task's list for a seed grows by appending, so drawing as many more as were avoided
        # until no more are keeps the first `n` it has outside `avoid`.
        skipped = 0
        while True:
            drawn = self.tasks[name].problems(seed, n + skipped)
            kept = [p for p in drawn if avoid is None or not avoid(p.prompt)]
            if len(kept) >= n or len(drawn) < n + skipped:  # enough, or the task has no more
                return kept[:n]
            skipped = len(drawn) - len(kept)

    def with_traces(self) -> list[str]:
        """The tasks that can write reference traces for cold-start SFT."""
        return [t for t, task in self.tasks.items() if hasattr(task, "reference_trace")]


def without_verifier(tasks: dict[str, Task]) -> list[str]:
    """The names of the tasks whose answers only a preference model can score."""
    return [name for name, task in tasks.items() if not getattr(task, "verifier", True)]


def _distinct(task: Task, seed: int, n: int) -> list[Problem]:
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            return out
        p = task.sample(rng, "eval")
        if p.id not in seen:
            seen.add(p.id)
            out.append(p)
    if len(out) < n:
        raise ConfigError(f"task {task.name} has only {len(out)} distinct held-out problems, asked for {n}; "
                          "lower task.eval_prompts or the task's weight")
    return out


def build_mixture(cfg: TaskConfig, held_out: HeldOut | None = None, what: str = "") -> Mixture:
    """The tasks of `cfg` whose weight is above 0, built and checked (datasets loaded).

    No train problem is in the eval split of a task of the mixture or in `held_out` (e.g. the
    questions a pipeline evaluates on): dataset tasks drop such train rows (e.g. GSM8K
    questions that are also in its test file), saying how many with `what` (the stage) when
    given; synthetic tasks draw again (`Mixture.exclude`)."""
    tasks: dict[str, Task] = {}
    c = cfg.arithmetic
    if c.weight > 0:
        tasks["arithmetic"] = Arithmetic(arithmetic.ArithmeticTask(
            min_digits=c.min_digits, max_digits=c.max_digits, num_operands=c.num_operands, operation=c.operation,
            direct_traces=c.direct_traces, checked_traces=c.checked_traces,
            hurried_direct=c.hurried_direct),
            last_number=cfg.answer == "last_number", spelled_out=cfg.template == "chat")
    if cfg.countdown.weight > 0:
        c = cfg.countdown
        tasks["countdown"] = Countdown(countdown.CountdownTask(c.num_numbers, c.max_number, c.max_target))
    if cfg.knights.weight > 0:
        tasks["knights"] = Knights(knights.KnightsTask(cfg.knights.num_people))
    if cfg.math.weight > 0:
        tasks["math"] = _math_dataset(cfg)
    if cfg.code.weight > 0:
        from rewards import sandbox

        missing = sandbox.available()
        if missing:
            raise ConfigError(f"task.code.weight={cfg.code.weight:g} needs the code sandbox: {missing}")
        c = cfg.code
        tasks["code"] = Code(tuple(code.humaneval_problems()), c.partial_credit, c.timeout_s, c.memory_mb)
    if cfg.general.weight > 0:
        tasks["general"] = _general(cfg)
    weights = {t: getattr(cfg, t).weight for t in tasks}
    excluded = Mixture(dict(tasks), weights, held_out).excluded  # reads the tasks' eval splits only
    for name, path in (("math", cfg.math.path), ("general", cfg.general.path)):
        if name in tasks:
            tasks[name] = _without_held_out(tasks[name], excluded, name, path, what)
    return Mixture(tasks, weights, held_out)


def _without_held_out(task: MathDataset | General, excluded: HeldOut, name: str, path: str,
                      what: str) -> MathDataset | General:
    """`task` with no train row that `excluded` claims (reported when `what` names the stage)."""
    from rewards.data import DatasetError, drop_held_out

    try:
        train = drop_held_out(list(task.train), excluded, what and f"{what} (task.{name})", path,
                              question=lambda p: p.prompt)
    except DatasetError as err:
        raise ConfigError(f"task.{name}: {err}") from None
    return dataclasses.replace(task, train=tuple(train))


def _general(cfg: TaskConfig) -> General:
    from rewards.data import DatasetError, read_jsonl

    def load(path: str) -> list[Problem]:
        try:
            rows = read_jsonl(path, ("prompt", "response"), "task.general")
        except DatasetError as err:
            raise ConfigError(str(err)) from None
        return [Problem(str(r.get("id", f"general-{_digest(r['prompt'])}")), "general", r["prompt"],
                        str(r["answer"]).strip() if "answer" in r else None) for r in rows]

    train = load(cfg.general.path)
    if cfg.general.eval_path:
        evals = load(cfg.general.eval_path)
    else:
        evals = [p for p in train if in_eval_bucket(p.prompt)]
        train = [p for p in train if not in_eval_bucket(p.prompt)]
    if not train or not evals:
        raise ConfigError(f"task.general: {cfg.general.path} leaves {len(train)} train and {len(evals)} "
                          "held-out prompts; give more rows or task.general.eval_path")
    return General(tuple(train), tuple(evals))


def _math_dataset(cfg: TaskConfig) -> MathDataset:
    from rewards.data import DatasetError, load_problems

    c = cfg.math

    def load(source: str, split: str) -> list[Problem]:
        try:
            rows = load_problems(source, c.format, split=split, prompt_field=c.prompt_field or None,
                                 answer_field=c.answer_field or None, limit=c.limit or None)
        except DatasetError as err:
            raise ConfigError(f"task.math: {err}") from None
        return [Problem(p.id, "math", p.prompt, p.answer) for p in rows]

    train = load(c.path, c.split)
    if c.eval_path:
        evals = load(c.eval_path, c.eval_split)
    else:  # hold out a tenth of the questions
        evals = [p for p in train if in_eval_bucket(p.prompt)]
        train = [p for p in train if not in_eval_bucket(p.prompt)]
    for name, rows in (("train", train), ("eval", evals)):
        if not rows:
            raise ConfigError(f"task.math: the {name} split of {c.path} is empty; give more rows "
                              "or task.math.eval_path")
    return MathDataset(tuple(train), tuple(evals))
