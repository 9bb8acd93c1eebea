"""The R1 prompt template and the format reward: what a well-formed response looks like.

The policy sees `render_prompt(question)`, which ends inside an open think block, and writes
    <reasoning> </think> <answer> <final answer> </answer>
Generation stops at `STOP_STRINGS`; the engine keeps the stop string in the returned text,
so every checker here (and `rewards.arithmetic.check`) expects the closing `</answer>` to
be present. The tiny policy's tokenizer has each tag as one token, added as a normal (not
"special") token so that engines which drop special tokens when decoding keep the tags.

Pure functions of strings: imports neither Ray nor torch (STYLE.md point 9).
"""

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

# DeepSeek-R1-Zero's template (Table 1 of the R1 paper) in miniature. The paper opens with a
# ~70-word system description of the think/answer protocol ("A conversation between User
# and Assistant ... i.e., <think> reasoning process here </think> <answer> answer here
# </answer>. User: {prompt}. Assistant:"). A ~3M-parameter model cannot read instructions;
# it learns the protocol from cold-start SFT and the format reward, so those tokens would
# only slow every step. We keep the User/Assistant turn and prefill `<think>` (as TinyZero
# and similar replications do) so that the response starts inside the reasoning block.
R1_TEMPLATE = "User: {question}\nAssistant: " + THINK_OPEN

# Generation ends once the answer is closed; nothing after it can earn reward.
STOP_STRINGS = (ANSWER_CLOSE,)

# With each tag present exactly once (checked before matching), this matches iff the tags
# come in order; the groups let us say which part is malformed.
_FORMAT_RE = re.compile(
    r"(?P<think>.*?)</think>(?P<gap>.*?)<answer>(?P<answer>.*?)</answer>(?P<tail>.*)",
    re.DOTALL,
)


# Model output is searched from its end: a 1 MB response costs no more than this much.
MAX_RESPONSE_CHARS = 20_000
_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)


def clean(text: str | bytes) -> str:
    """Model output as searchable text: decoded, without NUL bytes, its last part only."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text.replace("\x00", "")[-MAX_RESPONSE_CHARS:]


def last_answer(text: str) -> str | None:
    """The raw content of the last `<answer>...</answer>` in `text`, or None if there is none."""
    tagged = _ANSWER_RE.findall(text)
    return tagged[-1] if tagged else None


# Boxes that give one answer together ("\\boxed{1}, \\boxed{2}", "\\boxed{(2,2)} \\quad \\text{and}
# \\quad \\boxed{(6,2)}", "y_1 = \\boxed{a} and y_2 = \\boxed{b}"): once LaTeX spacing, math delimiters
# and braces are dropped, only a comma, a semicolon, "and" or "or" (perhaps after a few words: "for
# part (a) and") and the next box's label stand between them. Anything else ("or rather", a
# sentence) ends the run, so a box that corrects an earlier one still stands alone.
_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\{")
_BOX_MARKUP_RE = re.compile(r"\\(?:quad|qquad|text|mathrm|[,;:! ()\[\]])|[${}~]")
_BOX_GLUE_RE = re.compile(r"(?:[,;]?\s*(?:and|or)?|[\w\s()]{1,24}\s(?:and|or))\s*(?:[A-Za-z](?:_\w+)?\s*=)?\s*")
_MAX_GLUE_CHARS = 80

# Minerva's few-shot format for MATH, "Final Answer: The final answer is $X$. I hope it is
# correct.", kept by models tuned on MATH-style data. The statement after the marker ends
# with its sentence (a period before a space), its line, or "I hope it is correct".
_STATED_RE = re.compile(r"Final Answer:\**[ \t]*(?:The final answer is[ \t]*)?(.+?)"
                        r"(?:\.(?=\s|$)|I hope it is correct|$)", re.MULTILINE)


def _box_run(text: str) -> tuple[int, str] | None:
    """(start, answer) of the last run of boxes, their contents joined by ", "; None if there
    is no box or the last one is unterminated."""
    contents: list[str] = []
    run_start = len(text)  # where the run found so far starts
    for box in reversed(list(_BOX_OPEN_RE.finditer(text))):
        # A box must close before the next one opens; if not, it contains the run: stop.
        end = _closing_brace(text, box.end(), run_start)
        if end is None or (contents and not _joins(text[end + 1:run_start])):
            break
        contents.append(text[box.end():end])
        run_start = box.start()
    return (run_start, ", ".join(reversed(contents))) if contents else None


def _closing_brace(text: str, i: int, stop: int) -> int | None:
    """Index of the brace closing the group opened just before `i`, if it is before `stop`."""
    depth = 1
    for j in range(i, stop):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def _joins(between: str) -> bool:
    """Whether the text between two boxes makes them one answer (see `_BOX_GLUE_RE`)."""
    return len(between) <= _MAX_GLUE_CHARS and bool(_BOX_GLUE_RE.fullmatch(_BOX_MARKUP_RE.sub(" ", between)))


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced, joined with the boxes
    just before it that give one answer with it ("\\boxed{1}, \\boxed{2}" -> "1, 2"); None if
    there is no box or the last one is unterminated."""
    run = _box_run(text)
    return run[1] if run else None


def final_answer(text: str) -> str | None:
    """The answer a response marks as final; never the bare text. The last `<answer>...</answer>`
    (the R1 template) wins; else whichever comes later of the last run of `\\boxed{}` (the chat
    template's instruction) and the last "Final Answer: ..." statement (Minerva's format)."""
    tagged = last_answer(text)
    if tagged is not None:
        return tagged
    marked = [found for found in (_box_run(text), _last_statement(text)) if found is not None]
    return max(marked)[1] if marked else None


def _last_statement(text: str) -> tuple[int, str] | None:
    """(start, answer) of the last Minerva "Final Answer: ..." statement, or None."""
    stated = list(_STATED_RE.finditer(text))
    return (stated[-1].start(), stated[-1][1].strip()) if stated else None


def render_prompt(question: str) -> str:
    """The text the engine continues: the question in the R1 template, ending with `<think>`."""
    return R1_TEMPLATE.format(question=question)


def format_reward(response: str) -> tuple[float, str]:
    """1.0 iff `response` (the text generated after the prompt) is well formed, else 0.0.

    Well formed: non-blank reasoning, `</think>`, optional whitespace, `<answer>`, non-blank
    content, `</answer>`, then only whitespace. Each of those three tags exactly once and no
    `<think>` at all (the prompt already opened it). Blank reasoning is rejected so that the
    format reward never pays for skipping the think block.
    Returns (score, reason); reason is "ok" or names the first defect found.
    """
    if THINK_OPEN in response:
        return 0.0, f"unexpected {THINK_OPEN}"
    for tag in (THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        count = response.count(tag)
        if count == 0:
            return 0.0, f"missing {tag}"
        if count > 1:
            return 0.0, f"repeated {tag} (x{count})"
    match = _FORMAT_RE.fullmatch(response)
    if match is None:
        return 0.0, "tags out of order"
    if match["gap"].strip():
        return 0.0, f"text between {THINK_CLOSE} and {ANSWER_OPEN}"
    if match["tail"].strip():
        return 0.0, f"text after {ANSWER_CLOSE}"
    if not match["think"].strip():
        return 0.0, "empty reasoning"
    if not match["answer"].strip():
        return 0.0, "empty answer"
    return 1.0, "ok"
