"""Fuzz the indexed-dataset reader: random, truncated and mutated .idx/.bin/.npy files.

A small valid dataset is written with `IndexedWriter`; each case damages a copy (truncate,
overwrite bytes, flip bits, append junk, replace with random bytes, swap in a pickled or
wrongly-shaped .npy). Opening it must either raise one `IndexedDataError` naming the file, or,
when the damage left it valid (e.g. a changed token byte), read back every sequence with the
lengths the index promises. Never another exception type, a crash in megatron-core, or a hang.
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest

from data.indexed import IndexedDataError, IndexedReader, IndexedWriter

FILES = (".idx", ".bin", ".doclens.npy", ".doclens_offsets.npy")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path_factory.mktemp("idx") / "train")
    w = IndexedWriter(prefix, vocab_size=1000)
    for _ in range(12):
        docs = [int(x) for x in rng.integers(1, 9, size=rng.integers(1, 4))]
        w.add(rng.integers(0, 1000, size=sum(docs)), docs)
    w.finalize()
    return prefix


def _damage(data: bytes, rng: random.Random, ext: str) -> bytes:
    op = rng.randrange(7)
    i = rng.randrange(len(data) + 1)
    if op == 0:
        return data[:i]                                              # truncate
    if op == 1:
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))  # append junk
    if op == 2:
        b = bytearray(data)                                          # flip bits
        for _ in range(rng.randint(1, 4)):
            if b:
                j = rng.randrange(len(b))
                b[j] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 3:
        hot = 40 if ext == ".idx" else len(data)                     # overwrite (header region for .idx)
        j = rng.randrange(max(1, min(hot, len(data))))
        return data[:j] + bytes(rng.randrange(256) for _ in range(8)) + data[j + 8:]
    if op == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))  # random file
    if op == 5:
        return b""
    b = bytearray(data)                                              # a large count or length field
    j = rng.randrange(max(1, len(b) - 8))
    b[j:j + 8] = rng.choice([2**63 - 1, 2**31, 2**32 + 3, 0]).to_bytes(8, "little")
    return bytes(b)


def _open_and_read(prefix: str) -> None:
    r = IndexedReader(prefix)
    for i in range(len(r)):
        tokens, lens = r.get(i)
        assert len(tokens) == int(lens.sum()) and (lens > 0).all()


@pytest.mark.timeout(120)
def test_damaged_files_give_one_clear_error(dataset, tmp_path):
    rng = random.Random(7)
    originals = {ext: open(dataset + ext, "rb").read() for ext in FILES}
    outcomes = {"error": 0, "valid": 0}
    for n in range(300):
        case = str(tmp_path / f"c{n % 4}")  # reuse a few directories: cheap and bounded
        shutil.rmtree(case, ignore_errors=True)
        os.makedirs(case)
        prefix = os.path.join(case, "train")
        ext = rng.choice(FILES)
        for e in FILES:
            with open(prefix + e, "wb") as f:
                f.write(_damage(originals[e], rng, e) if e == ext else originals[e])
        try:
            _open_and_read(prefix)
            outcomes["valid"] += 1
        except IndexedDataError as e:
            assert prefix in str(e) and "prepare" in str(e)
            outcomes["error"] += 1
        except Exception as e:
            raise AssertionError(f"case {n} ({ext} damaged): {type(e).__name__}: {e}") from e
    assert outcomes["error"] > 200 and outcomes["valid"] > 0, outcomes


def test_the_valid_dataset_reads(dataset):
    _open_and_read(dataset)


@pytest.mark.parametrize("payload", ["pickle", "float", "2d"])
def test_doclens_npy_must_be_plain_integers(dataset, tmp_path, payload):
    prefix = str(tmp_path / "train")
    for e in FILES:
        shutil.copyfile(dataset + e, prefix + e)
    arr = {"pickle": np.array([{"x": 1}], dtype=object), "float": np.ones(30, np.float32),
           "2d": np.ones((3, 3), np.int32)}[payload]
    np.save(prefix + ".doclens.npy", arr, allow_pickle=True)
    with pytest.raises(IndexedDataError, match="doclens.npy"):
        IndexedReader(prefix)


def test_missing_bin_is_named(dataset, tmp_path):
    prefix = str(tmp_path / "train")
    for e in FILES:
        if e != ".bin":
            shutil.copyfile(dataset + e, prefix + e)
    with pytest.raises(IndexedDataError, match=r"train\.bin: missing"):
        IndexedReader(prefix)
