"""learner.dtype auto: bf16 only where it is fast, decided once when the config loads, and the
concrete choice is what the run folder records (so a resume elsewhere keeps the precision)."""

import pytest
import yaml

from cluster import precision
from cluster.config import load_config
from cluster.precision import choose_dtype, resolve_dtype

# First flags of this project's two kinds of machine (2026-12-01): an AVX2-only AMD EPYC and
# an Intel Xeon with AVX512-BF16 and AMX.
AMD = set("fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes vpclmulqdq".split())
INTEL = AMD | set("avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8".split())


def test_a_cpu_without_bf16_instructions_trains_in_fp32():
    dtype, why = choose_dtype(0, AMD, None)
    assert dtype == "float32"
    assert why == "this CPU has no AMX or AVX512-BF16 (bf16 matmuls are emulated, ~100x slower)"


@pytest.mark.parametrize("flags, named", [(AMD | {"avx512_bf16"}, "AVX512-BF16"), (AMD | {"amx_bf16"}, "AMX"),
                                          (INTEL, "AMX and AVX512-BF16")])
def test_a_cpu_with_avx512_bf16_or_amx_trains_in_bf16(flags, named):
    assert choose_dtype(0, flags, None) == ("bfloat16", f"this CPU has {named} (native bf16 matmuls)")


@pytest.mark.parametrize("gpu_bf16, dtype", [(True, "bfloat16"), (False, "float32"), (None, "bfloat16")])
def test_a_gpu_learner_follows_the_gpu_whatever_the_cpu(gpu_bf16, dtype):
    # None: the driver sees no GPU (a CPU head node); bf16 is assumed, and the line says so.
    for flags in (AMD, INTEL):
        got, why = choose_dtype(1, flags, gpu_bf16)
        assert got == dtype
        assert ("assuming" in why) == (gpu_bf16 is None)


@pytest.fixture
def machine(monkeypatch):
    """machine(flags, gpu_bf16): make this machine look like that one for resolve_dtype."""
    def set_to(flags, gpu_bf16=None):
        monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(precision, "gpu_bf16", lambda: gpu_bf16)
        precision._machine_choice.cache_clear()

    yield set_to
    precision._machine_choice.cache_clear()


def test_explicit_values_pass_through_without_looking_at_the_machine(machine, capsys):
    machine(INTEL, True)
    assert [resolve_dtype(d, g) for d in ("float32", "bfloat16") for g in (0, 1)] == ["float32"] * 2 + ["bfloat16"] * 2
    assert load_config(None, ["learner.dtype=float32"]).learner.dtype == "float32"
    assert capsys.readouterr().out == ""


def test_auto_is_resolved_once_with_one_line_saying_why(machine, capsys):
    machine(AMD)
    assert resolve_dtype("auto", 0) == resolve_dtype("auto", 0.0) == "float32"
    assert capsys.readouterr().out == ("r1ray: learner.dtype auto -> float32: this CPU has no AMX or AVX512-BF16 "
                                       "(bf16 matmuls are emulated, ~100x slower)\n")


def test_the_default_job_is_fp32_and_a_file_that_leaves_dtype_out_is_auto(machine, tmp_path):
    machine(INTEL)
    assert load_config(None).learner.dtype == "float32"  # r1ray train with no --config
    assert load_config(None, ["learner.lr=1e-4"]).learner.dtype == "float32"
    for text in ("learner: {lr: 1.0e-4}\n", "algorithm: {steps: 3}\n"):  # a learner group or none
        (tmp_path / "c.yaml").write_text(text)
        assert load_config(tmp_path / "c.yaml").learner.dtype == "bfloat16", text


def test_the_run_folder_records_the_resolved_dtype_and_a_resume_keeps_it(machine, tmp_path, capsys):
    from cluster.train import _make_run_dir

    machine(AMD | {"avx512_bf16"})
    cfg = load_config(None, ["learner.dtype=auto", f"cluster.runs_dir={tmp_path}", "logging.run_name=r"])
    run_dir = _make_run_dir(cfg)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["learner"]["dtype"] == "bfloat16"
    assert "auto -> bfloat16" in capsys.readouterr().out
    machine(AMD)  # resumed on a CPU without bf16: `r1ray train --resume` loads the run's config.yaml
    assert load_config(run_dir / "config.yaml").learner.dtype == "bfloat16"
    assert capsys.readouterr().out == ""
