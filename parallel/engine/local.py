"""One process: plain autograd and the project's AdamW (`parallel.adamw`) on the whole model.

Its checkpoint tensors are those of every other layout (`model.<name>`, `optim.<name>.{master,
exp_avg,exp_avg_sq}`, `optim.step`): an fp32 parameter is its own master copy (bf16 parameters,
`train.param_dtype`: the AdamW keeps an fp32 master per parameter), so a run of one process
resumes from a sharded checkpoint and a sharded run from this one's.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.batch import Batch
from parallel.adamw import AdamW
from parallel.engine.base import ForwardContext, StepMetrics, eval_forward, run_micro_batches, with_step_counts
from parallel.topology import Topology

OPT_KEYS = ("master", "exp_avg", "exp_avg_sq")


class LocalEngine:
    """A world of one: no collective anywhere."""

    def __init__(self, model: nn.Module, optimizer: AdamW, topology: Topology, device: torch.device,
                 make_context: ForwardContext, grad_clip: float):
        self.model, self.optimizer, self.topology, self.device = model, optimizer, topology, device
        self.make_context, self.grad_clip = make_context, grad_clip

    def eval_forward(self, batch: Batch):
        return eval_forward(self.model, batch, self.make_context)

    def forward_backward(self, batches: list[Batch]) -> StepMetrics:
        return run_micro_batches(self.model, with_step_counts(batches, self.model.cfg.mtp.depth), self.make_context)

    def reduce_metrics(self, m: StepMetrics) -> StepMetrics:
        return m

    def reduce_and_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        # summed in float64: fp32 sums of squares over large matrices drift by ~1e-4 relative
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float64)
                                                      for p in params]))
        norm = float(total)
        if self.grad_clip > 0 and math.isfinite(norm):  # clip only after the culprit of a NaN is known
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, total)
        return norm

    def apply(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)

    def discard(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def agree_stop(self, requested: bool) -> bool:
        return requested

    def reset_comm_stats(self) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        step = 0
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            per = self.optimizer.state.get(p, {})
            state[f"optim.{name}.master"] = per["master"] if "master" in per else p.detach()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"optim.{name}.{key}"] = (per[key].float() if key in per
                                                else torch.zeros_like(p, dtype=torch.float32))
            step = max(step, int(per["step"].item()) if "step" in per else 0)
        state["optim.step"] = torch.tensor(step, dtype=torch.int64)
        return state

    def load_targets(self) -> dict[str, Tensor]:
        """What a load reads into: the state's tensors, with every master a tensor of its own (not
        the parameter that is its own master in fp32), so that a checkpoint's fp32 masters arrive
        whole whatever dtype its `model.*` weights have."""
        state = self.state_dict()
        for key, v in state.items():
            if key.endswith(".master"):
                state[key] = v.detach().float().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Model tensors; the optimizer's too unless the checkpoint holds weights only. With
        optimizer state the parameters are the checkpoint's fp32 masters (cast to their dtype):
        a resume across `train.param_dtype` is exact."""
        with torch.no_grad():
            self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        self.optimizer.state.clear()
        step = int(state["optim.step"]) if "optim.step" in state else 0
        dtype = self.optimizer.moment_dtype
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            per = {}
            if step:
                per = {"step": torch.tensor(float(step), dtype=torch.float32),
                       "exp_avg": state[f"optim.{name}.exp_avg"].to(p.device, dtype, copy=True),
                       "exp_avg_sq": state[f"optim.{name}.exp_avg_sq"].to(p.device, dtype, copy=True)}
                with torch.no_grad():
                    p.copy_(state[f"optim.{name}.master"])
            if self.optimizer.master_weights:
                source = state[f"optim.{name}.master"] if step else p
                per["master"] = source.detach().to(p.device, torch.float32, copy=True)
            if per:
                self.optimizer.state[p] = per
