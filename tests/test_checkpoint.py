"""Checkpoint folders: atomic publication, rotation, corruption detection, config checks."""

import json

import pytest
import yaml

from cluster import checkpoint
from cluster.checkpoint import CheckpointError
from cluster.config import load_config, to_dict

CFG = load_config(None)


def run_dir(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(CFG)))
    return tmp_path


def write_weights(content: bytes):
    def write(folder):
        (folder / "model").mkdir()
        (folder / "model" / "model.safetensors").write_bytes(content)
    return write


def test_saves_are_published_whole_and_rotated(tmp_path):
    d = run_dir(tmp_path)
    for step in (10, 20, 30):
        checkpoint.save(d, step, write_weights(b"w%d" % step), {"version": step + 1}, CFG, keep=2)
    assert [p.name for p in checkpoint.complete(d)] == ["step-000020", "step-000030"]
    newest = checkpoint.latest(d)
    assert newest.name == "step-000030" and checkpoint.load_state(newest) == {"step": 30, "version": 31}
    assert (newest / "model" / "model.safetensors").read_bytes() == b"w30"
    assert yaml.safe_load((newest / "config.yaml").read_text()) == to_dict(CFG)


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path):
    d = run_dir(tmp_path)
    checkpoint.save(d, 1, write_weights(b"one"), {}, CFG, keep=2)

    def crash(folder):
        write_weights(b"half")(folder)
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.save(d, 2, crash, {}, CFG, keep=2)
    assert checkpoint.latest(d).name == "step-000001"
    checkpoint.save(d, 3, write_weights(b"three"), {}, CFG, keep=2)  # sweeps the partial folder
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step-000001", "step-000003"]


def test_a_corrupt_checkpoint_is_detected_and_skipped(tmp_path, capsys):
    d = run_dir(tmp_path)
    checkpoint.save(d, 1, write_weights(b"good"), {}, CFG, keep=3)
    bad = checkpoint.save(d, 2, write_weights(b"also good"), {}, CFG, keep=3)
    (bad / "model" / "model.safetensors").write_bytes(b"also goo")  # truncated
    assert checkpoint.latest(d).name == "step-000001"
    assert "skipping checkpoint step-000002: model/model.safetensors has 8 bytes, the manifest says 9" in \
        capsys.readouterr().out
    (checkpoint.complete(d)[0] / "model" / "model.safetensors").write_bytes(b"evil")  # same size, other bytes
    with pytest.raises(CheckpointError, match="step-000001: model/model.safetensors does not match its sha256"):
        checkpoint.latest(d)


def test_a_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    d = run_dir(tmp_path)
    ckpt = checkpoint.save(d, 5, write_weights(b"x"), {}, CFG, keep=2)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step-000005: no manifest.json"):
        checkpoint.latest(d)


def test_resume_accepts_more_steps_and_refuses_other_changes(tmp_path):
    d = run_dir(tmp_path)
    ckpt = checkpoint.save(d, 40, write_weights(b"x"), {}, CFG, keep=2)
    checkpoint.check_compatible(ckpt, load_config(None, ["algorithm.steps=500", "logging.wandb_mode=disabled",
                                                         "rollout.num_engines=2", "rollout.num_cpus=0.4",
                                                         "algorithm.max_minutes=30"]))
    with pytest.raises(CheckpointError, match=r"differs in .*algorithm.loss \(checkpoint: 'grpo', now: 'gspo'\)"):
        checkpoint.check_compatible(ckpt, load_config(None, ["algorithm.loss=gspo"]))
    with pytest.raises(CheckpointError, match=r"differs in rollout.max_new_tokens"):  # not every rollout key
        checkpoint.check_compatible(ckpt, load_config(None, ["rollout.max_new_tokens=64"]))
    with pytest.raises(CheckpointError, match=r"differs in learner.lr \(checkpoint: 5e-05, now: 0.001\)"):
        checkpoint.check_compatible(ckpt, load_config(None, ["learner.lr=1e-3"]))
    with pytest.raises(CheckpointError, match="it is at step 40, past algorithm.steps=30"):
        checkpoint.check_compatible(ckpt, load_config(None, ["algorithm.steps=30"]))


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    ckpt = checkpoint.save(run_dir(tmp_path), 1, write_weights(b"abc"), {"v": 1}, CFG, keep=1)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest) == {"model/model.safetensors", "config.yaml", "state.json"}
    assert manifest["model/model.safetensors"][0] == 3


def test_a_save_is_due_every_n_steps_and_after_every_minutes():
    # every=50, every_minutes=10: step 50 by count; step 3 once 600 s have passed since the
    # last save (or RL's start), not at 599 s; 0 turns either off.
    cfg = load_config(None, ["checkpoint.every=50", "checkpoint.every_minutes=10"]).checkpoint
    assert checkpoint.due(cfg, 50, 0.0) and checkpoint.due(cfg, 3, 600.0)
    assert not checkpoint.due(cfg, 3, 599.0) and not checkpoint.due(cfg, 49, 0.0)
    off = load_config(None, ["checkpoint.every=0", "checkpoint.every_minutes=0"]).checkpoint
    assert not any(checkpoint.due(off, step, 1e9) for step in (1, 50, 100))
    tiny = load_config(None, ["checkpoint.every=0", "checkpoint.every_minutes=0.5"]).checkpoint
    assert [checkpoint.due(tiny, 7, s) for s in (29.9, 30.0)] == [False, True]


def test_a_run_that_saved_nothing_yet_may_start_over_but_not_one_with_only_broken_checkpoints(tmp_path):
    d = run_dir(tmp_path)
    assert checkpoint.latest(d, missing_ok=True) is None
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        checkpoint.latest(d)  # `--resume` of such a folder
    (checkpoint.save(d, 1, write_weights(b"x"), {}, CFG, keep=1) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="step-000001: no manifest.json"):
        checkpoint.latest(d, missing_ok=True)
