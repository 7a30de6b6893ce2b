"""Splitting a backward into its input-gradient (I) and weight-gradient (W) halves.

Zero Bubble PP (Qi et al. 2023, section 2) observes that a linear layer's backward is two
independent products: dX = dY W (needed at once by the previous stage) and dW = dY^T X (needed
only by the optimizer). Deferring dW lets a schedule fill its bubbles with it.

No global store: a `WeightGradDeferral` object belongs to one pipeline chunk. The runtime opens
`deferral.collect()` around an I backward; every `DeferrableLinear` of that chunk then returns
only dX and appends a closure computing its dW to the collected list, which the runtime keeps
per (micro-batch, chunk) and calls at that chunk's W. Outside `collect()` (a full B) the layer
computes both halves as usual. Modules that are not deferrable simply finish in I (empty W).
`SplitWeightProvider` hands such linears to the model through the layer-provider seam, each
layer's to the deferral of the chunk that runs it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor, nn

from model.provider import LayerProvider, check_linear_kind


class WeightGradDeferral:
    """Per-chunk switch: inside `collect()` deferrable layers queue their dW instead of computing it."""

    def __init__(self):
        self.sink: list | None = None

    @contextmanager
    def collect(self):
        assert self.sink is None, "nested collect() on one chunk"
        self.sink = []
        try:
            yield self.sink
        finally:
            self.sink = None


@torch.no_grad()
def _accumulate(p: Tensor, x2: Tensor, g2: Tensor) -> None:
    g = g2.t() @ x2
    if p.grad is None:
        p.grad = g.to(p.dtype)
    else:
        p.grad.add_(g)


class _DeferrableLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, deferral):
        ctx.save_for_backward(x, weight)
        # the parameter itself: under activation checkpointing the saved `weight` comes back
        # as a recomputed alias, and a deferred .grad must land on the real parameter
        ctx.deferral, ctx.param = deferral, weight
        return x @ weight.t()

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = g @ weight if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return gx, None, None
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        sink = ctx.deferral.sink if ctx.deferral is not None else None
        if sink is None:
            return gx, g2.t() @ x2, None
        param = ctx.param
        sink.append(lambda: _accumulate(param, x2.detach(), g2.detach()))
        return gx, None, None


class DeferrableLinear(nn.Linear):
    """Bias-free nn.Linear whose weight gradient can be deferred (see module doc)."""

    def __init__(self, in_features: int, out_features: int, deferral: WeightGradDeferral | None):
        super().__init__(in_features, out_features, bias=False)
        self.deferral = deferral

    @torch._disable_dynamo  # torch.compiler.disable, importing dynamo (~1 s) only when first called
    def forward(self, x: Tensor) -> Tensor:
        # eager under torch.compile: a traced backward would fix `deferral.sink` at trace time
        # (dW computed in I, W empty), so each deferrable linear runs between graphs
        return _DeferrableLinearFn.apply(x, self.weight, self.deferral)


class SplitWeightProvider(LayerProvider):
    """Layer provider whose linears (all kinds) defer dW under `deferral.collect()`, each to the
    deferral `deferral_of_layer(layer)` of the chunk that runs its layer (layer None: the head)."""

    def __init__(self, deferral_of_layer: Callable[[int | None], WeightGradDeferral]):
        self.deferral_of_layer = deferral_of_layer

    def linear(self, in_features: int, out_features: int, *, kind: str, layer: int | None) -> nn.Module:
        check_linear_kind(kind)
        return DeferrableLinear(in_features, out_features, self.deferral_of_layer(layer))
