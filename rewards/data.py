"""Dataset tasks: math word problems loaded with `datasets` from local files or the hub.

    problems = load_problems("data/gsm8k_train.jsonl", fmt="gsm8k")
    problems = load_problems("data/math.parquet", fmt="math", answer_field="answer")

Formats map a dataset's fields to a prompt and a gold answer:
- "gsm8k": `question`, and `answer` whose last line is "#### N" (the gold is N);
- "math": `problem`, and `solution` whose last \\boxed{...} is the gold (or a plain answer
  field, given with `answer_field`).
Field names can be overridden for other datasets of the same shape. A local .jsonl,
.jsonl.gz, .json or .parquet file is read offline; anything else is taken as a hub name.
A row missing a field, or whose answer has no final value, is an error that names the file,
the row and the field, at load time rather than mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from rewards.math import GSM8K_RE, extract_answer

Row = TypeVar("Row")

FORMATS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
_LOCAL = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet"}


class DatasetError(ValueError):
    """A dataset cannot be read, or a row lacks what its format needs."""


@dataclass(frozen=True)
class DatasetProblem:
    id: str
    prompt: str
    answer: str
    """The gold final answer, checked with `rewards.math.check`."""


def load_problems(source: str, fmt: str = "gsm8k", *, split: str = "train", prompt_field: str | None = None,
                  answer_field: str | None = None, limit: int | None = None) -> list[DatasetProblem]:
    """The problems of a local file or hub dataset, in file order (ids are source:row)."""
    if fmt not in FORMATS:
        raise DatasetError(f"format {fmt!r} is not known; choose one of {', '.join(FORMATS)}")
    prompt_key, answer_key = prompt_field or FORMATS[fmt][0], answer_field or FORMATS[fmt][1]
    rows = _rows(source, split)
    problems = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        for key in (prompt_key, answer_key):
            if row.get(key) in (None, ""):
                present = sorted(k for k, v in row.items() if v not in (None, ""))
                raise DatasetError(f"{source}: row {i}: missing field {key!r} (the row has: "
                                   f"{', '.join(present) or 'nothing'})")
        answer = _gold(str(row[answer_key]), fmt, plain=answer_field is not None)
        if answer is None:
            expected = "a #### line" if fmt == "gsm8k" else "a \\boxed{...}"
            raise DatasetError(f"{source}: row {i}: field {answer_key!r} has no final answer ({expected} expected)")
        problems.append(DatasetProblem(f"{Path(source).name}:{i}", str(row[prompt_key]).strip(), answer))
    if not problems:
        raise DatasetError(f"{source}: no rows")
    return problems


def _rows(source: str, split: str):
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    try:
        if path.exists():
            builder = _LOCAL.get(path.suffix)
            if builder is None:
                raise DatasetError(f"{source}: unknown file type {path.suffix!r}; use .jsonl, .json, "
                                   ".jsonl.gz or .parquet")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if source.startswith((".", "/", "~")) or Path(source).suffix in _LOCAL:
            raise DatasetError(f"{source}: no such file")
        return datasets.load_dataset(source, split=split)
    except DatasetError:
        raise
    except Exception as err:  # datasets raises many types (offline, missing split, bad file)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetError(f"{source}: cannot load ({first})") from None


def _gold(text: str, fmt: str, plain: bool) -> str | None:
    if plain:
        return text.strip()
    if fmt == "gsm8k":
        found = GSM8K_RE.findall(text)
        return found[-1].replace(",", "") if found else None
    return extract_answer(text)


def read_jsonl(path: str | Path, fields: tuple[str, ...], what: str) -> list[dict]:
    """The rows of a local JSONL file, each checked to have the non-empty string `fields`.

    Errors name `what` reads it (e.g. "stage cold_start"), the file, the 1-based line and the
    field, so a bad row is found at load time rather than mid-run; an empty file is an error.
    """
    import json

    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"{what}: {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{what}: {path}:{line_no}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{what}: {path}:{line_no}: expected an object, got {type(row).__name__}")
            for key in fields:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    problem = "missing" if key not in row else f"not a non-empty string ({row[key]!r:.40})"
                    raise DatasetError(f"{what}: {path}:{line_no}: field {key!r} is {problem}")
            rows.append(row)
    if not rows:
        raise DatasetError(f"{what}: {path} has no rows")
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write `rows` as JSONL, atomically: to a .partial file, renamed when complete."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)


def drop_held_out(rows: list[Row], held_out: Callable[[str], bool], what: str, path: str | Path,
                  question: Callable[[Row], str] = lambda row: row["prompt"]) -> list[Row]:
    """`rows` without those whose question (a row's "prompt") is in the run's held-out split,
    so that no stage trains on what the run is evaluated on. Prints one line naming `what`
    reads the file, the file and how many rows went (nothing if `what` is empty); an error if
    no row is left."""
    kept = [row for row in rows if not held_out(question(row))]
    if what:
        print(f"r1ray: {what}: dropped {len(rows) - len(kept)} held-out rows of {path}", flush=True)
    if rows and not kept:
        raise DatasetError(f"{what + ': ' if what else ''}all {len(rows)} rows of {path} are in the held-out split")
    return kept
