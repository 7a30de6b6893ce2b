"""Parameter init (DeepSeek-V3 section 4.2: normal(0, 0.006) for weights; ones for norms).

Every weight matrix is drawn from normal(0, init_std) with a generator seeded by (seed,
parameter name), and each routed expert additionally by its *global* expert index. So a
pipeline stage (fewer layers) or an expert-parallel shard (fewer experts) gets bit-identical
values to the same parameters of the full model, which makes the parallel equivalence tests
simple. RMSNorm weights are ones; the router's balancing bias buffer starts at zero.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

from model.layers import RMSNorm
from model.experts import GroupedExperts


def _generator(seed: int, key: str, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))
    return g


@torch.no_grad()
def init_weights(model: nn.Module, std: float, seed: int) -> None:
    grouped = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        if name in norms:
            p.fill_(1.0)
        elif p.dim() < 2:
            p.zero_()
        else:
            owner = next((m for pre, m in grouped.items() if name.startswith(pre)), None)
            if owner is None:
                p.normal_(0.0, std, generator=_generator(seed, name, p.device))
            else:
                for e in range(p.shape[0]):
                    key = f"{name}[{owner.expert_offset + e}]"
                    p[e].normal_(0.0, std, generator=_generator(seed, key, p.device))
    for name, buf in model.named_buffers():
        if name.endswith("router.bias") and not buf.is_meta:
            buf.zero_()
