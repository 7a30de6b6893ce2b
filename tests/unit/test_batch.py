"""Batch building: positions, segments, labels, MTP targets on a hand example."""
import pytest
import torch

from model.batch import IGNORE, make_batch, mtp_labels

X = IGNORE


def _hand():
    # row 0: doc [1 2 3 4 5], doc [6 7 8], one pad (0); row 1: one full document
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 0], [9, 8, 7, 6, 5, 4, 3, 2, 1]])
    return make_batch(tokens, [[5, 3], [9]])


def test_positions_segments_labels():
    b = _hand()
    assert b.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0], list(range(9))]
    assert b.segment_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, -1], [0] * 9]
    assert b.labels.tolist() == [[2, 3, 4, 5, X, 7, 8, X, X], [8, 7, 6, 5, 4, 3, 2, 1, X]]
    assert b.tokens.dtype == b.positions.dtype == b.segment_ids.dtype == b.labels.dtype == torch.long


def test_mtp_targets_shift_and_mask_at_document_end():
    b = _hand()
    assert mtp_labels(b, 0).tolist() == b.labels.tolist()
    assert mtp_labels(b, 1).tolist() == [[3, 4, 5, X, X, 8, X, X, X], [7, 6, 5, 4, 3, 2, 1, X, X]]
    assert mtp_labels(b, 3).tolist() == [[5, X, X, X, X, X, X, X, X], [5, 4, 3, 2, 1, X, X, X, X]]
    assert (mtp_labels(b, 20) == X).all()


def test_doc_lens_none_and_errors():
    tokens = torch.arange(12).view(2, 6)
    b = make_batch(tokens, None)
    assert b.positions.tolist() == [list(range(6))] * 2 and (b.segment_ids == 0).all()
    with pytest.raises(ValueError, match="row length 6"):
        make_batch(tokens, [[4, 3], [6]])
    with pytest.raises(ValueError, match="doc_lens has 1 rows"):
        make_batch(tokens, [[6]])
