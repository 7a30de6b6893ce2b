"""Input shards: the unit of work of the per-document stages (sign, tokenize).

The ordered dumps are cut into shards of about `data.shard_mb` MB, in dump order, and every
document gets a global id `shard << 32 | record`, where `record` counts the shard's input
records (bad ones included). Global ids therefore sort in corpus order (dump, then position),
which is what "the earliest copy wins" compares. The cut depends only on the inputs and
`shard_mb`, never on how many tasks run, so the prepared bytes do not either.

How a dump is cut:
  * an uncompressed .jsonl/.json file: byte ranges; a line belongs to the range holding its
    first byte (so a reader seeks straight to its range: no scan of the file to plan);
  * a folder of .txt files: runs of whole files by size (from `stat`);
  * everything else (bundled dumps, Parquet, .jsonl.gz): one planning pass counts records and
    text bytes, and shards are record ranges.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass
from typing import Iterator

from data.sources import RawDoc, _decode, expand_dumps, is_bundled, jsonl_doc, read_dump

RECORD_BITS = 32


@dataclass(frozen=True)
class Shard:
    """Records [lo, hi) of dump `dump` (`kind` 'bytes': byte offsets, 'files'/'records': indices)."""

    index: int
    dump: int
    spec: str
    kind: str
    lo: int
    hi: int
    mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def global_ids(shard: int, records) -> "object":
    """Global document ids of `records` (numpy array or int) of shard `shard`."""
    return (shard << RECORD_BITS) | records


def plan_shards(dumps: list[str], shard_mb: float, text_field: str, bundled_mb: float) -> list[Shard]:
    """Every input shard, in corpus order."""
    out: list[Shard] = []
    target = max(1, int(shard_mb * 1e6))
    for d, spec in enumerate(expand_dumps(dumps)):
        for kind, lo, hi, size in _cut(spec, target, text_field, bundled_mb):
            out.append(Shard(len(out), d, spec, kind, lo, hi, round(size / 1e6, 6)))
    return out


def _cut(spec: str, target: int, text_field: str, bundled_mb: float):
    if spec.endswith((".jsonl", ".json")) and os.path.isfile(spec):
        size = os.path.getsize(spec)
        for lo in range(0, max(size, 1), target):
            yield "bytes", lo, min(size, lo + target), min(size, lo + target) - lo
        return
    if os.path.isdir(spec) and not is_bundled(spec):
        sizes = [os.path.getsize(p) for p in _txt_files(spec)]
        yield from _runs("files", sizes, target)
        return
    cap = bundled_mb if is_bundled(spec) else 0.0
    sizes = [len((r.text or "").encode("utf-8", "surrogatepass")) + 1 for r in read_dump(spec, text_field, cap)]
    yield from _runs("records", sizes, target)


def _runs(kind: str, sizes: list[int], target: int):
    lo, acc = 0, 0
    for i, s in enumerate(sizes):
        acc += s
        if acc >= target:
            yield kind, lo, i + 1, acc
            lo, acc = i + 1, 0
    if lo < len(sizes) or not sizes:
        yield kind, lo, len(sizes), acc


def _txt_files(folder: str) -> list[str]:
    paths = []
    for root, _, files in os.walk(folder):
        paths.extend(os.path.join(root, f) for f in files if f.endswith(".txt"))
    return sorted(paths)


def read_shard(shard: Shard, text_field: str, bundled_mb: float) -> Iterator[RawDoc]:
    """The shard's records in order (record i of the shard is the i-th yielded)."""
    if shard.kind == "bytes":
        yield from _jsonl_range(shard.spec, shard.lo, shard.hi, text_field)
    elif shard.kind == "files":
        for path in _txt_files(shard.spec)[shard.lo:shard.hi]:
            with open(path, "rb") as f:
                yield _decode(f.read(), f"{shard.spec}:{os.path.relpath(path, shard.spec)}")
    else:
        cap = bundled_mb if is_bundled(shard.spec) else 0.0
        yield from itertools.islice(read_dump(shard.spec, text_field, cap), shard.lo, shard.hi)


def _jsonl_range(path: str, lo: int, hi: int, text_field: str) -> Iterator[RawDoc]:
    """Lines of `path` whose first byte lies in [lo, hi); blank lines are skipped like `read_jsonl`."""
    import json
    with open(path, "rb") as f:
        if lo > 0:
            f.seek(lo - 1)
            f.readline()  # the line holding byte lo-1 belongs to the previous range
        pos = f.tell()
        while pos < hi:
            raw = f.readline()
            if not raw:
                return
            source = f"{path}@{pos}"
            pos += len(raw)
            if raw.strip():
                yield jsonl_doc(raw, source, text_field)
