"""TokenStream: deterministic per (seed, rank, world), exact resume, re-shard, epochs, blending."""
import numpy as np
import pytest

from data.stream import TokenStream, blend_schedule


def _ids(stream, n):
    """Global sample ids this rank would read next (without reading tokens)."""
    return [stream._locate(stream.global_index(stream.taken + j)) for j in range(n)]


def test_take_shapes_and_doc_lens(tiny_data):
    out, cfg = tiny_data
    s = TokenStream(out, cfg.seq_len, 0, 1, seed=3)
    tokens, doc_lens = s.take(16)
    assert tokens.shape == (16, cfg.seq_len) and tokens.dtype == np.int64
    assert tokens.max() < s.vocab_size
    for row, lens in zip(tokens, doc_lens):
        assert lens.dtype == np.int32 and lens.min() > 0 and lens.sum() <= cfg.seq_len
        assert (row[lens.sum():] == s.pad_id).all()
    # every EOS sits at the end of a piece (the last piece of its document)
    for row, lens in zip(tokens, doc_lens):
        eos_at = set(np.nonzero(row[:lens.sum()] == s.eos_id)[0].tolist())
        assert eos_at <= set((np.cumsum(lens) - 1).tolist())
    assert sum((row == s.eos_id).sum() for row in tokens) > 0


def test_deterministic_and_seed_dependent(tiny_data):
    out, cfg = tiny_data
    a = TokenStream(out, cfg.seq_len, 1, 2, seed=7).take(8)[0]
    b = TokenStream(out, cfg.seq_len, 1, 2, seed=7).take(8)[0]
    c = TokenStream(out, cfg.seq_len, 1, 2, seed=8).take(8)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_resume_continues_with_next_sample(tiny_data):
    out, cfg = tiny_data
    full = TokenStream(out, cfg.seq_len, 0, 1, seed=1).take(12)[0]
    s = TokenStream(out, cfg.seq_len, 0, 1, seed=1)
    s.take(5)
    sd = s.state_dict()
    r = TokenStream(out, cfg.seq_len, 0, 1, seed=1)
    r.load_state_dict(sd)
    assert np.array_equal(r.take(7)[0], full[5:])


def test_reshard_without_repeat_or_skip(tiny_data):
    out, cfg = tiny_data
    ranks2 = [TokenStream(out, cfg.seq_len, r, 2, seed=5) for r in range(2)]
    seen = [x for s in ranks2 for x in _ids(s, 6)]
    for s in ranks2:
        s.take(6)
    sd = ranks2[0].state_dict()
    assert sd == ranks2[1].state_dict() and sd["consumed"] == 12
    ranks3 = [TokenStream(out, cfg.seq_len, r, 3, seed=5) for r in range(3)]
    for s in ranks3:
        s.load_state_dict(sd)
    seen += [x for s in ranks3 for x in _ids(s, 4)]
    single = TokenStream(out, cfg.seq_len, 0, 1, seed=5)
    assert sorted(seen) == sorted(_ids(single, 24))
    assert len(set(seen)) == 24


def test_epochs_cover_every_sequence_once_and_reshuffle(tiny_data):
    out, cfg = tiny_data
    s = TokenStream(out, cfg.seq_len, 0, 1, seed=2)
    n = len(s.readers[0])
    first = [s._sequence_id(0, i) for i in range(n)]
    second = [s._sequence_id(0, i) for i in range(n, 2 * n)]
    assert sorted(first) == list(range(n)) == sorted(second)
    assert first != second


def test_blending_follows_weights(tiny_data):
    out, cfg = tiny_data
    s = TokenStream([out, out], cfg.seq_len, 0, 1, seed=0, weights=[3.0, 1.0])
    picks = np.array([s._locate(g)[0] for g in range(4000)])
    assert abs((picks == 0).mean() - 0.75) < 0.01
    locals_ = [s._locate(g) for g in range(4000)]
    for k in (0, 1):  # each dataset's local indices run 0, 1, 2, ... without gaps
        idx = [i for kk, i in locals_ if kk == k]
        assert idx == list(range(len(idx)))
    assert np.bincount(blend_schedule([1, 1, 2], 8), minlength=3).tolist() == [2, 2, 4]


def test_valid_split_and_mismatched_state(tiny_data):
    out, cfg = tiny_data
    v = TokenStream(out, cfg.seq_len, 0, 1, seed=0, split="valid")
    t = TokenStream(out, cfg.seq_len, 0, 1, seed=0)
    assert len(v.readers[0]) > 0 and len(t.readers[0]) > len(v.readers[0])
    with pytest.raises(ValueError, match="seed"):
        TokenStream(out, cfg.seq_len, 0, 1, seed=9).load_state_dict(t.state_dict())
    with pytest.raises(ValueError, match="seq_len"):
        TokenStream(out, cfg.seq_len * 2, 0, 1, seed=0)
