"""A trained model back from a checkpoint (no optimizer, one process), and the device this process uses.

Reads a single-process checkpoint (`step_XXXXXXXX/`, manifest verified, weights_only load) or a
DCP directory of any (dp, ep, pp) layout (tensors carry global names), with the config saved
beside it (or `--config`), and the tokenizer of the run's prepared data.
"""
from __future__ import annotations

import os

import torch

from parallel import checkpoint as ckpt
from trainer.config import Config, ConfigError, load_config


def pick_device(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    """(device of this process, autocast dtype or None for fp32) from train.device / train.dtype."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda': no CUDA device is visible; use train.device=cpu or auto")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    dtype = cfg.train.dtype
    if dtype == "auto":  # bf16 parameters need bf16 compute (train.param_dtype)
        dtype = "bf16" if use_cuda or cfg.train.param_dtype == "bf16" else "fp32"
    return device, (torch.bfloat16 if dtype == "bf16" else None)


def find_config(path: str, explicit: str | None) -> str:
    """config.yaml of a checkpoint: explicit, in the directory, or in a parent (DCP layouts)."""
    if explicit:
        return explicit
    here = os.path.abspath(path)
    for _ in range(3):
        cand = os.path.join(here, "config.yaml")
        if os.path.isfile(cand):
            return cand
        here = os.path.dirname(here)
    raise ConfigError(f"{path}: no config.yaml in the checkpoint or its parents; pass --config")


def read_model_state(path: str) -> dict:
    """Model tensors (our names, full shapes) of a single-process or DCP checkpoint."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        state = ckpt.read_checkpoint(path)
        if "model" in state:
            return state["model"]
        if not os.path.isfile(os.path.join(path, "dcp", ".metadata")):
            raise ckpt.CheckpointError(f"{path}/state.pt: no 'model' entry")
        path = os.path.join(path, "dcp")  # a multi-rank step: state.pt holds the extras, dcp/ the tensors
    if os.path.isfile(os.path.join(path, ".metadata")):
        full = ckpt.read_dcp(path)
        return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    raise ckpt.CheckpointError(f"{path}: neither a checkpoint directory (manifest.json) nor a DCP "
                               "checkpoint (.metadata)")


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
