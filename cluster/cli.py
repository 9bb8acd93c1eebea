"""The `r1ray` command: `r1ray train ...`, `r1ray eval ...`, `r1ray pipeline ...`, ...

Subcommands dispatch with a plain `if` so every entry point can be found with grep.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable


def run(body: Callable[[], object]) -> int:
    """Run a command's body; turn what a user can act on into one line and an exit code:
    2 for what the user can fix (config, cluster size, a prompt too long), 1 for what broke
    while running, 128+signal for a run stopped with a checkpoint, else 0."""
    import ray

    from actors.pool import EngineDiedError
    from actors.rollout import PromptTooLongError
    from cluster.config import ConfigError
    from cluster.placement import ClusterError
    from cluster.checkpoint import Stopped
    from cluster.recipe import StageError
    from cluster.rejection import NothingKeptError
    from cluster.weight_sync import WeightSyncError
    from rewards.data import DatasetError

    quiet_libraries()
    try:
        body()
    except Stopped as err:
        print(f"r1ray: {err}", file=sys.stderr)
        return 128 + err.signum
    except (ConfigError, ClusterError, PromptTooLongError, DatasetError, StageError) as err:
        print(f"r1ray: error: {_message(err)}", file=sys.stderr)
        return 2
    except (WeightSyncError, EngineDiedError, NothingKeptError) as err:
        print(f"r1ray: error: {_message(err)}{_details()}", file=sys.stderr)
        return 1
    except ray.exceptions.GetTimeoutError:
        print(f"r1ray: error: a remote call took longer than cluster.timeout_s{_details()}", file=sys.stderr)
        return 1
    except TimeoutError as err:  # a step's rollout (cluster/pipeline.py) that never finished
        print(f"r1ray: error: {err}{_details()}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return 0


def quiet_libraries() -> None:
    """What this process's libraries print unasked, on every command: DeepSpeed's warning that
    it found no GPU (transformers imports DeepSpeed whenever a model is loaded or saved, here
    where no rank runs) and Hugging Face's progress bars for writing and loading weights. The
    actors' own output is kept apart too (cluster.placement.connect, logging.verbose)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub and transformers
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


def _details() -> str:
    """Where the actors' own account of a failure is, when it was not printed here."""
    from cluster.placement import actor_logs

    logs = actor_logs()
    return f" (the actors' output: {logs})" if logs else ""


def _message(err: Exception) -> str:
    """The error's own message, without the remote traceback Ray wraps around it."""
    cause = getattr(err, "cause", None)
    return str(cause if isinstance(cause, Exception) else err)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: r1ray train [--config FILE] [--resume RUN_DIR] [key=value ...]\n"
              "       r1ray eval --model PATH --task NAME [--k 8] [--prompts 200] [key=value ...]\n"
              "       r1ray plot RUN_DIR [--out FILE.png]\n"
              "       r1ray pipeline RECIPE.yaml [--redo STAGE]\n"
              "       r1ray train-rm --data PAIRS.jsonl --out DIR [--config FILE] [key=value ...]\n"
              "       r1ray distill --teacher PATH --student PATH_OR_CONFIG --task NAME [--out DIR] [key=value ...]\n\n"
              "  train     cold-start SFT then GRPO on a local or remote Ray cluster\n"
              "  eval      pass@1 (greedy, sampled), pass@k and maj@k of a model on held-out problems\n"
              "  plot      reward, response length and KL curves of a run, from its metrics.jsonl\n"
              "  pipeline  a recipe's stages in order (R1: cold start, RL, rejection sampling, SFT, RL)\n"
              "  train-rm  a Bradley-Terry reward model from (prompt, chosen, rejected) pairs\n"
              "  distill   a teacher's verified reasoning traces learned by a student with SFT")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from cluster.train import main as train_main

        return train_main(rest)
    if command == "eval":
        from cluster.evaluate import main as eval_main

        return eval_main(rest)
    if command == "plot":
        from cluster.plot import main as plot_main

        return plot_main(rest)
    if command == "pipeline":
        from cluster.recipe import main as pipeline_main

        return pipeline_main(rest)
    if command == "train-rm":
        from cluster.reward_model import main as rm_main

        return rm_main(rest)
    if command == "distill":
        from cluster.distill import main as distill_main

        return distill_main(rest)
    print(f"r1ray: unknown command {command!r}; valid: train, eval, plot, pipeline, train-rm, distill",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
