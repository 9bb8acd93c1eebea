"""The real entry point, end to end: `python -m r1ray train` for two GRPO steps, and the
bad inputs a user can give it, each of which must stop quickly with one clear message."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT = ["cold_start.steps=30", "algorithm.steps=2", "algorithm.prompts_per_step=4",
         "algorithm.group_size=4", "task.eval_prompts=8", "logging.progress=false",
         "rollout.max_new_tokens=16", "logging.wandb_mode=offline", "algorithm.kl_beta=0.001",
         "logging.samples_every=2"]


def run(args, tmp_path, timeout=600, env=None):
    cmd = [sys.executable, "-m", "r1ray", "train", *args, f"cluster.runs_dir={tmp_path / 'runs'}",
           f"cluster.cache_dir={tmp_path / 'cache'}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc, time.monotonic() - start


RUNS = {
    # Two vLLM engines fed by the broadcast transport, checked after every sync.
    # Held-out evaluation with 2 samples per problem after step 2.
    # Four steps: the resume test stops a copy of this run after its first step.
    "vllm-x2-broadcast": ["rollout.num_engines=2", "rollout.num_cpus=0.4", "sync.transport=broadcast",
                          "sync.check=true", "eval.every=2", "eval.k=2", "algorithm.steps=4"],
    # One transformers engine fed through the object store, colocated with the learner rank
    # (it sleeps while the rank trains, and refuses work while asleep); truncated answers
    # masked; a mixture of four tasks, one of them a dataset, scored by two checker
    # processes, drawn by a learnability curriculum without settled prompts; DAPO's dynamic
    # sampling refilling the batch with groups that have signal; tokens outside the mismatch
    # band dropped (none: same numerics); an entropy bonus. A wall-clock budget of RL that
    # ends it after its first step of four, as after its last (evaluated, saved, exit 0).
    "transformers-mixture": ["rollout.engine=transformers", "cluster.colocate=true", "algorithm.mask_truncated=true",
                             "task.countdown.weight=1", "task.countdown.num_numbers=3", "task.knights.weight=1",
                             "task.math.weight=1", "task.math.path={data}", "rewards.processes=2",
                             "algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_rounds=2",
                             "algorithm.prompt_filter=skip", "algorithm.curriculum=learnability",
                             "algorithm.mismatch=mis_token", "algorithm.entropy_coef=0.001",
                             "algorithm.steps=3", "algorithm.max_minutes=1e-4"],
    # Two learner ranks (ZeRO-2 over gloo), a checkpoint every two of four steps: the run
    # tests/test_resume.py kills rank 1 of, and compares with this one. GSPO, with the KL
    # folded into the reward (each rank scores its shard against the reference).
    "learner-x2": ["learner.num_ranks=2", "learner.num_cpus=0.5", "algorithm.steps=4", "checkpoint.every=2",
                   "algorithm.loss=gspo", "algorithm.kl_in=reward"],
}


def run_args(name, tmp, model):
    """RUNS[name]'s command line (its dataset written to `tmp`). The policy is given as a
    plain HF folder path, as a user's own model would be."""
    data = tmp / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+{i}?", "answer": f"#### {2 * i}"}) + "\n"
                            for i in range(100)))
    return ["--config", str(REPO / "configs/default.yaml"), *SHORT, *[a.format(data=data) for a in RUNS[name]],
            f"model.path={model}"]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def against_shared(finished, name, tmp_path, model, run_name, *overrides):
    """(shared run folder, folder of the same run with `overrides`): RUNS[name] is run once per
    session (tests/conftest.py) and compared with a variant of it run here."""
    shared_proc, shared = finished(name)
    assert shared_proc.returncode == 0, shared_proc.stderr[-3000:]
    proc, _ = run([*run_args(name, tmp_path, model), *overrides, f"logging.run_name={run_name}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return shared, tmp_path / "runs" / run_name


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_two_grpo_steps_through_the_real_entry_point(finished, name):
    proc, run_dir = finished(name)
    rollout = RUNS[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"run folder {run_dir}" in proc.stdout
    if "cluster.colocate=true" in rollout:  # one bundle holds the rank and its engine
        assert "placement: 1 learner rank(s), each with its rollout actor (colocated), on node(s)" in proc.stdout
    rows = read_rows(run_dir / "metrics.jsonl")
    steps = 1 if "algorithm.max_minutes=1e-4" in rollout else 4 if "algorithm.steps=4" in rollout else 2
    if "algorithm.max_minutes=1e-4" in rollout:  # saved as a last step is
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000001"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ["reward/mean", "reward/std", "reward/correct", "reward/format", "response_length/mean",
                "response_length/max", "groups/all_equal_fraction", "groups/generated", "groups/trained",
                "timing/generate", "timing/reward", "rollout/skipped_prompts", "reward/length",
                "reward/check_failed"]:
        assert all(key in r for r in rows), key
    kl = "reward/kl_penalty" if "algorithm.kl_in=reward" in rollout else "learner/kl"
    for r in rows:  # a step with no group that has signal learns nothing and syncs nothing
        learned = {"learner/clip_fraction", kl, "learner/entropy", "learner/lr", "timing/learn", "timing/sync",
                   "sync/bytes", "learner/offpolicy_gap", "learner/mismatch_kl", "throughput/learn_tokens_per_s"}
        assert learned <= set(r) if r["groups/trained"] else not learned & set(r), r
        assert ("learner/kl" in r) == (r["groups/trained"] > 0 and kl == "learner/kl"), r
    trained = [r for r in rows if r["groups/trained"]]
    assert trained, "no step learned anything; the test says nothing about learning"
    # Versions: cold start made 1, every step that learned made one more.
    assert [r["sync/version"] for r in trained] == list(range(2, 2 + len(trained)))
    assert all(r["learner/offpolicy_gap"] < 1e-3 for r in trained)  # fp32 engines, same temperature
    # The KL reference is the policy RL starts from (after cold start), not the initial model
    # (which was of order 1 away): no KL before the first update, a little after one step at
    # the warm-up's lr (the second update's mini-batch).
    assert trained[0][kl] < 1e-3
    if "algorithm.curriculum=learnability" in rollout:  # every task weighted, after its first scores
        assert all(abs(sum(r[f"curriculum/{t}/weight"] for t in ("arithmetic", "countdown", "knights", "math"))
                       - 1) < 1e-9 and 0 <= r["prompts/skipped"] < 1 for r in rows)
    if "algorithm.mismatch=mis_token" in rollout:  # the engine samples in the learner's numerics
        assert all(r["learner/masked_tokens"] == 0 for r in trained)
    prompts = read_rows(run_dir / "prompts.jsonl")
    for r in rows:
        rounds = sum(p["step"] == r["step"] for p in prompts)  # 1 + dynamic sampling's extra rounds
        assert r["groups/generated"] == 4 * rounds
        with_signal = round(r["groups/generated"] * (1 - r["groups/all_equal_fraction"]))
        # Groups without signal never reach the learner; dynamic sampling samples more until
        # 4 have signal (at most 2 more rounds), and keeps 4.
        assert r["groups/trained"] == min(with_signal, 4)
        if "algorithm.dynamic_sampling=true" in rollout:
            assert rounds == 3 or with_signal >= 4
        else:
            assert rounds == 1
    if "sync.check=true" in rollout:
        assert all(r["sync/logprob_diff_max"] < 1e-3 for r in trained)
    if "eval.every=2" in rollout:
        assert "eval/pass@2" not in rows[0] and {"eval/pass@1/greedy", "eval/pass@1", "eval/pass@2",
                                                 "eval/maj@2"} <= set(rows[1])
    results = json.loads((run_dir / "results.json").read_text())
    tasks = {"arithmetic", "countdown", "knights", "math"} if "task.math.weight=1" in rollout else {"arithmetic"}
    seen = {key.split("/")[1] for r in rows for key in r if key.startswith("task/")}
    assert seen <= tasks and all(abs(sum(v for k, v in r.items() if k.endswith("/fraction")) - 1) < 1e-9
                                 for r in rows)
    per_task = {f"accuracy/{when}/{t}" for when in ("initial", "before_rl", "after_rl") for t in tasks}
    assert set(results) == {"accuracy/initial", "accuracy/before_rl", "accuracy/after_rl"} | (
        per_task if len(tasks) > 1 else set())
    assert (run_dir / "model" / "model.safetensors").exists()
    assert (run_dir / "reference" / "model.safetensors").exists()  # kl_beta > 0 after a cold start
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "curves.png").exists() and "run summary" in proc.stdout
    # A quiet console: r1ray's own lines and its summary. What the actors print (vLLM's,
    # torch's and transformers' notices among it) is in the run folder's logs/.
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("r1ray: ") and (
        "pid=" in line or "warn" in line.lower() or "Traceback" in line or line.startswith("wandb:") or "it/s]" in line)]
    assert not noise, noise[:10]
    (logs,) = (run_dir / "logs").iterdir()  # this run's Ray session
    assert f"r1ray: the actors' output (other libraries' warnings) is in {logs}; " in proc.stdout
    names = {line.removeprefix(":actor_name:") for f in logs.glob("worker-*.out")
             for line in f.read_text().splitlines() if line.startswith(":actor_name:")}
    assert {"Learner", "RolloutActor", "RewardWorker"} <= names, names
    written = run_dir / "samples.jsonl"
    samples = read_rows(written) if written.exists() else []  # 4 every 2 steps
    assert {s["step"] for s in samples} == set(range(2, steps + 1, 2)) and len(samples) == 4 * (steps // 2)
    assert all(s["reason"] for s in samples)


TIMED = ("time", "timing/", "throughput/", "sync/gb_per_s")
"""Metrics that measure the clock, which differs between runs."""


def untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in rows]


PHASE = {"generate": ("generating step ",), "eval": ("evaluating",),
         "idle": ("staging weights", "generating step ", "evaluating"),
         "stage": ("staging weights",), "commit": ("committing weights",), "score": ("scoring",)}
"""The phase a fault injected at each point is found in (an idle engine: by the next call to it)."""


def injected(output):
    """[(role, index, point, step, the fault line that followed)] of a run's console: each
    fault injected (cluster/faults.py) and the line saying it was found and handled."""
    out, pending = [], None
    for line in output.splitlines():
        line = line[max(0, line.find("r1ray: ")):]  # Ray's own output may precede a line
        if line.startswith("r1ray: injecting a fault: "):
            words = line.split()  # r1ray: injecting a fault: SIG to ROLE INDEX (pid N) at POINT, step S
            pending = (words[6], int(words[7]), words[11].rstrip(","), int(words[13]))
        elif line.startswith("r1ray: fault: ") and pending:
            out.append((*pending, line.removeprefix("r1ray: fault: ")))
            pending = None
    return out


def same_work(rows):
    """What a run computed: untimed metrics, less the count of its actors' deaths."""
    return [{k: v for k, v in r.items() if not k.startswith("faults/")} for r in untimed(rows)]


BUILDS_MODEL = pytest.mark.slow  # these build the default model (and tokenize its prompts) first: ~10 s each


@pytest.mark.parametrize("args, message", [
    (["learner.lrr=1"], "unknown config key learner.lrr"),
    (["model.path=/does/not/exist"], "model.path='/does/not/exist' is not a Hugging Face model folder"),
    # What a local cluster would lack is known before anything is built: its CPUs (cluster.num_cpus=2)...
    (["learner.num_cpus=8"], "asks for 9 CPUs"),
    (["rollout.num_engines=3"], "asks for 3.8 CPUs (1 learner rank(s) x 1 CPUs, 3 rollout actor(s) x 0.9 CPUs"),
    pytest.param(["cluster.address=127.0.0.1:1"], "cannot reach a Ray cluster at cluster.address='127.0.0.1:1'",
                 marks=BUILDS_MODEL),
    # ...and, once the model is there, whether the held-out prompts (~15 tokens) fit in 20 - 16.
    pytest.param(["rollout.engine=transformers", "rollout.max_model_len=20", "rollout.max_new_tokens=16"],
                 "tokens; rollout.max_model_len - rollout.max_new_tokens leaves 4 for a prompt", marks=BUILDS_MODEL),
])
def test_bad_input_stops_before_a_cluster_starts_with_one_message(tmp_path, args, message):
    proc, seconds = run(args, tmp_path, timeout=120, env={"RAY_TMPDIR": str(tmp_path / "ray")})
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ray").exists()  # where a Ray session would have written its files
    assert seconds < 90  # not the minutes of cluster.timeout_s; a loaded 2-core machine needs slack


@pytest.mark.slow
def test_prompts_too_long_for_the_context_are_skipped_and_counted(tmp_path, tiny_model):
    # ~15-token prompts cannot fit in 20 - 16 tokens: with "skip" every step samples nothing,
    # says so in its metrics, and the run still ends normally.
    proc, _ = run([*SHORT, "cold_start.steps=0", "rollout.engine=transformers", "rollout.max_model_len=20",
                   "rollout.prompt_too_long=skip", "logging.run_name=skip", f"model.path={tiny_model}"],
                  tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(tmp_path / "runs" / "skip" / "metrics.jsonl")
    assert [(r["step"], r["rollout/skipped_prompts"]) for r in rows] == [(1, 4.0), (2, 4.0)]
    assert json.loads((tmp_path / "runs" / "skip" / "results.json").read_text())["accuracy/after_rl"] == 0.0


@pytest.mark.slow
def test_a_run_stopped_resumed_and_faulted_in_every_phase_is_bit_identical_to_the_same_seeds_run(
        finished, tmp_path, tiny_model):
    # The invariant that guards every other number: vLLM engines, the learner and the rewards
    # reproduce a run exactly, so a change that alters results shows up here. The run to match
    # is RUNS' vllm-x2-broadcast (two engines, the broadcast transport, 4 steps). Its copy here
    # changes when and where things happen, and nothing else:
    # - it is stopped by SIGTERM after a step and resumed;
    # - it samples with one engine, then, resumed, with two (prompts are seeded one by one);
    # - it scores each step's answers after generation, not each group as it finishes
    #   (`rewards.stream=false`);
    # - its actors die: engines are killed (SIGKILL, as the OOM killer would) while being
    #   evaluated, staging and committing weights, generating and idle, alone and beside the
    #   other engine; one is stopped (SIGSTOP: hung, found by its deadline); a reward worker is
    #   killed while scoring. Each is replaced, brought to the current weights and its work
    #   redone with the same seeds.
    full_proc, full_dir = finished("vllm-x2-broadcast")
    assert full_proc.returncode == 0, full_proc.stderr[-3000:]
    args = [*run_args("vllm-x2-broadcast", tmp_path, tiny_model), "rewards.stream=false", "rollout.num_engines=1",
            "checkpoint.every=3", "checkpoint.keep=1", "rollout.max_restarts=4", "rewards.max_restarts=1",
            "cluster.deadline_s=10", "sync.timeout_s=30"]
    alone = ["engine0@eval:0", "engine0@stage:0", "engine0@generate:1"]  # step 0: before RL (the cold start's sync)
    beside = ["engine0@stage:0", "engine1@commit:0", "engine1@generate:0:SIGSTOP", "reward0@score:0",
              "engine0@idle:0"]  # step 0: the resumed run's first sync (the checkpoint's weights)

    # SIGTERM once the first step is logged: the run finishes the step it is in, saves a
    # checkpoint and exits 143; --resume then runs the remaining steps.
    cut_dir = tmp_path / "runs" / "cut"
    cmd = [sys.executable, "-m", "r1ray", "train", *args, "logging.run_name=cut",
           f"cluster.runs_dir={tmp_path / 'runs'}", f"cluster.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "R1RAY_INJECT_FAULTS": ",".join(alone)})
    deadline = time.monotonic() + 400
    while not (cut_dir / "metrics.jsonl").exists() or not (cut_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stopped_at = int(err.split("stopped by SIGTERM after step ")[1].split(",")[0])
    assert 1 <= stopped_at < 4 and f"continue with: r1ray train --resume {cut_dir}" in err
    assert [p.name for p in (cut_dir / "checkpoints").iterdir()] == [f"step-{stopped_at:06d}"]

    resumed, _ = run(["--resume", str(cut_dir), "rollout.num_engines=2"], tmp_path,
                     env={"R1RAY_INJECT_FAULTS": ",".join(beside)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step-{stopped_at:06d}" in resumed.stdout
    for output, faults in [(out, alone), (resumed.stdout, beside)]:
        found = injected(output)
        assert sorted(f"{role}{i}@{point}" for role, i, point, _, _ in found) == sorted(f.split(":")[0] for f in faults)
        for role, i, point, _, line in found:  # each found in its phase, handled, and said so once
            assert line.startswith(tuple(f"{role} {i} died while {p}" for p in PHASE[point])), line
        assert output.count("r1ray: fault: ") == len(faults)
    hung = next(line for role, i, point, _, line in injected(resumed.stdout) if point == "generate")
    assert "(no answer in 10s (cluster.deadline_s))" in hung

    # Same prompts in the same order, every step once, and the same learning, to the bit (the
    # KL too: the resumed run loads the reference the first part saved, its RL start).
    assert read_rows(cut_dir / "prompts.jsonl") == read_rows(full_dir / "prompts.jsonl")
    full, cut = read_rows(full_dir / "metrics.jsonl"), read_rows(cut_dir / "metrics.jsonl")
    assert [r["step"] for r in cut] == [1, 2, 3, 4] and any(r.get("learner/grad_norm", 0) > 0 for r in full)
    assert same_work(cut) == same_work(full)

    # Each process counts the deaths it saw: the first all three of its engine's by step 1;
    # the resumed one four of its engines' and one reward worker's by the last step (an idle
    # engine's death counts in the step that finds it).
    counts = [(r["faults/engine"], r["faults/reward"]) for r in cut]
    assert counts[:stopped_at] == [(3, 0)] * stopped_at and counts[-1] == (4, 1)
    assert counts[stopped_at:] == sorted(counts[stopped_at:])
    assert json.loads((cut_dir / "results.json").read_text()) == json.loads((full_dir / "results.json").read_text())
    # Only the newest checkpoint is kept; the final one is at the last step and loads as an HF folder.
    assert [p.name for p in (cut_dir / "checkpoints").iterdir()] == ["step-000004"]
    assert (cut_dir / "checkpoints" / "step-000004" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "not a run folder (no config.yaml)"),
    (lambda d: (d.mkdir(), (d / "config.yaml").write_text("{}\n")), "no usable checkpoint"),
])
def test_resume_without_a_checkpoint_says_so(tmp_path, make, message):
    make(tmp_path / "run")
    proc, seconds = run(["--resume", str(tmp_path / "run")], tmp_path, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
