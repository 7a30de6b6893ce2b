"""Autograd-aware, asynchronous uneven all-to-all: the one communication primitive of EP.

Expert parallelism (DeepSeek-V3 section 3.2.2) moves token rows between ranks with
`all_to_all_single` and uneven splits. `exchange_counts` exchanges the per-destination row counts
on the rows' device (NCCL takes device tensors only) and reads them on the host once (they size
the receive buffers: the one host sync of a hop); a `PendingExchange` then issues the row exchange
with `async_op=True` (`start_exchange` does both); `finish()` waits and attaches the result to
autograd through `_ExchangeFn`, whose backward is the same exchange with the splits swapped.
Several tensors with the same rows (activations, gate weights, expert ids) travel in one
exchange so that the backward issues its collectives in one fixed order on every rank.

`CommStats` counts rows and bytes that leave a rank, split into crossing a node boundary and
staying inside the node (sends to oneself are a local copy and are not counted).

Legend: R rows to send, D hidden, K experts per token, P members of the group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    """Rows and bytes sent to other ranks, dispatch and combine together, since the last reset."""

    cross_node_rows: int = 0
    intra_node_rows: int = 0
    cross_node_bytes: int = 0
    intra_node_bytes: int = 0

    def add(self, counts: list[int], row_bytes: int, cross: list[bool], me: int, rows: bool) -> None:
        for member, n in enumerate(counts):
            if member == me or n == 0:
                continue
            if cross[member]:
                self.cross_node_bytes += n * row_bytes
                self.cross_node_rows += n if rows else 0
            else:
                self.intra_node_bytes += n * row_bytes
                self.intra_node_rows += n if rows else 0

    def reset(self) -> None:
        self.cross_node_rows = self.intra_node_rows = self.cross_node_bytes = self.intra_node_bytes = 0


def exchange_counts(send_PC: Tensor, group) -> tuple[list[list[int]], list[list[int]]]:
    """Each member tells every other how many rows (and per-row extras, C columns) it will send it.

    `send_PC` [P, C] int64 lives on the device of the rows: an NCCL group takes device tensors
    only, so counts built on the host would be refused there. One tiny all-to-all, then one host
    read of what was sent and what will arrive: the one sync per hop that sizes the receive
    buffers. Returns (sent, received) as [P][C] lists."""
    if group is None:
        sent = send_PC.tolist()
        return sent, sent
    recv_PC = torch.empty_like(send_PC)
    dist.all_to_all_single(recv_PC, send_PC.contiguous(), group=group)
    both = torch.stack([send_PC, recv_PC]).tolist()
    return both[0], both[1]


def _a2a(send: Tensor, send_counts: list[int], recv_counts: list[int], group, async_op: bool):
    recv = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
    if group is None:
        recv.copy_(send)
        return recv, None
    work = dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group, async_op=async_op)
    return recv, work


class PendingExchange:
    """Rows in flight. `finish()` waits and returns the received tensors, wired into autograd."""

    def __init__(self, tensors: list[Tensor], send_counts: list[int], recv_counts: list[int], group):
        self.send_counts, self.recv_counts, self.group = send_counts, recv_counts, group
        self.inputs = tensors
        self.recv, self.works = [], []
        for t in tensors:
            recv, work = _a2a(t.detach(), send_counts, recv_counts, group, async_op=True)
            self.recv.append(recv)
            self.works.append(work)
        self.done = False

    def wait(self) -> None:
        for work in self.works:
            if work is not None:
                work.wait()
        self.works = []

    def finish(self) -> list[Tensor]:
        assert not self.done, "an exchange is finished once"
        self.done = True
        return list(_ExchangeFn.apply(self, *self.inputs))


class _ExchangeFn(torch.autograd.Function):
    """Forward: the (already issued) exchange; backward: gradients go back the way rows came."""

    @staticmethod
    def forward(ctx, pending: PendingExchange, *inputs: Tensor):
        pending.wait()
        ctx.meta = (pending.send_counts, pending.recv_counts, pending.group)
        ctx.shapes = [(t.shape, t.dtype, t.device, t.is_floating_point()) for t in inputs]
        outs = tuple(pending.recv)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads: Tensor):
        send_counts, recv_counts, group = ctx.meta
        out = []
        for g, (shape, dtype, device, floating) in zip(grads, ctx.shapes):
            if not floating:
                out.append(None)
                continue
            if g is None:
                g = torch.zeros((sum(recv_counts),) + tuple(shape[1:]), dtype=dtype, device=device)
            back, work = _a2a(g.contiguous(), recv_counts, send_counts, group, async_op=False)
            out.append(back)
        return (None, *out)


def start_exchange(tensors: list[Tensor], send_counts: list[int], group) -> PendingExchange:
    """Exchange counts (blocking, on the rows' device), then issue the row exchange of every
    tensor (non-blocking)."""
    send_P1 = torch.tensor(send_counts, dtype=torch.int64).to(tensors[0].device)[:, None]
    _, recv = exchange_counts(send_P1, group)
    return PendingExchange(tensors, list(send_counts), [r[0] for r in recv], group)
