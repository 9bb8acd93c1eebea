"""Dataset tasks: GSM8K and MATH shapes from local files, offline, with errors that point at
the file, the row and the field."""

import json

import pytest

from rewards.data import DatasetError, drop_held_out, load_problems
from rewards.math import check

GSM8K = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
         {"question": "A shop sells 1,200 pens a day. How many in 2 days?", "answer": "2*1200\n#### 2,400"}]
MATH = [{"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "Sum is $\\boxed{\\frac{3}{4}}$."}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_jsonl(tmp_path):
    problems = load_problems(_jsonl(tmp_path / "gsm8k.jsonl", GSM8K), "gsm8k")
    assert [(p.id, p.answer) for p in problems] == [("gsm8k.jsonl:0", "7"), ("gsm8k.jsonl:1", "2400")]
    assert problems[0].prompt.startswith("Tom has")
    assert check("<answer>2,400</answer>", problems[1].answer) == (1.0, "correct")


def test_math_parquet_and_field_mapping(tmp_path):
    import datasets

    path = tmp_path / "math.parquet"
    datasets.Dataset.from_list(MATH).to_parquet(str(path))
    (p,) = load_problems(str(path), "math")
    assert p.answer == "\\frac{3}{4}" and check("<answer>0.75</answer>", p.answer) == (1.0, "correct")
    renamed = [{"q": r["problem"], "final": "3/4"} for r in MATH]
    (p,) = load_problems(_jsonl(tmp_path / "m.jsonl", renamed), "math", prompt_field="q", answer_field="final")
    assert p.answer == "3/4"


def test_limit(tmp_path):
    assert len(load_problems(_jsonl(tmp_path / "g.jsonl", GSM8K), limit=1)) == 1


@pytest.mark.parametrize("rows, message", [
    ([GSM8K[0], {"question": "no answer here"}], "g.jsonl: row 1: missing field 'answer' (the row has: question)"),
    ([{"question": "q", "answer": "just 5"}], "g.jsonl: row 0: field 'answer' has no final answer (a #### line expected)"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    with pytest.raises(DatasetError) as err:
        load_problems(_jsonl(tmp_path / "g.jsonl", rows))
    assert str(err.value).endswith(message)


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="format 'mmlu' is not known; choose one of gsm8k, math"):
        load_problems("x.jsonl", "mmlu")
    with pytest.raises(DatasetError, match="missing.jsonl: no such file"):
        load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown file type '.csv'"):
        load_problems(str(tmp_path / "d.csv"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as on these machines: no hub
    with pytest.raises(DatasetError, match="openai/gsm8k: cannot load"):
        load_problems("openai/gsm8k")


def test_drop_held_out_drops_exactly_the_held_out_rows_and_says_how_many(capsys):
    rows = [{"prompt": q, "response": str(i)} for i, q in enumerate(["1+2=?", "sort 3 1", "5+5=?", "sort 3 1"])]
    kept = drop_held_out(rows, lambda q: q == "sort 3 1", "stage sft", "mix.jsonl")
    assert kept == [rows[0], rows[2]]
    assert capsys.readouterr().out == "r1ray: stage sft: dropped 2 held-out rows of mix.jsonl\n"
    assert drop_held_out(rows, lambda q: False, "", "mix.jsonl") == rows and not capsys.readouterr().out
    with pytest.raises(DatasetError, match="stage sft: all 2 rows of mix.jsonl are in the held-out split"):
        drop_held_out(rows[1::2], lambda q: q == "sort 3 1", "stage sft", "mix.jsonl")
