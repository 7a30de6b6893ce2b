"""A persistent, sharded deduplication index: a new batch is deduplicated against it.

For corpora larger than memory (the setting of cross-dump deduplication in DeepSeek LLM,
arXiv 2401.02954, section 2), every batch of documents becomes one shard holding
  * `exact.npy`  the xxh3_128 hashes of its exact-unique documents, sorted (M, 2) uint64;
  * `sig.npy`    their MinHash signatures (M, K) uint32;
  * `keys.npy` / `rows.npy`  per band, the 64-bit band keys in ascending order and the
                 signature row each belongs to (B, M), so a lookup is one `searchsorted`;
  * `ids.npy`    the (dump, document) id of each signature row.
Shards are opened memory-mapped, so only the pages a lookup touches are read; `compact`
merges several shards into one. Documents are processed in (dump, document) order, so any
document that links to the index is later than its match and is the one dropped: the
earliest copy is kept. Near-duplicates that were themselves dropped stay in the index, so
clusters are connected components across batches too.

Signing (`sign_batch`) is a pure function and can run in worker processes; `add` makes the
keep/drop decisions and must see batches in order.

Legend: N documents in the batch, M rows in a shard, K signature bins, B bands.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from dataclasses import dataclass

import numpy as np

from data.dedup import exact as ex
from data.dedup import lsh
from data.dedup.config import DedupConfig
from data.dedup.minhash import band_keys, sign_texts

_FORMAT = 1
_PARAMS = ("shingle_size", "bands", "rows", "seed")
_ARRAYS = ("exact", "sig", "keys", "rows", "ids")


@dataclass
class SignedBatch:
    """Everything `DedupIndex.add` needs about a batch of documents."""

    exact_N2: np.ndarray  # xxh3_128 (hi, lo) of the normalised texts
    sig_NK: np.ndarray  # MinHash signatures, uint32
    has_sig_N: np.ndarray  # False for documents without a single word
    keys_NB: np.ndarray  # LSH band keys, uint64
    n_bytes: int  # UTF-8 bytes signed (for throughput)

    def __len__(self) -> int:
        return len(self.exact_N2)


def sign_batch(texts: list[str], cfg: DedupConfig) -> SignedBatch:
    """Exact hashes, MinHash signatures and band keys of a batch (pure; safe in workers)."""
    exact = ex.exact_hashes(texts) if cfg.exact else np.zeros((len(texts), 2), np.uint64)
    if cfg.near:
        sig, has = sign_texts(texts, cfg)
        keys = band_keys(sig, cfg.bands, cfg.rows, cfg.seed)
    else:
        sig = np.zeros((len(texts), 0), np.uint32)
        has = np.zeros(len(texts), bool)
        keys = np.zeros((len(texts), 0), np.uint64)
    return SignedBatch(exact, sig, has, keys, sum(len(t.encode("utf-8", "surrogatepass")) for t in texts))


class DedupIndex:
    """Shards of already-processed documents; in memory when `path` is empty."""

    def __init__(self, cfg: DedupConfig, path: str = ""):
        self.cfg = cfg
        self.path = path
        self.shards: list[dict[str, np.ndarray]] = []
        self._names: list[str] = []
        if path:
            self._open(path)

    # ------------------------------------------------------------------ persistence

    def _params(self) -> dict:
        return {name: getattr(self.cfg, name) for name in _PARAMS}

    def _open(self, path: str) -> None:
        meta_path = os.path.join(path, "index.json")
        if not os.path.exists(meta_path):
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not os.path.exists(meta_path):
                    self._write_meta([])
                fcntl.flock(lock, fcntl.LOCK_UN)
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"dedup.index_dir = {path!r}: index format {meta.get('format')} is not {_FORMAT}; "
                             "rebuild the index")
        for name in _PARAMS:
            if meta["params"][name] != getattr(self.cfg, name):
                raise ValueError(f"dedup.{name} = {getattr(self.cfg, name)!r}: the index at {path!r} was built with "
                                 f"{name} = {meta['params'][name]!r}; use the same value or a new index_dir")
        for name in meta["shards"]:
            self.shards.append({a: np.load(os.path.join(path, name, f"{a}.npy"), mmap_mode="r") for a in _ARRAYS})
        self._names = list(meta["shards"])

    def _write_meta(self, names: list[str]) -> None:
        self._names = list(names)
        tmp = os.path.join(self.path, f"index.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"format": _FORMAT, "params": self._params(), "shards": names}, f, indent=1)
        os.replace(tmp, os.path.join(self.path, "index.json"))

    def _names_on_disk(self) -> list[str]:
        with open(os.path.join(self.path, "index.json")) as f:
            return list(json.load(f)["shards"])

    def _store(self, shard: dict[str, np.ndarray], replace: bool = False) -> None:
        """Append a shard (or, with `replace`, make it the only one) and persist it.

        Safe when several processes share the index dir: the shard is written to a temporary
        folder of this process, and its name is chosen and index.json rewritten under a file
        lock from the names on disk (another process may have added shards meanwhile).
        """
        if not self.path:
            self.shards = [shard] if replace else self.shards + [shard]
            return
        tmp = os.path.join(self.path, f"incoming-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        os.makedirs(tmp)
        for a in _ARRAYS:
            np.save(os.path.join(tmp, f"{a}.npy"), shard[a])
        with open(os.path.join(self.path, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = self._names_on_disk()
            name = f"shard-{1 + max((int(n.split('-')[1]) for n in on_disk + self._names), default=-1):06d}"
            os.replace(tmp, os.path.join(self.path, name))
            old_names = self._names
            self._write_meta([name] if replace else on_disk + [name])
            fcntl.flock(lock, fcntl.LOCK_UN)
        if replace:
            self.shards = []
            for old in old_names:
                shutil.rmtree(os.path.join(self.path, old), ignore_errors=True)
        self.shards.append({a: np.load(os.path.join(self.path, name, f"{a}.npy"), mmap_mode="r") for a in _ARRAYS})

    @property
    def num_docs(self) -> int:
        """Signature rows held (exact-unique documents that have a signature)."""
        return sum(len(s["ids"]) for s in self.shards)

    # ------------------------------------------------------------------ decisions

    def add(self, batch: SignedBatch, dump: int, first_doc: int = 0) -> tuple[np.ndarray, dict]:
        """Deduplicate a batch against itself and the index, then store it as a new shard.

        Returns (keep_N bool, stats) with stats: exact, near (documents dropped), candidates
        (band collisions examined), rejected (collisions under the threshold), clusters.
        """
        n = len(batch)
        exact_dup = np.zeros(n, bool)
        if self.cfg.exact and n:
            exact_dup = ~ex.first_occurrence(batch.exact_N2)
            for shard in self.shards:
                exact_dup |= ex.contains(shard["exact"], batch.exact_N2)
        idx = np.flatnonzero(~exact_dup & batch.has_sig_N) if self.cfg.near else np.zeros(0, np.int64)
        near_dup, st = self._near(batch.sig_NK[idx], batch.keys_NB[idx])
        keep = ~exact_dup
        keep[idx[near_dup]] = False
        ids = np.stack((np.full(idx.size, dump, np.int64), idx.astype(np.int64) + first_doc), axis=1)
        keys_sorted, rows_sorted = lsh.sort_band_keys(batch.keys_NB[idx])
        stored_exact = batch.exact_N2[~exact_dup] if self.cfg.exact else np.zeros((0, 2), np.uint64)
        self._store({"exact": ex.sort_hashes(stored_exact), "sig": batch.sig_NK[idx],
                     "keys": keys_sorted, "rows": rows_sorted, "ids": ids})
        st.update(exact=int(exact_dup.sum()), near=int(near_dup.sum()))
        return keep, st

    def _near(self, sig_MK: np.ndarray, keys_MB: np.ndarray) -> tuple[np.ndarray, dict]:
        """Near-duplicate flags of the batch's exact-unique signed documents (in order)."""
        m, thr = len(sig_MK), self.cfg.threshold
        st = {"candidates": 0, "rejected": 0, "clusters": 0}
        if m == 0:
            return np.zeros(0, bool), st
        e = lsh.edges_within(keys_MB)
        ok = lsh.similarity(sig_MK[e[:, 0]], sig_MK[e[:, 1]]) >= thr
        st["candidates"] += len(e)
        st["rejected"] += int((~ok).sum())
        linked_old = np.zeros(m, bool)
        old_hits = set()
        for s_i, shard in enumerate(self.shards):
            e_old = lsh.edges_to_sorted(keys_MB, shard["keys"], shard["rows"])
            if len(e_old) == 0:
                continue
            ok_old = lsh.similarity(sig_MK[e_old[:, 0]], np.asarray(shard["sig"][e_old[:, 1]])) >= thr
            st["candidates"] += len(e_old)
            st["rejected"] += int((~ok_old).sum())
            linked_old[e_old[ok_old, 0]] = True
            old_hits.update((s_i, r) for r in np.unique(e_old[ok_old, 1]).tolist())
        labels = lsh.components(m, e[ok])
        comp_old = np.zeros(m, bool)
        comp_old[labels[linked_old]] = True
        dup = (labels != np.arange(m)) | comp_old[labels]
        st["clusters"] = int(np.unique(labels[dup & ~comp_old[labels]]).size) + len(old_hits)
        return dup, st

    # ------------------------------------------------------------------ maintenance

    def compact(self) -> None:
        """Merge all shards into one (fewer lookups per batch); keeps the index's content."""
        if len(self.shards) < 2:
            return
        merged = {a: np.concatenate([np.asarray(s[a]) for s in self.shards]) for a in ("exact", "sig", "ids")}
        merged["exact"] = ex.sort_hashes(merged["exact"])
        offsets = np.cumsum([0] + [len(s["ids"]) for s in self.shards])
        n_bands = self.cfg.bands if self.cfg.near else 0
        keys = np.zeros((n_bands, offsets[-1]), np.uint64)
        rows = np.zeros((n_bands, offsets[-1]), lsh.row_dtype(offsets[-1]))
        for b in range(n_bands):  # one band at a time: memory is one band of every shard
            k = np.concatenate([np.asarray(s["keys"][b]) for s in self.shards])
            r = np.concatenate([np.asarray(s["rows"][b]) + o for s, o in zip(self.shards, offsets)])
            order = np.argsort(k, kind="stable")
            keys[b], rows[b] = k[order], r[order]
        merged.update(keys=keys, rows=rows)
        self._store(merged, replace=True)
