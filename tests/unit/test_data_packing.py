"""Best-fit-decreasing packing and the concat baseline: no cut that fits, every token once."""
import numpy as np
import pytest

from data.packing import CapacityTree, best_fit_decreasing, pack, packing_stats, split_long


def _check_cover(sequences, doc_lens, seq_len):
    """Every token of every document appears exactly once; pieces are contiguous and ordered."""
    covered = [[] for _ in doc_lens]
    for seq in sequences:
        assert 0 < sum(p.length for p in seq) <= seq_len
        for p in seq:
            covered[p.doc].append((p.start, p.end))
    for n, spans in zip(doc_lens.tolist(), covered):
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    return covered


@pytest.mark.parametrize("seq_len", [16, 64, 100])
def test_bfd_never_cuts_fitting_docs_and_covers_every_token(seq_len):
    rng = np.random.default_rng(seq_len)
    doc_lens = rng.integers(1, 3 * seq_len, size=500)
    seqs = list(pack(doc_lens, seq_len, "bfd", buffer=120))
    covered = _check_cover(seqs, doc_lens, seq_len)
    for n, spans in zip(doc_lens.tolist(), covered):
        if n <= seq_len:
            assert len(spans) == 1, "a document that fits was cut"
        else:
            assert len(spans) == -(-n // seq_len)
    st = packing_stats(seqs, doc_lens, seq_len)
    assert st["docs_cut"] == st["docs_longer_than_seq"] == int((doc_lens > seq_len).sum())
    assert st["tokens"] == int(doc_lens.sum())


def test_concat_baseline_covers_and_cuts_at_boundaries():
    doc_lens = np.array([5, 7, 3, 10, 1])
    seqs = list(pack(doc_lens, 8, "concat"))
    _check_cover(seqs, doc_lens, 8)
    assert [sum(p.length for p in s) for s in seqs] == [8, 8, 8, 2]
    assert packing_stats(seqs, doc_lens, 8)["docs_cut"] == 2  # docs 1 and 3 straddle a cut


def test_best_fit_picks_tightest_sequence():
    # 6 opens A (room 4), 5 opens B (room 5), 4 must go to A (tightest), 5 then fills B
    pieces = split_long(np.array([6, 5, 4, 5]), 10)
    seqs = best_fit_decreasing(pieces, 10)
    assert sorted(sorted(p.doc for p in s) for s in seqs) == [[0, 2], [1, 3]]


def test_capacity_tree_matches_brute_force():
    rng = np.random.default_rng(0)
    tree, counts = CapacityTree(50), np.zeros(51, int)
    for _ in range(2000):
        c = int(rng.integers(0, 51))
        if rng.random() < 0.6 or counts[c] == 0:
            tree.add(c, 1)
            counts[c] += 1
        else:
            tree.add(c, -1)
            counts[c] -= 1
        q = int(rng.integers(0, 51))
        ok = np.nonzero(counts[q:])[0]
        assert tree.smallest_at_least(q) == (q + int(ok[0]) if len(ok) else -1)


def test_bfd_padding_is_small_on_realistic_lengths():
    rng = np.random.default_rng(1)
    doc_lens = (rng.lognormal(6, 1, size=5000) + 1).astype(np.int64)
    st = packing_stats(list(pack(doc_lens, 4096, "bfd")), doc_lens, 4096)
    st_concat = packing_stats(list(pack(doc_lens, 4096, "concat")), doc_lens, 4096)
    assert st["padding_fraction"] < 0.01
    assert st["docs_cut"] < st_concat["docs_cut"]
