"""`train.recompute` and `train.compile` on a pipeline rank's model (DeepSeek-V3 sections 3.2.1, 3.2.3).

A pipeline rank runs its blocks as pieces (`pieces.stage_steps`: attention + router, dispatch,
routed experts, shared experts, combine) or whole (`ModelChunk` without pieces). Both policies
only ever touch compute, so neither can re-issue or trace an all-to-all:

- recompute "selective" checkpoints leaf compute (every RMSNorm, the MLA up-projections
  `wq_b` / `wkv_b`, the SwiGLU activations: `parallel.recompute`), which never communicates:
  it applies to the rank's model as to a single-process one. Each checkpointed region lies
  inside one piece and runs no step generator, so the piecewise backward (also of an
  overlapped F&B pair) passes through it once and recomputes it once; under ZB1P's split
  backward the recomputed input of a deferrable linear is what its deferred weight gradient
  uses at W. "full" is the chunks' piecewise recomputation (`model_stage.build_union_chunks`).
- compile wraps the compute methods of every block in place with `torch.compile` (as torchtitan
  compiles per block; here per piece): a dense block whole, an MoE block's `attention` step,
  its router, routed experts and shared experts. Dispatch, combine and the expert-load
  bookkeeping stay eager between them, and so do the embedding, the head and the losses; so do
  the linears whose weight gradient is deferred (`split.DeferrableLinear`). Layer
  indices are traced as dynamic ints, so all layers share one graph per piece
  (`parallel.compile`).

`describe_paths` says which path each layer type took; the engine logs it.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel.compile import check_compile_platform
from parallel.recompute import apply_recompute, blocks_of

EAGER = "eager"


def apply_stage_recompute(model: nn.Module, mode: str) -> list[str]:
    """The part of `train.recompute` applied to the rank's model (selective); "full" is done by
    the chunks, piece by piece. Returns the names of the wrapped modules."""
    return apply_recompute(model, "selective") if mode == "selective" else []


def _compile_method(module: nn.Module, name: str, backend: str) -> None:
    """Replace `module.name` on the instance by its compiled form (the class keeps its code)."""
    setattr(module, name, torch.compile(getattr(module, name), backend=backend))


def apply_stage_compile(model: nn.Module, device: torch.device, backend: str = "inductor") -> list[str]:
    """Compile the compute pieces of every block of `model` in place; returns what was compiled."""
    check_compile_platform(device)
    import torch._dynamo  # imported by the check too; named here for the config below

    blocks = blocks_of(model)
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks))
    compiled = []
    for name, block in blocks:
        if not block.is_moe:
            block.compile(backend=backend)
            compiled.append(name)
            continue
        _compile_method(block, "attention", backend)
        moe = block.ffn
        _compile_method(moe, "route", backend)
        moe.experts.compile(backend=backend)
        compiled += [f"{name}.attention", f"{name}.ffn.route", f"{name}.ffn.experts"]
        if moe.shared is not None:
            moe.shared.compile(backend=backend)
            compiled.append(f"{name}.ffn.shared")
    return compiled


def layer_kinds(cfg) -> dict[str, bool]:
    """{layer type of the whole model: whether it is an MoE block}, for every type it has."""
    m, moe = cfg.model, cfg.model.first_k_dense < cfg.model.num_layers
    kinds = {"dense block": False} if m.first_k_dense > 0 else {}
    if moe:
        kinds["MoE block"] = True
    if cfg.mtp.depth > 0:
        kinds["MTP MoE block" if moe else "MTP dense block"] = moe
    return kinds


def describe_paths(cfg, split_w: bool = False) -> dict[str, str]:
    """{layer type: the recompute and compile path it takes on every pipeline rank}; `split_w`:
    the schedule defers weight gradients (its deferrable linears run eagerly between graphs)."""
    recompute, compile = cfg.train.recompute, cfg.train.compile
    eager_linears = "; linears eager between graphs (their dW is deferred to W)" if compile and split_w else ""
    out = {kind: f"recompute: {_recompute_path(kind, is_moe, recompute)}; "
                 f"compile: {_compile_path(is_moe, compile)}{eager_linears}"
           for kind, is_moe in layer_kinds(cfg).items()}
    out["embedding, head, losses"] = "recompute: none; compile: eager"
    return out


def _recompute_path(kind: str, is_moe: bool, mode: str) -> str:
    if mode == "none":
        return "none"
    if mode == "selective":
        return "selective (RMSNorm, wq_b/wkv_b, SwiGLU activation checkpointed)"
    if kind.startswith("MTP"):
        return "none (MTP blocks run inside the head stage's loss piece)"
    if is_moe:
        return "full, per piece (attention + router, routed experts, shared experts; exchanges not rerun)"
    return "full (whole block)"


def _compile_path(is_moe: bool, compile: bool) -> str:
    if not compile:
        return EAGER
    if not is_moe:
        return "compiled (whole block)"
    return ("compiled per piece (attention + router, routed experts, shared experts); "
            "dispatch, combine, load bookkeeping eager")
