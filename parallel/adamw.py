"""AdamW with fp32 master weights and optional bf16 moments (DeepSeek-V3 section 3.3.3).

`adamw_update_` is the decoupled-weight-decay Adam update (Loshchilov & Hutter) written as one
functional step, so the single-process optimizer here and the ZeRO-1 sharded optimizer in
`parallel/data_parallel.py` share the exact same arithmetic. Moments may be kept in bf16; the
update itself is always computed in fp32.
"""
from __future__ import annotations

import math

import torch


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place; `step` counts from 1. Matches torch.optim.AdamW (foreach=False)."""
    g = grad.float()
    m = exp_avg.float().lerp_(g, 1 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.mul_(1 - lr * weight_decay)
    bias1 = 1 - beta1 ** step
    bias2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (v.sqrt() / bias2_sqrt).add_(eps)
    param.addcdiv_(m, denom, value=-lr / bias1)


class AdamW(torch.optim.Optimizer):
    """AdamW over fp32 parameters; `moment_dtype` = torch.bfloat16 stores moments in bf16."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1
                adamw_update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()),
                              group["lr"], beta1, beta2, group["eps"], group["weight_decay"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and 1-D tensors get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg) -> AdamW:
    """AdamW from an `optim:` config section (lr, betas, eps, weight decay, bf16 moments)."""
    moment_dtype = torch.bfloat16 if cfg.bf16_moments else torch.float32
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                 eps=cfg.eps, moment_dtype=moment_dtype)
