"""Parquet input: rows read in order across row groups, bad rows counted, a missing column is clear,
and a Parquet dump is deduplicated (exactly) against a JSONL dump like any other."""
import json

import pytest

from data.config import DataConfig
from data.dedup.config import DedupConfig
from data.prepare import prepare
from data.sources import read_dump

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [f"Document number {i} talks about topic {i * 7 % 13} in a few plain words." for i in range(25)]


def _parquet(path, texts, column="text", row_group_size=10):
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), str(path), row_group_size=row_group_size)
    return str(path)


def test_rows_in_order_across_row_groups(tmp_path):
    path = _parquet(tmp_path / "a.parquet", TEXTS + [None, ""])
    docs = list(read_dump(path))
    assert [d.text for d in docs[:25]] == TEXTS
    assert len(docs) == 27
    assert docs[25].text is None and docs[25].error == "not_text"   # counted as bad input, not dropped
    assert docs[26].text == "" and docs[26].source.endswith(":26")


def test_missing_column_names_the_fix(tmp_path):
    path = _parquet(tmp_path / "b.parquet", TEXTS, column="body")
    with pytest.raises(ValueError, match="data.text_field"):
        list(read_dump(path, text_field="text"))
    assert [d.text for d in read_dump(path, text_field="body")] == TEXTS


def test_parquet_dump_dedups_against_jsonl_dump(tmp_path):
    jsonl = tmp_path / "first.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:10]))
    parquet = _parquet(tmp_path / "second.parquet", TEXTS[5:])       # 5 exact copies of dump 0
    cfg = DataConfig(dumps=[str(jsonl), parquet], output_dir=str(tmp_path / "out"), seq_len=64,
                     tokenizer="bpe:300", workers=1)
    report = prepare(cfg, DedupConfig(near=False), quiet=True)  # the templated texts are near-duplicates
    assert [d["duplicates"] for d in report["dumps"]] == [0, 5]
