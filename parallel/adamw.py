"""AdamW with fp32 master weights and optional bf16 moments (DeepSeek-V3 section 3.3.3).

`adamw_update_` is the decoupled-weight-decay Adam update (Loshchilov & Hutter) written as one
functional step on one tensor: the reference. `adamw_step_` applies the same update to lists of
tensors with PyTorch's multi-tensor kernels, which is what the single-process optimizer here and
the ZeRO-1 sharded optimizer in `parallel/data_parallel.py` (on its flat shards) run: the fused
AdamW kernel (`torch._fused_adamw_`, one launch for all tensors on CUDA, vectorised on CPU) when
the moments share the parameters' dtype, else `torch._foreach_*` ops computing in fp32 (bf16
moments). The fused kernel orders its fp32 arithmetic differently: results agree with the
reference to fp32 rounding, not bit for bit. Moments may be kept in bf16; the update itself is
always computed in fp32.
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


def _fused_ok(params: list[torch.Tensor], grads, exp_avgs) -> bool:
    fused = getattr(torch, "_fused_adamw_", None)
    same = all(p.dtype == g.dtype == m.dtype == torch.float32 for p, g, m in zip(params, grads, exp_avgs))
    return fused is not None and same and params[0].device.type in ("cuda", "cpu")


def _foreach_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """`adamw_update_` over lists with foreach ops (moments of any dtype, arithmetic in fp32)."""
    g = [x.float() for x in grads]
    m = [x.float() for x in exp_avgs]
    v = [x.float() for x in exp_avg_sqs]
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    torch._foreach_copy_(exp_avgs, m)
    torch._foreach_copy_(exp_avg_sqs, v)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, math.sqrt(1 - beta2 ** step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - beta1 ** step))


def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], weight_decays: list[float], step: int, lr: float,
                beta1: float, beta2: float, eps: float) -> None:
    """One AdamW step in place on every tensor (weight decay per tensor); `step` counts from 1."""
    groups: dict[float, list[int]] = {}
    for i, wd in enumerate(weight_decays):
        groups.setdefault(wd, []).append(i)
    for wd, idx in groups.items():
        p, g = [params[i] for i in idx], [grads[i] for i in idx]
        m, v = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        if _fused_ok(p, g, m):
            # the step as a device tensor: the kernel reads it there (no host value per tensor)
            steps = [torch.full((), float(step), dtype=torch.float32, device=p[0].device)] * len(p)
            torch._fused_adamw_(p, g, m, v, [], steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd,
                                eps=eps, amsgrad=False, maximize=False)
        else:
            _foreach_adamw_(p, g, m, v, step, lr, beta1, beta2, eps, wd)


class AdamW(torch.optim.Optimizer):
    """AdamW; `moment_dtype` = torch.bfloat16 stores moments in bf16. With `master_weights` every
    parameter gets an fp32 master copy (state "master", taken now: build it before casting the
    parameters to bf16) that the update runs on and the parameter is copied from."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.float32, master_weights: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype, self.master_weights = moment_dtype, master_weights
        if master_weights:
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["master"] = p.detach().float().clone()

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_step: dict[int, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1      # a host tensor: reading it syncs nothing
                by_step.setdefault(int(state["step"].item()), []).append(p)
            for step, ps in by_step.items():
                states = [self.state[p] for p in ps]
                targets = [s.get("master", p) for s, p in zip(states, ps)]
                grads = [p.grad.float() if "master" in s else p.grad for s, p in zip(states, ps)]
                adamw_step_(targets, grads, [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [group["weight_decay"]] * len(ps), step,
                            group["lr"], beta1, beta2, group["eps"])
                for p, t in zip(ps, targets):
                    if t is not p:
                        p.copy_(t)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and 1-D tensors get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg, master_weights: bool = False) -> AdamW:
    """AdamW from an `optim:` config section (lr, betas, eps, weight decay, bf16 moments);
    `master_weights`: fp32 masters of parameters about to be cast to bf16."""
    moment_dtype = torch.bfloat16 if cfg.bf16_moments else torch.float32
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                 eps=cfg.eps, moment_dtype=moment_dtype, master_weights=master_weights)
