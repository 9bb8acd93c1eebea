"""Checkpoints: everything a run needs to go on as if it had never stopped.

    RUN_DIR/checkpoints/step-000040/
        model/          the policy as an HF folder (safetensors + tokenizer): transformers
                        and vLLM load it as is
        learner/        DeepSpeed's per-rank weights, optimizer moments and torch RNG
        config.yaml     the config the run had when it saved
        state.json      step, weight version, the prompt sampler's RNG state, results so far,
                        the W&B run id
        manifest.json   size and sha256 of every file above, written last

Saving is atomic: everything is written to `step-000040.partial/`, then the folder is
renamed, so a crash mid-save leaves the previous checkpoint as the newest complete one (and
the partial folder is swept by the next save). `latest` checks each candidate against its
manifest and never loads one whose files are missing, truncated or changed; it falls back to
the previous checkpoint and says why. Only the newest `checkpoint.keep` are kept.

When (`due`): every `checkpoint.every` steps, and after a step that ends
`checkpoint.every_minutes` after the last save (or RL's start), so a learner rank's death
(the run resumes itself, cluster/train.py) or a lost driver costs at most that much work;
also at the end and when stopped by a signal.

Saving is synchronous, between steps. The learner's part must be: the ranks write their state
from the live tensors, which the next optimizer step changes (writing it in the background
would need a second copy of the optimizer's state in memory). The driver's part (config,
state, the manifest's sha256 of every file, the rename, rotation) could run in a thread while
the next step runs, but every reader of the run's checkpoints (the next save, a resume after
a learner's death, a stop's promise of a checkpoint, the run's summary) would have to wait
for it first, and its errors would surface a save late; on the default job it is not worth
it. A save there (4.4M parameters, 51 MB) took 0.22-0.28 s: 0.15-0.21 s on the learner and
0.06-0.08 s in the driver (2 contended AMD EPYC cores, 2026-12-02), once per 50 steps or 10
minutes. Hashing runs at ~0.7 GB/s here: for a model of billions of parameters (tens of GB
with Adam's moments) the driver's part grows to tens of seconds, and a background manifest
becomes worth its waits.

Learning-rate schedule: a pure function of the step (`learner.schedule.lr_at`), so the step
is its whole state. The engines' sampling seeds are derived from the step too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Callable

from cluster.config import CheckpointConfig, Config, ConfigError, to_dict

PREFIX = "step-"
PARTIAL = ".partial"
# Keys a resumed run may change; any other difference from the checkpoint's config is an error.
# The engines' count and CPUs change no number: prompts are seeded one by one, whichever
# engine samples them (tests/test_e2e.py resumes a one-engine run with two).
RESUMABLE = ("algorithm.steps", "algorithm.max_minutes", "logging.", "cluster.", "checkpoint.", "sync.timeout_s",
             "eval.", "rollout.max_restarts", "rewards.max_restarts", "rollout.num_engines", "rollout.num_cpus")


class CheckpointError(ConfigError):
    """No usable checkpoint, or one the given config cannot continue."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def due(cfg: CheckpointConfig, step: int, since_save_s: float) -> bool:
    """Whether step `step`, ending `since_save_s` seconds after the last save (or RL's start),
    is saved (besides the last step and a stop, which always are)."""
    by_steps = cfg.every > 0 and step % cfg.every == 0
    return by_steps or (cfg.every_minutes > 0 and since_save_s >= 60 * cfg.every_minutes)


def save(run_dir: Path, step: int, write: Callable[[Path], None], state: dict, config: Config,
         keep: int, also: int | None = None) -> Path:
    """Write checkpoint `step`: `write(folder)` fills in model/ and learner/, this adds the
    config, `state` and the manifest, then publishes the folder and rotates old ones: the
    newest `keep` stay, and step `also` if given."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"*{PARTIAL}"):  # left by a save that crashed
        shutil.rmtree(stale, ignore_errors=True)
    final = step_folder(run_dir, step)
    tmp = root / f"{final.name}{PARTIAL}"
    tmp.mkdir()
    write(tmp)
    import yaml

    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    files = {str(p.relative_to(tmp)): _digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_synced(tmp / "manifest.json", json.dumps(files, indent=1))
    if final.exists():  # a second save of the same step (e.g. the end right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in complete(run_dir)[:-keep]:
        if also is None or old != step_folder(run_dir, also):
            shutil.rmtree(old, ignore_errors=True)
    return final


def step_folder(run_dir: Path, step: int) -> Path:
    """Where checkpoint `step` of the run is published."""
    return checkpoints_dir(run_dir) / f"{PREFIX}{step:06d}"


def complete(run_dir: Path) -> list[Path]:
    """Published checkpoint folders, oldest first (not yet checked against their manifests)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and not p.name.endswith(PARTIAL))


def problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be loaded (missing, truncated or changed files), or None if sound."""
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())
    except ValueError:
        return "manifest.json is not valid JSON"
    for name, (size, sha) in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if _digest(path)[1] != sha:
            return f"{name} does not match its sha256"
    return None


def latest(run_dir: Path, missing_ok: bool = False) -> Path | None:
    """The newest sound checkpoint of a run; CheckpointError if there is none (None with
    `missing_ok` when the run has saved none yet: one that saved only broken ones still fails)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"--resume {run_dir}: not a run folder (no config.yaml)")
    if missing_ok and not complete(run_dir):
        return None
    rejected = []
    for ckpt in reversed(complete(run_dir)):
        why = problem(ckpt)
        if why is None:
            for name, reason in rejected:
                print(f"r1ray: skipping checkpoint {name}: {reason}", flush=True)
            return ckpt
        rejected.append((ckpt.name, why))
    found = "; ".join(f"{n}: {r}" for n, r in rejected) or "none saved"
    raise CheckpointError(f"--resume {run_dir}: no usable checkpoint in {checkpoints_dir(run_dir)} ({found})")


def load_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def check_compatible(ckpt: Path, cfg: Config) -> None:
    """Refuse to continue `ckpt` with a config that differs in anything but RESUMABLE keys."""
    import yaml

    differ = differences(yaml.safe_load((ckpt / "config.yaml").read_text()), cfg, "checkpoint")
    if differ:
        raise CheckpointError(f"cannot resume {ckpt}: the config differs in {differ}; only "
                              f"{', '.join(RESUMABLE)} may change on resume")
    if cfg.algorithm.steps < load_state(ckpt)["step"]:
        raise CheckpointError(f"cannot resume {ckpt}: it is at step {load_state(ckpt)['step']}, past "
                              f"algorithm.steps={cfg.algorithm.steps}")


def differences(saved: dict, cfg: Config, where: str) -> str:
    """The keys, besides RESUMABLE ones, in which `cfg` differs from the config tree `saved`
    (read from `where`), with both values; "" when none do."""
    saved, given = _flat(saved), _flat(to_dict(cfg))
    differ = [k for k in sorted(saved.keys() | given.keys())
              if saved.get(k) != given.get(k) and not k.startswith(RESUMABLE)]
    listed = ", ".join(f"{k} ({where}: {saved.get(k)!r}, now: {given.get(k)!r})" for k in differ[:5])
    return listed + (" and more" if len(differ) > 5 else "")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class Stopped(Exception):
    """A run stopped by a signal after saving a checkpoint (the command exits 128 + signum)."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}, with a checkpoint; "
                         f"continue with: r1ray train --resume {run_dir}")
        self.signum = signum
