"""The learning-rate schedule (learner/schedule.py) by hand for each driver's use, and against
the three per-driver functions it replaced, kept here verbatim as references."""

import math
from itertools import pairwise

import pytest

from learner.schedule import lr_at

# ---- by hand ------------------------------------------------------------------------------------


def test_rl_warms_up_over_warmup_steps_then_stays():
    # cluster/train.py: steps count from 1; warm-up 4: 2 x 1/4, 2 x 2/4, 2 x 3/4, then 2.
    assert [lr_at(2.0, s, 4) for s in range(1, 7)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [lr_at(2.0, s, 0) for s in (1, 2, 50)] == [2.0, 2.0, 2.0]  # no warm-up


def test_sft_warms_up_over_a_tenth_then_decays_to_a_tenth():
    # cluster/sft.py, 20 steps: warm-up 20 // 10 = 2 (1/2, then the peak), then cosine with
    # done = (s - 3) / 18: s = 3 -> 0.1 + 0.9 x (1 + 1) / 2 = 1; s = 12 -> done 1/2 -> 0.1 + 0.45 = 0.55;
    # s = 20 -> done 17/18 -> 0.1 + 0.45 x (1 + cos(17 pi / 18)) = 0.1 + 0.45 x 0.01519 = 0.10684.
    lrs = [lr_at(1.0, s, 2, total=20) for s in range(1, 21)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[11] == pytest.approx(0.55) and lrs[19] == pytest.approx(0.10684, abs=1e-5)
    assert all(a > b for a, b in pairwise(lrs[2:]))  # falling from step 3 on
    # 100 steps: 0.1 at the first, the peak at the tenth, near a tenth at the last.
    lrs = [lr_at(1.0, s, 10, total=100) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_reward_model_warms_up_over_a_tenth_rounded_up_then_stays():
    # cluster/reward_model.py, 20 steps: warm-up ceil(2.0) = 2; 25 steps: ceil(2.5) = 3.
    assert [lr_at(1.0, s, 2) for s in (1, 2, 3, 20)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_at(3.0, s, 3) for s in (1, 2, 3, 25)] == [1.0, 2.0, 3.0, 3.0]


# ---- the functions it replaced ------------------------------------------------------------------
# Verbatim but for their names; each driver's call of lr_at must give what its own function gave.


def rl_before(lr: float, warm: int, step: int) -> float:  # cluster/train.py lr_at(cfg, step), step from 1
    return lr * (min(1.0, step / warm) if warm else 1.0)


def sft_before(peak: float, step: int, total: int) -> float:  # cluster/sft.py lr_at, step from 0
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    done = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def reward_model_before(peak: float, step: int, steps: int) -> float:  # cluster/reward_model.py warmup_lr, from 0
    warm = max(1, math.ceil(0.1 * steps))
    return peak * min(1.0, (step + 1) / warm)


PEAKS = [1.0, 0.5, 2.0**-12, 1e-6, 1e-5, 5e-5, 3e-4, 1e-3, 2e-3, 3e-3]


@pytest.mark.parametrize("peak", PEAKS)
def test_rl_gives_what_it_gave(peak):
    for warm in range(40):
        for step in range(1, 120):
            assert lr_at(peak, step, warm) == rl_before(peak, warm, step), (warm, step)


@pytest.mark.parametrize("peak", PEAKS)
def test_reward_model_gives_what_it_gave(peak):
    for steps in range(1, 300):
        for step in range(steps):
            assert lr_at(peak, step + 1, max(1, math.ceil(0.1 * steps))) == reward_model_before(peak, step, steps)


@pytest.mark.parametrize("peak", PEAKS)
def test_sft_gives_what_it_gave(peak):
    """Exactly, but in the warm-up for peaks that are not powers of two: there the old function
    rounded peak x (step + 1) before dividing by the warm-up, and lr_at (as the RL and reward-model
    schedules did) divides first. The two roundings differ on about a quarter of the warm-up steps,
    by 1 ulp (2 on 0.2% of them): a relative 2e-16, far below anything a step could show."""
    exact_warmup = math.frexp(peak)[0] == 0.5  # a power of two: multiplying by it rounds nothing
    for steps in range(1, 300):
        warm = max(1, steps // 10)
        for step in range(steps):
            new, old = lr_at(peak, step + 1, warm, total=steps), sft_before(peak, step, steps)
            if step >= warm or exact_warmup:
                assert new == old, (steps, step)
            else:
                assert abs(new - old) <= 2 * math.ulp(old), (steps, step)
