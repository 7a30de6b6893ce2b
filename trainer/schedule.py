"""Learning-rate schedules: `cosine` = linear warmup then cosine decay to min_lr; `wsd` =
DeepSeek-V3's warmup / constant / cosine decay (report section 4.2: 2K warmup steps, constant,
then cosine).
"""
from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig, ScheduleConfig


def lr_at(step: int, optim: OptimConfig, sched: ScheduleConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based). Pure function of its arguments."""
    if sched.warmup_steps and step < sched.warmup_steps:
        return optim.lr * (step + 1) / sched.warmup_steps
    hold = sched.constant_steps if sched.kind == "wsd" else 0
    start = sched.warmup_steps + hold
    if step < start:
        return optim.lr
    decay = sched.decay_steps or max(total_steps - start, 1)
    progress = min((step - start) / decay, 1.0)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
