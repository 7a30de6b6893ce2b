"""Packed sequences on disk: Megatron's indexed dataset (.bin/.idx) plus document lengths.

Written with megatron-core's `IndexedDatasetBuilder`; read by `IndexedReader`, a memory map of
the .bin at the offsets of the checked .idx (what megatron-core's `IndexedDataset` does: importing
megatron-core takes seconds, once per rank and tool; tests/unit/test_data_prepare.py reads the
same files with both). One packed sequence = one Megatron sequence = one Megatron document, so
Megatron tools see a plain indexed dataset. Padding is not stored: a sequence holds only its
tokens (<= L); the reader pads. Document boundaries inside each sequence (cu_seqlens-style)
go beside it:
  PREFIX.doclens.npy          int32 [total pieces]  lengths of the document pieces, in order
  PREFIX.doclens_offsets.npy  int64 [n + 1]         sequence i owns doclens[off[i]:off[i+1]]
The .idx layout (documented in megatron-core): magic b"MMIDIDX\\x00\\x00", u64 version 1,
u8 dtype code, u64 sequence count, u64 document count, int32 sequence lengths, int64 byte
pointers, int64 document indices. megatron-core is imported lazily, by the writer only.

Files from elsewhere are untrusted: before megatron-core maps them, `validate` checks the .idx
header (magic, version, dtype code), that its size is exactly what the counts imply, that the
lengths/pointers are consistent and fit in the .bin, that the document indices are monotonic,
and that the document lengths (.npy, loaded without pickle) tile every sequence. Any violation
is one `IndexedDataError` naming the file and what is wrong, never a crash inside numpy or
megatron-core or a silently shifted read.
"""
from __future__ import annotations

import os
import warnings

import numpy as np


def _megatron():
    """megatron-core's indexed_dataset module, imported quietly (it warns about missing TE/Apex)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int):
    """Smallest dtype Megatron uses for this vocabulary (uint16 below 65500, else int32)."""
    return _megatron().DType.optimal_dtype(vocab_size)


_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = len(_MAGIC) + 8 + 1 + 8 + 8
# megatron-core's DType codes for the integer token types (float codes are not token files)
_TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}


class IndexedDataError(ValueError):
    """A .bin/.idx/.doclens file that is not a valid prepared dataset; the message says why."""


def _fail(path: str, why: str):
    raise IndexedDataError(f"{path}: {why}; the file is truncated or not a prepared dataset "
                           "(run python -m trainer.prepare again)")


def _read_idx(prefix: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Parse and check the .idx: (token dtype, lengths int32, pointers int64, document indices int64)."""
    path = prefix + ".idx"
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < _HEADER or blob[:len(_MAGIC)] != _MAGIC:
        _fail(path, f"no Megatron index header (got {len(blob)} bytes starting {blob[:9]!r})")
    version, code = int.from_bytes(blob[9:17], "little"), blob[17]
    n_seq, n_doc = int.from_bytes(blob[18:26], "little"), int.from_bytes(blob[26:34], "little")
    if version != 1:
        _fail(path, f"index version {version}, expected 1")
    if code not in _TOKEN_DTYPES:
        _fail(path, f"dtype code {code} is not an integer token type ({sorted(_TOKEN_DTYPES)})")
    want = _HEADER + 12 * n_seq + 8 * n_doc
    if want != len(blob):
        _fail(path, f"{n_seq} sequences and {n_doc} document indices need {want} bytes, the file has {len(blob)}")
    lengths = np.frombuffer(blob, np.int32, n_seq, _HEADER)
    pointers = np.frombuffer(blob, np.int64, n_seq, _HEADER + 4 * n_seq)
    docs = np.frombuffer(blob, np.int64, n_doc, _HEADER + 12 * n_seq)
    return np.dtype(_TOKEN_DTYPES[code]), lengths, pointers, docs


def validate(prefix: str) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """Raise IndexedDataError unless PREFIX.{idx,bin,doclens.npy,doclens_offsets.npy} are consistent;
    returns the checked (token dtype, sequence lengths, byte pointers)."""
    dtype, lengths, pointers, docs = _read_idx(prefix)
    idx, n = prefix + ".idx", len(lengths)
    if (lengths < 0).any():
        _fail(idx, "negative sequence length")
    ends = np.cumsum(lengths.astype(np.int64) * dtype.itemsize)
    if n and (pointers[0] != 0 or (pointers[1:] != ends[:-1]).any()):
        _fail(idx, "sequence pointers do not follow the sequence lengths")
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != n or (np.diff(docs) < 0).any():
        _fail(idx, f"document indices must rise from 0 to the sequence count {n}")
    bin_path = prefix + ".bin"
    if not os.path.isfile(bin_path):
        _fail(bin_path, "missing")
    need = int(ends[-1]) if n else 0
    if os.path.getsize(bin_path) != need:
        _fail(bin_path, f"{os.path.getsize(bin_path)} bytes but the index describes {need}")
    _validate_doclens(prefix, lengths.astype(np.int64))
    return dtype, lengths, pointers


def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        _fail(path, "missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TokenError...
        _fail(path, f"not a readable .npy array ({type(e).__name__}: {e})")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        _fail(path, f"expected a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    return arr


def _validate_doclens(prefix: str, lengths: np.ndarray) -> None:
    doclens = _load_npy(prefix + ".doclens.npy")
    offsets = np.asarray(_load_npy(prefix + ".doclens_offsets.npy"), dtype=np.int64)
    path = prefix + ".doclens_offsets.npy"
    if len(offsets) != len(lengths) + 1 or offsets[0] != 0 or offsets[-1] != len(doclens) \
            or (np.diff(offsets) < 0).any():
        _fail(path, f"{len(offsets)} offsets for {len(lengths)} sequences and {len(doclens)} document lengths")
    d = np.asarray(doclens, dtype=np.int64)
    if (d <= 0).any():
        _fail(prefix + ".doclens.npy", "document lengths must be positive")
    cum = np.concatenate([[0], np.cumsum(d)])
    if (cum[offsets[1:]] - cum[offsets[:-1]] != lengths).any():
        _fail(prefix + ".doclens.npy", "document lengths do not add up to the sequence lengths")


class IndexedWriter:
    """Append packed sequences, then `finalize()` writes .idx and the document lengths."""

    def __init__(self, prefix: str, vocab_size: int):
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        self.builder = _megatron().IndexedDatasetBuilder(prefix + ".bin", dtype=self.dtype)
        self.doclens: list[int] = []
        self.offsets: list[int] = [0]

    def add(self, tokens: np.ndarray, doc_lens: list[int]) -> None:
        assert sum(doc_lens) == len(tokens) and all(n > 0 for n in doc_lens), (doc_lens, len(tokens))
        self.builder.add_document(np.asarray(tokens, dtype=self.dtype), [len(tokens)])
        self.doclens.extend(doc_lens)
        self.offsets.append(len(self.doclens))

    def finalize(self) -> int:
        self.builder.finalize(self.prefix + ".idx")
        np.save(self.prefix + ".doclens.npy", np.asarray(self.doclens, dtype=np.int32))
        np.save(self.prefix + ".doclens_offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        return len(self.offsets) - 1


class IndexedReader:
    """Random access to packed sequences: `get(i) -> (tokens, doc_lens int32)`."""

    def __init__(self, prefix: str):
        if not os.path.isfile(prefix + ".idx"):
            raise FileNotFoundError(f"no indexed dataset at {prefix}.idx/.bin; run python -m trainer.prepare")
        self.prefix = prefix
        dtype, self.lengths, pointers = validate(prefix)
        self.starts = pointers // dtype.itemsize   # validate() checked they follow the lengths
        size = os.path.getsize(prefix + ".bin")
        self.tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        self.doclens = np.load(prefix + ".doclens.npy", mmap_mode="r", allow_pickle=False)
        self.offsets = np.load(prefix + ".doclens_offsets.npy", allow_pickle=False)
        assert len(self.offsets) - 1 == len(self.lengths), "validate() checked the counts"

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start = int(self.starts[i])
        tokens = np.asarray(self.tokens[start:start + int(self.lengths[i])])
        return tokens, np.asarray(self.doclens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int32)
