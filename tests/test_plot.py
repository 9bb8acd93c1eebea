"""`r1ray plot` on a recorded metrics file: one panel per logged family of curves."""

import json

import numpy as np
import pytest

from cluster.plot import plot, series, smooth
from r1ray.cli import main


def write_run(tmp_path, rows):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def recorded(steps=30, kl=True, evals=True, reflection=True, general=False):
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "reward/mean": s / steps, "reward/correct": s / steps / 2, "reward/format": 1.0,
               "response_length/mean": 20 + s, "response_length/max": 32, "task/arithmetic/reward": 0.5}
        if reflection:
            row["rollout/reflection_rate"] = s / steps
        if kl:
            row["learner/kl"] = 0.001 * s
        if evals and s % 10 == 0:
            row["eval/pass@1"] = s / 100
        if general:  # a final RL stage: a reward-model-scored task beside arithmetic
            row |= {"reward/preference": 0.5 + s / 100, "task/general/correct": 0.6 - s / 100}
            if s % 10 == 0:
                row["eval/pass@1/greedy/general"] = 0.8 - s / 100
        rows.append(row)
    return rows


def test_smooth_is_a_trailing_mean():
    assert smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2) == pytest.approx([1.0, 2.0, 4.0, 6.0])
    assert smooth(np.array([1.0, 3.0]), 1) == pytest.approx([1.0, 3.0])


def test_one_panel_per_family_of_logged_curves(tmp_path):
    import matplotlib.image

    full = plot(write_run(tmp_path / "a", recorded()))
    bare = plot(write_run(tmp_path / "b", recorded(kl=False, evals=False, reflection=False)), tmp_path / "bare.png",
                window=1)
    assert full == tmp_path / "a" / "curves.png" and bare == tmp_path / "bare.png"
    # 2.6 inches at 100 dpi per panel: reward, length, reflection, KL, eval vs reward, length.
    assert matplotlib.image.imread(full).shape[0] == 5 * 260
    assert matplotlib.image.imread(bare).shape[0] == 2 * 260
    # A run with a reward-model-scored task: its score beside the reference, a sixth panel.
    assert matplotlib.image.imread(plot(write_run(tmp_path / "c", recorded(general=True)))).shape[0] == 6 * 260


def test_held_out_curves_start_where_rl_started():
    rows = recorded()
    results = {"accuracy/before_rl": 0.35, "accuracy/before_rl/pass@1": 0.38, "accuracy/after_rl": 0.9}
    steps, values = series(rows, "eval/pass@1/greedy", results)  # the run logged no greedy figure: the start alone
    assert steps.tolist() == [0] and values.tolist() == [0.35]
    steps, values = series(rows, "eval/pass@1", results)
    assert steps.tolist() == [0, 10, 20, 30] and values.tolist() == pytest.approx([0.38, 0.1, 0.2, 0.3])
    steps, values = series(rows, "reward/mean", results)  # training curves start at step 1
    assert steps[0] == 1 and len(steps) == 30
    assert series(rows, "eval/pass@1", {})[0].tolist() == [10, 20, 30]  # a run still going: no results.json
    assert series(rows, "eval/pass@1", {"accuracy/before_rl/pass@1": float("nan")})[0].tolist() == [10, 20, 30]
    # Per task, the task's own start: greedy and sampled.
    rows = recorded(general=True)
    results |= {"accuracy/before_rl/general": 0.875, "accuracy/before_rl/pass@1/general": 0.5}
    steps, values = series(rows, "eval/pass@1/greedy/general", results)
    assert steps.tolist() == [0, 10, 20, 30] and values.tolist() == pytest.approx([0.875, 0.7, 0.6, 0.5])
    steps, values = series([{"step": 5, "eval/pass@1/general": 0.25}], "eval/pass@1/general", results)
    assert steps.tolist() == [0, 5] and values.tolist() == [0.5, 0.25]


def test_plot_command_names_a_missing_or_bad_metrics_file(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
