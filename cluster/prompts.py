"""How a question becomes the text an engine continues, and where its answer stops.

    fmt = prompt_format(cfg, model_path)
    fmt.render("47+38=?"), fmt.stop

- "r1" (`task.template=r1`): the R1-Zero template, `User: ...\\nAssistant: <think>`; the
  answer goes in `<answer>...</answer>` and generation stops there. What R1-Zero trains.
- "chat": the model's own chat template (from its tokenizer) with the question in
  `task.chat_prompt` (e.g. "{question} Reply with just the number."); generation stops at
  the model's end of turn. For instruction-tuned models that cannot follow the R1 tags yet (SmolLM2-135M
  scores 0 with them), so that some answers in a group are right and GRPO has a signal.
Checkers read the last `<answer>` or, without one, the last `\\boxed{}` either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from cluster.config import Config
from rewards.format import STOP_STRINGS, render_prompt



@dataclass(frozen=True)
class PromptFormat:
    name: str
    """ "r1" or "chat"."""
    stop: tuple[str, ...]
    """Stop strings of the answer (the chat format stops at the end-of-turn token instead)."""
    model_path: str
    """Whose tokenizer renders the chat template."""
    chat_prompt: str = "{question}"
    """The user turn of the chat template."""

    def render(self, question: str) -> str:
        if self.name == "r1":
            return render_prompt(question)
        return _tokenizer(self.model_path).apply_chat_template(
            [{"role": "user", "content": self.chat_prompt.replace("{question}", question)}],
            tokenize=False, add_generation_prompt=True)


def prompt_format(cfg: Config, model_path: str) -> PromptFormat:
    stop = STOP_STRINGS if cfg.task.template == "r1" else ()
    return PromptFormat(cfg.task.template, stop, model_path, cfg.task.chat_prompt)


@lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not tokenizer.chat_template:
        from cluster.config import ConfigError

        raise ConfigError(f"task.template=chat: the tokenizer of {model_path} has no chat template; "
                          "use task.template=r1")
    return tokenizer
