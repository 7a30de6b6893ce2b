"""Execute one rank's lowered action list for real over torch.distributed point-to-point.

The runtime walks the list produced by `schedules.build_schedule` (compute + SEND/RECV):
- F: run the chunk on its input (received, handed over locally, or None on the first stage)
  and keep what the backward needs, per (micro-batch, chunk).
- B / I: back-propagate the received output gradient (or the loss / N on the loss stage, plus
  any auxiliary loss the chunk reports, e.g. MoE balance losses of a middle stage). For I the
  chunk's `WeightGradDeferral` (split.py) collects the weight-gradient closures, which the
  runtime keeps under that (micro-batch, chunk) and runs at its W. No global store.
- FB: an F&B pair, run by a pair executor. `PairExecutor` runs the forward then the backward
  (torch.distributed.pipelining does the same); `overlap.OverlapPairExecutor` interleaves the
  two micro-batches (DeepSeek-V3 section 3.2.1). Both drive the step generators
  (`parallel.steps`) `forward_steps(m, c)` / `backward_steps(m, c, op)`, which yield whenever a
  chunk has an all-to-all in flight (chunks with a `steps` method and a tape, see pieces.py).
- SEND / RECV: a run of consecutive comm actions becomes one `batch_isend_irecv`. The first
  time a message (peer, kind, micro-batch, chunk) goes by, it carries a shape header (int64
  [ndim, dtype, dims...]); both ends then cache its shape and dtype and later steps send the
  bare tensor, one round trip per message instead of two. Shapes come from the tensors; none
  are fixed up front. A sender whose shape changes raises (pass `dynamic_shapes=True` to send
  headers every time). Reuse one runtime across steps so that the caches stay in step on all
  ranks. Per pair of ranks the RECVs come in the sender's SEND order (the lowering guarantees
  it), so this also holds on NCCL, which matches messages in issue order.

With `record_timeline=True` the runtime keeps each action's start and end (`timeline`), the
measured counterpart of the simulator's replay (simulate.py); off, it costs one branch per action.

After the list: wait for the sends, then `reduce_shared_grads` sums the gradients of every
parameter held more than once in the pipeline (DualPipe's two model copies, an embedding
copied onto the head stage for MTP): locally across chunks, then with the other holders.

A chunk is any callable `chunk(micro, x) -> ChunkOutput` with optional attributes `deferral`
(a WeightGradDeferral), `steps(micro, x)` (a generator form of the call) and
`named_parameters()`; `ModuleChunk` wraps a plain nn.Module.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.steps import call_steps, drain

from .actions import COMM_OPS, Action
from .schedules import Schedule

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)
_HEADER = 10


@dataclass
class ChunkOutput:
    out: Tensor | None = None      # activation for the next stage (None on the loss stage)
    loss: Tensor | None = None     # scalar, on the loss stage only
    aux: Tensor | None = None      # scalar back-propagated with the same 1/N scale (balance losses)
    info: object = None            # returned to the caller per micro-batch (e.g. ModelOutput)
    tape: object = None            # a segmented forward (overlap.Tape) whose backward can yield


class ModuleChunk:
    """A plain nn.Module as a chunk: the first stage reads `inputs[m]`, the last applies `loss_fn`."""

    def __init__(self, module: nn.Module, inputs=None, loss_fn: Callable | None = None, deferral=None):
        self.module, self.inputs, self.loss_fn, self.deferral = module, inputs, loss_fn, deferral

    def __call__(self, micro: int, x: Tensor | None) -> ChunkOutput:
        y = self.module(self.inputs[micro] if x is None else x)
        if self.loss_fn is None:
            return ChunkOutput(out=y)
        return ChunkOutput(loss=self.loss_fn(micro, y))

    def named_parameters(self):
        return self.module.named_parameters()


def chunk_steps(chunk, micro: int, x: Tensor | None):
    """The step generator of a chunk's forward: its `steps` if it has them, else its plain call."""
    return chunk.steps(micro, x) if hasattr(chunk, "steps") else call_steps(chunk, micro, x)


@dataclass
class _Saved:
    x: Tensor | None
    result: ChunkOutput


class PairExecutor:
    """Runs an F&B pair serially: the forward, then the backward."""

    def __call__(self, rt: "PipelineRuntime", a: Action) -> None:
        rt.forward(a.micro, a.chunk)
        rt.backward(a.micro2, a.chunk2, a.bop)


@dataclass
class PipelineRuntime:
    schedule: Schedule
    rank: int                       # this rank's index inside the pipeline
    chunks: list                    # local chunk index -> chunk
    group_ranks: list[int] | None = None   # pipeline rank -> global rank (default identity)
    group: object = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    pair: PairExecutor = field(default_factory=PairExecutor)
    dynamic_shapes: bool = False    # True: every message carries its shape header
    record_timeline: bool = False   # True: `timeline` keeps (action, start, end) of every action
    loss_scale: float | None = None  # factor of each loss in backward; None = 1 / micro-batches

    def __post_init__(self):
        if len(self.chunks) != self.schedule.placement.chunks_per_rank:
            raise ValueError(f"{self.schedule.name} needs {self.schedule.placement.chunks_per_rank} "
                             f"chunks per rank, got {len(self.chunks)}")
        self.group_ranks = self.group_ranks or list(range(self.schedule.num_ranks))
        self._sent_meta: dict[tuple, tuple] = {}   # (peer, kind, micro, chunk) -> (shape, dtype)
        self._recv_meta: dict[tuple, tuple] = {}

    # ---- one step ----
    def run(self) -> list:
        """Run this rank's list once; returns (loss, info) per micro-batch whose loss is here.

        `self.infos[(micro, chunk)]` keeps every chunk's info (e.g. expert counts)."""
        self._inputs, self._grads, self._outbox = {}, {}, {}
        self._saved: dict[tuple[int, int], _Saved] = {}
        self._wq: dict[tuple[int, int], list] = {}
        self._sends, self._keep, self.results, self.infos = [], [], {}, {}
        self.timeline: list[tuple[Action, float, float]] = []
        acts, i = self.schedule.lowered[self.rank], 0
        while i < len(acts):
            j = i
            while j < len(acts) and acts[j].op in COMM_OPS:
                j += 1
            if j > i:
                self._timed(self._communicate, acts[i:j])
                i = j
            else:
                self._timed(self.execute, acts[i])
                i += 1
        for work in self._sends:
            work.wait()
        self._keep.clear()
        assert not self._saved and not self._wq, "activations or W closures left over"
        return [self.results[m] for m in sorted(self.results)]

    def _timed(self, fn, acts) -> None:
        """fn(acts); with `record_timeline` each action of `acts` (one, or a batch of comms) gets
        the call's (start, end) in seconds of `time.perf_counter`."""
        if torch.autograd._profiler_enabled():  # a named range per action (parallel.profiling)
            names = str(acts) if isinstance(acts, Action) else " ".join(map(str, acts))
            with torch.autograd.profiler.record_function(f"pipeline {names}"):
                self._run_timed(fn, acts)
        else:
            self._run_timed(fn, acts)

    def _run_timed(self, fn, acts) -> None:
        if not self.record_timeline:
            fn(acts)
            return
        t0 = time.perf_counter()
        fn(acts)
        t1 = time.perf_counter()
        self.timeline += [(a, t0, t1) for a in ([acts] if isinstance(acts, Action) else acts)]

    def execute(self, a: Action) -> None:
        if a.op == "F":
            self.forward(a.micro, a.chunk)
        elif a.op in ("B", "I"):
            self.backward(a.micro, a.chunk, a.op)
        elif a.op == "W":
            for fn in self._wq.pop((a.micro, a.chunk)):
                fn()
        elif a.op == "FB":
            self.pair(self, a)
        elif a.op in COMM_OPS:
            self._communicate([a])
        else:
            raise AssertionError(f"unknown action {a}")

    def forward(self, m: int, c: int) -> None:
        drain(self.forward_steps(m, c))

    def backward(self, m: int, c: int, op: str) -> None:
        drain(self.backward_steps(m, c, op))

    def forward_steps(self, m: int, c: int):
        """Generator: the forward of (m, c); yields while the chunk has communication in flight."""
        place = self.schedule.placement
        first, last = place.is_first(m, self.rank, c), place.is_last(m, self.rank, c)
        x = None if first else self._inputs.pop((m, c)).detach().requires_grad_()
        chunk = self.chunks[c]
        res = yield from chunk_steps(chunk, m, x)
        assert (res.loss is not None) == last, f"chunk {c} micro {m}: loss stage mismatch"
        self.infos[(m, c)] = res.info
        if last:
            self.results[m] = (res.loss.detach(), res.info)
        else:
            nxt = place.next(m, self.rank, c)
            if nxt[0] == self.rank:
                self._inputs[(m, nxt[1])] = res.out.detach()
            else:
                self._outbox[("act", m, c)] = res.out.detach()
        self._saved[(m, c)] = _Saved(x, res)

    def backward_steps(self, m: int, c: int, op: str):
        """Generator: the backward (B or I) of (m, c); yields while an all-to-all is in flight."""
        saved = self._saved.pop((m, c))
        res = saved.result
        scale = 1.0 / self.schedule.num_micro if self.loss_scale is None else self.loss_scale
        if res.loss is not None:
            targets, grads = [res.loss * scale], [None]
        else:
            targets, grads = [res.out], [self._grads.pop((m, c))]
        if res.aux is not None and res.aux.requires_grad:
            targets.append(res.aux * scale)
            grads.append(None)
        deferral = getattr(self.chunks[c], "deferral", None)
        if op == "I" and deferral is not None:
            with deferral.collect() as sink:
                yield from self._autograd(res, targets, grads)
            self._wq[(m, c)] = list(sink)
        else:
            yield from self._autograd(res, targets, grads)
            if op == "I":
                self._wq[(m, c)] = []
        self._hand_back(m, c, saved.x)

    @staticmethod
    def _autograd(res: ChunkOutput, targets: list, grads: list):
        if res.tape is None:
            torch.autograd.backward(targets, grads)
        else:
            yield from res.tape.backward_steps(targets, grads)

    def _hand_back(self, m: int, c: int, x: Tensor | None) -> None:
        prv = self.schedule.placement.prev(m, self.rank, c)
        if prv is None:
            return
        g = x.grad if x.grad is not None else torch.zeros_like(x)
        if prv[0] == self.rank:
            self._grads[(m, prv[1])] = g
        else:
            self._outbox[("grad", m, c)] = g

    # ---- point to point ----
    def _communicate(self, acts: list[Action]) -> None:
        """Post a run of SEND/RECV actions as one batch; messages without cached shapes go first
        through the header protocol, one by one, in list order."""
        ops, recvs = [], []
        for a in acts:
            key = (a.peer, a.kind, a.micro, a.chunk)
            dst = self.group_ranks[a.peer]
            if a.op == "SEND":
                t = self._outbox.pop((a.kind, a.micro, a.chunk)).contiguous()
                self._send_header(t, key, dst, ops)
                ops.append(dist.P2POp(dist.isend, t, dst, self.group))
                self._keep.append(t)  # alive until the sends complete
                continue
            meta = self._recv_meta.get(key) if not self.dynamic_shapes else None
            if meta is None:  # the shape comes first, in its own round trip
                self._flush(ops, recvs)
                ops, recvs = [], []
                meta = self._recv_header(dst)
                self._recv_meta[key] = meta
            buf = torch.empty(meta[0], dtype=meta[1], device=self.device)
            ops.append(dist.P2POp(dist.irecv, buf, dst, self.group))
            recvs.append((a, buf, len(ops) - 1))
        self._flush(ops, recvs)

    def _flush(self, ops: list, recvs: list) -> None:
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        waiting = {i for _, _, i in recvs}
        for i, w in enumerate(works):
            if i in waiting:
                w.wait()
            else:
                self._sends.append(w)
        for a, buf, _ in recvs:
            store = self._inputs if a.kind == "act" else self._grads
            store[(a.micro, a.chunk)] = buf

    def _send_header(self, t: Tensor, key: tuple, dst: int, ops: list) -> None:
        """Append the shape header op unless both ends already know this message's shape."""
        meta = (tuple(t.shape), t.dtype)
        known = self._sent_meta.get(key)
        if known is not None and not self.dynamic_shapes:
            if known != meta:
                raise ValueError(f"pipeline message {key} changed from {known} to {meta}; build the "
                                 f"runtime with dynamic_shapes=True when activation shapes vary")
            return
        self._sent_meta[key] = meta
        header = shape_header(t)
        ops.append(dist.P2POp(dist.isend, header, dst, self.group))
        self._keep.append(header)

    def _recv_header(self, src: int) -> tuple:
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, header, src, self.group)]):
            w.wait()
        return header_meta(header)


def shape_header(t: Tensor) -> Tensor:
    """int64 [ndim, dtype, dims...] of `t`, on its device: what a receiver needs for its buffer."""
    header = [t.dim(), _DTYPES.index(t.dtype), *t.shape]
    return torch.tensor(header + [0] * (_HEADER - len(header)), dtype=torch.int64, device=t.device)


def header_meta(header: Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) written by `shape_header`."""
    h = header.tolist()
    return tuple(h[2:2 + h[0]]), _DTYPES[h[1]]


def send_tensor(t: Tensor, dst: int, group=None) -> None:
    """Blocking send of `t` with its shape header (for `recv_tensor`); `dst` is a global rank."""
    dist.send(shape_header(t), dst, group=group)
    dist.send(t.contiguous(), dst, group=group)


def recv_tensor(src: int, device: torch.device, group=None) -> Tensor:
    """The tensor `send_tensor` sent from global rank `src`."""
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    shape, dtype = header_meta(header)
    t = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(t, src, group=group)
    return t


def reduce_shared_grads(chunks: list, rank: int, num_ranks: int, group_ranks: list[int] | None = None,
                        group=None) -> None:
    """Sum the grads of parameters that appear under the same name in several chunks/ranks.

    Every pipeline rank must call this (it exchanges name lists). Afterwards each holder of a
    shared name has the total gradient, so identical copies stay identical after the step.
    """
    group_ranks = group_ranks or list(range(num_ranks))
    local: dict[str, list[nn.Parameter]] = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if all(q is not p for q in local.get(name, [])):
                local.setdefault(name, []).append(p)
    sums = {}
    for name, ps in local.items():
        grads = [p.grad for p in ps if p.grad is not None]
        sums[name] = torch.stack(grads).sum(0) if grads else torch.zeros_like(ps[0])
    gathered = [None] * num_ranks
    names = sorted(local)
    dist.all_gather_object(gathered, names, group=group)
    everyone = [set(n) for n in gathered]
    ops, incoming = [], []
    for name in names:
        for peer in range(num_ranks):
            if peer != rank and name in everyone[peer]:
                buf = torch.empty_like(sums[name])
                incoming.append((name, buf))
                ops.append(dist.P2POp(dist.isend, sums[name], group_ranks[peer], group))
                ops.append(dist.P2POp(dist.irecv, buf, group_ranks[peer], group))
    if ops:
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    total = {name: s.clone() for name, s in sums.items()}
    for name, buf in incoming:
        total[name] += buf
    for name, ps in local.items():
        if len(ps) > 1 or any(name in everyone[q] for q in range(num_ranks) if q != rank):
            for p in ps:
                p.grad = total[name].clone()
