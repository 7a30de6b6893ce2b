"""Token cross-entropy of the language-model head and of the MTP heads (DeepSeek-V3 section 2.2).

The mean over non-ignored targets of -log softmax(logits)[target] (0 when every target is
ignored), in fp32 or wider. One autograd function instead of log_softmax + nll_loss: the forward
keeps only the logits (not the [N, V] log-probabilities), and the backward writes
(softmax(logits) - onehot(target)) * grad / count into one new tensor, rows of ignored targets
zero. log_softmax + nll_loss allocate three [N, V] tensors (the log-probabilities, nll_loss's
zero-filled gradient with the targets scattered into it, log_softmax's gradient); this allocates
one, or none with `overwrite_logits` (the caller's logits are a temporary read by nothing after
the loss, as the model's head output is: the gradient is written into their storage, which saves
an [N, V] tensor and, on CPU, the page faults of touching a new one). Rows are processed in
chunks: on CPU about 1 MB of fp32 each, so that a chunk stays in cache across its passes
(log_softmax / softmax, gather or scatter, scale); on other devices up to 512 MB, which bounds the
fp32 copy of bf16 logits.

A training step's loss is the sum of token losses over its whole batch (all micro-batches of all
data-parallel ranks) divided by the number of its targets, as Megatron's per-token loss and
torchtitan do: each micro-batch passes the step's global count as `denominator`, so its loss is
its share of that one mean and the shares sum to the same loss at every layout and padding.

Legend: N tokens, V vocab.
"""
from __future__ import annotations

import torch
from torch import Tensor

from model.batch import IGNORE


def chunk_rows(logits_NV: Tensor) -> int:
    """Rows per chunk: about 2^18 fp32 values on CPU (cache-sized), 2^27 on other devices."""
    elements = 2 ** 18 if logits_NV.device.type == "cpu" else 2 ** 27
    return max(1, elements // logits_NV.shape[-1])


class TokenCrossEntropy(torch.autograd.Function):
    """logits [N, V], targets [N] (IGNORE to skip) -> summed cross-entropy over kept targets divided
    by their count, or by `denominator` (the step's global target count) when given."""

    @staticmethod
    def forward(ctx, logits_NV: Tensor, targets_N: Tensor, overwrite_logits: bool = False,
                denominator: Tensor | None = None) -> Tensor:
        dtype = torch.promote_types(logits_NV.dtype, torch.float32)
        keep_N = targets_N != IGNORE
        index_N1 = targets_N.clamp(min=0)[:, None]
        rows = chunk_rows(logits_NV)
        target_logp_N = torch.cat([
            torch.log_softmax(logits_NV[i:i + rows], dim=-1, dtype=dtype).gather(1, index_N1[i:i + rows])[:, 0]
            for i in range(0, logits_NV.shape[0], rows)])
        count = (keep_N.sum() if denominator is None else denominator.to(keep_N.device)).clamp(min=1).to(dtype)
        ctx.save_for_backward(logits_NV, targets_N, count)
        ctx.overwrite_logits = overwrite_logits
        return -torch.where(keep_N, target_logp_N, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits_NV, targets_N, count = ctx.saved_tensors
        dtype = torch.promote_types(logits_NV.dtype, torch.float32)
        keep_N1 = (targets_N != IGNORE)[:, None]
        scale_N1 = torch.where(keep_N1, grad_loss.to(dtype) / count, 0.0)
        minus_one_N1 = -keep_N1.to(dtype)
        index_N1 = targets_N.clamp(min=0)[:, None]
        grad_NV = logits_NV if ctx.overwrite_logits else torch.empty_like(logits_NV)
        rows = chunk_rows(logits_NV)
        for i in range(0, logits_NV.shape[0], rows):
            chunk = slice(i, i + rows)
            prob = torch.softmax(logits_NV[chunk], dim=-1, dtype=dtype)   # read before the chunk is written
            prob.scatter_add_(1, index_N1[chunk], minus_one_N1[chunk])
            torch.mul(prob, scale_N1[chunk], out=grad_NV[chunk])
        return grad_NV, None, None, None


def token_cross_entropy(logits_BLV: Tensor, targets_BL: Tensor, overwrite_logits: bool = False,
                        denominator: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over non-ignored targets (0 when there are none), in fp32 or wider;
    with `denominator` the sum is divided by it instead (a share of the step's per-token loss).
    overwrite_logits: the backward writes the logits' gradient into their storage (for logits that
    nothing reads after the loss; never a leaf)."""
    if overwrite_logits and logits_BLV.is_leaf and logits_BLV.requires_grad:
        raise ValueError("overwrite_logits=True on a leaf tensor: its values would become its gradient; "
                         "pass overwrite_logits=False")
    return TokenCrossEntropy.apply(logits_BLV.reshape(-1, logits_BLV.shape[-1]), targets_BL.reshape(-1),
                                   overwrite_logits, denominator)
