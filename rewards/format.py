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


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is
    none or it is unterminated."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def final_answer(text: str) -> str | None:
    """The answer a response marks as final: the last `<answer>...</answer>` (the R1 template),
    else the last `\\boxed{}` (the chat template's instruction); never the bare text."""
    tagged = last_answer(text)
    return tagged if tagged is not None else last_boxed(text)


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
