"""`train.compile`: torch.compile applied per transformer block, from outside the model.

As torchtitan does, each block is compiled on its own (`nn.Module.compile`, in place: names,
parameters and state dicts are unchanged), so the graphs stay small, the embedding, head and
loss stay eager, and every block shares one compiled graph: integer attributes of modules
(layer indices) are traced as dynamic, not specialised per layer. With the single-rank
dispatcher on CUDA a block compiles to one graph (`fullgraph`); under expert parallelism the
all-to-all split sizes need the host, and on CPU the fp32 grouped GEMM cannot be traced (it runs
eagerly between graphs), so graph breaks are allowed there.
"""
from __future__ import annotations

import logging
import shutil
import sys

import torch
from torch import nn

from model.experts import LocalDispatcher
from parallel.recompute import apply_recompute, blocks_of

log = logging.getLogger(__name__)


def check_compile_platform(device: torch.device) -> None:
    """Raise one line naming train.compile when this platform cannot compile."""
    import torch._dynamo  # here, not at module level: importing it takes about a second

    fix = "set train.compile=false"
    if not torch._dynamo.is_dynamo_supported():
        raise ValueError(f"train.compile=true: torch.compile does not support Python {sys.version.split()[0]} "
                         f"on this platform; {fix}")
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise ValueError(f"train.compile=true on CPU needs a C++ compiler (g++/clang++) on PATH; install one or {fix}")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ValueError(f"train.compile=true on CUDA needs triton importable; install it or {fix}") from None


def apply_compile(model: nn.Module, device: torch.device, backend: str = "inductor") -> list[str]:
    """Compile every block of `model` in place; returns the names of the compiled blocks."""
    check_compile_platform(device)
    import torch._dynamo

    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    blocks = blocks_of(model)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks))
    for _, block in blocks:
        dispatcher = getattr(block.ffn, "dispatcher", None)
        single_rank = dispatcher is None or isinstance(dispatcher, LocalDispatcher)
        block.compile(backend=backend, fullgraph=single_rank and device.type == "cuda")
    return [name for name, _ in blocks]


def apply_block_policies(model: nn.Module, train_cfg, device: torch.device) -> None:
    """`train.recompute` then `train.compile` on a built (and, if sharded, parallelized) model."""
    wrapped = apply_recompute(model, train_cfg.recompute)
    if wrapped:
        log.info("recompute=%s: %d modules wrapped", train_cfg.recompute, len(wrapped))
    if train_cfg.compile:
        log.info("compile: %d blocks compiled", len(apply_compile(model, device)))
