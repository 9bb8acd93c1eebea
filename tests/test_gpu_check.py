"""bench/gpu_check.py, the device check, exercised on the CPU with tiny shapes.

It must run where only torch and transformers are installed: the subprocess here sees Ray,
vLLM, DeepSpeed and accelerate as absent (a `sitecustomize` puts None in `sys.modules` for
them, so `import ray` fails and `importlib.util.find_spec("ray")` answers None, as on a
machine without them), in its spawned processes too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
ABSENT = ("ray", "vllm", "deepspeed", "accelerate")
# The largest GRPO-math error accepted, relative to the float64 reference's largest magnitude:
# fp32 rounds at ~6e-8 per operation; bf16 at ~4e-3 (8 bits), a few roundings deep.
GRPO_BOUNDS = {"float32": 1e-5, "bfloat16": 5e-2}


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_section_is_recorded_and_the_next_still_runs():
    check = load_script()
    args = SimpleNamespace(device="cpu")
    failed = check.run_section("broken", lambda _: {"x": 1 / 0}, args)
    assert not failed["ok"] and failed["error"] == "ZeroDivisionError: division by zero"
    assert "1 / 0" in failed["traceback"]
    fine = check.run_section("fine", lambda _: {"x": 1}, args)
    assert fine["ok"] and fine["x"] == 1 and fine["seconds"] >= 0
    assert not check.run_section("failures", lambda _: {"failures": ["too far"]}, args)["ok"]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_without_ray_vllm_deepspeed(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(f"import sys\n\nsys.modules.update(dict.fromkeys({ABSENT!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    failed = {name: s.get("error") or s.get("failures") for name, s in report["sections"].items() if not s["ok"]}
    assert done.returncode == 0 and report["ok"], (failed, done.stdout[-3000:], done.stderr[-3000:])
    sections = report["sections"]
    assert list(sections) == ["grpo_math", "learner_logprobs", "memory", "bf16_noise", "engine", "broadcast",
                              "cuda_ipc"]
    assert sections["cuda_ipc"]["skipped"] == "CUDA IPC needs a GPU"
    assert "gpu_check: broadcast ok" in done.stdout  # progress is printed

    for dtype, bound in GRPO_BOUNDS.items():
        math = sections["grpo_math"][dtype]
        variants = ("grpo_token", "grpo_sequence", "grpo_constant", "gspo_sequence", "cispo_token")
        terms = ("advantages", "is_weights", "kl_k1", "kl_k2", "kl_k3",
                 *(f"{kind}_{variant}" for kind in ("loss", "grad") for variant in variants))
        assert all(math[t]["max_rel"] < bound for t in terms), (dtype, math)
        assert math["finite"] and math["exact_zero_advantages"]
    step = sections["learner_logprobs"]["step"]
    assert step["finite"] and step["loss_before_after"][1] < step["loss_before_after"][0]
    assert sections["learner_logprobs"]["logprobs_bfloat16_vs_cpu_fp32"]["max"] < 0.1
    chunked = sections["learner_logprobs"]["chunked_vs_whole"]
    assert chunked["logprobs"]["max_rel"] < 1e-5 and chunked["grads"]["max_rel"] < 1e-5
    rows = sections["memory"]["rows"]
    assert [(r["gradient_checkpointing"], r["seq_len"], r["logprob_chunk"]) for r in rows] == [
        (checkpointing, length, chunk) for checkpointing in (False, True) for length in (32, 64) for chunk in (0, 16)]
    assert all(r["peak_gib"] is None for r in rows)  # no CUDA allocator to ask on a CPU
    noise = sections["bf16_noise"]["abs_diff"]
    assert set(noise) == {"fp32_vs_bf16", "fp32_sdpa_vs_fp32_eager", "bf16_sdpa_vs_bf16_eager", "bf16_batch1_vs_batch4"}
    assert all(0 <= s["mean"] <= s["p99"] <= s["max"] and set(s["within_sync_check"]) == {"mean", "p99"}
               for s in noise.values())
    assert noise["fp32_sdpa_vs_fp32_eager"]["max"] < 1e-4 < noise["fp32_vs_bf16"]["mean"]  # bf16 is the noise
    for dtype in ("float32", "bfloat16"):
        engine = sections["engine"][dtype]
        assert engine["tokens"] > 0 and engine["same_tokens_same_seed"] and engine["score_finite"]
    assert sections["engine"]["float32"]["engine_vs_learner_logprob"]["max"] < 1e-4
    for end in ("sender", "receiver"):
        rounds = sections["broadcast"][end]["rounds"]
        assert [r["dtype"] for r in rounds] == ["float32", "bfloat16"] and all(r["bytes"] > 0 for r in rounds)
    assert all(not r["mismatched"] for r in sections["broadcast"]["receiver"]["rounds"])  # bit-exact
