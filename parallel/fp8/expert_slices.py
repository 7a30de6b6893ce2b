"""Per-expert views of stacked expert weights whose gradients land in one buffer.

The FP8 expert loop (`provider.FP8GroupedExperts`, used where no grouped FP8 kernel exists) needs
each expert's weight w[e] as its own tensor. Two plain ways cost a lot on the backward:
- `w[e]`: its backward writes a zero tensor the size of the whole [E, ...] weight and adds it to
  the gradient, once per expert (E full-size fills and adds per weight per step);
- `w.unbind(0)`: its backward holds all E per-expert gradients until the last arrives, then
  stacks them (a second full-size copy at the peak).
`expert_slices(w)` returns E views whose backward (`_Slice`) adds each expert's gradient into one
[E, ...] buffer as soon as it is computed; a node ahead of them (`_Gather`) hands that buffer on as
w's gradient once every slice has run, so the parameter's own gradient hooks (ZeRO's reduce-scatter
trigger) fire as usual. Kept out of torch.compile: the loop around it reads counts on the host.

Legend: E experts.
"""
from __future__ import annotations

import torch


class _Buffer:
    """The [E, ...] gradient the slices fill, allocated on first use."""

    def __init__(self, like: torch.Tensor):
        self.like, self.grad = like, None

    def add(self, e: int, g: torch.Tensor) -> None:
        if self.grad is None:
            self.grad = torch.zeros_like(self.like)
        self.grad[e] += g

    def take(self) -> torch.Tensor | None:
        grad, self.grad = self.grad, None
        return grad


class _Gather(torch.autograd.Function):
    """Identity on w; its backward returns the buffer the slices filled (no gradient flows through)."""

    @staticmethod
    def forward(ctx, w, buffer):
        ctx.buffer = buffer
        ctx.set_materialize_grads(False)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, unused):
        return ctx.buffer.take(), None


class _Slice(torch.autograd.Function):
    """w[e] as a view; its backward adds the gradient into the shared buffer."""

    @staticmethod
    def forward(ctx, w, e, buffer):
        ctx.e, ctx.buffer = e, buffer
        return w.select(0, e)

    @staticmethod
    def backward(ctx, g):
        ctx.buffer.add(ctx.e, g)
        return None, None, None


@torch.compiler.disable
def expert_slices(w: torch.Tensor) -> list[torch.Tensor]:
    """The E views w[0], ..., w[E-1]; gradients accumulate into one [E, ...] tensor."""
    if not w.requires_grad or not torch.is_grad_enabled():
        return list(w.unbind(0))
    buffer = _Buffer(w)
    shared = _Gather.apply(w, buffer)
    return [_Slice.apply(shared, e, buffer) for e in range(w.shape[0])]
