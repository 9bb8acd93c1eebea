"""The overlapped loop against the synchronous one, through the real entry point.

With max_staleness 1 the next step is generated while this one learns: the same prompts in
the same order, every sample at most one weight version behind (exactly one after a step
that learned), and the learner applies the importance-sampling correction. (Scoring groups
as they finish against scoring the step afterwards: tests/test_e2e.py, the same-seed test.)
"""

import pytest

from tests.test_e2e import against_shared, read_rows


@pytest.mark.slow
def test_the_overlapped_loop_against_the_synchronous_one(finished, tmp_path, tiny_model):
    # The streamed run is tests/test_e2e.py's 4-step run with two vLLM engines (shared); the
    # overlapped one has one engine, which samples what two do (prompts are seeded one by one),
    # and starts in two thirds of the time.
    streamed, stale = against_shared(finished, "vllm-x2-broadcast", tmp_path, tiny_model, "stale1",
                                     "algorithm.max_staleness=1", "rollout.num_engines=1")

    a, c = read_rows(streamed / "metrics.jsonl"), read_rows(stale / "metrics.jsonl")
    assert all(r["rollout/staleness_max"] == 0 and "learner/is_weight_mean" not in r for r in a)
    assert read_rows(stale / "prompts.jsonl") == read_rows(streamed / "prompts.jsonl")
    assert c[0]["reward/mean"] == a[0]["reward/mean"]  # step 1 is sampled by the same weights
    # A step's samples are one version behind exactly when the step before it learned (a step
    # whose groups all lack signal takes no optimizer step, and the version stays).
    lags = [0] + [1 if r["groups/trained"] else 0 for r in c[:-1]]
    assert [r["rollout/staleness_max"] for r in c] == lags and [r["rollout/staleness_mean"] for r in c] == lags
    # Samples of the learner's own version have weights 1 up to fp32 rounding; a version behind,
    # the weights move off 1 (their values against a known behaviour policy: tests/test_learner.py).
    learned = [(r, lag) for r, lag in zip(c, lags) if r["groups/trained"]]
    assert {lag for _, lag in learned} == {0, 1}, "the run must learn from fresh and from stale samples"
    for r, lag in learned:
        assert (abs(r["learner/is_weight_mean"] - 1.0) > 1e-4) == bool(lag), (r["step"], lag)
    for r in a + c:  # the step-time breakdown is logged, and adds up
        assert r["timing/step"] >= r.get("timing/learn", 0) + r.get("timing/sync", 0) - 1e-6
        assert 0 <= r["timing/idle/learner"] <= r["timing/step"] and 0 <= r["timing/idle/engines"] <= r["timing/step"]
