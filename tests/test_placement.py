"""Placement: what each role asks for, whether a cluster can hold it (a clear error at once
when not), and a run on a simulated three-node cluster with learner ranks packed and rollout
actors spread."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.placement import GIB, misfit, requests

REPO = Path(__file__).resolve().parents[1]


def fits(overrides, nodes, path=None):
    return misfit(list(requests(load_config(path, overrides)).values()), nodes)


def test_bundles_carry_each_roles_resources():
    reqs = requests(load_config(None, ["learner.num_gpus=1", "learner.memory_gb=4", "rollout.num_gpus=2",
                                       "rollout.tensor_parallel_size=2", "rewards.memory_gb=0.5"]))
    assert reqs["learner"].bundle == {"CPU": 1.0, "GPU": 1.0, "memory": 4 * GIB}
    assert reqs["rollout"].bundle == {"CPU": 0.9, "GPU": 2.0}
    assert reqs["reward"].options() == {"num_cpus": 0.1, "num_gpus": 0.0, "memory": 0.5 * GIB}


def test_colocated_a_rank_and_its_engine_share_one_gpu_in_one_bundle():
    cfg = load_config(None, ["cluster.colocate=true", "learner.num_ranks=2", "rollout.num_engines=2",
                             "learner.num_gpus=1", "rollout.num_gpus=1", "cluster.num_cpus=4"])
    reqs = requests(cfg)
    assert reqs["learner"].options()["num_gpus"] == reqs["rollout"].options()["num_gpus"] == 0.5
    # Two GPUs hold both pairs; one does not (each pair needs a whole GPU).
    assert fits(["cluster.colocate=true", "learner.num_ranks=2", "rollout.num_engines=2", "learner.num_gpus=1",
                 "rollout.num_gpus=1"], [{"CPU": 8.0, "GPU": 2.0}]) is None
    assert "asks for 2 GPUs" in fits(["cluster.colocate=true", "learner.num_ranks=2", "rollout.num_engines=2",
                                      "learner.num_gpus=1", "rollout.num_gpus=1"], [{"CPU": 8.0, "GPU": 1.0}])


def test_the_two_node_eight_gpu_example_fits_two_such_nodes_only():
    node = {"CPU": 96, "GPU": 8, "memory": 900 * GIB}
    assert fits([], [node, node], REPO / "configs/2nodes-8gpus.yaml") is None
    assert "asks for 16 GPUs (8 learner rank(s) x 1 GPUs, 4 rollout actor(s) x 2 GPUs) but the Ray cluster " \
           "has 8 GPUs" in fits([], [node], REPO / "configs/2nodes-8gpus.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["rollout.num_cpus=2.5"], "one rollout actor asks for 2.5 CPUs but the largest node has 2 CPUs"),
    (["learner.num_ranks=4", "algorithm.prompts_per_step=16"], "asks for 5 CPUs (4 learner rank(s) x 1 CPUs"),
    (["learner.memory_gb=20"], "one learner rank asks for 20 GiB memory but the largest node has 16 GiB memory"),
    (["rollout.num_gpus=1"], "asks for 1 GPUs (1 rollout actor(s) x 1 GPUs) but the Ray cluster has 0 GPUs"),
])
def test_what_cannot_be_placed_is_named(overrides, message):
    node = {"CPU": 2, "memory": 16 * GIB}
    assert message in fits(overrides, [node, node])
    assert fits([], [node, node]) is None


def test_a_local_cluster_short_of_cpus_is_refused_before_it_starts(monkeypatch):
    import ray

    from cluster.placement import ClusterError, check_fits

    def no_cluster_yet():
        raise AssertionError("check_fits asked a cluster that does not exist yet")

    # A driver before `connect` (this test process may hold the suite's cluster).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "nodes", no_cluster_yet)
    with pytest.raises(ClusterError, match=r"asks for 2.1 CPUs \(1 learner rank\(s\) x 1 CPUs, 1 rollout "
                       r"actor\(s\) x 1 CPUs, 1 reward worker\(s\) x 0.1 CPUs\) but the Ray cluster has 2 CPUs"):
        check_fits(load_config(None, ["rollout.num_cpus=1"]))
    check_fits(load_config(None, ["rollout.num_cpus=0.9"]))  # 2.0 fits
    check_fits(load_config(None, ["rollout.num_cpus=1", "cluster.address=auto"]))  # known once joined


CLUSTER = """
import sys, time
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
for _ in range(2):
    cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes our stdin
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def three_nodes():
    """A head without CPUs and two 2-CPU nodes, all on this machine, in a process of its own."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="r1n-", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    address = proc.stdout.readline().strip()
    assert address, "the simulated cluster did not start"
    yield env, address
    proc.stdin.close()
    proc.wait(timeout=120)


def run(env, args, tmp_path, timeout=600):
    cmd = [sys.executable, "-m", "r1ray", "train", *args, f"cluster.runs_dir={tmp_path / 'runs'}",
           f"cluster.cache_dir={tmp_path / 'cache'}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_run_on_three_nodes_packs_learners_and_spreads_engines(three_nodes, tmp_path):
    env, address = three_nodes
    proc = run(env, [f"cluster.address={address}", "cold_start.steps=2", "algorithm.steps=2",
                     "algorithm.prompts_per_step=4", "algorithm.group_size=4", "task.eval_prompts=4",
                     "logging.progress=false", "logging.wandb_mode=disabled", "rollout.max_new_tokens=8",
                     "learner.num_ranks=2", "learner.num_cpus=0.5", "learner.threads=1", "rollout.num_engines=2",
                     "rollout.num_cpus=0.5", "rollout.threads=1", "rollout.engine=transformers",
                     "rollout.placement=spread", "sync.transport=broadcast"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("r1ray: placement:"))
    learner_nodes = line.split("learner rank(s) on node(s) ")[1].split(",")[0].split()
    engine_nodes = line.split("rollout actor(s) on node(s) ")[1].split()
    assert len(learner_nodes) == 2 and len(set(learner_nodes)) == 1, line
    assert len(engine_nodes) == 2 and len(set(engine_nodes)) == 2, line


@pytest.mark.slow
def test_an_actor_larger_than_any_node_fails_at_once(three_nodes, tmp_path):
    env, address = three_nodes
    start = time.monotonic()
    proc = run(env, [f"cluster.address={address}", "rollout.num_cpus=2.5"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "one rollout actor asks for 2.5 CPUs but the largest node has 2 CPUs" in proc.stderr
    assert time.monotonic() - start < 60
