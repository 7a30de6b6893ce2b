"""The FP8 LayerProvider: which of the model's GEMMs run in FP8, and on which backend.

DeepSeek-V3 (arXiv 2412.19437, section 3.3.1) runs the three GEMMs of every Linear in FP8 but
keeps the embedding, output head, MoE gating, normalisation and attention core in BF16/FP32.
`in_fp8(cfg, num_layers, kind, layer)` is the one place that decides this from
`FP8Config.keep_high_precision` (component names mapped to provider kinds in
`parallel/fp8/config.py`) and `first_layers_bf16` / `last_layers_bf16`; blocks with an index
>= num_layers are MTP blocks and follow the "mtp" entry. Master weights stay in the parameters'
own dtype (FP32); only the GEMM operands are quantized.

The provider subclasses the model's `model.provider.LayerProvider` (the seam:
linear(in, out, kind=, layer=) and grouped_experts(E, D, F, layer=)), so the
model never imports an FP8 library. `autocast_context` is what the training step enters around
forward and backward (te.autocast for TE, nothing for the other backends).

Legend: S rows sorted by expert, D model width, F expert inner width, E experts.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from parallel.fp8 import te as te_backend
from parallel.fp8.config import COMPONENT_KINDS
from parallel.fp8.emulate import EmulatedFP8Linear, emulated_linear, spec_from_config
from parallel.fp8.select import select_backend
from parallel.fp8.torch_grouped import grouped_fp8_swiglu
from parallel.fp8.torch_native import ScaledMMLinear, check_shape, scaled_mm_linear
from model.experts import GroupedExperts
from model.provider import LayerProvider

log = logging.getLogger(__name__)


def in_fp8(cfg, num_layers: int, kind: str, layer: int | None) -> bool:
    """Whether the GEMMs of provider `kind` in block `layer` (None = not in a block) run in FP8."""
    if not cfg.enabled:
        return False
    high_kinds = {k for name in cfg.keep_high_precision for k in COMPONENT_KINDS[name]}
    if kind in high_kinds:
        return False
    if layer is not None:
        if layer >= num_layers:
            return "mtp" not in cfg.keep_high_precision
        if layer < cfg.first_layers_bf16 or layer >= num_layers - cfg.last_layers_bf16:
            return False
    return True


def host_counts(counts) -> list[int]:
    """Per-expert row counts as a host list: one device read for a tensor."""
    return counts.tolist() if isinstance(counts, torch.Tensor) else [int(c) for c in counts]


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts whose GEMMs run in FP8: per expert through `linear(x, w) -> x @ w.T`, or,
    with `grouped` (torch backend, rowwise, CUDA), all experts in one `torch._scaled_grouped_mm`
    per GEMM with device-side offsets (`parallel/fp8/torch_grouped.py`). `path` names which.

    Same parameters, init and contract as the BF16 GroupedExperts (the model's seeded init finds
    it by type), so a BF16 and an FP8 model built from one seed start from identical weights.
    """

    def __init__(self, num_experts: int, hidden: int, ffn: int, *, layer: int, linear, backend: str,
                 grouped: bool = False, pow2: bool = True):
        super().__init__(num_experts, hidden, ffn, layer=layer)
        self.linear, self.backend, self.grouped, self.pow2 = linear, backend, grouped, pow2

    @property
    def path(self) -> str:
        return "scaled_grouped_mm" if self.grouped else "per-expert loop"

    def forward(self, x_SD: torch.Tensor, counts) -> torch.Tensor:
        if self.grouped:
            counts_E = self._counts_tensor(counts, x_SD.device)
            return grouped_fp8_swiglu(x_SD, counts_E, self.w_gate, self.w_up, self.w_down, self.pow2)
        counts = host_counts(counts)         # one host read per layer, not one per expert
        if len(counts) != self.num_experts or sum(counts) != x_SD.shape[0]:
            raise ValueError(f"counts {counts} do not match {self.num_experts} experts and {x_SD.shape[0]} rows")
        outs = []
        # unbind, not w[e]: the backward of w[e] builds a zero tensor the size of the whole [E,F,D]
        # weight for every expert; unbind's backward stacks the E gradients once
        weights = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0))
        for x_e, (w_gate, w_up, w_down) in zip(torch.split(x_SD, counts), weights):
            # empty slices still run, as in GroupedExperts, so every expert gets a (zero) gradient
            h = F.silu(self.linear(x_e, w_gate)) * self.linear(x_e, w_up)
            outs.append(self.linear(h, w_down))
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.backend}, path={self.path}"


class FP8LayerProvider(LayerProvider):
    """LayerProvider that hands out FP8 Linears / experts wherever `in_fp8` says so.

    `decisions` records (kind, layer, "fp8" | "high") for every module handed out, for logs and tests.
    """

    def __init__(self, cfg, num_layers: int, backend: str):
        super().__init__()
        self.cfg, self.num_layers, self.backend = cfg, num_layers, backend
        self.decisions: list[tuple[str, int | None, str]] = []
        if backend == "emulate":
            self._fn = functools.partial(_emulate_fn, spec=spec_from_config(cfg))
        elif backend == "torch":
            self._fn = functools.partial(_torch_fn, mode=cfg.recipe, pow2=cfg.power_of_two_scales)
        else:
            self._fn = None

    def _decide(self, kind: str, layer: int | None) -> bool:
        fp8 = in_fp8(self.cfg, self.num_layers, kind, layer)
        self.decisions.append((kind, layer, "fp8" if fp8 else "high"))
        return fp8

    def linear(self, in_features: int, out_features: int, *, kind: str, layer: int | None) -> nn.Module:
        base = super().linear(in_features, out_features, kind=kind, layer=layer)
        if not self._decide(kind, layer):
            return base
        if self.backend in ("te", "torch"):
            check_shape(in_features, out_features, f"{kind} (layer {layer})", self.backend)
        if self.backend == "te":
            return te_backend.make_linear(base)
        if self.backend == "torch":
            return ScaledMMLinear(base.weight, self.cfg.recipe, self.cfg.power_of_two_scales)
        return EmulatedFP8Linear(base.weight, spec_from_config(self.cfg))

    def grouped_experts(self, num_experts: int, hidden: int, ffn: int, *, layer: int) -> nn.Module:
        if not self._decide("experts", layer):
            return super().grouped_experts(num_experts, hidden, ffn, layer=layer)
        if self.backend in ("te", "torch"):
            check_shape(hidden, ffn, f"experts (layer {layer})", self.backend)
        if self.backend == "te":
            base = super().grouped_experts(num_experts, hidden, ffn, layer=layer)
            return te_backend.TEGroupedExperts(base, self.cfg.recipe)
        grouped = self.backend == "torch" and grouped_kernel_available(self.cfg.recipe)
        experts = FP8GroupedExperts(num_experts, hidden, ffn, layer=layer, linear=self._fn, backend=self.backend,
                                    grouped=grouped, pow2=self.cfg.power_of_two_scales)
        log.info("fp8 experts layer %s: backend %s, %s", layer, self.backend, experts.path)
        return experts


def grouped_kernel_available(recipe: str) -> bool:
    """The fused FP8 grouped GEMM exists for rowwise scaling on sm90 CUDA only."""
    return recipe == "rowwise" and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def _emulate_fn(x, w, *, spec):
    return emulated_linear(x, w, spec)


def _torch_fn(x, w, *, mode, pow2):
    return scaled_mm_linear(x, w, mode, pow2)


def make_provider(fp8_cfg, num_layers: int, *, backend: str | None = None) -> LayerProvider:
    """The LayerProvider for this FP8 config: plain LayerProvider when fp8 is off.

    `backend` skips selection (e.g. when the caller already ran `select_backend`).
    """
    if not fp8_cfg.enabled:
        return LayerProvider()
    backend = backend or select_backend(fp8_cfg).backend
    return FP8LayerProvider(fp8_cfg, num_layers, backend)


def autocast_context(fp8_cfg, *, backend: str | None = None) -> contextlib.AbstractContextManager:
    """Enter around each forward+backward: te.autocast(recipe) for TE, a no-op otherwise."""
    if not fp8_cfg.enabled:
        return contextlib.nullcontext()
    backend = backend or select_backend(fp8_cfg).backend
    if backend == "te":
        return te_backend.autocast(fp8_cfg)
    return contextlib.nullcontext()
