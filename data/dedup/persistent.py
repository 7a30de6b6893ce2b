"""Deduplication against documents of earlier preparations (`dedup.index_dir`).

Run inside the global clusters step of a sharded preparation: after this run's own
decisions, the surviving documents of each input shard, in corpus order, go through
`DedupIndex.add` as one batch (from the signatures the sign stage stored), so a document
that matches one of an earlier run is dropped and the survivors join the index. Memory is
one shard's signatures at a time; the index itself is memory-mapped. A file lock serialises
preparations that share the index, and the drops are recorded per preparation so a redone
clusters step does not add the same documents twice.
"""
from __future__ import annotations

import fcntl
import hashlib
import os

import numpy as np

from data.dedup import _next_dump_id
from data.dedup.index import DedupIndex, SignedBatch
from data.dedup.minhash import band_keys
from data.shards import global_ids
from data.tasks import unit_array


def drop_against_index(ctx, dropped: np.ndarray) -> np.ndarray:
    """Global ids of this run's surviving documents that the persistent index drops."""
    index_dir = ctx.dedup.index_dir
    os.makedirs(os.path.join(index_dir, "runs"), exist_ok=True)
    record = os.path.join(index_dir, "runs", hashlib.sha256(os.path.abspath(ctx.out_dir).encode()).hexdigest()[:16]
                          + ".npy")
    with open(os.path.join(index_dir, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.isfile(record):
                return np.load(record)
            extra = _add_shards(ctx, DedupIndex(ctx.dedup, index_dir), dropped)
            np.save(record + ".tmp.npy", extra)
            os.replace(record + ".tmp.npy", record)
            return extra
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _add_shards(ctx, index: DedupIndex, dropped: np.ndarray) -> np.ndarray:
    first_dump = _next_dump_id(index)
    cfg, out = ctx.dedup, [np.zeros(0, np.int64)]
    for s, shard in enumerate(ctx.shards):
        gids = global_ids(s, np.asarray(unit_array(ctx, "sign", s, "records"), np.int64))
        rows = np.flatnonzero(~np.isin(gids, dropped))
        if rows.size == 0:
            continue
        exact = np.asarray(unit_array(ctx, "sign", s, "exact")[rows])
        sig = np.asarray(unit_array(ctx, "sign", s, "sig")[rows])
        has = np.asarray(unit_array(ctx, "sign", s, "has")[rows])
        keys = band_keys(sig, cfg.bands, cfg.rows, cfg.seed) if cfg.near else np.zeros((len(rows), 0), np.uint64)
        keep, _ = index.add(SignedBatch(exact, sig, has, keys, 0), first_dump + shard.dump, 0)
        out.append(gids[rows][~keep])
    return np.concatenate(out)
