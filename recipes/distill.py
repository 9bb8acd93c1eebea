"""Distillation (DeepSeek-R1, section 2.4): a teacher's verified reasoning traces, learned by a
smaller student with SFT alone, no RL.

    r1ray distill --teacher runs/r1/final_rl/model --student configs/student.yaml --task arithmetic
    r1ray distill --teacher T --student PATH --task arithmetic --out runs/distill rejection.k=4

1. The teacher samples `rejection.k` answers to `rejection.prompts` train prompts on the
   rollout engines; the verifier (and the format and readability filters of
   recipes/rejection.py) keep the correct ones -> OUT/traces.jsonl.
2. The student is fine-tuned on them (recipes/sft.py) -> OUT/student.
3. Teacher, student before and student after are scored greedily on the same held-out prompts.
Neither the traces nor the student's SFT data hold a question of the run's held-out split
(the task mixture's; in a pipeline, also the questions the pipeline evaluates on).
The student is an HF folder, a YAML config whose `model` group describes it ("tiny" builds a
model of that shape), or "tiny" with model.* overrides.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cluster.config import Config, ConfigError, load_config
from rewards.tasks import HeldOut


def distill(cfg: Config, teacher: str, student: str, out_dir: Path, what: str = "distill", *,
            held_out: HeldOut) -> dict[str, float]:
    """Steps 1-3 above, with `cfg`'s task mixture, never training on a `held_out` question;
    writes OUT/traces.jsonl, OUT/student and OUT/results.json and returns the results."""
    from cluster.evaluate import evaluate, evaluate_model, serving
    from cluster.prompts import prompt_format
    from recipes.rejection import rejection_sample
    from recipes.sft import sft
    from rewards.tasks import build_mixture

    tasks = build_mixture(cfg.task)
    problems = tasks.eval_problems(cfg.algorithm.seed, cfg.task.eval_prompts)
    out_dir.mkdir(parents=True, exist_ok=True)
    traces, model = out_dir / "traces.jsonl", out_dir / "student"
    with serving(cfg, teacher, tasks.tasks) as served:  # one set of engines: the teacher's score and traces
        results = evaluate(cfg, *served, prompt_format(cfg, teacher), problems, 1, prefix="teacher/")
        results |= rejection_sample(cfg, teacher, traces, f"{what}: teacher traces", held_out=held_out,
                                    served=served)
    results |= {f"student_before/{k}": v for k, v in evaluate_model(cfg, student, tasks.tasks, problems).items()}
    results |= sft(cfg, student, traces, model, f"{what}: student SFT", held_out=held_out)
    results |= {f"student/{k}": v for k, v in evaluate_model(cfg, str(model), tasks.tasks, problems).items()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def student_model(spec: str, cfg: Config) -> str:
    """The student's HF folder from --student: a folder, a YAML config (its model group), or
    "tiny" (cfg's model group)."""
    from cluster.train import resolve_model

    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--student {spec}: no such config file")
        model = load_config(path).model
        return resolve_model(dataclasses.replace(cfg, model=model))
    return resolve_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=spec)))
