"""SFT data: loss masking, packing boundaries, JSONL errors, mixing; and a real packed SFT run."""

import json
import random

import numpy as np
import pytest

from learner.sft import Example, allowed_attention, pack, positions


def _ex(prompt, response):
    return Example(np.array(prompt), np.array(response))


def test_prompt_tokens_carry_no_loss_and_examples_share_no_target():
    rows = pack([_ex([1, 2, 3], [4, 5]), _ex([6, 7], [8]), _ex([9], [10, 11, 12])], max_len=8)
    # first fit: 5 + 3 tokens fill row 0; the third example opens row 1
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0, 0, 0]]
    assert rows.segment_ids.tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]]
    # loss_mask[t] is about token t+1: only 4, 5, 8 in row 0 and 10, 11, 12 in row 1 are targets.
    # Token 6 (the next example's first) is not predicted from the previous example.
    assert rows.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0, 1], [1, 1, 1, 0, 0, 0, 0]]
    assert rows.attention_mask.tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert positions(rows.segment_ids).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]


def test_attention_stays_inside_each_example():
    allowed = allowed_attention(np.array([[1, 1, 2, 2, 0]]))[0]
    assert allowed.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                [0, 0, 0, 0, 1]]


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="longer than 4 tokens.*has 5"):
        pack([_ex([1, 2], [3]), _ex([1, 2, 3], [4, 5])], max_len=4)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_log_probs_equal_unpacked_ones(tiny_model, attention):
    """The model sees a packed row as its examples one by one: same log-probs to 1e-5."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.batch import collate
    from learner.learner import RAW, _next_token_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    rng = np.random.default_rng(0)
    examples = [_ex(rng.integers(5, 300, 3 + i), rng.integers(5, 300, 4 + 2 * i)) for i in range(4)]
    packed = pack(examples, max_len=40)
    assert len(packed) < len(examples)  # something was packed together
    alone = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], pad_id=0)
    with torch.no_grad():
        got, _, _ = _next_token_logprobs(model, packed.input_ids, packed.attention_mask, RAW, packed.loss_mask,
                                         segment_ids=packed.segment_ids)
        want, _, _ = _next_token_logprobs(model, alone.input_ids, alone.attention_mask, RAW, alone.loss_mask)
    got_tokens = got[torch.as_tensor(packed.loss_mask).bool()]  # response targets, in packing order
    want_tokens = torch.cat([want[i][torch.as_tensor(alone.loss_mask[i]).bool()] for i in range(len(examples))])
    assert got_tokens.shape == want_tokens.shape
    # Without the block mask the later examples would attend to the earlier ones and differ.
    torch.testing.assert_close(got_tokens, want_tokens, atol=1e-5, rtol=0)


def test_sft_rows_with_missing_fields_name_file_line_and_field(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from cluster.prompts import PromptFormat
    from recipes.sft import load_examples
    from rewards.data import DatasetError

    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=?", "response": "x"}) + "\n\n" + json.dumps({"prompt": "2+2=?"}) + "\n")
    tokenizer, fmt = AutoTokenizer.from_pretrained(tiny_model), PromptFormat("r1", ("</answer>",), tiny_model)
    keep_all = lambda question: False  # noqa: E731
    with pytest.raises(DatasetError, match=r"stage cold_start: .*traces.jsonl:3: field 'response' is missing"):
        load_examples(path, tokenizer, fmt, "stage cold_start", keep_all)
    path.write_text("")
    with pytest.raises(DatasetError, match="has no rows"):
        load_examples(path, tokenizer, fmt, "stage cold_start", keep_all)
    with pytest.raises(DatasetError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl", tokenizer, fmt, "stage cold_start", keep_all)


def test_sft_data_loses_exactly_its_held_out_rows(tmp_path, tiny_model, capsys):
    """Both SFT files (the main data and sft.mix_path) are read this way."""
    from transformers import AutoTokenizer

    from cluster.config import load_config
    from cluster.prompts import PromptFormat
    from recipes.sft import load_examples
    from rewards.tasks import build_mixture

    tasks = build_mixture(load_config(None, ["cold_start.steps=0"]).task)
    held, train = tasks.eval_problems(0, 3), tasks.sample(random.Random(0), 6)
    rows = [{"prompt": p.prompt, "response": f"x</think><answer>{p.reference.answer}</answer>"}
            for p in train[:2] + held + train[2:]]
    mixed, clean = tmp_path / "mixed.jsonl", tmp_path / "clean.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[5:]))
    tokenizer, fmt = AutoTokenizer.from_pretrained(tiny_model), PromptFormat("r1", ("</answer>",), tiny_model)
    got = load_examples(mixed, tokenizer, fmt, "stage sft (sft.mix_path)", tasks.held_out)
    assert capsys.readouterr().out == f"r1ray: stage sft (sft.mix_path): dropped 3 held-out rows of {mixed}\n"
    want = load_examples(clean, tokenizer, fmt, "clean", lambda question: False)
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        assert a.prompt_ids.tolist() == b.prompt_ids.tolist() and a.response_ids.tolist() == b.response_ids.tolist()


def test_general_rows_are_mixed_in_at_the_ratio():
    from recipes.sft import epoch_examples

    main, general = [_ex([1], [2])] * 30, [_ex([3], [4])]
    epoch = epoch_examples(main, general, 0.2, random.Random(0))
    assert len(epoch) == 36 and sum(int(e.prompt_ids[0]) == 3 for e in epoch) == 6
