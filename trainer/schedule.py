"""What each optimizer step runs with: its micro-batch count, learning rate and scheduled weights.

Two ways to schedule. In steps: `cosine` = linear warmup then cosine decay to min_lr; `wsd` =
DeepSeek-V3's warmup / constant / cosine decay (report section 4.2: 2K warmup steps, constant,
then cosine). In tokens: `schedule.phases` (trainer.phases) gives optim.lr, train.global_batch,
moe.bias_update_speed, mtp.loss_weight or moe.seq_aux_loss_alpha as pieces over the tokens seen;
a phased lr still warms up linearly over `schedule.warmup_steps` steps, as the report does.

`step_values(cfg, step, tokens, ...)` is the one place that decides a step: a pure function of
the step index and the tokens seen before it (both restored on resume, so a resumed run
replays the same values). Tokens count every position of every sequence (sequences x
data.seq_len, padding included). The global batch is rounded down to what the layout can
run (`micro_batches`): a multiple of dp x micro_batch_size sequences, and at least the
pipeline schedule's smallest micro-batch count (DualPipe / DualPipeV: 2 x pp, DualPipe even).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from parallel.pipeline.schedules import smallest_micro
from trainer.config import Config, OptimConfig, ScheduleConfig
from trainer.phases import constant, constant_until, piece_index, value_at

# Scheduled model quantities: config field -> (short name in logs and metrics)
MODEL_VALUES = {"moe.bias_update_speed": "bias_update_speed", "mtp.loss_weight": "mtp_loss_weight",
                "moe.seq_aux_loss_alpha": "seq_aux_loss_alpha"}
SHORT = {"optim.lr": "lr", "train.global_batch": "batch", "moe.bias_update_speed": "gamma",
         "mtp.loss_weight": "lambda", "moe.seq_aux_loss_alpha": "alpha"}


def lr_at(step: int, optim: OptimConfig, sched: ScheduleConfig, total_steps: int) -> float:
    """Learning rate of the step schedule for optimizer step `step` (0-based). Pure."""
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


@dataclass(frozen=True)
class Layout:
    """What bounds a step's micro-batch count: dp ranks, sequences per micro-batch, the pipeline."""

    dp: int = 1
    micro_batch_size: int = 1
    pp: int = 1
    schedule: str = "1f1b"

    @classmethod
    def of(cls, cfg: Config, dp: int) -> "Layout":
        return cls(dp, cfg.train.micro_batch_size, cfg.parallel.pp, cfg.parallel.schedule)

    @property
    def smallest(self) -> int:
        """Fewest micro-batches per step the pipeline schedule runs."""
        return smallest_micro(self.schedule, self.pp) if self.pp > 1 else 1

    @property
    def step(self) -> int:
        """Micro-batch counts must be a multiple of this (DualPipe runs half from each end)."""
        return 2 if self.pp > 1 and self.schedule == "dualpipe" else 1


def micro_batches(sequences: float, lay: Layout) -> int:
    """Micro-batches per dp rank for a scheduled global batch of `sequences`: rounded down to a
    multiple of dp x micro_batch_size (x 2 for DualPipe), at least the layout's smallest count."""
    n = int(sequences + 1e-9) // (lay.dp * lay.micro_batch_size)
    n -= n % lay.step
    return max(n, lay.smallest)


def batch_phases(cfg: Config):
    """The global batch as a phase list (None: train.grad_accum micro-batches per rank)."""
    pieces = cfg.schedule.pieces("train.global_batch")
    if pieces is None and cfg.train.global_batch:
        pieces = constant(float(cfg.train.global_batch))
    return pieces


@dataclass(frozen=True)
class StepValues:
    """Everything scheduled for one optimizer step."""

    step: int                  # 0-based index of the step
    tokens: int                # tokens seen before it
    grad_accum: int            # micro-batches per dp rank
    global_batch: int          # sequences over all dp ranks
    lr: float
    model: dict = field(default_factory=dict)   # bias_update_speed, mtp_loss_weight, seq_aux_loss_alpha
    phase: str = ""            # which piece of each phased field, e.g. "lr 2/4 batch 2/2"

    def tokens_after(self, seq_len: int) -> int:
        return self.tokens + self.global_batch * seq_len


def grad_accum_at(cfg: Config, tokens: int, lay: Layout) -> int:
    phases = batch_phases(cfg)
    return cfg.train.grad_accum if phases is None else micro_batches(value_at(phases, tokens), lay)


def step_values(cfg: Config, step: int, tokens: int, lay: Layout, total_steps: int) -> StepValues:
    """The values of optimizer step `step` (0-based) after `tokens` tokens. Pure."""
    sched = cfg.schedule
    n = grad_accum_at(cfg, tokens, lay)
    lr_phases = sched.pieces("optim.lr")
    if lr_phases is None:
        lr = lr_at(step, cfg.optim, sched, total_steps)
    else:
        lr = value_at(lr_phases, tokens) * (min(1.0, (step + 1) / sched.warmup_steps) if sched.warmup_steps else 1.0)
    model = {short: _model_value(cfg, name, tokens) for name, short in MODEL_VALUES.items()}
    parts = ["warmup"] if step < sched.warmup_steps else []
    parts += [f"{short} {piece_index(p, tokens) + 1}/{len(p)}" for name, short in SHORT.items()
              if (p := sched.pieces(name)) is not None]
    return StepValues(step, tokens, n, n * lay.dp * lay.micro_batch_size, lr, model, " ".join(parts))


def _model_value(cfg: Config, name: str, tokens: int) -> float:
    pieces = cfg.schedule.pieces(name)
    if pieces is not None:
        return value_at(pieces, tokens)
    section, key = name.split(".")
    return float(getattr(getattr(cfg, section), key))


def segments(cfg: Config, lay: Layout, tokens: int = 0, step: int = 0):
    """(micro-batches per dp rank, steps) of the rest of the run, in order, from `step` after
    `tokens`: until train.steps, or the step that reaches train.tokens if sooner. Stretches where
    the global batch is constant come as one segment (a 14.8T-token run is a few thousand)."""
    limit = cfg.train.steps or math.inf
    if not cfg.train.tokens:
        if limit > step:
            yield cfg.train.grad_accum if batch_phases(cfg) is None else grad_accum_at(cfg, tokens, lay), limit - step
        return
    phases = batch_phases(cfg)
    while step < limit and tokens < cfg.train.tokens:
        n = grad_accum_at(cfg, tokens, lay)
        per_step = n * lay.dp * lay.micro_batch_size * cfg.data.seq_len
        steady = math.inf if phases is None else constant_until(phases, tokens)
        k = max(1, math.ceil((min(steady, cfg.train.tokens) - tokens) / per_step)) if steady > tokens else 1
        k = int(min(k, limit - step))
        yield n, k
        step, tokens = step + k, tokens + k * per_step


def run_steps(cfg: Config, lay: Layout, tokens: int = 0, step: int = 0) -> int:
    """The index after the run's last step: train.steps, or fewer when train.tokens comes first
    (the step that reaches it is the last)."""
    if not cfg.train.tokens:
        return cfg.train.steps
    return step + sum(k for _, k in segments(cfg, lay, tokens, step))


def trajectory(cfg: Config, lay: Layout, steps: int):
    """StepValues of steps 0 .. steps-1 from the start of a run (for plans and plots)."""
    tokens = 0
    for step in range(steps):
        v = step_values(cfg, step, tokens, lay, steps)
        yield v
        tokens = v.tokens_after(cfg.data.seq_len)
