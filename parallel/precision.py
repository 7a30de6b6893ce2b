"""Parameter precision (`train.param_dtype`, `optim.grad_reduce_dtype`).

With bf16 parameters (as DeepSeek-V3, arXiv 2412.19437, section 3.3: bf16 weights and
gradients for compute, fp32 master weights and moments in the optimizer) only the model's
*parameters* are cast: floating buffers (the router's bias, the rotary tables) stay fp32, and
autograd then hands out bf16 gradients. The optimizer keeps the fp32 master copy: ZeRO-1's
shards (`parallel.data_parallel`), or the local AdamW's per-parameter master (`parallel.adamw`).
Cast after the optimizer is built, so that the master starts from the fp32 initialisation.
"""
from __future__ import annotations

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_params_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter of `model` in place (same Parameter objects: optimizer
    buckets and hooks keep pointing at them); buffers are left as they are."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
