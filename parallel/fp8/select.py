"""Choosing the FP8 backend: te, torch or emulate (DeepSeek-V3 report section 3.3).

`auto` takes Transformer Engine if it imports and supports the recipe on this GPU, else PyTorch's
scaled matmuls on a capable GPU, else the CPU emulation; the choice and the reasons the better
backends were passed over are logged. A backend asked for by name that cannot run raises
`FP8BackendError` with the reason: there is never a silent fallback to BF16.

The device is read through `device_info()` (compute capability, CUDA version) and TE through
`te.probe`; tests replace both.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel.fp8 import te as te_backend

log = logging.getLogger(__name__)

TORCH_RECIPES = ("tensorwise", "rowwise", "blockwise")
EMULATE_RECIPES = ("blockwise",)


class FP8BackendError(RuntimeError):
    """The requested FP8 backend cannot run here."""


@dataclass(frozen=True)
class Selection:
    backend: str
    recipe: str
    why: str


def device_info() -> tuple[tuple[int, int] | None, str | None]:
    """(compute capability, CUDA version of the torch build), or (None, None) without a GPU."""
    if not torch.cuda.is_available():
        return None, None
    return tuple(torch.cuda.get_device_capability()), torch.version.cuda


def torch_probe(recipe: str, info) -> str | None:
    """Why PyTorch's scaled matmuls cannot run `recipe` here (None if they can)."""
    capability, cuda_version = info()
    if recipe not in TORCH_RECIPES:
        return f"the torch backend implements {', '.join(TORCH_RECIPES)}, not '{recipe}'"
    if capability is None:
        return "no CUDA device (the torch backend's scaled matmuls are GPU kernels)"
    if tuple(capability) < (8, 9):
        return f"FP8 matmuls need compute capability >= 8.9, found sm{capability[0]}{capability[1]}"
    if recipe in ("rowwise", "blockwise") and tuple(capability) < (9, 0):
        return f"{recipe} scaled_mm needs sm90+, found sm{capability[0]}{capability[1]}"
    if recipe == "blockwise":
        if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
            return f"torch {torch.__version__} has no block-wise torch.nn.functional.scaled_mm"
        if tuple(int(p) for p in (cuda_version or "0.0").split(".")[:2]) < (12, 9):
            return f"block-wise scaled_mm needs CUDA >= 12.9, torch was built with {cuda_version}"
    return None


def emulate_probe(recipe: str) -> str | None:
    if recipe not in EMULATE_RECIPES:
        return f"the emulate backend reproduces the blockwise recipe only, not '{recipe}'"
    return None


def select_backend(cfg, *, info=device_info, te_probe=te_backend.probe) -> Selection:
    """The backend that will run `cfg.recipe`; raises FP8BackendError if the requested one cannot."""
    probes = {
        "te": lambda: te_probe(cfg.recipe, info),
        "torch": lambda: torch_probe(cfg.recipe, info),
        "emulate": lambda: emulate_probe(cfg.recipe),
    }
    if cfg.backend != "auto":
        reason = probes[cfg.backend]()
        if reason is not None:
            raise FP8BackendError(
                f"fp8.backend = {cfg.backend!r} cannot run recipe {cfg.recipe!r}: {reason}. "
                f"Use fp8.backend=auto (te, else torch, else emulate), another backend, or fp8.enabled=false")
        sel = Selection(cfg.backend, cfg.recipe, "requested")
    else:
        passed = []
        for name in ("te", "torch", "emulate"):
            reason = probes[name]()
            if reason is None:
                sel = Selection(name, cfg.recipe, "auto; " + ("; ".join(passed) or "first choice"))
                break
            passed.append(f"{name}: {reason}")
        else:
            raise FP8BackendError(f"fp8.backend = 'auto': no backend runs recipe {cfg.recipe!r} here "
                                  f"({'; '.join(passed)}). Use fp8.recipe=blockwise or fp8.enabled=false")
    log.info("fp8: backend=%s recipe=%s (%s)", sel.backend, sel.recipe, sel.why)
    return sel
