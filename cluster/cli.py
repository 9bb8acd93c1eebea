"""The `r1ray` command: `r1ray train ...`, `r1ray eval ...`.

Subcommands dispatch with a plain `if` so every entry point can be found with grep.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: r1ray train [--config FILE] [--resume RUN_DIR] [key=value ...]\n"
              "       r1ray eval --model PATH --task NAME [--k 8] [--prompts 200] [key=value ...]\n"
              "       r1ray plot RUN_DIR [--out FILE.png]\n\n"
              "  train   cold-start SFT then GRPO on a local or remote Ray cluster\n"
              "  eval    pass@1 (greedy, sampled), pass@k and maj@k of a model on held-out problems\n"
              "  plot    reward, response length and KL curves of a run, from its metrics.jsonl")
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
    print(f"r1ray: unknown command {command!r}; valid: train, eval, plot", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
