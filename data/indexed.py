"""Packed sequences on disk: Megatron's indexed dataset (.bin/.idx) plus document lengths.

Written with megatron-core's `IndexedDatasetBuilder` and read with its `IndexedDataset`
(both run on CPU). One packed sequence = one Megatron sequence = one Megatron document, so
Megatron tools see a plain indexed dataset. Padding is not stored: a sequence holds only its
tokens (<= L); the reader pads. Document boundaries inside each sequence (cu_seqlens-style,
issue 3) go beside it:
  PREFIX.doclens.npy          int32 [total pieces]  lengths of the document pieces, in order
  PREFIX.doclens_offsets.npy  int64 [n + 1]         sequence i owns doclens[off[i]:off[i+1]]
The .idx layout (documented in megatron-core): magic b"MMIDIDX\\x00\\x00", u64 version 1,
u8 dtype code, u64 sequence count, u64 document count, int32 sequence lengths, int64 byte
pointers, int64 document indices. megatron-core is imported lazily (it takes seconds).
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
            raise FileNotFoundError(f"no indexed dataset at {prefix}.idx/.bin; run python -m data.prepare")
        self.prefix = prefix
        self.dataset = _megatron().IndexedDataset(prefix)
        self.doclens = np.load(prefix + ".doclens.npy", mmap_mode="r")
        self.offsets = np.load(prefix + ".doclens_offsets.npy")
        if len(self.offsets) - 1 != len(self.dataset):
            raise ValueError(f"{prefix}: {len(self.dataset)} sequences but document lengths for "
                             f"{len(self.offsets) - 1}; the output is corrupt, prepare it again")

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset[i], np.asarray(self.doclens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int32)
