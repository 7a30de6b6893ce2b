"""Deduplication config (exact xxh3_128 + MinHash LSH near-duplicates). Pure stdlib.

The near-duplicate defaults (3-word shingles, 32 bands x 4 rows, verification at an
estimated Jaccard of 0.4) were chosen by measurement on copies of real documents with
5-10% of their words edited: see `benchmarks/bench_dedup.py` and the tests in
`tests/unit/test_dedup_quality.py`. datatrove's defaults (5-gram, 14 x 8) find fewer than a
fifth of such copies because their 5-gram Jaccard (~0.45-0.65) sits under its S-curve.
"""
from __future__ import annotations

from dataclasses import dataclass

from config_fields import doc as _doc
from config_fields import require as _require


@dataclass(kw_only=True)
class DedupConfig:
    """Cross-dump deduplication run by `python -m trainer.prepare` (earliest dump's copy is kept)."""

    exact: bool = _doc(True, "Drop documents whose normalised text hashes (xxh3_128) equal an earlier one.")
    near: bool = _doc(True, "Drop near-duplicates found by MinHash LSH and verified by estimated Jaccard.")
    shingle_size: int = _doc(3, "Words per shingle (word n-gram). Smaller n tolerates more edits; datatrove uses 5.")
    bands: int = _doc(32, "LSH bands b: two documents become candidates when all rows of any band agree.")
    rows: int = _doc(4, "Rows r per band; the signature has bands*rows one-permutation-hashing bins.")
    threshold: float = _doc(0.4, "Verification: a band collision merges two documents only if their estimated Jaccard (fraction of equal signature bins) is at least this; 0 trusts every collision (datatrove's behaviour).")
    seed: int = _doc(0, "Seed of the shingle, bin and band hash functions (an index only accepts batches signed with its own seed).")
    batch_docs: int = _doc(20000, "Documents signed and deduplicated per vectorised batch (one index shard per batch).")
    buckets: int = _doc(0, "Hash buckets of the candidate-pair stage (one task each; a bucket task's memory is about 12 bytes x documents x bands / buckets); 0 = one per input shard. Does not change which documents are dropped.")
    index_dir: str = _doc("", "Folder for the persistent index (signatures, band keys and exact hashes per shard); empty keeps it in memory.")

    def __post_init__(self):
        _require(1 <= self.shingle_size <= 16, "shingle_size", self.shingle_size, "must be in 1..16")
        _require(self.bands >= 1, "bands", self.bands, "must be >= 1")
        _require(self.rows >= 1, "rows", self.rows, "must be >= 1")
        _require(self.bands * self.rows <= 4096, "bands*rows", self.bands * self.rows,
                 "must be <= 4096 signature bins; lower bands or rows")
        _require(0.0 <= self.threshold <= 1.0, "threshold", self.threshold, "must be in [0, 1]")
        _require(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2**63)")
        _require(self.buckets >= 0, "buckets", self.buckets, "must be >= 0 (0 = one per input shard)")
        _require(self.batch_docs >= 1, "batch_docs", self.batch_docs, "must be >= 1")

    @property
    def num_perm(self) -> int:
        """Signature length K = bands * rows."""
        return self.bands * self.rows
