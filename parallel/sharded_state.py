"""Sharded checkpoint state: each rank writes and reads only what it holds, as DCP chunks of the
global per-parameter tensors, and hashes exactly the bytes it writes or reads.

ZeRO-1 (Rajbhandari et al.; DeepSeek-V3 section 3.1) gives each rank a contiguous slice of a flat
bucket, which cuts parameters at arbitrary elements. A contiguous range of a row-major tensor is a
union of at most 2 x ndim - 1 boxes (a partial row, whole rows, a partial row, recursively), each
itself contiguous in memory: `FlatChunks` hands these boxes to torch.distributed.checkpoint (DCP)
as chunks (offsets, sizes) of the global tensor. DCP records every chunk in its metadata, so a
loader of any layout reads, for its own ranges, whichever saved chunks overlap them; nothing is
gathered at save or load, and what a rank allocates is one chunk at a time (DCP copies a view
whose storage is larger than itself before writing it, and reads a saved chunk whole before
copying the wanted part into place). Tensors that several ranks hold whole (replicated dense
weights, `optim.step`) share one index and DCP's planner keeps one writer for them.

Integrity: `HashingWriter` hashes each item's bytes as they stream to the file (sha256, per
(file, offset)); the ranks' tables go into the checkpoint's manifest. `VerifyingReader` checks
each item it reads against that table before deserialising it: a rank verifies what it reads and
nothing else (no whole-file rereads by one rank, no rank hashing the whole checkpoint).

Legend: n elements of a tensor, shape (d0, ..., dk).
"""
from __future__ import annotations

import hashlib
import io
import math
import queue
import threading

import torch
from torch import Tensor
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _item_size, _StorageWriterTransforms
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


def range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple, tuple, int]]:
    """The flat range [start, stop) of a row-major tensor of `shape` as boxes (offsets, sizes,
    flat start), in order; each box is a contiguous run of elements."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,), start)]
    inner = math.prod(shape[1:])
    out, row = [], start // inner
    if start % inner:  # a partial first row
        end = min(stop, (row + 1) * inner)
        out += [((row, *o), (1, *s), f + row * inner) for o, s, f in range_boxes(shape[1:], start - row * inner,
                                                                                  end - row * inner)]
        start, row = end, row + 1
    full = stop // inner
    if start < stop and full > row:  # whole rows
        out.append(((row,) + (0,) * (len(shape) - 1), (full - row, *shape[1:]), row * inner))
        start = full * inner
    if start < stop:  # a partial last row
        out += [((full, *o), (1, *s), f + full * inner) for o, s, f in range_boxes(shape[1:], 0, stop - start)]
    return out


class FlatChunks:
    """This rank's elements [start, start + n) of the flattened global tensor of `global_shape`,
    held in the 1-D tensor `local` (a view of the live ZeRO shard: DCP writes from it and reads
    into it). Speaks DCP's checkpointable protocol through `ChunkSavePlanner` / `ChunkLoadPlanner`."""

    def __init__(self, local: Tensor, global_shape: tuple[int, ...], start: int):
        assert local.dim() == 1 and start + local.numel() <= math.prod(global_shape), (local.shape, global_shape, start)
        self.local, self.global_shape, self.start = local, torch.Size(global_shape), start
        self.boxes = range_boxes(tuple(global_shape), start, start + local.numel())

    def size(self) -> torch.Size:
        return self.global_shape

    def piece(self, offsets) -> Tensor:
        """The local view of the box at `offsets`."""
        for o, s, f in self.boxes:
            if tuple(o) == tuple(offsets):
                return self.local[f - self.start:f - self.start + math.prod(s)].view(s)
        raise KeyError(f"no chunk at {tuple(offsets)}")

    def __create_write_items__(self, fqn: str, _obj) -> list[WriteItem]:
        props = TensorProperties.create_from_tensor(self.local)
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(o)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(o), torch.Size(s)),
                                                      properties=props, size=self.global_shape))
                for o, s, _ in self.boxes]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s, _ in self.boxes]


class ChunkSavePlanner(DefaultSavePlanner):
    """DCP's planner, resolving a `FlatChunks` item to its local view."""

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict.get(index.fqn)
        return obj.piece(index.offset) if isinstance(obj, FlatChunks) else super().lookup_object(index)


class ChunkLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, reading into the local views of `FlatChunks` targets."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        chunks = {k: v for k, v in state_dict.items() if isinstance(v, FlatChunks)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(chunks)  # DCP's set-up replaces objects that are not tensors by None
        self.state_dict.update(chunks)

    def lookup_tensor(self, index: MetadataIndex) -> Tensor:
        obj = self.state_dict.get(index.fqn)
        return obj.piece(index.offset) if isinstance(obj, FlatChunks) else super().lookup_tensor(index)


class _HashingStream(io.IOBase):
    """Passes writes through to `raw` (never closing it) and hashes them."""

    def __init__(self, raw, on_close):
        self.raw, self.on_close, self.sha, self.n = raw, on_close, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(memoryview(b).cast("B"))
        return self.raw.write(b)

    def close(self) -> None:
        if not self.closed:
            self.raw.flush()
            self.on_close(self.sha.hexdigest(), self.n)
        super().close()


class _HashingTransforms(_StorageWriterTransforms):
    """No stream transforms (plain DCP files); each item's bytes hashed as DCP writes them."""

    def __init__(self, hashes: dict):
        super().__init__(())
        self.hashes, self.lock = hashes, threading.Lock()

    def transform_save_stream(self, write_item: WriteItem, raw_stream):
        def record(digest: str, n: int):
            with self.lock:
                self.hashes[write_item.index] = (digest, n)
        return _HashingStream(raw_stream, record), []


class HashingWriter(FileSystemWriter):
    """DCP's file writer, with files of at most about `file_bytes` each (DCP keeps every tensor of
    a file alive until the file is closed, copies of views included: smaller files bound what a
    rank holds while writing); `chunk_hashes()` after the save: {file: [[offset, length, sha256]]}
    of what this rank wrote."""

    def __init__(self, path: str, file_bytes: int = 2 ** 26, **kwargs):
        super().__init__(path, **kwargs)
        self.file_bytes = file_bytes
        self._hashes: dict = {}
        self._results: list = []
        self.transforms = _HashingTransforms(self._hashes)

    def write_data(self, plan, planner):
        files: list[list] = [[]]
        size = 0
        for item in plan.items:
            n = _item_size(item)
            if files[-1] and size + n > self.file_bytes:
                files.append([])
                size = 0
            files[-1].append(item)
            size += n
        queue_ = queue.Queue()
        for i, items in enumerate(f for f in files if f):
            name = f"{plan.storage_data.prefix}{i}{DEFAULT_SUFFIX}"
            queue_.put((self.fs.concat_path(self.path, name), name, items))
        fut = self._write_data(planner, queue_)
        self._results = fut.value()
        return fut

    def chunk_hashes(self) -> dict[str, list[list]]:
        out: dict[str, list[list]] = {}
        for r in self._results:
            digest, n = self._hashes[r.index]
            info = r.storage_data
            assert n == info.length, (r.index, n, info.length)
            out.setdefault(info.relative_path, []).append([info.offset, info.length, digest])
        return out


class ChunkChecksumError(ValueError):
    """An item of a DCP file whose bytes differ from the manifest's hash."""


class VerifyingReader(FileSystemReader):
    """DCP's file reader that checks every item it reads against `chunks` ({file: [[offset,
    length, sha256]]}, from the manifest) before DCP deserialises it. Files the table does not
    name are read unchecked (their whole-file hash was verified beforehand)."""

    def __init__(self, path: str, chunks: dict[str, list[list]] | None):
        super().__init__(path)
        self.expected = {(f, off): (n, digest) for f, rows in (chunks or {}).items() for off, n, digest in rows}

    def _slice_file(self, file, sinfo):
        want = self.expected.get((sinfo.relative_path, sinfo.offset))
        if want is None:
            return super()._slice_file(file, sinfo)
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        if len(data) != want[0] or hashlib.sha256(data).hexdigest() != want[1]:
            raise ChunkChecksumError(f"{sinfo.relative_path}: bytes {sinfo.offset}..{sinfo.offset + sinfo.length} "
                                     "differ from the checksum in manifest.json")
        return io.BytesIO(data)
