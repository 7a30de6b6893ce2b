"""Transformer Engine backend: te.Linear / te.GroupedLinear under te.autocast with the chosen recipe.

Recipes (TE 2.x names; our config names follow Megatron's `fp8_recipe`):
    delayed    -> DelayedScaling       (per-tensor scale from an amax history)
    tensorwise -> Float8CurrentScaling (per-tensor scale from the current amax)
    blockwise  -> Float8BlockScaling   (DeepSeek-V3 section 3.3: 1x128 / 128x128; sm90, CUDA >= 12.9)
    mxfp8      -> MXFP8BlockScaling    (1x32 blocks with E8M0 scales; sm100)
TE is imported lazily, only here and only when this backend is asked for; importing it can fail
with ImportError, OSError (missing .so), RuntimeError or others, so `probe` catches them all and
reports the reason. FP8 GEMMs in TE need the rows of each expert to be a multiple of 16 (32 for
MXFP8): `TEGroupedExperts` pads each expert's rows with zeros and drops them again.

Legend: S rows sorted by expert, P padded rows, D model width, F expert inner width, E experts.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

RECIPE_CLASSES = {"delayed": "DelayedScaling", "tensorwise": "Float8CurrentScaling",
                  "blockwise": "Float8BlockScaling", "mxfp8": "MXFP8BlockScaling"}
# TE's own support checks, newest name first; each returns (ok, reason) or bool.
_SUPPORT_CHECKS = {
    "delayed": ("is_fp8_available", "check_fp8_support"),
    "tensorwise": ("is_fp8_available", "check_fp8_support"),
    "blockwise": ("is_fp8_block_scaling_available", "check_fp8_block_scaling_support"),
    "mxfp8": ("is_mxfp8_available", "check_mxfp8_support"),
}


def import_te():
    """(transformer_engine.pytorch, transformer_engine.common.recipe); raises whatever TE raises."""
    import transformer_engine.pytorch as te_pt
    from transformer_engine.common import recipe as te_recipe
    return te_pt, te_recipe


def hardware_gate(recipe: str, capability: tuple[int, int] | None, cuda_version: str | None) -> str | None:
    """Why this GPU cannot run `recipe` (None if it can). Pure: tested without a GPU."""
    if capability is None:
        return "no CUDA device"
    if recipe not in RECIPE_CLASSES:
        return f"Transformer Engine has no '{recipe}' recipe (torch backend only)"
    cc = tuple(capability)
    if cc < (8, 9):
        return f"FP8 needs compute capability >= 8.9 (Ada/Hopper), found sm{cc[0]}{cc[1]}"
    if recipe == "mxfp8" and cc < (10, 0):
        return f"mxfp8 needs Blackwell (sm100+), found sm{cc[0]}{cc[1]}"
    if recipe == "blockwise":
        if cc < (9, 0):
            return f"blockwise needs Hopper (sm90+), found sm{cc[0]}{cc[1]}"
        major_minor = tuple(int(p) for p in (cuda_version or "0.0").split(".")[:2])
        if major_minor < (12, 9):
            return f"blockwise needs CUDA >= 12.9, torch was built with CUDA {cuda_version}"
    return None


def _te_support(te_pt, recipe: str) -> str | None:
    """TE's own verdict for `recipe` on this device, None if supported or if TE has no check."""
    for name in _SUPPORT_CHECKS[recipe]:
        fn = getattr(te_pt, name, None)
        if fn is None:
            fn = getattr(getattr(te_pt, "fp8", None), name, None)
        if fn is None:
            continue
        out = fn(return_reason=True) if name.startswith("is_") else fn()
        ok, reason = (out, "") if isinstance(out, bool) else (out[0], out[1])
        return None if ok else f"Transformer Engine says: {reason or 'not supported'}"
    return None


def probe(recipe: str, device_info) -> str | None:
    """Why the TE backend cannot run `recipe` here (None if it can). `device_info()` -> (cc, cuda)."""
    try:
        te_pt, _ = import_te()
    except Exception as err:  # noqa: BLE001 - TE fails in many ways when parts are missing
        return f"transformer_engine not importable ({type(err).__name__}: {err})"
    capability, cuda_version = device_info()
    reason = hardware_gate(recipe, capability, cuda_version)
    if reason is None:
        try:
            reason = _te_support(te_pt, recipe)
        except Exception as err:  # noqa: BLE001
            reason = f"Transformer Engine support check failed ({type(err).__name__}: {err})"
    return reason


def make_recipe(cfg, te_recipe):
    """The TE recipe object for an FP8Config."""
    if cfg.recipe not in RECIPE_CLASSES:
        raise ValueError(f"fp8.recipe = {cfg.recipe!r}: Transformer Engine has no such recipe; "
                         f"use one of {', '.join(RECIPE_CLASSES)} or fp8.backend=torch")
    fmt = te_recipe.Format.E4M3 if cfg.format == "e4m3" else te_recipe.Format.HYBRID
    cls = getattr(te_recipe, RECIPE_CLASSES[cfg.recipe])
    if cfg.recipe == "delayed":
        return cls(fp8_format=fmt, amax_history_len=cfg.amax_history_len, amax_compute_algo="max")
    return cls(fp8_format=fmt)


def autocast(cfg) -> contextlib.AbstractContextManager:
    """te.autocast(recipe=...) (te.fp8_autocast on TE versions before the rename)."""
    te_pt, te_recipe = import_te()
    recipe = make_recipe(cfg, te_recipe)
    if hasattr(te_pt, "autocast"):
        return te_pt.autocast(enabled=True, recipe=recipe)
    return te_pt.fp8_autocast(enabled=True, fp8_recipe=recipe)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_linear(base: nn.Module) -> nn.Module:
    """A te.Linear with the same shape, dtype and initial values as the provider's `base` Linear."""
    te_pt, _ = import_te()
    out_f, in_f = base.weight.shape
    lin = te_pt.Linear(in_f, out_f, bias=False, params_dtype=base.weight.dtype, device=_device())
    with torch.no_grad():
        lin.weight.copy_(base.weight)
    return lin


def align_rows(recipe: str) -> int:
    """Rows per GEMM that TE's FP8 kernels need a multiple of."""
    return 32 if recipe == "mxfp8" else 16


def padded_index(counts: list[int], multiple: int) -> tuple[list[int], torch.Tensor]:
    """Per-expert counts rounded up to `multiple`, and the padded row of every real row [S]."""
    padded = [-(-c // multiple) * multiple for c in counts]
    # real row i of expert e lands at (padded start of e) + (i - real start of e): one vector op
    shift = torch.tensor([p_start - c_start for p_start, c_start in zip(_starts(padded), _starts(counts))],
                         dtype=torch.long)
    rows = torch.arange(sum(counts)) + torch.repeat_interleave(shift, torch.tensor(counts, dtype=torch.long))
    return padded, rows


def _starts(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


class TEGroupedExperts(nn.Module):
    """Routed experts on two te.GroupedLinear (gate and up fused into one [2F, D] weight per expert).

    TE owns the weights (`gate_up.weight{e}` [2F, D], `down.weight{e}` [D, F]); the state dict is
    translated to and from the GroupedExperts contract names w_gate [E,F,D], w_up [E,F,D],
    w_down [E,D,F], so checkpoints move freely between backends.
    """

    def __init__(self, base: nn.Module, recipe: str):
        super().__init__()
        te_pt, _ = import_te()
        E, F_, D = base.w_gate.shape
        self.num_experts, self.ffn, self.hidden = E, F_, D
        self.multiple = align_rows(recipe)
        kw = dict(bias=False, params_dtype=base.w_gate.dtype, device=_device())
        self.gate_up = te_pt.GroupedLinear(E, D, 2 * F_, **kw)
        self.down = te_pt.GroupedLinear(E, F_, D, **kw)
        with torch.no_grad():
            for e in range(E):
                getattr(self.gate_up, f"weight{e}").copy_(torch.cat([base.w_gate[e], base.w_up[e]]))
                getattr(self.down, f"weight{e}").copy_(base.w_down[e])
        self.register_state_dict_post_hook(_to_contract_names)
        self.register_load_state_dict_pre_hook(_from_contract_names)

    def forward(self, x_SD: torch.Tensor, counts) -> torch.Tensor:
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else [int(c) for c in counts]  # one read
        padded, rows_S = padded_index(counts, self.multiple)
        rows_S = rows_S.to(x_SD.device)
        x_PD = x_SD.new_zeros(sum(padded), self.hidden).index_copy(0, rows_S, x_SD)
        gu_PF2 = self.gate_up(x_PD, padded)
        gate, up = gu_PF2.chunk(2, dim=-1)
        y_PD = self.down(torch.nn.functional.silu(gate) * up, padded)
        return y_PD.index_select(0, rows_S)


def _to_contract_names(module: TEGroupedExperts, state_dict, prefix, local_metadata) -> None:
    E, F_ = module.num_experts, module.ffn
    gu = [state_dict.pop(f"{prefix}gate_up.weight{e}") for e in range(E)]
    dn = [state_dict.pop(f"{prefix}down.weight{e}") for e in range(E)]
    state_dict[f"{prefix}w_gate"] = torch.stack([w[:F_] for w in gu])
    state_dict[f"{prefix}w_up"] = torch.stack([w[F_:] for w in gu])
    state_dict[f"{prefix}w_down"] = torch.stack(dn)


def _from_contract_names(module: TEGroupedExperts, state_dict, prefix, *args) -> None:
    if f"{prefix}w_gate" not in state_dict:
        return
    w_gate, w_up = state_dict.pop(f"{prefix}w_gate"), state_dict.pop(f"{prefix}w_up")
    w_down = state_dict.pop(f"{prefix}w_down")
    for e in range(module.num_experts):
        state_dict[f"{prefix}gate_up.weight{e}"] = torch.cat([w_gate[e], w_up[e]])
        state_dict[f"{prefix}down.weight{e}"] = w_down[e]
