"""Language consistency: the share of the reasoning's words written in the target language."""

import pytest

from rewards.language import language_consistency, reasoning


def test_only_the_reasoning_counts():
    assert reasoning("<think>a b</think><answer>c</answer>") == "a b"
    assert reasoning("prefilled a b</think><answer>c</answer>") == "prefilled a b"
    # The answer is in Chinese but the reasoning is English: fully consistent.
    assert language_consistency("first add the units</think><answer>十五</answer>")[0] == 1.0


@pytest.mark.parametrize("text, language, share", [
    ("Let me check: 12+3=15", "en", 1.0),
    ("Let me 检查 this", "en", 3 / 5),  # Let, me, 检, 查, this
    ("我们先算 12+3", "zh", 1.0),
    ("我们 check", "zh", 2 / 3),
    ("только русский", "ru", 1.0),
    ("café naïve", "fr", 1.0),
    ("これは テスト", "ja", 1.0),
    ("12+3=15, 4*5=20", "en", 1.0),  # no words: nothing inconsistent
])
def test_share_of_words_in_the_target_script(text, language, share):
    assert language_consistency(text + "</think>", language)[0] == pytest.approx(share)


def test_unknown_language_names_the_valid_ones():
    with pytest.raises(ValueError, match="language 'xx' is not supported; choose one of en, fr"):
        language_consistency("a", "xx")


def test_hostile_text_is_fast():
    import time

    start = time.monotonic()
    score, _ = language_consistency("word " * 200_000 + "\x00\ufffd" * 1000 + "</think>")
    assert score == 1.0 and time.monotonic() - start < 5


def test_config_offers_exactly_the_supported_languages():
    import dataclasses

    from rewards.config import RewardsConfig
    from rewards.language import SCRIPTS

    field = {f.name: f for f in dataclasses.fields(RewardsConfig)}["language"]
    assert field.metadata["choices"] == tuple(SCRIPTS)
