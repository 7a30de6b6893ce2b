"""A model stage run piece by piece: attention, dispatch, MLP, combine (DeepSeek-V3 section 3.2.1).

DeepSeek-V3 (Figure 4) splits each chunk into attention, all-to-all dispatch, MLP and all-to-all
combine, the backward into the same pieces in reverse, so that the communication of one
micro-batch hides behind the computation of another. `stage_steps` drives the steps the model
hands out (`Block.attention`, `MoE.route` / `shared_mlp` / `expert_mlp` / `output` /
`record`, the dispatcher's `dispatch_steps` / `combine_steps`) as a step generator
(`parallel.steps`): it yields right after an exchange is issued.

- A `Tape` cuts the autograd graph at every piece boundary: tensors that cross it are replaced
  by fresh leaves, and an exchange's received tensors are leaves too. The backward
  (`Tape.backward_steps`) walks the boundaries in reverse: for a plain cut it back-propagates
  the leaves' accumulated gradients into the previous piece; for an exchange it first sends the
  leaves' gradients back the way the rows came with an asynchronous all-to-all, yields while
  it travels and continues into the previous piece when it is back. Every leaf is consumed
  only by later pieces, so its gradient is complete when its cut is reached, and the result
  equals one autograd pass.
- The shared experts need no communication, so they run while the dispatch travels
  (Megatron-core's shared-expert overlap): between issuing the block's first dispatch exchange
  and waiting for it. Their output is cut `aside`: the cut joins that exchange, and in the
  backward the shared experts' gradient runs while the dispatch's gradients travel back.
- Activation recomputation (`recompute=True`) runs each *compute* piece (attention + router,
  routed experts, shared expert, dense blocks) under non-reentrant `torch.utils.checkpoint`, so
  a recomputation never re-issues an all-to-all and never re-runs the expert-load /
  balance-loss bookkeeping, which stays outside the checkpointed pieces. (Checkpointing a whole
  MoE block would replay its exchanges inside the backward.)

Legend: B batch, L sequence, D hidden, T = B*L tokens, K experts per token, S (token, slot) rows
at the expert rank.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from parallel.expert import AllToAllDispatcher
from parallel.expert_comm import PendingExchange
from parallel.steps import call_steps, work_in_flight

from .runtime import ChunkOutput


@dataclass
class _Cut:
    targets: list          # in-graph tensors produced by the piece before the cut
    leaves: list           # what the pieces after the cut use instead
    pending: object = None  # the PendingExchange when the cut is an all-to-all
    during: list = dataclasses.field(default_factory=list)  # cuts back-propagated while its gradients travel


class Tape:
    """The graph boundaries of one micro-batch's forward through one chunk, in order."""

    def __init__(self):
        self.cuts: list[_Cut] = []
        self._aside: list[_Cut] = []  # cuts waiting for the next exchange to join

    def cut(self, *tensors: Tensor | None) -> list:
        """Replace in-graph tensors (None passes through) by leaves for the pieces that follow."""
        leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors]
        self.cuts.append(_Cut(list(tensors), leaves))
        return leaves

    def aside(self, *tensors: Tensor | None) -> list:
        """A cut of compute done while an exchange is in flight: it joins the next exchange this
        tape finishes, and its backward runs while that exchange's gradients travel back."""
        leaves = self.cut(*tensors)
        self._aside.append(self.cuts.pop())
        return leaves

    def settle(self) -> None:
        """Cuts set aside that no exchange joined (nothing travelled) become plain cuts."""
        self.cuts += self._aside
        self._aside = []

    def exchange(self, pending: PendingExchange) -> list[Tensor]:
        """Finish an exchange as a cut: wait, then hand out the received rows as leaves."""
        assert not pending.done, "an exchange is finished once"
        pending.wait()
        pending.done = True
        leaves = [r.requires_grad_(t.requires_grad) if r.is_floating_point() else r
                  for t, r in zip(pending.inputs, pending.recv)]
        self.cuts.append(_Cut(list(pending.inputs), leaves, pending, self._aside))
        self._aside = []
        return leaves

    def backward_steps(self, targets: list, grads: list):
        """Step generator: back-propagate (targets, grads), then every cut in reverse; yields while
        an exchange of gradients is in flight."""
        assert not self._aside, "a cut set aside was never settled"
        torch.autograd.backward(targets, grads)
        while self.cuts:
            cut = self.cuts.pop()
            if cut.pending is None:
                _backward_cut(cut)
                continue
            pairs = _pairs(cut)
            # every peer expects the exchange: send zeros for a leaf nothing used
            sent = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for _, leaf in pairs]
            back = PendingExchange(sent, cut.pending.recv_counts, cut.pending.send_counts, cut.pending.group)
            for side in cut.during:  # e.g. the shared experts' backward, hidden behind this exchange
                _backward_cut(side)
            yield back
            back.wait()
            outs = [(t, g) for (t, _), g in zip(pairs, back.recv)]
            if outs:
                torch.autograd.backward([t for t, _ in outs], [g for _, g in outs])


def _pairs(cut: _Cut) -> list:
    return [(t, leaf) for t, leaf in zip(cut.targets, cut.leaves) if t is not None and t.requires_grad]


def _backward_cut(cut: _Cut) -> None:
    """Back-propagate a plain cut's leaf gradients into the piece before it."""
    outs = [(t, leaf.grad) for t, leaf in _pairs(cut) if leaf.grad is not None]
    if outs:
        torch.autograd.backward([t for t, _ in outs], [g for _, g in outs])


def _checkpointed(fn, *args):
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _plain(fn, *args):
    return fn(*args)


def _attend_and_route(block, h_BLD: Tensor, ctx):
    """The piece before the dispatch: the block's attention step and its router."""
    h_BLD, x_BLD = block.attention(h_BLD, ctx)
    return h_BLD, block.ffn.route(x_BLD)


def _dispatch_steps(moe, r, tape: Tape, shared):
    """Step generator of the dispatch, with `shared()` run while its first exchange is in
    flight; returns the dispatch's result and the shared experts' output."""
    if isinstance(moe.dispatcher, AllToAllDispatcher):
        steps = moe.dispatcher.dispatch_steps(r.x_TD, r.ids_TK, r.weights_TK, finish=tape.exchange)
    else:  # local: nothing travels
        steps = call_steps(moe.dispatcher.dispatch, r.x_TD, r.ids_TK, r.weights_TK)
    dispatched, shared_TD = yield from work_in_flight(steps, shared)
    tape.settle()
    return dispatched, shared_TD


def _combine_steps(dispatcher, y_SD: Tensor, state, tape: Tape):
    if isinstance(dispatcher, AllToAllDispatcher):
        return dispatcher.combine_steps(y_SD, state, finish=tape.exchange)
    return call_steps(dispatcher.combine, y_SD, state)


def _moe_block_steps(block, h_BLD: Tensor, ctx, tape: Tape, compute, shared_in_flight: bool = True):
    """Step generator: one MoE block as attention / dispatch (+ shared experts) / MLP / combine pieces."""
    moe = block.ffn
    h_BLD, r = compute(_attend_and_route, block, h_BLD, ctx)
    h_BLD, x_TD, w_TK, scores_TE = tape.cut(h_BLD, r.x_TD, r.weights_TK, r.scores_TE)
    r = dataclasses.replace(r, x_TD=x_TD, weights_TK=w_TK, scores_TE=scores_TE)
    moe.record(ctx, r)

    def shared():  # needs no communication: runs while the dispatch travels
        return tape.aside(compute(moe.shared_mlp, r.x_TD) if moe.shared is not None else None)[0]
    if shared_in_flight:
        (x_SD, counts, state), shared_TD = yield from _dispatch_steps(moe, r, tape, shared)
        y_SD = compute(moe.expert_mlp, x_SD, counts)
    else:  # the serial order: routed experts, then shared experts
        (x_SD, counts, state), _ = yield from _dispatch_steps(moe, r, tape, lambda: None)
        y_SD = compute(moe.expert_mlp, x_SD, counts)
        (shared_TD,) = tape.cut(compute(moe.shared_mlp, r.x_TD) if moe.shared is not None else None)
    y_TD = yield from _combine_steps(moe.dispatcher, y_SD, state, tape)
    return h_BLD + moe.output(y_TD, shared_TD, r)


def stage_steps(stage, batch, x: Tensor | None, recompute: bool = False, shared_in_flight: bool = True):
    """Step generator of a stage's forward on one micro-batch (x: its input, None on the first
    stage), MoE blocks in pieces; returns the ChunkOutput, whose `tape` runs the backward.
    `shared_in_flight=False` runs the shared experts after the routed ones (for comparisons)."""
    tape, compute = Tape(), (_checkpointed if recompute else _plain)
    ctx = stage.make_context(batch)
    h = stage.embed_tokens(batch) if x is None else x
    for block in stage.blocks():
        if block.is_moe:
            h = yield from _moe_block_steps(block, h, ctx, tape, compute, shared_in_flight)
        else:
            h = compute(block, h, ctx)
    out = stage.head_loss(h, batch, ctx) if stage.has_head else h
    return chunk_output(stage, out, ctx, tape)


def chunk_output(stage, out, ctx, tape: Tape | None = None) -> ChunkOutput:
    """The runtime's view of a stage's result: the loss on the head stage; otherwise the
    activation, the stage's balance losses as `aux` and its expert loads as `info`."""
    if stage.has_head:
        return ChunkOutput(loss=out.loss, info=out, tape=tape)
    return ChunkOutput(out=out, aux=ctx.balance_loss(), info=ctx.expert_counts.detach(), tape=tape)
