"""Packed training batches: tokens plus per-document metadata (the Batch contract).

A row of length L packs whole documents back to back (each ends with EOS) and pads the rest.
`make_batch` derives, per token: its position inside its document (RoPE positions restart at
every document), its document index in the row (segment id, -1 on padding; attention never
crosses segments) and its next-token label (-100 at each document's last token and on padding,
so no document predicts the next one). `mtp_labels(batch, k)` gives the targets of MTP depth k
(DeepSeek-V3 section 2.2): position i predicts token i+k+1 when it is still in i's document.
`step_counts` carries the step's global numbers of rows and targets (`target_counts` summed over
every micro-batch of every data-parallel rank): the model divides its summed token losses by them,
so a step's loss is the same whatever the layout (`model.loss`).

Legend: B rows, L row length.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

IGNORE = -100


@dataclass
class Batch:
    tokens: Tensor       # [B,L] long
    positions: Tensor    # [B,L] long, restart at 0 per document
    segment_ids: Tensor  # [B,L] long, document index in the row, -1 on padding
    labels: Tensor       # [B,L] long, next token in the same document, -100 elsewhere
    # [2 + D] of the whole step (every micro-batch of every data-parallel rank): rows, lm targets,
    # targets of each MTP depth; set by the engine (`with_step_counts`), None = this batch alone
    step_counts: Tensor | None = None

    def to(self, device) -> "Batch":
        """On `device`; host tensors bound for a GPU go through pinned memory without blocking
        (the copy is ordered before any kernel that reads it on the current stream)."""
        device = torch.device(device)
        move = (lambda t: _to_cuda(t, device)) if device.type == "cuda" else (lambda t: t.to(device))
        return Batch(**{f.name: None if getattr(self, f.name) is None else move(getattr(self, f.name))
                        for f in fields(self)})


def _to_cuda(t: Tensor, device: torch.device) -> Tensor:
    if t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)



def _row_meta(doc_lens, L: int) -> tuple[np.ndarray, np.ndarray]:
    lens = np.asarray(doc_lens, dtype=np.int64).reshape(-1)
    if (lens <= 0).any() or lens.sum() > L:
        raise ValueError(f"doc_lens {lens.tolist()}: need positive lengths summing to <= row length {L}")
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    seg = np.full(L, -1, dtype=np.int64)
    pos = np.zeros(L, dtype=np.int64)
    n = int(lens.sum())
    seg[:n] = np.repeat(np.arange(len(lens)), lens)
    pos[:n] = np.arange(n) - starts
    return pos, seg


def make_batch(tokens, doc_lens, device=None) -> Batch:
    """Build a Batch from tokens [B,L] and per row a list/array of document lengths.

    doc_lens=None treats every row as one full-length document.
    """
    tokens = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens).long().cpu()
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
    B, L = tokens.shape
    if doc_lens is None:
        doc_lens = [[L]] * B
    if len(doc_lens) != B:
        raise ValueError(f"doc_lens has {len(doc_lens)} rows, tokens has {B}")
    meta = [_row_meta(d, L) for d in doc_lens]
    pos = torch.from_numpy(np.stack([m[0] for m in meta]))
    seg = torch.from_numpy(np.stack([m[1] for m in meta]))
    batch = Batch(tokens=tokens, positions=pos, segment_ids=seg, labels=shifted_targets(tokens, seg, 1))
    return batch.to(device) if device is not None else batch


def shifted_targets(tokens_BL: Tensor, seg_BL: Tensor, shift: int) -> Tensor:
    """targets[i] = tokens[i+shift] if that token is in i's document, else -100."""
    B, L = tokens_BL.shape
    out = torch.full_like(tokens_BL, IGNORE)
    if shift >= L:
        return out
    same = (seg_BL[:, shift:] == seg_BL[:, :-shift]) & (seg_BL[:, :-shift] >= 0)
    out[:, :-shift] = torch.where(same, tokens_BL[:, shift:], torch.full_like(tokens_BL[:, shift:], IGNORE))
    return out


def target_counts(batch: Batch, mtp_depth: int) -> Tensor:
    """[2 + mtp_depth] float64: rows, lm targets, then the targets of each MTP depth of `batch`."""
    rows = torch.full((1,), float(batch.tokens.shape[0]), dtype=torch.float64, device=batch.tokens.device)
    targets = [(mtp_labels(batch, k) != IGNORE).sum(dtype=torch.float64)[None] for k in range(mtp_depth + 1)]
    return torch.cat([rows, *targets])  # on the batch's device: no host sync


def mtp_labels(batch: Batch, depth: int) -> Tensor:
    """Targets of MTP depth k >= 1: token i+k+1, masked past the document end (depth 0 = labels)."""
    return shifted_targets(batch.tokens, batch.segment_ids, depth + 1)
