"""FP8 config (DeepSeek-V3 section 3.3). See parallel/fp8/ for the backends."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.model.config import doc, require

RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
BACKENDS = ("auto", "te", "torch", "emulate")


@dataclass(kw_only=True)
class FP8Config:
    """FP8 GEMMs for Linear layers and experts; everything listed in keep_high_precision stays BF16/FP32."""

    enabled: bool = doc(False, "Run the Linear GEMMs (forward, input-grad, weight-grad) in FP8 E4M3.")
    recipe: str = doc("blockwise", "Scaling recipe: delayed, tensorwise, blockwise (DeepSeek-V3: 1x128 / 128x128) or mxfp8.")
    backend: str = doc("auto", "auto (te, else torch on a capable GPU, else emulate), te, torch or emulate.")
    block_size: int = doc(128, "Tile length for activation/gradient scales and weight block side.")
    promote_every: int = doc(128, "Promote partial sums to FP32 every this many elements of K (0 = never).")
    keep_high_precision: list = doc(["embedding", "output_head", "router", "norm", "attention_core", "mtp"],
                                    "Components kept in BF16/FP32 (DeepSeek-V3 section 3.3.1).")
    first_layers_bf16: int = doc(0, "Keep the first N transformer blocks in BF16.")
    last_layers_bf16: int = doc(0, "Keep the last N transformer blocks in BF16.")

    def __post_init__(self):
        require(self.recipe in RECIPES, "recipe", self.recipe, f"must be one of {', '.join(RECIPES)}")
        require(self.backend in BACKENDS, "backend", self.backend, f"must be one of {', '.join(BACKENDS)}")
        require(self.block_size > 0, "block_size", self.block_size, "must be positive")
        require(self.promote_every >= 0, "promote_every", self.promote_every, "must be >= 0")
        require(self.first_layers_bf16 >= 0, "first_layers_bf16", self.first_layers_bf16, "must be >= 0")
        require(self.last_layers_bf16 >= 0, "last_layers_bf16", self.last_layers_bf16, "must be >= 0")
