"""The saves of one run (`Checkpointer`): synchronous, or staged to host memory and written by a
background thread while training goes on (`checkpoint.async_save`, at every layout).

What a rank stages is what it writes (`stage`): its ZeRO shard and expert rows as chunks of the
global tensors (`parallel.sharded_state.FlatChunks`) and its share of the replicated tensors, one
writer per group of holders chosen by a hash of the name, so that host memory follows the rank's
share of the model and not its size. The files, manifest and rename rules are `parallel.checkpoint`'s.
"""
from __future__ import annotations

import logging
import math
import threading
import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.checkpoint import save, write_checkpoint
from parallel.sharded_state import FlatChunks
from parallel.topology import Topology

log = logging.getLogger("moepipe")


class AsyncWriter:
    """Runs one save function at a time in a background thread; `wait()` before the next save or
    exit re-raises its error on the training thread."""

    def __init__(self, write=None):
        self.write = write or write_checkpoint
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, *args) -> None:
        self.wait()

        def run():
            try:
                self.write(*args)
            except BaseException as e:  # re-raised on the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error



class Checkpointer:
    """The saves of one run. Every rank calls `save`. With `async_save` the rank stages what it
    writes (`stage`: its ZeRO and expert shards and its share of the replicated tensors) into host
    memory, pinned where CUDA is, and a background thread writes it while training goes on; the
    collectives of a multi-rank save run on a gloo group of their own, so they never interleave
    with the training's. A save waits for the previous one; the directory is renamed into place
    only when every rank's part is written, so a crash mid-write leaves the previous checkpoint
    as the latest."""

    def __init__(self, root: str, config_yaml: str, keep_last: int, topology: Topology, async_save: bool):
        self.root, self.config_yaml, self.keep_last, self.topology = root, config_yaml, keep_last, topology
        self.writer, self.group = None, None
        if async_save:
            self.writer = AsyncWriter(write_checkpoint if topology.world_size == 1 else save)
            if topology.world_size > 1:
                self.group = dist.new_group(backend="gloo")  # every rank builds the Checkpointer

    def save(self, step: int, tensors: dict, state: dict) -> None:
        if self.writer is None:
            path = save(self.root, step, tensors, state, self.config_yaml, self.keep_last, self.topology)
            log.info("saved checkpoint %s", path)
            return
        self.writer.wait()  # the previous save's staging buffers are free again
        staged = stage(tensors, self.topology)  # training goes on mutating the live tensors
        if self.topology.world_size == 1:
            self.writer.submit(self.root, step, _cpu_copy(state), self.config_yaml, self.keep_last, staged)
        else:
            self.writer.submit(self.root, step, staged, _cpu_copy(state), self.config_yaml, self.keep_last,
                               self.topology, self.group)

    def wait(self) -> None:
        if self.writer is not None:
            self.writer.wait()


def _host_copy(t: Tensor) -> Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    return out.copy_(t.detach(), non_blocking=t.is_cuda)


def _writes_replica(key: str, topology: Topology, kind: str) -> bool:
    """Whether this rank writes `key`, a tensor every rank of its `kind` group holds alike."""
    if topology.world_size == 1 or topology.size(kind) == 1:
        return True
    return zlib.crc32(key.encode()) % topology.size(kind) == topology.ranks(kind).index(topology.rank)


def stage(tensors: dict, topology: Topology) -> dict:
    """Host copies of what this rank writes: its `FlatChunks` and expert DTensor shards (as
    chunks), and the replicated tensors assigned to it (one rank of each group of holders, by a
    hash of the name), so that a rank stages its share and not the model."""
    from torch.distributed.tensor import DTensor
    out = {}
    for key, v in tensors.items():
        if isinstance(v, FlatChunks):
            out[key] = FlatChunks(_host_copy(v.local), v.global_shape, v.start)
        elif isinstance(v, DTensor):
            if _writes_replica(key, topology, "edp"):  # expert rows, sharded on dim 0 over ep
                start = _row_offset(v) * math.prod(v.shape[1:])
                out[key] = FlatChunks(_host_copy(v.to_local()).reshape(-1), tuple(v.shape), start)
        elif _writes_replica(key, topology, "dp"):
            out[key] = _host_copy(v)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies have landed before the writer reads them
    return out


def _row_offset(v) -> int:
    """First global row of a DTensor sharded on dim 0 (this rank's chunk)."""
    from torch.distributed.checkpoint.planner_helpers import _create_chunk_from_dtensor
    return int(_create_chunk_from_dtensor(v).offsets[0])


def _cpu_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj
