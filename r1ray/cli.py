"""The `r1ray` command: every subcommand's arguments, and the one place errors become exit codes.

    r1ray train [--config FILE] [--resume RUN_DIR] [key=value ...]
    python -m r1ray train --config configs/default.yaml learner.lr=1e-4   # the same; a
                                                    # `ray job submit` entrypoint

Subcommands dispatch with a plain `if` so every entry point can be found with grep; each
one's body calls a plain function of cluster/ (the loop) or recipes/ (the R1 stages), which
raise errors and never exit. `run` turns what a user can act on into one line and a code.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

USAGE = """\
usage: r1ray train [--config FILE] [--resume RUN_DIR] [key=value ...]
       r1ray eval --model PATH --task NAME [--k 8] [--prompts 200] [key=value ...]
       r1ray plot RUN_DIR [--out FILE.png]
       r1ray pipeline RECIPE.yaml [--redo STAGE] [--until STAGE] [--from RUN_DIR] [key=value ...]
       r1ray train-rm --data PAIRS.jsonl --out DIR [--config FILE] [key=value ...]
       r1ray distill --teacher PATH --student PATH_OR_CONFIG --task NAME [--out DIR] [key=value ...]

  train     cold-start SFT then GRPO on a local or remote Ray cluster
  eval      pass@1 (greedy, sampled), pass@k and maj@k of a model on held-out problems
  plot      reward, response length and KL curves of a run, from its metrics.jsonl
  pipeline  a recipe's stages in order (R1: cold start, RL, rejection sampling, SFT, RL)
  train-rm  a Bradley-Terry reward model from (prompt, chosen, rejected) pairs
  distill   a teacher's verified reasoning traces learned by a student with SFT"""

COMMANDS = ("train", "eval", "plot", "pipeline", "train-rm", "distill")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        args = _parser("train", "--config", "--resume", "overrides").parse_args(rest)
        return run(lambda: _train(args))
    if command == "eval":
        args = _parser("eval", "--model", "--task", "--k", "--prompts", "--config", "overrides").parse_args(rest)
        return run(lambda: _eval(args))
    if command == "plot":
        args = _parser("plot", "run_dir", "--out", "--smooth").parse_args(rest)
        return run(lambda: _plot(args))
    if command == "pipeline":
        args = _parser("pipeline", "recipe", "--redo", "--until", "--from", "overrides").parse_args(rest)
        return run(lambda: _pipeline(args))
    if command == "train-rm":
        args = _parser("train-rm", "--data", "--out", "--config", "overrides", required=("--out",)).parse_args(rest)
        return run(lambda: _train_rm(args))
    if command == "distill":
        args = _parser("distill", "--teacher", "--student", "--task", "--out", "--config", "overrides").parse_args(rest)
        return run(lambda: _distill(args))
    print(f"r1ray: unknown command {command!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


# ---- the commands' bodies ----------------------------------------------------------------------

def _train(args: argparse.Namespace) -> None:
    from cluster.checkpoint import CheckpointError
    from cluster.config import load_config
    from cluster.train import train

    config = args.config or (args.resume / "config.yaml" if args.resume else None)
    if args.resume and not Path(config).is_file():
        raise CheckpointError(f"--resume {args.resume}: not a run folder (no config.yaml)")
    train(load_config(config, args.overrides), args.resume)


def _eval(args: argparse.Namespace) -> None:
    """Engines and reward workers for one task; prints its table."""
    from cluster.evaluate import evaluate_model, print_table
    from cluster.train import resolve_model
    from common.config import ConfigError
    from rewards.tasks import build_mixture

    if args.k < 1 or args.prompts < 1:
        raise ConfigError(f"--k={args.k} and --prompts={args.prompts} must be at least 1")
    cfg = _one_task_config(args, f"model.path={args.model}")
    model_path = resolve_model(cfg)
    tasks = build_mixture(cfg.task)
    problems = tasks.eval_problems(cfg.algorithm.seed, args.prompts)
    results = evaluate_model(cfg, model_path, tasks.tasks, problems, args.k, progress=True)
    print_table(results, f"{args.task}, {len(problems)} held-out problems, {model_path}")


def _plot(args: argparse.Namespace) -> None:
    from cluster.plot import plot

    try:
        print(f"r1ray: wrote {plot(args.run_dir, args.out, args.smooth)}")
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None


def _pipeline(args: argparse.Namespace) -> None:
    from recipes.recipe import load_recipe, run_recipe

    run_recipe(load_recipe(args.recipe, args.overrides), args.redo, args.until, args.source)


def _train_rm(args: argparse.Namespace) -> None:
    from cluster.config import load_config
    from cluster.evaluate import print_table
    from cluster.train import resolve_model
    from recipes.reward_model import train_reward_model
    from rewards.tasks import build_mixture

    cfg = load_config(args.config, args.overrides)
    model_path = resolve_model(cfg)
    results = train_reward_model(cfg, args.data, args.out, model_path, held_out=build_mixture(cfg.task).held_out)
    print_table(results, f"reward model {args.out} (from {model_path}, pairs {args.data})")


def _distill(args: argparse.Namespace) -> None:
    import dataclasses

    from cluster.evaluate import print_table
    from cluster.train import resolve_model
    from recipes.distill import distill, student_model
    from rewards.tasks import build_mixture

    cfg = _one_task_config(args)
    teacher = resolve_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=args.teacher)))
    student = student_model(args.student, cfg)
    out = args.out or Path(cfg.cluster.runs_dir) / time.strftime("distill-%Y%m%d-%H%M%S")
    results = distill(cfg, teacher, student, out, held_out=build_mixture(cfg.task).held_out)
    print_table(results, f"r1ray distill: {args.task}, teacher {teacher} -> student {out / 'student'}")


def _one_task_config(args: argparse.Namespace, *extra: str):
    """The config of a command about one task (`--task`): only that task has a weight, and no
    cold start."""
    from cluster.config import load_config
    from common.config import ConfigError
    from rewards.config import TASKS

    if args.task not in TASKS:
        raise ConfigError(f"--task {args.task!r} is not a task; choose one of {', '.join(TASKS)}")
    weights = [f"task.{t}.weight={1 if t == args.task else 0}" for t in TASKS]
    return load_config(args.config, [*weights, "cold_start.steps=0", *extra, *args.overrides])


# ---- arguments -------------------------------------------------------------------------------

ARGUMENTS: dict[str, dict] = {  # name: argparse's keywords
    "overrides": dict(nargs="*", metavar="key=value", help="config keys, e.g. learner.lr=1e-5"),
    "--config": dict(help="YAML config file (default: the built-in default job)"),
    "--resume": dict(metavar="RUN_DIR", type=Path,
                     help="continue this run from its newest checkpoint (its config.yaml unless --config)"),
    "--model": dict(required=True, help="an HF model folder (e.g. runs/<run>/model)"),
    "--task": dict(required=True, help="one task: arithmetic, countdown, knights, math (with "
                   "task.math.path=...), code or general"),
    "--k": dict(type=int, default=8, help="samples per problem for pass@k and maj@k (1: greedy only)"),
    "--prompts": dict(type=int, default=200, help="held-out problems"),
    "run_dir": dict(type=Path, help="a run folder"),
    "--out": dict(type=Path, help="where to write: plot's PNG (default RUN_DIR/curves.png), distill's "
                  "folder (default runs/distill-<time>), train-rm's new reward-model folder"),
    "--smooth": dict(type=int, default=10, help="trailing-mean window in steps (1: raw)"),
    "recipe": dict(help="a recipe file, e.g. configs/r1.yaml"),
    "--redo": dict(metavar="STAGE", help="run this stage and every later one again"),
    "--until": dict(metavar="STAGE", help="stop after this stage"),
    "--from": dict(metavar="RUN_DIR", dest="source", help="take the stages done in this run of the recipe "
                   "(before --redo) instead of running them"),
    "--data": dict(required=True, help="JSONL of {prompt, chosen, rejected} rows"),
    "--teacher": dict(required=True, help="the teacher's HF model folder"),
    "--student": dict(required=True, help="an HF model folder, a YAML config with a model group, "
                      "or tiny (with model.* overrides)"),
}
"""Every argument of every subcommand, declared once."""


def _parser(command: str, *names: str, required: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The parser of `r1ray command`, with the `ARGUMENTS` of `names` (those in `required` made so)."""
    parser = argparse.ArgumentParser(prog=f"r1ray {command}")
    for name in names:
        kwargs = ARGUMENTS[name]
        parser.add_argument(name, **(kwargs | {"required": True} if name in required else kwargs))
    return parser


# ---- errors -> exit codes ----------------------------------------------------------------------

class UsageError(Exception):
    """A command's argument names nothing usable (e.g. `r1ray plot` of a folder without metrics)."""


def run(body: Callable[[], object]) -> int:
    """Run a command's body; turn what a user can act on into one line and an exit code:
    2 for what the user can fix (config, cluster size, a prompt too long, a missing file),
    1 for what broke while running, 128+signal for a run stopped with a checkpoint or by a
    Ctrl-C, else 0. (A run stopped at once exits in its signal handler: cluster/train.py,
    `StopRequest`.)"""
    from actors.rollout import PromptTooLongError
    from cluster.checkpoint import Stopped
    from cluster.faults import RestartsExhausted
    from cluster.placement import ClusterError
    from cluster.rollout_pool import EngineDiedError
    from common.config import ConfigError
    from common.weight_sync import WeightSyncError
    from recipes.recipe import StageError
    from recipes.rejection import NothingKeptError
    from rewards.data import DatasetError

    quiet_libraries()
    ray = sys.modules.get("ray")
    ours = ray is None or not ray.is_initialized()  # a Ray session this command starts, it stops
    try:
        body()
    except Stopped as err:
        print(f"r1ray: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:  # a Ctrl-C where no handler of r1ray's is installed (before a run's start)
        print("r1ray: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ConfigError, ClusterError, PromptTooLongError, DatasetError, StageError, UsageError) as err:
        print(f"r1ray: error: {_message(err)}", file=sys.stderr)
        return 2
    except (WeightSyncError, EngineDiedError, NothingKeptError, RestartsExhausted) as err:
        print(f"r1ray: error: {_message(err)}{_details()}", file=sys.stderr)
        return 1
    except TimeoutError as err:  # a remote call (Ray's GetTimeoutError), or a step's rollout that never finished
        ray = sys.modules.get("ray")
        timed_out = ray is not None and isinstance(err, ray.exceptions.GetTimeoutError)
        print(f"r1ray: error: {'a remote call took longer than cluster.timeout_s' if timed_out else err}"
              f"{_details()}", file=sys.stderr)
        return 1
    finally:
        ray = sys.modules.get("ray")  # `r1ray plot` never imports it
        if ours and ray is not None and ray.is_initialized():
            ray.shutdown()
    return 0


def _no_cpu_notice(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def quiet_libraries() -> None:
    """What this process's libraries print unasked, on every command: DeepSpeed's warning that
    it found no GPU (transformers imports DeepSpeed whenever a model is loaded or saved, here
    where no rank runs) and Hugging Face's progress bars for writing and loading weights. The
    actors' own output is kept apart too (cluster.placement.connect, logging.verbose)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub and transformers
    logging.getLogger("DeepSpeed").addFilter(_no_cpu_notice)  # once: a filter added twice is kept once


def _details() -> str:
    """Where the actors' own account of a failure is, when it was not printed here."""
    from cluster.placement import actor_logs

    logs = actor_logs()
    return f" (the actors' output: {logs})" if logs else ""


def _message(err: Exception) -> str:
    """The error's own message, without the remote traceback Ray wraps around it."""
    cause = getattr(err, "cause", None)
    return str(cause if isinstance(cause, Exception) else err)
