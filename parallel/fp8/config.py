"""FP8 config (DeepSeek-V3 report, arXiv 2412.19437, section 3.3). See parallel/fp8/ for the backends.

The list of components that stay in high precision lives here, in one place
(`FP8Config.keep_high_precision` plus `first_layers_bf16` / `last_layers_bf16`); the provider in
`parallel/fp8/provider.py` is the only reader. Pure stdlib: no torch here.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import doc, require

RECIPES = ("delayed", "tensorwise", "rowwise", "blockwise", "mxfp8")
BACKENDS = ("auto", "te", "torch", "emulate")
FORMATS = ("e4m3", "hybrid")
# Names accepted in keep_high_precision. The first three never reach the Linear provider (they are
# not GEMMs of a Linear) and so are always high precision; they must stay listed so that the list
# stays an honest description of what runs in BF16/FP32.
ALWAYS_HIGH_PRECISION = ("embedding", "norm", "attention_core")
# Provider kinds (see trainer/model/provider.py) that a name in keep_high_precision covers.
COMPONENT_KINDS = {
    "embedding": (), "norm": (), "attention_core": (),
    "output_head": ("output_head",),
    "router": ("router",),
    "mtp": ("mtp_proj",),               # also every block whose index is >= model.num_layers
    "attention": ("attention",),        # the MLA projections (DeepSeek-V3 runs them in FP8)
    "mlp": ("mlp",),                    # dense SwiGLU blocks
    "shared_expert": ("shared_expert",),
    "experts": ("experts",),            # the routed experts' grouped GEMMs
}
WGMMA_K = 32  # K of one FP8 tensor-core MMA on Hopper; promotion intervals are multiples of it


@dataclass(kw_only=True)
class FP8Config:
    """FP8 GEMMs for Linear layers and experts; everything listed in keep_high_precision stays BF16/FP32."""

    enabled: bool = doc(False, "Run the Linear GEMMs (forward, input-grad, weight-grad) in FP8 E4M3.")
    recipe: str = doc("blockwise", "Scaling recipe: delayed, tensorwise, rowwise (torch backend only), "
                      "blockwise (DeepSeek-V3: 1x128 tiles / 128x128 blocks) or mxfp8.")
    backend: str = doc("auto", "auto (te, else torch on a capable GPU, else emulate), te, torch or emulate.")
    format: str = doc("e4m3", "e4m3 for every FP8 tensor (DeepSeek-V3) or hybrid (E5M2 for gradients).")
    block_size: int = doc(128, "Tile length for activation/gradient scales and weight block side.")
    power_of_two_scales: bool = doc(True, "Round every scale up to a power of two (exact in the exponent, "
                                    "as TE's Float8BlockScaling); false uses amax / fp8_max exactly.")
    promote_every: int = doc(128, "Promote partial sums to FP32 every this many elements of K "
                             "(0 = never; emulate backend only; multiple of 32, the tensor-core MMA K).")
    accum_mantissa_bits: int = doc(14, "Emulate backend: significant bits the tensor-core accumulator keeps "
                                   "between promotions (DeepSeek-V3 measured ~14 on H800); 0 = exact FP32.")
    amax_history_len: int = doc(1024, "Delayed recipe: length of the amax history window.")
    keep_high_precision: list = doc(["embedding", "output_head", "router", "norm", "attention_core", "mtp"],
                                    "Components kept in BF16/FP32 (DeepSeek-V3 section 3.3.1); names: "
                                    + ", ".join(COMPONENT_KINDS) + ".")
    first_layers_bf16: int = doc(0, "Keep the first N transformer blocks in BF16.")
    last_layers_bf16: int = doc(0, "Keep the last N transformer blocks in BF16.")

    def __post_init__(self):
        require(self.recipe in RECIPES, "recipe", self.recipe, f"must be one of {', '.join(RECIPES)}")
        require(self.backend in BACKENDS, "backend", self.backend, f"must be one of {', '.join(BACKENDS)}")
        require(self.format in FORMATS, "format", self.format, f"must be one of {', '.join(FORMATS)}")
        require(self.block_size > 0, "block_size", self.block_size, "must be positive")
        require(self.promote_every >= 0 and self.promote_every % WGMMA_K == 0, "promote_every",
                self.promote_every, f"must be 0 or a positive multiple of {WGMMA_K}")
        require(0 <= self.accum_mantissa_bits <= 23, "accum_mantissa_bits", self.accum_mantissa_bits,
                "must be between 0 (exact FP32) and 23")
        require(self.amax_history_len > 0, "amax_history_len", self.amax_history_len, "must be positive")
        require(self.first_layers_bf16 >= 0, "first_layers_bf16", self.first_layers_bf16, "must be >= 0")
        require(self.last_layers_bf16 >= 0, "last_layers_bf16", self.last_layers_bf16, "must be >= 0")
        unknown = [n for n in self.keep_high_precision if n not in COMPONENT_KINDS]
        require(not unknown, "keep_high_precision", self.keep_high_precision,
                f"unknown component(s) {unknown}; known: {', '.join(COMPONENT_KINDS)}")
        missing = [n for n in ALWAYS_HIGH_PRECISION if n not in self.keep_high_precision]
        require(not missing, "keep_high_precision", self.keep_high_precision,
                f"{missing} are not Linear GEMMs and always run in high precision; keep them listed")
        require(not (self.recipe in ("blockwise", "mxfp8") and self.format != "e4m3"), "format", self.format,
                f"recipe {self.recipe} uses E4M3 for every tensor; set format: e4m3")
