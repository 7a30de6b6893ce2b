"""DeepSeek-V3 model (arXiv 2412.19437) in plain PyTorch: pure math, no torch.distributed.

Import `model.transformer.build_model`; this package init stays light so that `model.config`
never pulls in torch.
"""
