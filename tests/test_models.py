"""The policies built or converted without a hub are ordinary HF folders with usable tokenizers."""

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.models import TEMPLATE_TOKENS, TinyLlamaSpec, count_parameters, tiny_llama_path


def test_tiny_model_is_a_loadable_hf_folder(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.vocab_size == len(tok)
    assert 0.5e6 < count_parameters(tiny_model) < 2e6
    assert sum(p.numel() for p in model.parameters()) == count_parameters(tiny_model)


def test_digits_and_tags_are_single_tokens(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "User: 47+38=?\nAssistant: <think>7+8=15</think><answer>85</answer>"
    pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    for tag in TEMPLATE_TOKENS:
        assert tag in pieces
    assert "4" in pieces and "47" not in pieces and "85" not in pieces
    # Tags are not "special": decoding that skips special tokens keeps them.
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_build_is_cached_and_keyed_by_spec(tmp_path):
    a = tiny_llama_path(TinyLlamaSpec(num_layers=1), tmp_path)
    assert tiny_llama_path(TinyLlamaSpec(num_layers=1), tmp_path) == a
    b = tiny_llama_path(TinyLlamaSpec(num_layers=2), tmp_path)
    assert a != b and (b / "model.safetensors").exists()
    assert not list((tmp_path / "models").glob(".building-*"))


@pytest.mark.slow
def test_smollm2_is_converted_once_to_an_hf_folder_with_its_chat_template(smollm2_model, model_cache):
    import time

    from cluster.prompts import PromptFormat
    from learner.models import smollm2_path

    path = Path(smollm2_model)
    assert (path / "model.safetensors").is_file() and count_parameters(path) == 134_515_008
    start = time.monotonic()
    assert smollm2_path(model_cache) == path and time.monotonic() - start < 1.0  # cached
    text = PromptFormat("chat", (), str(path), "{question} Reply with just the number.").render("What is 2+3?")
    assert "<|im_start|>user\nWhat is 2+3? Reply with just the number.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
