"""Unit tests of data.dedup: hashing, signatures, LSH, components, index, cross-dump API."""
import numpy as np
import pytest

from data.dedup import DedupConfig, DedupIndex, dedup_dumps, normalize_for_hash
from data.dedup import exact as ex
from data.dedup import lsh
from data.dedup import minhash as mh

TEXT_A = ("The committee met on Tuesday to review the budget for the coming year and agreed that "
          "spending on roads, schools and hospitals should rise while the cost of administration "
          "falls by a tenth over three years, subject to the approval of the full council in March.")
TEXT_B = ("Rain fell across the northern valleys all week, swelling the rivers and closing two "
          "bridges; farmers said the harvest would be late but larger than last season's, and the "
          "railway company promised to restore the damaged line before the autumn fair opened.")


def _edit(text: str, positions, word="zebra") -> str:
    w = text.split()
    for p in positions:
        w[p] = word
    return " ".join(w)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,value", [("shingle_size", 0), ("bands", 0), ("rows", 0), ("threshold", 1.5),
                                         ("batch_docs", 0), ("seed", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DedupConfig(**{field: value})


def test_config_num_perm():
    assert DedupConfig(bands=7, rows=3).num_perm == 21


# ----------------------------------------------------------------------------- hashing


def test_word_hashes_fold_case_split_punctuation_and_track_documents():
    w, d = mh.word_hashes(["Hello, WORLD!", "hello world", "", "x"])
    assert w.size == 5 and d.tolist() == [0, 0, 1, 1, 3]
    assert w[0] == w[2] and w[1] == w[3] and w[0] != w[1]


def test_word_hashes_non_ascii_characters_are_words():
    w, d = mh.word_hashes(["日本語", "café", "日本"])
    assert w.size == 3 + 2 + 2
    assert w[0] == w[5] and w[1] == w[6]  # same characters hash equal across documents
    assert d.tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_word_hashes_independent_of_chunking():
    texts = [TEXT_A, TEXT_B, "short text", TEXT_A.upper()] * 5
    w1, d1 = mh.word_hashes(texts, chunk_bytes=1 << 22)
    w2, d2 = mh.word_hashes(texts, chunk_bytes=50)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(d1, d2)


def test_shingles_stay_inside_documents_and_short_documents_get_one():
    w, d = mh.word_hashes(["a b c d", "e f", "", "g h i"])
    sh, sd = mh.shingle_hashes(w, d, 3, seed=0)
    assert sd.tolist() == [0, 0, 1, 3]
    w2, d2 = mh.word_hashes(["a b c d"])
    sh2, _ = mh.shingle_hashes(w2, d2, 3, seed=0)
    np.testing.assert_array_equal(sh[:2], sh2)


def test_signature_of_a_document_does_not_depend_on_its_batch():
    cfg = DedupConfig()
    s1, h1 = mh.sign_texts([TEXT_A], cfg)
    s2, h2 = mh.sign_texts([TEXT_B, "one two", TEXT_A, ""], cfg)
    np.testing.assert_array_equal(s1[0], s2[2])
    assert h2.tolist() == [True, True, True, False]


def test_densification_fills_every_bin_of_a_short_document():
    sig, has = mh.sign_texts(["one two three four five"], DedupConfig(bands=32, rows=4))
    assert has[0] and (sig[0] != 0xFFFFFFFF).all()
    assert np.unique(sig[0]).size <= 3  # 3 shingles, copied into 128 bins


def test_estimated_jaccard_tracks_true_jaccard():
    """Densified one-permutation MinHash is unbiased: the mean over 8 seeds is within ~3 std."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(100000)]
    for overlap in (0.2, 0.5, 0.8):
        n_shared = int(overlap * 3000)
        true_j = n_shared / (6000 - n_shared)
        errs = []
        for seed in range(8):
            common = rng.choice(len(vocab), 3000, replace=False)
            a = " ".join(vocab[i] for i in common)
            b = " ".join(vocab[i] for i in common[:n_shared]) + " " + " ".join(f"x{i}" for i in range(3000 - n_shared))
            sig, _ = mh.sign_texts([a, b], DedupConfig(shingle_size=1, bands=64, rows=4, seed=seed))
            errs.append(lsh.similarity(sig[:1], sig[1:])[0] - true_j)
        assert abs(np.mean(errs)) < 0.035, (overlap, errs)
        assert np.std(errs) < 0.06, (overlap, errs)


def test_band_keys_differ_per_band_and_match_for_equal_rows():
    sig = np.zeros((2, 8), np.uint32)
    sig[1, 4:] = 7
    k = mh.band_keys(sig, 2, 4, seed=0)
    assert k[0, 0] == k[1, 0] and k[0, 1] != k[1, 1] and k[0, 0] != k[0, 1]


# ----------------------------------------------------------------------------- exact


def test_normalize_for_hash_collapses_whitespace_only():
    assert normalize_for_hash("  a\n\tb  c ") == "a b c"
    assert normalize_for_hash("A b") != normalize_for_hash("a b")


def test_exact_hash_helpers():
    h = ex.exact_hashes(["a  b", "a b", "c", "a\nb"])
    assert ex.first_occurrence(h).tolist() == [True, False, True, False]
    stored = ex.sort_hashes(h[[2, 0]])
    assert ex.contains(stored, ex.exact_hashes(["a b", "d", "c"])).tolist() == [True, False, True]


# ----------------------------------------------------------------------------- LSH and components


def test_edges_within_links_equal_keys_only():
    keys = np.array([[1, 9], [2, 9], [1, 5], [3, 6]], np.uint64)
    assert lsh.edges_within(keys).tolist() == [[0, 1], [0, 2]]


def test_edges_to_sorted_finds_stored_rows():
    stored = np.array([[5, 10], [7, 20], [9, 30]], np.uint64)
    ks, rs = lsh.sort_band_keys(stored)
    new = np.array([[7, 0], [0, 30], [8, 8]], np.uint64)
    assert lsh.edges_to_sorted(new, ks, rs).tolist() == [[0, 1], [1, 2]]


def test_components_match_union_find():
    rng = np.random.default_rng(1)
    n = 500
    edges = rng.integers(0, n, (400, 2))
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    expected = [find(i) for i in range(n)]  # union by min keeps the lowest index as root
    assert lsh.components(n, edges).tolist() == expected


# ----------------------------------------------------------------------------- cross-dump API


def test_exact_and_near_duplicates_across_dumps_keep_the_earliest():
    near_a = _edit(TEXT_A, [3, 17])
    dumps = [[TEXT_A, TEXT_B], ["unrelated words here and there", near_a, TEXT_B.replace(" ", "  ")], [TEXT_A]]
    res = dedup_dumps(dumps, DedupConfig())
    assert [k.tolist() for k in res.keep] == [[True, True], [True, False, False], [False]]
    assert res.stats["exact_removed"] == [0, 1, 1] and res.stats["near_removed"] == [0, 1, 0]
    assert res.stats["kept"] == [2, 1, 0] and res.stats["docs"] == [2, 3, 1]


def test_within_dump_the_first_copy_wins_and_chains_form_one_cluster():
    v0 = TEXT_A
    v1 = _edit(v0, [2, 20])
    v2 = _edit(v1, [9, 30])
    res = dedup_dumps([[v2, TEXT_B, v1, v0]], DedupConfig())
    assert res.keep[0].tolist() == [True, True, False, False]
    assert res.stats["clusters"] == 1


def test_distinct_documents_and_empty_inputs_are_kept():
    dumps = [[TEXT_A, TEXT_B, "", "!!!"], [], ["", "???"]]
    res = dedup_dumps(dumps, DedupConfig())
    assert [k.tolist() for k in res.keep] == [[True, True, True, True], [], [False, True]]


def test_switches_disable_each_stage():
    dumps = [[TEXT_A, TEXT_A, _edit(TEXT_A, [5])]]
    assert dedup_dumps(dumps, DedupConfig(near=False)).keep[0].tolist() == [True, False, True]
    assert dedup_dumps(dumps, DedupConfig(exact=False)).keep[0].tolist() == [True, False, False]
    assert dedup_dumps(dumps, DedupConfig(exact=False, near=False)).keep[0].tolist() == [True, True, True]


def test_verification_threshold_rejects_band_collisions():
    half = " ".join(TEXT_A.split()[:20])
    a, b = half + " " + TEXT_B, half + " " + TEXT_A.split()[-1] + " " + " ".join(TEXT_B.split()[::-1])
    cfg_loose = DedupConfig(bands=64, rows=1, threshold=0.0)
    cfg_strict = DedupConfig(bands=64, rows=1, threshold=0.9)
    assert dedup_dumps([[a, b]], cfg_loose).keep[0].tolist() == [True, False]
    res = dedup_dumps([[a, b]], cfg_strict)
    assert res.keep[0].tolist() == [True, True] and res.stats["rejected"] >= 1


def test_results_do_not_depend_on_batch_size():
    docs = [TEXT_A, TEXT_B, _edit(TEXT_A, [1]), _edit(TEXT_B, [4]), TEXT_A, "x y", _edit(TEXT_A, [7, 8])]
    ref = dedup_dumps([docs[:4], docs[4:]], DedupConfig(batch_docs=100)).keep
    for bs in (1, 2, 3):
        got = dedup_dumps([docs[:4], docs[4:]], DedupConfig(batch_docs=bs)).keep
        assert [g.tolist() for g in got] == [r.tolist() for r in ref]


def test_persistent_index_dedups_a_new_dump_against_earlier_runs(tmp_path):
    cfg = DedupConfig(index_dir=str(tmp_path / "idx"), batch_docs=2)
    first = dedup_dumps([[TEXT_A, "alpha beta gamma delta", TEXT_B]], cfg)
    assert first.keep[0].all()
    index = DedupIndex(cfg, cfg.index_dir)  # reopened from disk
    assert len(index.shards) == 2 and index.num_docs == 3
    second = dedup_dumps([[_edit(TEXT_B, [6]), "new text entirely", TEXT_A]], cfg, index)
    assert second.keep[0].tolist() == [False, True, False]
    assert second.stats["first_dump_id"] == 1
    index.compact()
    reopened = DedupIndex(cfg, cfg.index_dir)
    assert len(reopened.shards) == 1 and reopened.num_docs == 5
    third = dedup_dumps([[_edit(TEXT_A, [2]), "alpha beta gamma delta", "new text entirely", "fresh"]], cfg, reopened)
    assert third.keep[0].tolist() == [False, False, False, True]


def test_index_refuses_other_hash_parameters(tmp_path):
    dedup_dumps([[TEXT_A]], DedupConfig(index_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="shingle_size"):
        DedupIndex(DedupConfig(shingle_size=5), str(tmp_path))


def test_in_memory_compact_keeps_decisions():
    cfg = DedupConfig(batch_docs=1)
    index = DedupIndex(cfg)
    dedup_dumps([[TEXT_A, TEXT_B, "alpha beta gamma"]], cfg, index)
    index.compact()
    assert len(index.shards) == 1
    res = dedup_dumps([[_edit(TEXT_B, [0]), "alpha beta gamma", "other"]], cfg, index)
    assert res.keep[0].tolist() == [False, False, True]
