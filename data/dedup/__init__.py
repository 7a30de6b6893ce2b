"""Cross-dump deduplication: exact (xxh3_128) then near-duplicate (MinHash LSH) removal.

DeepSeek LLM (arXiv 2401.02954, section 2) deduplicates across all Common Crawl dumps
rather than within each one, which removes about four times more documents; DeepSeek-V3
(arXiv 2412.19437, section 4.1) keeps that pipeline. `dedup_dumps` takes the dumps in
order and keeps the earliest (dump, document) of every duplicate cluster:

    from data.dedup import DedupConfig, dedup_dumps
    result = dedup_dumps([dump0_texts, dump1_texts], DedupConfig())
    kept0 = [t for t, k in zip(dump0_texts, result.keep[0]) if k]

With `index_dir` set, the index persists, so a later call (a new dump) is deduplicated
against everything processed before. See `minhash.py`, `lsh.py` and `index.py`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from data.dedup.config import DedupConfig
from data.dedup.exact import exact_hashes, normalize_for_hash
from data.dedup.index import DedupIndex, SignedBatch, sign_batch

__all__ = ["DedupConfig", "DedupIndex", "DedupResult", "SignedBatch", "dedup_dumps", "exact_hashes",
           "normalize_for_hash", "sign_batch"]


@dataclass
class DedupResult:
    """One keep-mask per dump (True = keep) and the counters of the run."""

    keep: list[np.ndarray]
    stats: dict = field(default_factory=dict)


def dedup_dumps(dumps: list[list[str]], cfg: DedupConfig, index: DedupIndex | None = None) -> DedupResult:
    """Deduplicate ordered dumps of (already normalised) texts; the earliest copy wins.

    `index` defaults to a fresh one (in memory, or at `cfg.index_dir` where documents of
    earlier runs also count as earlier). stats: per-dump lists `docs`, `exact_removed`,
    `near_removed`, `kept`; totals `candidates`, `rejected` (band collisions under the
    threshold), `clusters`; `seconds` per stage and `mb_per_s`.
    """
    index = index if index is not None else DedupIndex(cfg, cfg.index_dir)
    first_dump = _next_dump_id(index)
    keep_all: list[np.ndarray] = []
    st = {"docs": [], "exact_removed": [], "near_removed": [], "kept": [],
          "candidates": 0, "rejected": 0, "clusters": 0, "seconds": {"sign": 0.0, "match": 0.0}}
    n_bytes = 0
    for d, texts in enumerate(dumps):
        keep = np.ones(len(texts), bool)
        exact_n = near_n = 0
        for lo in range(0, len(texts), cfg.batch_docs):
            t0 = time.perf_counter()
            batch = sign_batch(texts[lo:lo + cfg.batch_docs], cfg)
            t1 = time.perf_counter()
            k, bst = index.add(batch, first_dump + d, lo)
            st["seconds"]["sign"] += t1 - t0
            st["seconds"]["match"] += time.perf_counter() - t1
            keep[lo:lo + len(k)] = k
            exact_n += bst["exact"]
            near_n += bst["near"]
            n_bytes += batch.n_bytes
            for name in ("candidates", "rejected", "clusters"):
                st[name] += bst[name]
        keep_all.append(keep)
        st["docs"].append(len(texts))
        st["exact_removed"].append(exact_n)
        st["near_removed"].append(near_n)
        st["kept"].append(int(keep.sum()))
    total = st["seconds"]["sign"] + st["seconds"]["match"]
    st["seconds"]["total"] = total
    st["mb_per_s"] = n_bytes / 1e6 / total if total > 0 else 0.0
    st["first_dump_id"] = first_dump
    return DedupResult(keep_all, st)


def _next_dump_id(index: DedupIndex) -> int:
    """Dump ids continue after those already in a persistent index."""
    last = [int(np.asarray(s["ids"][-1, 0])) for s in index.shards if len(s["ids"])]
    return max(last, default=-1) + 1
