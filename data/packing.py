"""Sequence packing: best-fit decreasing (Ding et al. 2024, "Fewer Truncations Improve Language
Modeling") and the concatenate-and-split baseline.

Both take document lengths in corpus order and return sequences as lists of `Piece`s
(document index, start, end); every token of every document lands in exactly one piece.

Best-fit decreasing: a document longer than L is split into L-token pieces (the remainder is
a piece too); nothing else is ever cut. Pieces are packed in buffers of `buffer` documents
(memory stays flat on any corpus size): sorted longest first, each goes into the open
sequence whose remaining room is the smallest that still fits, found in O(log L) by a segment
tree over remaining capacities 0..L (`CapacityTree`), or opens a new sequence. Sequences are
emitted in the order they were opened; pieces inside a sequence in placement order.

Concatenate-and-split: all documents back to back, cut every L tokens; documents that straddle
a cut are split (the baseline's truncations), the last sequence may be short.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    doc: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class CapacityTree:
    """Counts of open sequences per remaining capacity; finds the smallest capacity >= q."""

    def __init__(self, max_capacity: int):
        self.size = 1
        while self.size < max_capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)

    def add(self, capacity: int, delta: int) -> None:
        i = capacity + self.size
        while i:
            self.count[i] += delta
            i //= 2

    def smallest_at_least(self, q: int) -> int:
        """Smallest capacity >= q with an open sequence, or -1."""
        count, i = self.count, q + self.size
        if count[i]:
            return q
        while i > 1:
            if i % 2 == 0 and count[i + 1]:
                i += 1
                while i < self.size:
                    i = 2 * i if count[2 * i] else 2 * i + 1
                return i - self.size
            i //= 2
        return -1


def split_long(doc_lens: np.ndarray, seq_len: int, first_doc: int = 0) -> list[Piece]:
    """Pieces of at most `seq_len` tokens; only documents longer than `seq_len` are cut."""
    pieces = []
    for i, n in enumerate(doc_lens.tolist()):
        for start in range(0, n, seq_len):
            pieces.append(Piece(first_doc + i, start, min(start + seq_len, n)))
    return pieces


def best_fit_decreasing(pieces: list[Piece], seq_len: int) -> list[list[Piece]]:
    """Pack pieces (each <= seq_len) into sequences of at most seq_len tokens."""
    order = sorted(range(len(pieces)), key=lambda k: (-pieces[k].length, k))
    tree = CapacityTree(seq_len)
    bins: list[list[Piece]] = []
    open_by_capacity: dict[int, list[int]] = {}
    for k in order:
        piece = pieces[k]
        assert 0 < piece.length <= seq_len, piece
        cap = tree.smallest_at_least(piece.length)
        if cap < 0:
            bins.append([])
            b, cap = len(bins) - 1, seq_len
        else:
            b = open_by_capacity[cap].pop()
            tree.add(cap, -1)
        bins[b].append(piece)
        left = cap - piece.length
        if left > 0:
            open_by_capacity.setdefault(left, []).append(b)
            tree.add(left, 1)
    return bins


def pack_bfd(doc_lens: np.ndarray, seq_len: int, buffer: int = 10000):
    """Yield best-fit-decreasing sequences, one buffer of `buffer` documents at a time."""
    for first in range(0, len(doc_lens), buffer):
        pieces = split_long(doc_lens[first:first + buffer], seq_len, first)
        yield from best_fit_decreasing(pieces, seq_len)


def pack_concat(doc_lens: np.ndarray, seq_len: int):
    """Yield concatenate-and-split sequences (the baseline)."""
    current: list[Piece] = []
    room = seq_len
    for i, n in enumerate(doc_lens.tolist()):
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append(Piece(i, start, start + take))
            start += take
            room -= take
            if room == 0:
                yield current
                current, room = [], seq_len
    if current:
        yield current


def pack(doc_lens: np.ndarray, seq_len: int, mode: str, buffer: int = 10000):
    if mode == "bfd":
        return pack_bfd(doc_lens, seq_len, buffer)
    if mode == "concat":
        return pack_concat(doc_lens, seq_len)
    raise ValueError(f"packing = {mode!r}: must be 'bfd' or 'concat'")


def packing_stats(sequences: list[list[Piece]], doc_lens: np.ndarray, seq_len: int) -> dict:
    """Padding fraction, documents cut (appear in more than one piece), sequences."""
    pieces_per_doc = np.zeros(len(doc_lens), dtype=np.int64)
    tokens = 0
    for seq in sequences:
        for p in seq:
            pieces_per_doc[p.doc] += 1
            tokens += p.length
    slots = len(sequences) * seq_len
    cut = int((pieces_per_doc > 1).sum())
    return {"sequences": len(sequences), "tokens": tokens, "padding_tokens": slots - tokens,
            "padding_fraction": (slots - tokens) / slots if slots else 0.0,
            "docs": len(doc_lens), "docs_cut": cut,
            "docs_cut_fraction": cut / len(doc_lens) if len(doc_lens) else 0.0,
            "docs_longer_than_seq": int((doc_lens > seq_len).sum())}
