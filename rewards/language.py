"""Language consistency (DeepSeek-R1, section 2.3.2): how much of the reasoning is written in
the target language.

R1-Zero's reasoning drifted between languages; R1 added a reward equal to the proportion of
target-language words in the chain of thought. Here a word is a run of letters (each CJK
ideograph or kana counts as one word, as those scripts have no spaces), and its language is
judged by its script: a Latin-script word counts for English, a Han character for Chinese,
and so on. Digits, operators and punctuation are neutral: reasoning with no words at all
(e.g. only arithmetic) is fully consistent.

Pure function of strings: imports neither Ray nor torch.
"""

from __future__ import annotations

import re
import unicodedata

from rewards.format import THINK_CLOSE, THINK_OPEN

# Target language -> the Unicode script name prefixes its words are written in.
SCRIPTS = {
    "en": ("LATIN",),
    "fr": ("LATIN",),
    "de": ("LATIN",),
    "es": ("LATIN",),
    "zh": ("CJK",),
    "ja": ("CJK", "HIRAGANA", "KATAKANA"),
    "ko": ("HANGUL",),
    "ru": ("CYRILLIC",),
    "ar": ("ARABIC",),
}

# A run of letters, except that each ideograph / kana / hangul syllable is a word by itself.
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|[^\W\d_\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]+")


def reasoning(response: str) -> str:
    """The chain of thought: the text up to `</think>` (the prompt opened the block)."""
    text = response.split(THINK_CLOSE, 1)[0]
    return text.rsplit(THINK_OPEN, 1)[-1]


def _script(word: str) -> str:
    name = unicodedata.name(word[0], "")
    return name.split(" ", 1)[0]


def language_consistency(response: str, language: str = "en") -> tuple[float, str]:
    """(fraction of the reasoning's words in `language`'s script, reason)."""
    if language not in SCRIPTS:
        raise ValueError(f"language {language!r} is not supported; choose one of {', '.join(SCRIPTS)}")
    words = _WORD.findall(reasoning(response))
    if not words:
        return 1.0, "no words in the reasoning"
    scripts = SCRIPTS[language]
    inside = sum(_script(w).startswith(scripts) for w in words)
    return inside / len(words), f"{inside} of {len(words)} words in {language}"


def scripts_of(response: str) -> set[str]:
    """The scripts the reasoning's words are written in, e.g. {"LATIN", "CJK"}."""
    return {_script(w) for w in _WORD.findall(reasoning(response))}
