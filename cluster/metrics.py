"""Metrics: every RL step goes to `metrics.jsonl` in the run folder and to W&B.

Names are `/`-namespaced and identical in both places (`reward/mean`, `timing/generate`,
...), one JSON object per step with its `step`. W&B runs online with an API key, offline by
default (a local folder under the run folder, `wandb sync` uploads it later) or disabled.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from cluster.config import ConfigError, LoggingConfig
from learner.config import AlgorithmConfig
from rewards.language import reasoning


class MetricsLogger:
    """Appends to the run folder's metrics.jsonl (one row per step) and prompts.jsonl (the
    problem ids each step trained on). A resumed run (`state` from its checkpoint) first
    drops the rows of steps after the checkpoint, which it is about to run again, and
    continues the same W&B run."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict, total_steps: int,
                 state: dict | None = None):
        step = (state or {}).get("step", 0)
        self.path, self.prompts_path = run_dir / "metrics.jsonl", run_dir / "prompts.jsonl"
        for path in (self.path, self.prompts_path, run_dir / "samples.jsonl"):
            _keep_steps_up_to(path, step)
        self.file, self.prompts = self.path.open("a"), self.prompts_path.open("a")
        self.cfg, self.samples_path = cfg, run_dir / "samples.jsonl"
        self.wandb, self.run_id = None, (state or {}).get("wandb_id")
        if cfg.wandb_mode != "disabled":
            import wandb

            try:
                self.wandb = wandb.init(project=cfg.project, entity=cfg.entity or None, name=run_dir.name,
                                        group=cfg.group or None, dir=str(run_dir),
                                        tags=[t.strip() for t in cfg.tags.split(",") if t.strip()] or None,
                                        mode=cfg.wandb_mode, config=config, id=self.run_id,
                                        resume="allow" if self.run_id else None,
                                        settings=wandb.Settings(silent=not cfg.verbose))
                self.run_id = self.wandb.id
            except Exception as err:  # wandb raises many types (auth, network, usage)
                raise ConfigError(f"logging.wandb_mode={cfg.wandb_mode!r}: W&B did not start ({err}); "
                                  "set WANDB_API_KEY, or use offline or disabled") from None
            where = (self.wandb.url if cfg.wandb_mode == "online"
                     else f"{Path(self.wandb.dir).parent} (offline; `wandb sync` uploads it)")
            print(f"r1ray: W&B run {where}", flush=True)
        self.bar = None
        self.progress, self.total_steps, self.first_step = cfg.progress and total_steps > step, total_steps, step

    def log_prompts(self, step: int, problems: list) -> None:
        """Record which problems step `step` trains on (what resume must neither repeat nor skip)."""
        self.prompts.write(json.dumps({"step": step, "ids": [p.id for p in problems]}) + "\n")
        self.prompts.flush()

    def log_samples(self, step: int, problems: list, samples: list, reasons: list[str]) -> None:
        """Every `logging.samples_every` steps: the first answer of the first few groups, to
        samples.jsonl and as a W&B table."""
        every = self.cfg.samples_every
        if not every or step % every or not samples:
            return
        prompts = {p.id: p for p in problems}
        G = len(samples) // len({s.prompt_id for s in samples})
        rows = [[step, prompts[s.prompt_id].task, prompts[s.prompt_id].prompt, s.text, s.reward, reason]
                for s, reason in list(zip(samples, reasons))[::G][:self.cfg.samples_count]]
        columns = ["step", "task", "prompt", "response", "reward", "reason"]
        with self.samples_path.open("a") as f:
            f.writelines(json.dumps(dict(zip(columns, row))) + "\n" for row in rows)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=columns, data=rows)}, step=step)

    def log(self, metrics: dict[str, float]) -> None:
        """Record one step's metrics (must include "step")."""
        record = {"step": int(metrics["step"]), "time": time.time(), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.progress and self.bar is None:  # opened on the first step, after the cold start's bar
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.first_step, desc="GRPO", unit="step",
                            dynamic_ncols=True)
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{metrics.get('reward/mean', 0):.3f}",
                                 acc=f"{metrics.get('reward/correct', 0):.2f}", refresh=False)
            self.bar.update(1)

    def summary(self, values: dict[str, float]) -> None:
        """Run-level results (e.g. accuracy before/after), written to W&B's summary."""
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        self.prompts.close()
        if self.wandb is not None:
            self.wandb.finish()


def _keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` from a jsonl file (all of them for step 0)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    if len(kept) < len(rows):
        path.write_text("".join(line + "\n" for line in kept))


def rollout_metrics(samples: list, group_size: int) -> dict[str, float]:
    """Reward, accuracy, format and length statistics of one step's scored samples."""
    import numpy as np

    rewards = np.array([s.reward for s in samples], dtype=np.float64)  # [N]
    lengths = np.array([len(s.response_ids) for s in samples], dtype=np.float64)  # [N]
    groups = rewards.reshape(-1, group_size)  # [B, G]
    out = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/clipped_fraction": float(np.mean([s.finish_reason == "length" for s in samples])),
        # Groups whose answers all score the same have zero advantage: they teach nothing.
        "groups/all_equal_fraction": float(np.mean(groups.max(axis=1) == groups.min(axis=1))),
    }
    for name in dict.fromkeys(k for s in samples for k in s.reward_breakdown):  # preference: some tasks only
        out[f"reward/{name}"] = float(np.mean([s.reward_breakdown[name] for s in samples
                                               if name in s.reward_breakdown]))
    out["rollout/reflection_rate"] = float(np.mean([reflects(s.text) for s in samples]))
    return out


REFLECTIVE = re.compile(r"\b(wait|let me (re)?check|verify|double[- ]check|re-?examine|reconsider)\b", re.IGNORECASE)
"""The reflective phrases whose rise the R1 paper watched in R1-Zero's reasoning ("aha moment")."""


def reflects(response: str) -> bool:
    """Whether the reasoning (the text before </think>) holds a reflective phrase."""
    return REFLECTIVE.search(reasoning(response)) is not None


def throughput_metrics(samples: list, timings: dict[str, float], body_params: int, head_params: int = 0,
                       forward_only: int = 0, mask_truncated: bool = False,
                       generated: list | None = None) -> dict[str, float]:
    """Tokens per second: answers generated, and prompt + answer tokens learned from; the
    learner's achieved FLOP/s, `learn_flops` over the learn phase's wall time.

    `samples`: the learner's batch (its prompt and answer tokens are `rollout/prompt_tokens`
    and `rollout/response_tokens`); `generated`: every sample the step generated, when the
    batch leaves some out (default: `samples`). `body_params`, `head_params`:
    learner/models.py `flop_parameters` of the policy. `forward_only`:
    `forward_only_passes(cfg.algorithm)`. With `mask_truncated`, truncated answers are left
    out of the loss, so the head skips them (the body does not).
    """
    answers = sum(len(s.response_ids) for s in samples)
    sequences = answers + sum(len(s.prompt_ids) for s in samples)
    trained = sum(len(s.response_ids) for s in samples if not (mask_truncated and s.truncated))
    flops = learn_flops(sequences, trained, body_params, head_params, forward_only)
    made = answers if generated is None else sum(len(s.response_ids) for s in generated)
    return {"throughput/generate_tokens_per_s": made / max(timings["generate"], 1e-9),
            "throughput/learn_tokens_per_s": sequences / max(timings["learn"], 1e-9),
            "throughput/learn_gflops": flops / max(timings["learn"], 1e-9) / 1e9,
            "rollout/response_tokens": float(answers), "rollout/prompt_tokens": float(sequences - answers)}


def learn_flops(tokens: int, answer_tokens: int, body_params: int, head_params: int,
                forward_only: int = 0) -> float:
    """Matmul FLOPs the learner does on a batch of `tokens` real (unpadded) prompt + answer
    tokens, `answer_tokens` of them learned from:

        (6 + 2 x forward_only) x (body_params x tokens + head_params x answer_tokens)

    A forward pass is 2 FLOPs (a multiply and an add) per parameter per token it runs on;
    forward + backward is 3 forwards (the backward computes gradients of the activations and
    of the weights), hence 6 for the trained pass and 2 for each forward-only one (the frozen
    reference, the old-policy recompute). The body (every parameter but the input embedding,
    a lookup) runs on every token; the LM head only on the positions that predict an answer
    token (learner/learner.py, `_next_token_logprobs`), tied to the embedding or not.
    Not counted: attention's score and value products (they grow with sequence length, not
    parameters), the softmax and the optimizer. Nor is work on padding, or on the prompt
    positions ZeRO-3 sends through the head (it runs the head from the first answer column
    on): it is done but not useful, and counting it would flatter the figure.
    """
    forward = body_params * tokens + head_params * answer_tokens
    return (6 + 2 * forward_only) * forward


def forward_only_passes(algo: AlgorithmConfig) -> int:
    """Forward-only passes the learner makes over each token of a step besides its trained
    one (learner/learner.py, `Learner.train_step`): the frozen reference when the KL penalty
    is on (in the loss, or in the reward: `Learner.sequence_kl`); the old policy's recompute
    when several updates share a batch and the old log-probs come from the learner
    (`old_logprobs=learner`, which a mismatch correction implies)."""
    algo = algo.resolved()
    old = algo.updates_per_step > 1 and algo.old_logprobs == "learner"
    return int(algo.kl_beta > 0) + int(old)


def task_metrics(samples: list, problems: list, reasons: list[str]) -> dict[str, float]:
    """Per task of the step's mixture: mean reward, accuracy and share of the samples; and
    the share of samples whose check timed out, crashed or raised (`reasons` from the
    reward pool), which scored 0 whatever the answer."""
    import numpy as np

    task_of = {p.id: p.task for p in problems}
    out = {"reward/check_failed": float(np.mean([r.startswith(("timeout", "crashed", "error")) for r in reasons]))}
    for task in sorted(set(task_of.values())):
        mine = [s for s in samples if task_of[s.prompt_id] == task]
        if mine:
            out[f"task/{task}/reward"] = float(np.mean([s.reward for s in mine]))
            out[f"task/{task}/correct"] = float(np.mean([s.reward_breakdown["correct"] for s in mine]))
        out[f"task/{task}/fraction"] = len(mine) / len(samples)
    return out
