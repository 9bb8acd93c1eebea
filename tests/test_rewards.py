"""Tests for rewards.arithmetic and rewards.format: hand-checkable cases, then properties.

CPU only, stdlib only; runs in well under a second.
"""

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.arithmetic import ArithmeticProblem, ArithmeticTask, check, hurried_answer, in_eval_split
from rewards.format import R1_TEMPLATE, STOP_STRINGS, format_reward, render_prompt

# --- check: the answer checker ------------------------------------------------------------


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("7+8=15 4+3+1=8</think><answer>85</answer>", "85", (1.0, "correct")),
        ("x</think><answer> +085 \n</answer>", "85", (1.0, "correct")),  # sign, zeros, spaces
        ("x</think><answer>-5</answer>", "-5", (1.0, "correct")),
        ("x</think><answer>84</answer>", "85", (0.0, "wrong: got 84")),
        ("x</think><answer>-85</answer>", "85", (0.0, "wrong: got -85")),
        # Never score text outside the tag, even when it holds the right number.
        ("the answer is 85", "85", (0.0, "no answer tag")),
        ("x</think><answer>85", "85", (0.0, "no answer tag")),  # cut off before the stop string
        ("x</think>85</answer>", "85", (0.0, "no answer tag")),
        ("x</answer><answer>85", "85", (0.0, "no answer tag")),  # tags in the wrong order
        # The last answer counts, whichever way round.
        ("<answer>85</answer> no, <answer>84</answer>", "85", (0.0, "wrong: got 84")),
        ("<answer>84</answer> no, <answer>85</answer>", "85", (1.0, "correct")),
        ("<answer>84 <answer>85</answer>", "85", (1.0, "correct")),
        ("x</think><answer>8 5</answer>", "85", (0.0, "unparsable: '8 5'")),
        ("x</think><answer>85.0</answer>", "85", (0.0, "unparsable: '85.0'")),
        ("x</think><answer>1,000</answer>", "1000", (0.0, "unparsable: '1,000'")),
        ("x</think><answer>1_000</answer>", "1000", (0.0, "unparsable: '1_000'")),  # int() takes it
        ("x</think><answer>\u0668\u0665</answer>", "85", (0.0, "unparsable: '\u0668\u0665'")),
        ("x</think><answer>  </answer>", "85", (0.0, "unparsable: ''")),
        ("x</think><answer>+</answer>", "85", (0.0, "unparsable: '+'")),
    ],
)
def test_check(response, gold, expected):
    assert check(response, gold) == expected


def test_check_truncates_long_unparsable_reason():
    score, reason = check("<answer>" + "a" * 500 + "</answer>", "1")
    assert score == 0.0 and len(reason) < 50


# --- format: template and format reward ---------------------------------------------------


def test_render_prompt_is_compact_and_ends_inside_think():
    assert render_prompt("47+38=?") == "User: 47+38=?\nAssistant: <think>"
    assert R1_TEMPLATE.endswith("<think>")
    # Braces in a question are data, not format fields.
    assert render_prompt("{x}") == "User: {x}\nAssistant: <think>"


def test_stop_strings_end_the_answer():
    assert STOP_STRINGS == ("</answer>",)


@pytest.mark.parametrize(
    "response",
    [
        "7+8=15 4+3+1=8</think><answer>85</answer>",
        " 7+8=15\n4+3+1=8 </think>\n <answer> 85 </answer>\n",  # whitespace where allowed
        "think hard</think><answer>anything non-blank</answer>",  # format only, not correctness
    ],
)
def test_format_accepts(response):
    assert format_reward(response) == (1.0, "ok")


@pytest.mark.parametrize(
    "response, reason",
    [
        ("7+8=15 <answer>85</answer>", "missing </think>"),
        ("7+8=15</think>85</answer>", "missing <answer>"),
        ("7+8=15</think><answer>85", "missing </answer>"),
        ("a</think><answer>85</answer><answer>85</answer>", "repeated <answer> (x2)"),
        ("a</think></think><answer>85</answer>", "repeated </think> (x2)"),
        ("<think>a</think><answer>85</answer>", "unexpected <think>"),
        ("a</think><answer>85</answer> because", "text after </answer>"),
        ("a</think> so <answer>85</answer>", "text between </think> and <answer>"),
        ("a</think><answer></answer>", "empty answer"),
        ("a</think><answer> \n </answer>", "empty answer"),
        ("</think><answer>85</answer>", "empty reasoning"),
        ("a<answer>85</answer></think>", "tags out of order"),
        ("a</answer></think><answer>85", "tags out of order"),
        ("", "missing </think>"),
    ],
)
def test_format_rejects(response, reason):
    assert format_reward(response) == (0.0, reason)


# --- reference traces ---------------------------------------------------------------------

ADD = ArithmeticTask(min_digits=1, max_digits=3, num_operands=2, operation="+")
ADD3 = ArithmeticTask(min_digits=1, max_digits=3, num_operands=3, operation="+")
SUB = ArithmeticTask(min_digits=1, max_digits=3, num_operands=2, operation="-")
SUB3 = ArithmeticTask(min_digits=1, max_digits=3, num_operands=3, operation="-")


def _problem(task, *operands):
    """The Problem the task would generate for these operands."""
    return task._problem(tuple(operands))


@pytest.mark.parametrize(
    "task, operands, trace",
    [
        (ADD, (47, 38), "7+8=15 4+3+1=8</think><answer>85</answer>"),
        (ADD, (99, 1), "9+1=10 9+1=10</think><answer>100</answer>"),  # carry into a new digit
        (ADD, (0, 0), "0+0=0</think><answer>0</answer>"),
        (ADD, (7, 70), "7+0=7 7=7</think><answer>77</answer>"),  # short operand skipped
        (ADD3, (99, 99, 99), "9+9+9=27 9+9+9+2=29</think><answer>297</answer>"),  # carry 2
        (ADD3, (999, 1, 1), "9+1+1=11 9+1=10 9+1=10</think><answer>1001</answer>"),
        (SUB, (47, 38), "17-8=9 4-3-1=0</think><answer>9</answer>"),  # leading zero dropped
        (SUB, (100, 1), "10-1=9 10-1=9 1-1=0</think><answer>99</answer>"),  # borrow chain
        (SUB, (5, 5), "5-5=0</think><answer>0</answer>"),
        (SUB3, (20, 9, 9), "20-9-9=2 2-2=0</think><answer>2</answer>"),  # borrow 2
        (SUB3, (880, 65, 13), "10-5-3=2 8-6-1-1=0 8=8</think><answer>802</answer>"),
    ],
)
def test_reference_trace_examples(task, operands, trace):
    assert task.reference_trace(_problem(task, *operands)) == trace


def _answer_from_steps(steps: list[str], op: str) -> str:
    """Recompute the answer from the trace's steps alone, checking each step's arithmetic."""
    digits, carry = [], 0
    for step in steps:
        lhs, result = step.split("=")
        terms = [int(t) for t in lhs.split(op)]
        value = sum(terms) if op == "+" else terms[0] - sum(terms[1:])
        assert value == int(result), step
        if op == "-":
            assert 0 <= value <= 9, step
        digits.append(value % 10)
        carry = value // 10 if op == "+" else 0
    number = str(carry) + "".join(str(d) for d in reversed(digits))
    return str(int(number))


@pytest.mark.parametrize("task", [ADD, ADD3, SUB, SUB3, ArithmeticTask(3, 6, 4, "+")])
def test_reference_traces_are_correct_and_well_formed(task):
    for problem in task.sample(random.Random(0), 500):
        trace = task.reference_trace(problem)
        assert check(trace, problem.answer) == (1.0, "correct"), trace
        assert format_reward(trace) == (1.0, "ok"), trace
        assert trace.endswith(STOP_STRINGS[0])
        # The gold comes from the prompt text alone, independent of the task code.
        lhs = problem.prompt.removesuffix("=?")
        operands = [int(x) for x in lhs.split(task.operation)]
        gold = sum(operands) if task.operation == "+" else operands[0] - sum(operands[1:])
        assert problem.answer == str(gold) and gold >= 0
        # The answer must follow from the worked steps, not just be pasted in.
        steps = trace.split("</think>")[0].split(" ")
        assert _answer_from_steps(steps, task.operation) == problem.answer, trace


# --- trace styles: direct, checked (a guess, then a check that corrects it), column -------------


@pytest.mark.parametrize(
    "task, operands, trace",
    [
        (ArithmeticTask(direct_traces=1.0), (47, 38), "85</think><answer>85</answer>"),
        (ArithmeticTask(direct_traces=1.0, hurried_direct=True), (47, 38), "75</think><answer>75</answer>"),
        (ArithmeticTask(direct_traces=1.0, hurried_direct=True), (25, 21), "46</think><answer>46</answer>"),
        (ArithmeticTask(checked_traces=1.0), (25, 21), "46 wait, check: 5+1=6 2+2=4 yes</think><answer>46</answer>"),
        (ArithmeticTask(checked_traces=1.0), (47, 38),
         "75 wait, check: 7+8=15 4+3+1=8 no, 85</think><answer>85</answer>"),
        # the leading column is written whole: 99+99 hurried is 188, the tens' carry dropped
        (ArithmeticTask(checked_traces=1.0), (99, 99),
         "188 wait, check: 9+9=18 9+9+1=19 no, 198</think><answer>198</answer>"),
        (ArithmeticTask(operation="-", checked_traces=1.0), (50, 41),
         "19 wait, check: 10-1=9 5-4-1=0 no, 9</think><answer>9</answer>"),
    ],
)
def test_trace_style_examples(task, operands, trace):
    assert task.reference_trace(_problem(task, *operands)) == trace


@pytest.mark.parametrize("operation, operands, hurried", [
    ("+", (47, 38), "75"), ("+", (47, 68), "105"), ("+", (25, 21), "46"),
    ("+", (99, 99, 99), "277"),  # the units' 27 leaves 7, its carry of 2 is dropped
    ("+", (5, 993), "998"), ("+", (7, 8), "15"),  # one column: the leading one, whole
    ("-", (52, 38), "24"), ("-", (100, 99), "111"), ("-", (50, 21, 9), "30"), ("-", (9, 4), "5"),
])
def test_hurried_answer_drops_every_carry_and_borrow(operation, operands, hurried):
    assert hurried_answer(operation, operands) == hurried


def _carries(operation: str, operands: tuple[int, ...]) -> bool:
    """Whether some column below the leading one carries (+) or borrows (-), from the digits."""
    width = max(len(str(x)) for x in operands)
    digits = [[x // 10**i % 10 for x in operands] for i in range(width - 1)]
    if operation == "+":
        return any(sum(column) >= 10 for column in digits)
    return any(column[0] < sum(column[1:]) for column in digits)


@pytest.mark.parametrize("operation", ["+", "-"])
def test_the_check_line_catches_every_hurried_mistake(operation):
    from cluster.metrics import reflects

    task = ArithmeticTask(1, 3, 2, operation, checked_traces=1.0)
    wrong = 0
    for problem in task.sample(random.Random(0), 1000):
        trace = task.reference_trace(problem)
        guess, working, verdict, corrected, answer = re.fullmatch(
            r"(\d+) wait, check: (.+) (yes|no, (\d+))</think><answer>(\d+)</answer>", trace).groups()
        assert _answer_from_steps(working.split(" "), operation) == problem.answer == answer, trace
        # The hurried answer is wrong exactly where a column carries or borrows; dropping a carry
        # makes a sum smaller, dropping a borrow a difference larger.
        assert (verdict == "yes") == (guess == problem.answer) == (not _carries(operation, problem.operands)), trace
        if verdict != "yes":
            wrong += 1
            assert corrected == problem.answer, trace
            assert (int(guess) < int(problem.answer)) == (operation == "+"), trace
        assert check(trace, problem.answer) == (1.0, "correct") and format_reward(trace) == (1.0, "ok")
        assert reflects(trace), trace
    assert 300 <= wrong <= 900  # both verdicts are common


def test_trace_styles_come_in_their_shares_and_are_fixed_per_problem():
    from cluster.metrics import reflects

    task = ArithmeticTask(1, 3, 2, "+", direct_traces=0.6, checked_traces=0.1)
    problems = task.sample(random.Random(1), 4000)
    styles = [task.trace_style(p) for p in problems]
    for style, share in (("direct", 0.6), ("checked", 0.1), ("column", 0.3)):
        assert abs(styles.count(style) / len(styles) - share) < 0.035, style  # ~4.5 standard deviations
    again = ArithmeticTask(1, 3, 2, "+", direct_traces=0.6, checked_traces=0.1)
    assert [again.reference_trace(p) for p in problems[:200]] == [task.reference_trace(p) for p in problems[:200]]
    hurried = ArithmeticTask(1, 3, 2, "+", direct_traces=0.6, checked_traces=0.1, hurried_direct=True)
    for problem, style in zip(problems[:300], styles):
        trace = task.reference_trace(problem)
        assert reflects(trace) == (style == "checked")
        assert (trace == f"{problem.answer}</think><answer>{problem.answer}</answer>") == (style == "direct")
        guess = hurried_answer("+", problem.operands)
        assert (hurried.reference_trace(problem) == f"{guess}</think><answer>{guess}</answer>") == (style == "direct")
        assert format_reward(trace) == (1.0, "ok")  # every style earns the format reward: none is favoured


def test_the_config_sets_the_trace_styles():
    from rewards.config import ArithmeticTaskConfig, TaskConfig
    from rewards.tasks import build_mixture

    c = ArithmeticTaskConfig(min_digits=2, max_digits=2, direct_traces=1.0, hurried_direct=True)
    generator = build_mixture(TaskConfig(arithmetic=c)).tasks["arithmetic"].generator
    assert generator.reference_trace(_problem(generator, 47, 38)) == "75</think><answer>75</answer>"


@pytest.mark.parametrize("shares, message", [
    ({"direct_traces": 1.5}, "direct_traces=1.5 is invalid; must be in [0, 1]"),
    ({"checked_traces": -0.1}, "checked_traces=-0.1 is invalid; must be in [0, 1]"),
    ({"direct_traces": 0.7, "checked_traces": 0.4}, "direct_traces=0.7 + checked_traces=0.4 is above 1"),
])
def test_trace_shares_out_of_range_are_refused(shares, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ArithmeticTask(**shares)


def test_reference_trace_rejects_problem_of_another_operation():
    problem = _problem(ADD, 47, 38)
    with pytest.raises(ValueError, match=r"add-47-38 has answer 85.*operation='-'"):
        SUB.reference_trace(problem)


# --- sampling: config, splits, determinism ------------------------------------------------


@pytest.mark.parametrize("task", [ADD, ADD3, SUB, SUB3, ArithmeticTask(2, 2, 2, "+")])
def test_sample_respects_config(task):
    for p in task.sample(random.Random(1), 300):
        assert len(p.operands) == task.num_operands
        assert all(task.min_digits <= len(str(x)) <= task.max_digits for x in p.operands)
        assert p.prompt == task.operation.join(str(x) for x in p.operands) + "=?"
        if task.operation == "-":
            assert list(p.operands) == sorted(p.operands, reverse=True)
            assert int(p.answer) >= 0


@pytest.mark.parametrize("task", [ArithmeticTask(), ADD3, SUB, ArithmeticTask(1, 1)])
def test_train_and_eval_splits_are_disjoint(task):
    train = task.sample(random.Random(0), 5000, split="train")
    held = task.sample(random.Random(0), 2000, split="eval")
    # Sorted, so that commuted problems count as the same problem.
    train_keys = {tuple(sorted(p.operands)) for p in train}
    assert train_keys.isdisjoint({tuple(sorted(p.operands)) for p in held})
    assert not any(in_eval_split(p.operands) for p in train)
    assert all(in_eval_split(p.operands) for p in held)
    assert all(in_eval_split(p.operands[::-1]) for p in held)  # 38+47 held out with 47+38


def test_eval_split_is_about_ten_percent():
    rng = random.Random(0)
    tuples = [(rng.randrange(1000), rng.randrange(1000)) for _ in range(20000)]
    fraction = sum(in_eval_split(t) for t in tuples) / len(tuples)
    assert 0.08 < fraction < 0.12


def test_sample_is_deterministic_given_rng_state():
    task = ArithmeticTask()
    assert task.sample(random.Random(7), 100) == task.sample(random.Random(7), 100)
    assert task.sample(random.Random(7), 100) != task.sample(random.Random(8), 100)
    rng = random.Random(7)
    first, second = task.sample(rng, 50), task.sample(rng, 50)
    assert first + second == task.sample(random.Random(7), 100)


def test_problems_are_deterministic_distinct_and_pinned():
    task = ArithmeticTask()
    eval_set = task.problems(0, 5, "eval")
    assert eval_set == task.problems(0, 5, "eval")
    # Pinned: a change to the hash, the sampler or the id scheme silently moves the eval
    # set between versions, which makes eval scores incomparable. Update only on purpose.
    assert [p.id for p in eval_set] == ["add-1-70", "add-70-1", "add-36-0", "add-93-59", "add-85-4"]
    assert eval_set[0] == ArithmeticProblem(id="add-1-70", prompt="1+70=?", answer="71", operands=(1, 70))
    train = task.problems(0, 2000, "train")
    assert len({p.id for p in train}) == 2000
    assert task.problems(1, 50, "train") != task.problems(0, 50, "train")


def test_problems_raises_when_split_too_small():
    # 1-digit pairs: 100 ordered tuples, about 10 of them held out.
    with pytest.raises(ValueError, match=r"found only \d+ distinct eval problems.*n=100"):
        ArithmeticTask(1, 1).problems(0, 100, "eval")


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_digits=0), "min_digits=0 is invalid; must be in [1, 20]"),
        (
            dict(min_digits=3, max_digits=2),
            "max_digits=2 is invalid; must be in [min_digits=3, 20]",
        ),
        (dict(max_digits=21), "max_digits=21 is invalid; must be in [min_digits=1, 20]"),
        (dict(num_operands=1), "num_operands=1 is invalid; must be in [2, 8]"),
        (dict(num_operands=9), "num_operands=9 is invalid; must be in [2, 8]"),
        (dict(operation="*"), "operation='*' is invalid; must be one of ('+', '-')"),
    ],
)
def test_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ArithmeticTask(**kwargs)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match=re.escape("split='test' is invalid")):
        ArithmeticTask().sample(random.Random(0), 1, split="test")
    with pytest.raises(ValueError, match=re.escape("split='val' is invalid")):
        ArithmeticTask().problems(0, 1, "val")


def test_reward_modules_import_neither_ray_nor_torch():
    # A fresh interpreter: this test session may have imported torch through other tests.
    code = (
        "import sys, pkgutil, importlib, rewards; "
        "[importlib.import_module('rewards.' + m.name) for m in pkgutil.iter_modules(rewards.__path__)]; "
        "bad = [m for m in ('ray', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_a_boxed_answer_counts_when_there_is_no_answer_tag():
    assert check("so the sum is \\boxed{85}", "85") == (1.0, "correct")
    assert check("\\boxed{85} but <answer>84</answer>", "85") == (0.0, "wrong: got 84")  # the tag wins
    assert check("the sum is 85", "85") == (0.0, "no answer tag")  # bare text is never scored
    assert check("\\boxed{85", "85") == (0.0, "no answer tag")  # unterminated


def test_last_number_rule_reads_only_the_last_number():
    from rewards.arithmetic import check_last_number

    assert check_last_number("47 + 38 = 85.", "85") == (1.0, "correct")
    assert check_last_number("85, 86, 84", "85") == (0.0, "wrong: last number 84")
    assert check_last_number("no idea", "85") == (0.0, "no number")
    assert check_last_number("minus: -5", "-5") == (1.0, "correct")
