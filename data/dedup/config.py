"""Deduplication config (exact + MinHash LSH near-duplicates). Pure stdlib."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class DedupConfig:
    """Cross-dump deduplication run by `python -m data.prepare`."""

    exact: bool = field(default=True, metadata={"doc": "Drop documents whose normalised text hashes equal an earlier one (xxh3_128)."})
    near: bool = field(default=True, metadata={"doc": "Drop near-duplicates found by MinHash LSH and verified by estimated Jaccard."})
