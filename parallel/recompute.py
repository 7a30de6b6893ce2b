"""Activation recomputation policies, applied to a built model from outside (DeepSeek-V3 section 3.2.3).

- "none":      keep every activation autograd saves.
- "selective": what DeepSeek-V3 recomputes: every RMSNorm, the MLA up-projections (W_UQ and
               W_UKV: `wq_b`, `wkv_b`) and the SwiGLU activation (dense, shared and routed
               experts); their outputs are recomputed in backward instead of being kept.
- "full":      whole blocks: a block keeps only its input and reruns its forward in backward.

Each wrapped module keeps its class, parameters and names (its `forward` is replaced on the
instance), so checkpoints and optimizers see the same model. Recomputation only wraps compute:
a block whose dispatcher communicates (expert parallelism) is recomputed piece by piece
(norms, attention, router, experts, shared experts), never re-issuing an all-to-all; a whole
block rerun records its expert loads and balance loss into a scratch copy of the context, so
they are counted once.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.block import Block
from model.experts import GroupedExperts, LocalDispatcher
from model.layers import RMSNorm, SwiGLU

MODES = ("none", "selective", "full")


def apply_recompute(model: nn.Module, mode: str) -> list[str]:
    """Wrap the model's modules for `mode`; returns the names of what was wrapped."""
    if mode not in MODES:
        raise ValueError(f"train.recompute = {mode!r}: must be one of {', '.join(MODES)}")
    if mode == "none":
        return []
    if mode == "selective":
        return _selective(model)
    return _full(model)


def _checkpoint_forward(module: nn.Module) -> None:
    inner = module.forward

    def forward(*args):
        if not torch.is_grad_enabled():
            return inner(*args)
        return checkpoint(inner, *args, use_reentrant=False)
    module.forward = forward


def _selective(model: nn.Module) -> list[str]:
    wrapped = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, RMSNorm) or leaf in ("wq_b", "wkv_b"):
            _checkpoint_forward(mod)
            wrapped.append(name)
        elif isinstance(mod, (SwiGLU, GroupedExperts)):
            mod.recompute_activation = True
            wrapped.append(name)
    return wrapped


def blocks_of(model: nn.Module) -> list[tuple[str, Block]]:
    """(name, block) of the transformer blocks of the main model and of the MTP modules."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Block)]


def _full(model: nn.Module) -> list[str]:
    wrapped = []
    for name, block in blocks_of(model):
        dispatcher = getattr(block.ffn, "dispatcher", None)
        if dispatcher is None or isinstance(dispatcher, LocalDispatcher):
            _checkpoint_block(block)
            wrapped.append(name)
            continue
        for piece in ("attn_norm", "attn", "ffn_norm", "ffn.router", "ffn.experts", "ffn.shared"):
            mod = block.get_submodule(piece) if _has(block, piece) else None
            if mod is not None:
                _checkpoint_forward(mod)
                wrapped.append(f"{name}.{piece}")
    return wrapped


def _has(module: nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False


def _checkpoint_block(block: nn.Module) -> None:
    inner = block.forward

    def forward(h, ctx):
        if not torch.is_grad_enabled():
            return inner(h, ctx)
        runs = []

        def run(h):
            # the rerun in backward writes loads and balance losses into a scratch context
            c = ctx if not runs else dataclasses.replace(
                ctx, expert_counts=ctx.expert_counts.clone(), balance_losses=[])
            runs.append(1)
            return inner(h, c)
        return checkpoint(run, h, use_reentrant=False)
    block.forward = functools.wraps(inner)(forward)
