"""Padding sampled answers into a train batch: alignment of targets, masks and log-probs."""

import numpy as np
import pytest

from learner.batch import TrainBatch, collate


def test_collate_aligns_response_targets():
    # Sequence 0: prompt [5, 6], response [7, 8, 9]; sequence 1: prompt [5], response [4].
    batch = collate([np.array([5, 6]), np.array([5])], [np.array([7, 8, 9]), np.array([4])], pad_id=0,
                    advantages=np.array([1.0, -1.0]),
                    sampling_logprobs=[np.array([-0.1, -0.2, -0.3]), np.array([-0.4])])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # Target t is token t+1: the response of sequence 0 is targets 1..3, of sequence 1 target 0.
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    np.testing.assert_allclose(batch.sampling_logprobs, [[0, -0.1, -0.2, -0.3], [-0.4, 0, 0, 0]], rtol=1e-6)
    assert batch.advantages.dtype == np.float32


def test_split_keeps_rows_and_trims_padding():
    batch = collate([np.array([1, 2])] * 3 + [np.array([1])], [np.array([3])] * 3 + [np.array([3, 3, 3, 3])],
                    pad_id=0)
    first, second = batch.split(2)
    assert len(first) == 2 and len(second) == 2
    assert first.input_ids.shape == (2, 3)  # the long row is in the second half only
    assert second.input_ids.shape == (2, 5)
    assert first.loss_mask.shape == (2, 2)
    # More parts than sequences: the last part is empty (a learner rank pads it).
    assert [len(part) for part in batch.split(5)] == [1, 1, 0, 1, 1]
    assert [len(part) for part in collate([np.array([1])], [np.array([2])], pad_id=0).split(3)] == [0, 1, 0]
    with pytest.raises(ValueError, match="cannot split 4 sequences into 0 parts"):
        batch.split(0)


def test_a_placeholder_micro_batch_carries_nothing_to_learn():
    empty = TrainBatch.placeholder()
    assert empty.input_ids.shape == (1, 2) and empty.attention_mask.tolist() == [[1, 1]]
    assert empty.loss_mask.sum() == 0 and empty.advantages.tolist() == [0.0]
