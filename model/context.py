"""Per-forward context shared by all blocks of one micro-batch.

A packed row holds several documents (see `model.batch`). Every block needs the same
per-token facts: positions that restart at each document (for RoPE), the attention mask
"causal and same document" (DeepSeek-V3 trains on packed sequences without cross-document
attention), and which tokens are padding. The mask takes one of two forms, built once per
micro-batch and shared by all layers:
- "flex" (CUDA): a flex_attention BlockMask from the segment ids; fully masked tiles are
  skipped and no L x L tensor exists (the mask is built by a compiled kernel, tile by tile);
- "dense" (CPU): a [B,1,L,L] additive fp32 mask (0 where the boolean rule allows, -inf
  elsewhere) for scaled_dot_product_attention's flash kernel, the fastest exact path on CPU
  (flex_attention has no CPU backward). Built additive once: SDPA would otherwise convert a
  boolean mask in every layer and keep each layer's copy for backward. MoE layers also report into the context: tokens
routed per expert (for the aux-loss-free bias update, DeepSeek-V3 section 2.1.2) and their
sequence-wise balance losses (eq. 17-20). A pipeline stage builds its own context from the
batch with `model.make_context(batch)` and must add `ctx.balance_loss()` to what it
back-propagates (the head stage's `head_loss` already includes the balance losses of the
layers that ran with the same context).

Legend: B batch, L sequence, r = rope dims / 2, N MoE layers of the full model, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Context:
    positions: Tensor          # [B,L] long, restart at 0 per document
    segment_ids: Tensor        # [B,L] long, -1 on padding
    cos: Tensor                # [B,L,r] fp32 RoPE angles of each token's position
    sin: Tensor                # [B,L,r]
    mask: Tensor | None        # [B,1,L,L] fp32, 0 = query may attend key, -inf = not ("dense" only)
    valid: Tensor              # [B,L] bool, False on padding
    expert_counts: Tensor      # [N,E] fp32, tokens routed per expert (valid tokens only)
    block_mask: object = None  # flex_attention BlockMask ("flex" only)
    balance_losses: list = field(default_factory=list)
    row_share: Tensor | float = 1.0  # this batch's rows / the step's rows (`Batch.step_counts`)

    def balance_loss(self) -> Tensor:
        """Sum of the balance losses recorded by the MoE layers that ran with this context (each a
        mean over rows), times the batch's share of the step's rows."""
        if not self.balance_losses:
            return self.expert_counts.new_zeros(())
        return torch.stack([x.float() for x in self.balance_losses]).sum() * self.row_share


def attention_mask(segment_ids_BL: Tensor) -> Tensor:
    """[B,1,L,L] bool: causal and within one document. Padding (-1) attends only padding,
    so no row is empty (softmax stays finite) and no real token ever sees padding."""
    L = segment_ids_BL.shape[1]
    same = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids_BL.device).tril()
    return (same & causal)[:, None]


def additive_mask(mask_B1LL: Tensor) -> Tensor:
    """The boolean mask as SDPA's additive form: 0 where True, -inf where False (fp32)."""
    return torch.zeros(mask_B1LL.shape, device=mask_B1LL.device).masked_fill_(~mask_B1LL, float("-inf"))


def document_block_mask(segment_ids_BL: Tensor):
    """flex_attention BlockMask of the same rule as `attention_mask`, without an L x L tensor on CUDA."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, L = segment_ids_BL.shape

    def causal_same_document(b, h, q, kv):
        return (segment_ids_BL[b, q] == segment_ids_BL[b, kv]) & (q >= kv)
    return create_block_mask(causal_same_document, B, None, L, L, device=segment_ids_BL.device,
                             _compile=segment_ids_BL.is_cuda)


def attention_path(device: torch.device, requested: str = "auto") -> str:
    """"flex" on CUDA, "dense" elsewhere, unless one is requested."""
    if requested not in ("auto", "flex", "dense"):
        raise ValueError(f"attention path = {requested!r}: must be auto, flex or dense")
    if requested != "auto":
        return requested
    return "flex" if device.type == "cuda" else "dense"


def check_positions(positions_BL: Tensor, table_len: int) -> None:
    """Raise when a position reaches past the RoPE tables, without a host sync on the common path:
    positions restart per document, so rows no longer than the tables cannot reach past them
    (training rows are at most data.seq_len <= model.max_seq_len). Longer rows are read once."""
    if positions_BL.shape[-1] <= table_len or not positions_BL.numel():
        return
    top = int(positions_BL.max())
    if top >= table_len:
        raise ValueError(f"a document position reaches {top} but model.max_seq_len = "
                         f"{table_len}; raise model.max_seq_len or shorten the sequences")


def make_context(batch, cos_table: Tensor, sin_table: Tensor, n_moe_layers: int, num_experts: int,
                 attention: str = "auto") -> Context:
    """Build the context of one batch from the model's RoPE tables [max_len, r]."""
    check_positions(batch.positions, cos_table.shape[0])
    pos = batch.positions.to(cos_table.device)
    seg = batch.segment_ids.to(cos_table.device)
    path = attention_path(seg.device, attention)
    return Context(
        positions=pos, segment_ids=seg, cos=cos_table[pos], sin=sin_table[pos],
        mask=additive_mask(attention_mask(seg)) if path == "dense" else None,
        block_mask=document_block_mask(seg) if path == "flex" else None, valid=seg >= 0,
        expert_counts=torch.zeros(n_moe_layers, num_experts, device=cos_table.device),
        row_share=1.0 if getattr(batch, "step_counts", None) is None else
        (pos.shape[0] / batch.step_counts[0].to(cos_table.device)).float(),
    )
