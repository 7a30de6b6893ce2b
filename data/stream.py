"""Per-rank token stream over prepared packed sequences: deterministic, resumable, re-shardable.

The stream is a pure function of a *global sample index* g = 0, 1, 2, ...:
  1. Blending: g picks a dataset from a fixed weighted schedule of `_BLOCK` slots (largest
     deficit first), repeated block after block, so the k-th dataset's local index is
     block * (its slots per block) + (its slots before g in the block). With one dataset the
     local index is g.
  2. Epochs: local index i of a dataset with N sequences is epoch i // N, position i % N of
     that epoch's permutation, drawn from `np.random.default_rng([seed, dataset, epoch])`.
Data-parallel rank r of W takes the global samples start + r, start + r + W, ... so the ranks
together consume a prefix of the global order. The state dict stores `consumed` = how many
global samples all ranks together have taken (every rank takes the same count in
synchronous training); resuming at any world size starts the new round-robin there, so no
sample repeats or is skipped.

`take(n)` returns (tokens int64 [n, seq_len] padded with `pad_id`, doc_lens list of int32
arrays), the packed-sample format of the Batch contract. No torch.distributed in here.
"""
from __future__ import annotations

import json
import os

import numpy as np

from data.indexed import IndexedDataError, IndexedReader

_BLOCK = 4096


def read_meta(output_dir: str) -> dict:
    path = os.path.join(output_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.output_dir = {output_dir!r}: not a prepared dataset (no meta.json); "
                                "prepare it with python -m trainer.prepare CONFIG --force")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        for key in ("vocab_size", "eos_id", "pad_id", "seq_len"):
            int(meta[key])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise IndexedDataError(f"data.output_dir = {output_dir!r}: meta.json is unreadable ({type(e).__name__}: "
                               f"{e}); prepare it again with python -m trainer.prepare CONFIG --force") from None
    return meta


class ShardedSplit:
    """One split of a sharded preparation read as one dataset: the shards' sequences in shard order."""

    def __init__(self, directory: str, entries: list):
        self.readers, starts = [], [0]
        for prefix, count in entries:
            reader = IndexedReader(os.path.join(directory, prefix))
            if len(reader) != int(count):
                raise IndexedDataError(f"{os.path.join(directory, prefix)}: {len(reader)} sequences where meta.json "
                                       f"records {count}; prepare it again with python -m trainer.prepare CONFIG")
            self.readers.append(reader)
            starts.append(starts[-1] + len(reader))
        self.starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.readers[k].get(i - int(self.starts[k]))


def open_split(directory: str, split: str):
    """The `split` ('train' or 'valid') of a prepared directory: its shards as one dataset (or the
    single `<split>.bin/.idx` of a directory written before sharding)."""
    meta = read_meta(directory)
    if "shards" in meta:
        return ShardedSplit(directory, meta["shards"].get(split, []))
    return IndexedReader(os.path.join(directory, split))


def has_split(directory: str, split: str) -> bool:
    """Whether a prepared directory holds sequences of `split` (and their files are there)."""
    meta = read_meta(directory)
    if "shards" not in meta:
        return os.path.isfile(os.path.join(directory, f"{split}.idx"))
    entries = meta["shards"].get(split, [])
    return bool(entries) and all(os.path.isfile(os.path.join(directory, p + ".idx")) for p, _ in entries)


def blend_schedule(weights: list[float], block: int = _BLOCK) -> np.ndarray:
    """Dataset id of each slot of a block: the dataset furthest below its share goes next."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    taken = np.zeros(len(w))
    out = np.empty(block, dtype=np.int64)
    for s in range(block):
        k = int(np.argmax(w * (s + 1) - taken))
        out[s] = k
        taken[k] += 1
    return out


class TokenStream:
    """Packed samples for one data-parallel rank; see the module docstring."""

    def __init__(self, output_dir, seq_len: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 split: str = "train", weights: list[float] | None = None):
        dirs = [output_dir] if isinstance(output_dir, str) else list(output_dir)
        weights = [1.0] * len(dirs) if weights is None else list(weights)
        if len(weights) != len(dirs) or any(w <= 0 for w in weights):
            raise ValueError(f"weights = {weights}: need one positive weight per dataset ({len(dirs)})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank}: must be in [0, world_size = {world_size})")
        metas = [read_meta(d) for d in dirs]
        for d, m in zip(dirs, metas):
            if m["seq_len"] != seq_len:
                raise ValueError(f"seq_len = {seq_len}: {d} was packed for seq_len {m['seq_len']}; "
                                 "prepare it again with data.seq_len matching")
        self.pad_id = int(metas[0]["pad_id"])
        self.eos_id = int(metas[0]["eos_id"])
        self.vocab_size = max(int(m["vocab_size"]) for m in metas)
        self.readers = [open_split(d, split) for d in dirs]
        for d, r in zip(dirs, self.readers):
            if len(r) == 0:
                raise ValueError(f"{d}: split '{split}' has no sequences (raise data.valid_fraction "
                                 "or bundled_mb)")
        self.dirs, self.weights, self.split = dirs, weights, split
        self.seq_len, self.rank, self.world_size, self.seed = seq_len, rank, world_size, seed
        self.schedule = blend_schedule(weights) if len(dirs) > 1 else np.zeros(_BLOCK, dtype=np.int64)
        self.per_block = np.bincount(self.schedule, minlength=len(dirs))
        self.before = np.zeros((_BLOCK, len(dirs)), dtype=np.int64)  # slots of k before slot s
        self.before[np.arange(1, _BLOCK), :] = np.cumsum(
            np.eye(len(dirs), dtype=np.int64)[self.schedule], axis=0)[:-1]
        self.start = 0      # global index where this round-robin began (resume point)
        self.taken = 0      # samples this rank has taken since `start`
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ sample addressing
    def _locate(self, g: int) -> tuple[int, int]:
        block, slot = divmod(g, _BLOCK)
        k = int(self.schedule[slot])
        return k, block * int(self.per_block[k]) + int(self.before[slot, k])

    def _sequence_id(self, k: int, i: int) -> int:
        n = len(self.readers[k])
        epoch, pos = divmod(i, n)
        perm = self._perm_cache.get((k, epoch))
        if perm is None:
            perm = np.random.default_rng([self.seed, k, epoch]).permutation(n)
            self._perm_cache = {(k2, e2): p for (k2, e2), p in self._perm_cache.items() if k2 != k}
            self._perm_cache[(k, epoch)] = perm
        return int(perm[pos])

    def global_index(self, j: int) -> int:
        """Global sample index of this rank's j-th sample since the resume point."""
        return self.start + self.rank + self.world_size * j

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        k, i = self._locate(g)
        return self.readers[k].get(self._sequence_id(k, i))

    # ------------------------------------------------------------------ public API
    def take(self, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        tokens = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        doc_lens = []
        for row in range(n):
            index = self.global_index(self.taken)
            seq, lens = self.sample(index)
            if len(seq) and (seq.max() >= self.vocab_size or seq.min() < 0):
                raise IndexedDataError(f"sample {index}: token id {int(seq.max())} outside the tokenizer's "
                                       f"vocabulary [0, {self.vocab_size}); the data files do not belong to "
                                       "this tokenizer: prepare the data again")
            tokens[row, :len(seq)] = seq
            doc_lens.append(lens)
            self.taken += 1
        return tokens, doc_lens

    @property
    def consumed(self) -> int:
        """Global samples taken by all ranks together (assumes equal counts per rank)."""
        return self.start + self.world_size * self.taken

    def epoch(self) -> float:
        """Epochs of the first dataset consumed so far (for logging)."""
        k_share = self.per_block[0] / _BLOCK
        return self.consumed * k_share / len(self.readers[0])

    def state_dict(self) -> dict:
        return {"version": 1, "consumed": self.consumed, "seed": self.seed, "split": self.split,
                "datasets": [len(r) for r in self.readers], "weights": list(self.weights)}

    def load_state_dict(self, sd: dict) -> None:
        mine = self.state_dict()
        fields = {"seed": "data.seed", "split": "data split", "datasets": "sequences per prepared dataset",
                  "weights": "data.weight/data.blend"}
        for key in ("seed", "split", "datasets", "weights"):
            if sd.get(key) != mine[key]:
                raise ValueError(f"{fields[key]} = {mine[key]!r}: the checkpoint's data stream used "
                                 f"{sd.get(key)!r}, so resuming would not continue the same token order; "
                                 f"resume with {fields[key]} = {sd.get(key)!r} and the same data, or start a "
                                 "fresh run (checkpoint.resume=none or another train.output_dir)")
        self.start, self.taken = int(sd["consumed"]), 0


def stream_from_config(data_cfg, dedup_cfg, rank: int = 0, world_size: int = 1,
                       split: str = "train") -> TokenStream:
    """Prepare the data if needed, then the rank's stream, blending `data.blend` by weight."""
    from data.prepare import ensure_prepared
    out = ensure_prepared(data_cfg, dedup_cfg)
    dirs = [out] + (list(data_cfg.blend) if split == "train" else [])
    weights = [data_cfg.weight] + ([float(w) for w in data_cfg.blend.values()] if split == "train" else [])
    return TokenStream(dirs, data_cfg.seq_len, rank, world_size, data_cfg.seed, split, weights)
