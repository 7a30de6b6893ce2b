"""FP8 mixed precision (DeepSeek-V3 report section 3.3): backends te, torch and emulate behind the
model's LayerProvider seam. Entry points: `make_provider(fp8_cfg, num_layers)` and
`autocast_context(fp8_cfg)`; `select_backend(fp8_cfg)` says which backend runs and why.

Importing this package never imports Transformer Engine; only the te backend does, lazily.
"""
from parallel.fp8.provider import FP8LayerProvider, autocast_context, in_fp8, make_provider
from parallel.fp8.select import FP8BackendError, Selection, select_backend

__all__ = ["FP8BackendError", "FP8LayerProvider", "Selection", "autocast_context", "in_fp8",
           "make_provider", "select_backend"]
