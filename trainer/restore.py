"""A trained model back from a checkpoint, for evaluation and generation (no optimizer, one process).

Reads a single-process checkpoint (`step_XXXXXXXX/`, manifest verified, weights_only load) or a
DCP directory of any (dp, ep, pp) layout (tensors carry global names), with the config saved
beside it (or `--config`), and the tokenizer of the run's prepared data.
"""
from __future__ import annotations

import os

import torch

from trainer.config import ConfigError, load_config
from trainer.export import find_config, read_model_state


def load_model(path: str, config: str | None = None, overrides: list[str] | None = None,
               device: str = "cpu"):
    """(cfg, model in eval mode) of the checkpoint at `path`."""
    from model.transformer import build_model
    cfg = load_config(find_config(path, config), overrides or [])
    state = read_model_state(path)
    model = build_model(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ConfigError(f"checkpoint = {path}: its tensors do not fit the config "
                          f"({str(e).splitlines()[1].strip()}); pass the run's config with --config") from None
    if missing or unexpected:
        raise ConfigError(f"checkpoint = {path}: its tensors do not fit the config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); pass the run's config with --config")
    return cfg, model.to(torch.device(device)).eval()


def tokenizer_path(cfg, explicit: str | None = None) -> str:
    """tokenizer.json of the run's prepared data (or `explicit`)."""
    from data.prepare import prepared_dir
    path = explicit or os.path.join(prepared_dir(cfg.data, cfg.dedup), "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer = {path}: no such file; prepare the run's data first "
                          "(python -m trainer.prepare CONFIG) or pass --tokenizer PATH/tokenizer.json")
    return path


def load_run_tokenizer(cfg, explicit: str | None = None):
    """The run's tokenizer; refuses one whose vocabulary does not fit the checkpoint's."""
    from data.tokenize import load_tokenizer
    path = tokenizer_path(cfg, explicit)
    tok = load_tokenizer(path, allow_fast=False)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {path} = {tok.vocab_size} tokens: more than the checkpoint's "
                          f"model.vocab_size = {cfg.model.vocab_size}; use the tokenizer the run was trained "
                          "with (--tokenizer PATH)")
    return tok
