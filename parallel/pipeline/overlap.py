"""Overlapped F&B pairs: one micro-batch's all-to-all travels while the other one computes.

DeepSeek-V3 (section 3.2.1, Figure 4) splits each chunk into attention, all-to-all dispatch,
MLP and all-to-all combine (the backward into the same pieces in reverse) and pairs the forward
of one micro-batch with the backward of another so that the communication of each hides behind
the computation of the other. Here:

- `OverlapModelChunk.steps(micro, x)` is a generator form of a model stage's forward that
  splits every MoE block into those pieces. It yields right after it has issued an exchange
  (the expert-parallel dispatcher's steps, `parallel.expert`), so a driver can run the other
  micro-batch before it resumes and waits.
- A `Tape` cuts the autograd graph at every piece boundary: tensors that cross it are
  replaced by fresh leaves, and the exchange's received tensors are leaves too. The backward
  (`Tape.backward_steps`) then walks the boundaries in reverse: for a plain cut it
  back-propagates the leaves' accumulated gradients into the previous piece, for an exchange
  it first sends the leaves' gradients back the way the rows came with an *asynchronous*
  all-to-all, yields while it travels, and continues into the previous piece when it is back.
  Every leaf is consumed only by later pieces, so its gradient is complete when its cut is
  reached, and the result equals one autograd pass.
- `OverlapPairExecutor` alternates the two generators of an F&B pair (`runtime.backward_steps`
  first, then `runtime.forward_steps`): each runs until it has something in flight, then the
  other runs.
  Both ep peers of a stage run the same schedule and thus issue their collectives in the
  same order, which gloo and NCCL need.
- Activation recomputation composes: with `recompute=True` each *compute* piece (attention +
  router, routed experts, shared expert, dense blocks) runs under non-reentrant
  `torch.utils.checkpoint`, so a recomputation never re-issues an all-to-all and never re-runs
  the expert-load / balance-loss bookkeeping (which stays outside the checkpointed pieces).
  (Checkpointing a whole MoE block would replay its synchronous exchanges inside the
  backward, the reason torchtitan's overlap attempt did not compose with recomputation.)

Legend: B batch, L sequence, D hidden, T = B*L tokens, K experts per token, E experts,
S (token, slot) rows at the expert rank.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .model_stage import ModelChunk
from .runtime import ChunkOutput, PairExecutor, drain


@dataclass
class _Cut:
    targets: list          # in-graph tensors produced by the piece before the cut
    leaves: list           # what the pieces after the cut use instead
    pending: object = None  # the PendingExchange when the cut is an all-to-all


class _Returning:
    """Gradients sent back through an exchange; `wait()` returns them (one per float input)."""

    def __init__(self, grads: list[Tensor], pending):
        self.out, self.works = [], []
        for g in grads:
            back = g.new_empty((sum(pending.send_counts),) + tuple(g.shape[1:]))
            if pending.group is None:
                back.copy_(g)
            else:
                self.works.append(dist.all_to_all_single(
                    back, g.contiguous(), pending.send_counts, pending.recv_counts,
                    group=pending.group, async_op=True))
            self.out.append(back)

    def wait(self) -> list[Tensor]:
        for w in self.works:
            w.wait()
        self.works = []
        return self.out


class Tape:
    """The graph boundaries of one micro-batch's forward through one chunk, in order."""

    def __init__(self):
        self.cuts: list[_Cut] = []

    def cut(self, *tensors: Tensor | None) -> list:
        """Replace in-graph tensors (None passes through) by leaves for the pieces that follow."""
        leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors]
        self.cuts.append(_Cut(list(tensors), leaves))
        return leaves

    def exchange(self, pending) -> list[Tensor]:
        """Stands in for `PendingExchange.finish`: wait, then hand out the received rows as leaves."""
        assert not pending.done, "an exchange is finished once"
        pending.wait()
        pending.done = True
        leaves = [r.requires_grad_(t.requires_grad) if r.is_floating_point() else r
                  for t, r in zip(pending.inputs, pending.recv)]
        self.cuts.append(_Cut(list(pending.inputs), leaves, pending))
        return leaves

    def backward_steps(self, targets: list, grads: list):
        """Generator: back-propagate (targets, grads), then every cut in reverse; yields while an
        exchange of gradients is in flight."""
        torch.autograd.backward(targets, grads)
        while self.cuts:
            cut = self.cuts.pop()
            pairs = [(t, leaf) for t, leaf in zip(cut.targets, cut.leaves) if t is not None and t.requires_grad]
            if cut.pending is None:
                outs = [(t, leaf.grad) for t, leaf in pairs if leaf.grad is not None]
            else:  # every peer expects the exchange: send zeros for a leaf nothing used
                sent = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for _, leaf in pairs]
                handle = _Returning(sent, cut.pending)
                yield handle
                outs = [(t, g) for (t, _), g in zip(pairs, handle.wait())]
            if outs:
                torch.autograd.backward([t for t, _ in outs], [g for _, g in outs])


def _drive(steps, tape: Tape):
    """Run a dispatcher step generator, turning each exchange into a tape cut; yields in flight."""
    try:
        pending = next(steps)
        while True:
            pending.finish = functools.partial(tape.exchange, pending)
            yield pending
            pending = steps.send(None)
    except StopIteration as stop:
        return stop.value


def _attention_part(block, h_BLD: Tensor, ctx):
    """h + MLA(norm(h)), the FFN input and the router's choice: the piece before the dispatch."""
    h_BLD = h_BLD + block.attn(block.attn_norm(h_BLD), ctx)
    x_BLD = block.ffn_norm(h_BLD)
    x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
    ids_TK, weights_TK, scores_TE = block.ffn.router(x_TD)
    return h_BLD, x_TD, weights_TK, scores_TE, ids_TK


class OverlapModelChunk(ModelChunk):
    """A model stage whose MoE blocks run as attention / dispatch / MLP / combine pieces."""

    def __init__(self, model, batches: list, deferral=None, recompute: bool = False):
        super().__init__(model, batches, deferral)
        self.recompute = recompute

    def __call__(self, micro: int, x: Tensor | None) -> ChunkOutput:
        return drain(self.steps(micro, x))

    def _compute(self, fn, *args):
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def steps(self, micro: int, x: Tensor | None):
        """Generator form of the stage's forward; yields while a dispatch/combine is in flight."""
        model, batch, tape = self.model, self.batches[micro], Tape()
        ctx = model.make_context(batch)
        h = model.embed_tokens(batch) if x is None else x
        for i in model.owned:
            block = model.layers[str(i)]
            if block.is_moe:
                h = yield from self._moe_block(block, h, ctx, tape)
            else:
                h = self._compute(block, h, ctx)
        if model.has_head:
            out = model.head_loss(h, batch, ctx)
            return ChunkOutput(loss=out.loss, info=out, tape=tape)
        return ChunkOutput(out=h, aux=ctx.balance_loss(), info=ctx.expert_counts.detach(), tape=tape)

    def _moe_block(self, block, h_BLD: Tensor, ctx, tape: Tape):
        moe, (B, L, D) = block.ffn, h_BLD.shape
        h_BLD, x_TD, w_TK, scores_TE, ids_TK = self._compute(functools.partial(_attention_part, block), h_BLD, ctx)
        h_BLD, x_TD, w_TK, scores_TE = tape.cut(h_BLD, x_TD, w_TK, scores_TE)
        moe._record(ctx, ids_TK, scores_TE, B, L)
        disp = moe.dispatcher
        if hasattr(disp, "_dispatch_steps"):
            x_SD, counts, state = yield from _drive(disp._dispatch_steps(x_TD, ids_TK, w_TK), tape)
        else:  # a local dispatcher: nothing travels
            x_SD, counts, state = disp.dispatch(x_TD, ids_TK, w_TK)
        y_SD = self._compute(moe.experts, x_SD, counts)
        shared = self._compute(moe.shared, x_TD) if moe.shared is not None else None
        (shared,) = tape.cut(shared)
        if hasattr(disp, "_combine_steps"):
            y_TD = yield from _drive(disp._combine_steps(y_SD, state), tape)
        else:
            y_TD = disp.combine(y_SD, state)
        y_TD = y_TD.to(h_BLD.dtype)
        if shared is not None:
            y_TD = y_TD + shared
        return h_BLD + y_TD.view(B, L, D)


class OverlapPairExecutor(PairExecutor):
    """Runs an F&B pair with the two micro-batches interleaved at their exchanges.

    `overlapped` counts the exchanges that were in flight while the other half computed."""

    def __init__(self):
        self.overlapped = 0

    def __call__(self, rt, a) -> None:
        # the backward leads: its first exchange (combine's gradients) then hides behind the
        # forward's attention, and its last compute (attention backward) behind the forward's
        # final combine, so no exchange of the pair waits with nothing to hide behind
        live = [rt.backward_steps(a.micro2, a.chunk2, a.bop), rt.forward_steps(a.micro, a.chunk)]
        while live:
            for gen in list(live):
                try:
                    next(gen)
                    self.overlapped += len(live) == 2
                except StopIteration:
                    live.remove(gen)
