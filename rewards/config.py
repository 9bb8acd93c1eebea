"""The rewards' config sections: the task mixture (`task.*`) and the reward workers (`rewards.*`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from common.config import ConfigError, option


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    weight: float = option(1.0, lo=0.0)
    """Share of prompts from this task (weights are relative; 0 leaves the task out)."""
    min_digits: int = option(1, lo=1, hi=12)
    """Smallest number of digits of an operand."""
    max_digits: int = option(2, lo=1, hi=12)
    """Largest number of digits of an operand."""
    num_operands: int = option(2, lo=2, hi=6)
    """Operands per problem."""
    operation: str = option("+", choices=("+", "-"))
    """The arithmetic operation."""
    direct_traces: float = option(0.0, lo=0.0, hi=1.0)
    """Share of cold-start traces that state the answer at once, with no working ("85</think>...")."""
    checked_traces: float = option(0.0, lo=0.0, hi=1.0)
    """Share of cold-start traces that state the hurried answer (the columns without their
    carries: "75" for 47+38), then check it column by column ("75 wait, check: ...") and correct
    it where it was wrong. The rest of the traces (1 - direct - checked) work the answer out
    column by column (rewards/arithmetic.py)."""
    hurried_direct: bool = option(False)
    """Direct traces state the hurried answer too, right only where no column carries: a corpus
    whose answers given at once are unreliable."""

    def __post_init__(self) -> None:
        if self.min_digits > self.max_digits:
            raise ConfigError(f"task.arithmetic.min_digits={self.min_digits} must be <= "
                              f"task.arithmetic.max_digits={self.max_digits}")
        if self.direct_traces + self.checked_traces > 1:
            raise ConfigError(f"task.arithmetic.direct_traces={self.direct_traces:g} + "
                              f"task.arithmetic.checked_traces={self.checked_traces:g} is above 1: they are "
                              "shares of the same cold-start traces")


@dataclass(frozen=True)
class CountdownTaskConfig:
    weight: float = option(0.0, lo=0.0)
    """Share of prompts: reach a target from given numbers with + - * /."""
    num_numbers: int = option(4, lo=2, hi=8)
    """Numbers per problem (the difficulty knob)."""
    max_number: int = option(25, lo=1)
    """Numbers are drawn from 1..max_number."""
    max_target: int = option(1000, lo=1)
    """Largest target."""


@dataclass(frozen=True)
class KnightsTaskConfig:
    weight: float = option(0.0, lo=0.0)
    """Share of prompts: knights-and-knaves logic puzzles with a unique solution."""
    num_people: int = option(3, lo=2, hi=8)
    """Inhabitants per puzzle (the difficulty knob)."""


@dataclass(frozen=True)
class MathTaskConfig:
    weight: float = option(0.0, lo=0.0)
    """Share of prompts: math word problems from a dataset, checked by the math verifier."""
    path: str = option("")
    """Train problems: a local .jsonl/.json/.parquet file, or a hub dataset name (online only)."""
    format: str = option("gsm8k", choices=("gsm8k", "math"))
    """Row layout: gsm8k (question, answer ending in "#### N") or math (problem, solution
    with a final \\boxed{})."""
    prompt_field: str = option("")
    """Field holding the question, if not the format's own."""
    answer_field: str = option("")
    """Field holding the plain gold answer, if not the format's own solution field."""
    split: str = option("train")
    """Hub datasets only: the split of `path` to train on."""
    eval_path: str = option("")
    """Held-out problems; empty holds out a tenth of `path`'s questions."""
    eval_split: str = option("test")
    """Hub datasets only: the split of `eval_path`."""
    limit: int = option(0, lo=0)
    """Read at most this many rows of each file (0: all)."""


@dataclass(frozen=True)
class CodeTaskConfig:
    weight: float = option(0.0, lo=0.0)
    """Share of prompts: HumanEval functions, run against their tests in the sandbox."""
    partial_credit: bool = option(False)
    """Score the share of passing test cases instead of all-or-nothing."""
    timeout_s: float = option(5.0, lo=0.0, lo_open=True)
    """Wall-clock limit of one program's run (must be below rewards.timeout_s)."""
    memory_mb: int = option(512, lo=16)
    """Address-space limit of one program's run."""


@dataclass(frozen=True)
class GeneralTaskConfig:
    weight: float = option(0.0, lo=0.0)
    """Share of prompts with no rule verifier (R1's general data): scored in RL by the
    preference model (`rewards.preference_model`), which this task needs."""
    path: str = option("")
    """A JSONL of {"prompt", "response"} rows (the response is what SFT learns; RL reads only
    the prompt). An optional "answer" field is compared exactly with the final answer in
    evaluation only, never as a reward."""
    eval_path: str = option("")
    """Held-out rows of the same layout; empty holds out a tenth of `path`'s prompts."""


@dataclass(frozen=True)
class TaskConfig:
    """The prompt sources: every task whose weight is above 0 joins the run's mixture."""

    arithmetic: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)
    countdown: CountdownTaskConfig = field(default_factory=CountdownTaskConfig)
    knights: KnightsTaskConfig = field(default_factory=KnightsTaskConfig)
    math: MathTaskConfig = field(default_factory=MathTaskConfig)
    code: CodeTaskConfig = field(default_factory=CodeTaskConfig)
    general: GeneralTaskConfig = field(default_factory=GeneralTaskConfig)
    eval_prompts: int = option(200, lo=0)
    """Held-out prompts scored greedily before and after RL (0 to skip), shared out over
    the tasks by weight."""
    answer: str = option("marked", choices=("marked", "last_number"))
    """What counts as the answer: the last <answer> or \\boxed{} (never bare text), or, for
    the arithmetic task only and models too weak to mark answers, else the last number."""
    template: str = option("r1", choices=("r1", "chat"))
    """Prompt format: the R1-Zero template with <think>/<answer> tags, or the model's chat
    template (cluster/prompts.py)."""
    chat_prompt: str = option("{question}")
    """With template=chat: the user's turn, where {question} stands for the task's question."""

    def __post_init__(self) -> None:
        if not any(getattr(self, name).weight for name in TASKS):
            raise ConfigError("every task weight is 0; give at least one task a weight above 0 "
                              f"({', '.join(f'task.{name}.weight' for name in TASKS)})")
        if self.math.weight > 0 and not self.math.path:
            raise ConfigError(f"task.math.weight={self.math.weight:g} needs task.math.path (a .jsonl, "
                              ".json or .parquet file, or a hub dataset name)")
        if self.general.weight > 0 and not self.general.path:
            raise ConfigError(f"task.general.weight={self.general.weight:g} needs task.general.path (a JSONL "
                              "of prompt/response rows)")
        if self.answer == "last_number" and any(getattr(self, n).weight for n in TASKS if n != "arithmetic"):
            raise ConfigError("task.answer=last_number applies to the arithmetic task only; give the other "
                              "tasks weight 0 or use task.answer=marked")


TASKS = tuple(f.name for f in dataclasses.fields(TaskConfig) if f.default_factory is not dataclasses.MISSING)
"""The task kinds (TaskConfig's groups), in the order a mixture lists them."""


@dataclass(frozen=True)
class RewardsConfig:
    num_workers: int = option(1, lo=1)
    """Reward worker actors; a step's samples are split among them."""
    num_cpus: float = option(0.1, lo=0.0, lo_open=True)
    """CPUs reserved per reward worker."""
    memory_gb: float = option(0.0, lo=0.0)
    """Host memory reserved per reward worker in Ray's scheduler (0: none reserved)."""
    processes: int = option(1, lo=1)
    """Checker processes per reward worker (checks run in parallel, each killable)."""
    max_restarts: int = option(3, lo=0)
    """Times per run a reward worker or the preference scorer that died or hung is replaced
    and its samples scored again (cluster/faults.py); 0 stops the run at the first."""
    stream: bool = option(True)
    """Score each group as soon as its answers are finished, while the engines still
    generate the others; false scores the whole step after generation (same rewards)."""
    timeout_s: float = option(10.0, lo=0.0, lo_open=True)
    """Hard limit on one sample's check: its process is killed and the sample scores 0."""
    correct_weight: float = option(1.0, lo=0.0)
    """Weight of the task checker's score (1 correct, 0 wrong)."""
    format_weight: float = option(0.1, lo=0.0)
    """Weight of the R1 format score (<think>..</think><answer>..</answer>)."""
    language_weight: float = option(0.0, lo=0.0)
    """Weight of R1's language-consistency bonus: the share of the reasoning's words in
    `rewards.language` (always reported as reward/language)."""
    language: str = option("en", choices=("en", "fr", "de", "es", "zh", "ja", "ko", "ru", "ar"))
    """Target language of the reasoning, judged by each word's script."""
    length_weight: float = option(0.0, lo=0.0)
    """Weight of the overlong penalty (always reported as reward/length): 0 for answers up to
    rollout.max_new_tokens - overlong_buffer tokens, falling linearly to -1 at the budget."""
    overlong_buffer: int = option(0, lo=0)
    """Tokens before the budget where the overlong penalty starts (0: only answers that hit
    the budget get -1)."""
    preference_model: str = option("")
    """A reward-model folder written by `r1ray train-rm`: it scores the answers of tasks that
    have no rule verifier (task.general), in place of the checker's `correct`."""
    preference_normalize: str = option("calibrated", choices=("calibrated", "sigmoid", "none"))
    """How a raw preference score becomes a reward before it mixes with rule rewards:
    calibrated = sigmoid((s - mean) / std) with the mean and std of the model's scores on its
    held-out pairs (saved by train-rm), sigmoid = sigmoid(s), none = s as is."""
    preference_clip: float = option(0.0, lo=0.0)
    """Upper bound on the normalised preference reward (0: none). Answers the reward model
    scores above it tie, so RL is not pulled toward what the reward model alone prefers among
    answers it already rates well, where its errors are (reward hacking); answers below it
    are still pushed up. With `calibrated`, 0.5 is the reward model's mean on held-out pairs."""
    preference_batch: int = option(32, lo=1)
    """Answers per forward pass of the preference model."""
