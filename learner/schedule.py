"""The learning-rate schedule: a pure function of the optimizer step, so a resumed run needs no
scheduler state (the step is all of it). The drivers call it with their own warm-up and length:

    RL:            lr_at(learner.lr, step, learner.warmup_steps)              constant after warm-up
    SFT:           lr_at(sft.lr, step, max(1, steps // 10), total=steps)      cosine to a tenth
    reward model:  lr_at(reward_model.lr, step, max(1, ceil(0.1 * steps)))    constant after warm-up
"""

from __future__ import annotations

import math


def lr_at(peak: float, step: int, warmup: int, total: int = 0, final: float = 0.1) -> float:
    """The learning rate of optimizer step `step`, counted from 1.

    Linear warm-up: step s < `warmup` gets peak x s / warmup, step `warmup` the peak. Then the
    peak, or with `total` > 0 a cosine from the peak at step warmup + 1 (done = 0) down toward
    `final` x peak, which step total + 1 would reach (done = 1):
    peak x (final + (1 - final) x (1 + cos(pi x done)) / 2), done = (step - warmup - 1) / (total - warmup).
    """
    if step < warmup:
        return peak * (step / warmup)
    if not total or step <= warmup:
        return peak
    done = (step - warmup - 1) / max(1, total - warmup)
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * done)))
