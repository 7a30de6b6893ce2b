"""Checks made before anything is allocated or loaded, each ending in one ConfigError line.

- the device: `train.device=cuda` on a machine without CUDA;
- the memory: weights, gradients and the two AdamW moments (16 bytes per parameter in fp32,
  DeepSeek-V3 section 3.3 keeps the same four copies) divided over all ranks is a lower bound of
  what each rank needs; a config whose bound exceeds the memory of one device is refused
  before the model is built;
- the model of a checkpoint: its `config.yaml` is compared field by field with the current
  config, so a resume with another architecture names the fields instead of failing inside
  `load_state_dict`;
- the schedule: a resume with another `train.steps` re-stretches a decay that follows
  `train.steps` (`schedule.decay_steps = 0`); the warning gives the lr jump and the setting that
  keeps the old schedule.
"""
from __future__ import annotations

import os

import torch
import yaml

from trainer.config import Config, ConfigError

BYTES_PER_PARAM = 16
MODEL_SECTIONS = ("model", "attention", "moe", "mtp")
_SIZE_FIELDS = ("model.hidden_size", "model.num_layers", "model.vocab_size", "moe.num_experts",
                "moe.expert_ffn_size")


def check_device(cfg: Config) -> None:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda': no CUDA device is visible on this machine; "
                          "use train.device=cpu or train.device=auto")


def device_memory_bytes(cfg: Config) -> int:
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: Config, world_size: int = 1, available: int | None = None) -> None:
    from trainer.plan.flops import param_counts
    counts = param_counts(cfg)
    params = counts["main_total"] + counts["mtp_total"]
    need = params * BYTES_PER_PARAM / max(world_size, 1)
    have = device_memory_bytes(cfg) if available is None else available
    if need > have:
        values = ", ".join(f"{f} = {_get(cfg, f)}" for f in _SIZE_FIELDS)
        raise ConfigError(f"{values}: {params / 1e9:.3g}B parameters need at least {need / 2**30:,.1f} GiB per "
                          f"rank for weights, gradients and AdamW moments, more than the {have / 2**30:,.1f} GiB "
                          "of this device; lower those sizes or use more ranks")


def _get(cfg: Config, dotted: str):
    section, field = dotted.split(".")
    return getattr(getattr(cfg, section), field)


def model_changes(checkpoint: str, cfg: Config) -> list[str]:
    """'section.field: old -> new' for every model-shaping field that differs from the checkpoint's."""
    path = os.path.join(checkpoint, "config.yaml")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            saved = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return []
    return config_changes(saved, cfg)


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """'section.field: old -> new' for every field of the model sections that differs from `saved`."""
    changes = []
    for section in MODEL_SECTIONS:
        old = saved.get(section) or {}
        for field, new in vars(getattr(cfg, section)).items():
            if field in old and old[field] != new:
                changes.append(f"{section}.{field}: {old[field]!r} -> {new!r}")
    return changes


def check_model_matches(checkpoint: str, cfg: Config) -> None:
    changes = model_changes(checkpoint, cfg)
    if changes:
        first = changes[0].split(":")[0]
        raise ConfigError(f"{first} = {_get(cfg, first)!r}: the checkpoint {checkpoint} was trained with a "
                          f"different model ({'; '.join(changes)}); resume with the checkpoint's values, or "
                          "start a fresh run (checkpoint.resume=none or another train.output_dir)")


def _saved_config(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return saved if isinstance(saved, dict) else {}


def schedule_change(checkpoint: str, cfg: Config) -> str | None:
    """A warning when the lr at the resume step differs from what the checkpoint's run would use."""
    from trainer.schedule import lr_at
    saved = _saved_config(checkpoint)
    old_steps = (saved.get("train") or {}).get("steps")
    if not isinstance(old_steps, int) or old_steps == cfg.train.steps or cfg.schedule.decay_steps \
            or not old_steps or not cfg.train.steps or cfg.train.tokens or cfg.schedule.pieces("optim.lr"):
        return None
    from parallel.checkpoint import step_of
    step = step_of(checkpoint) or 0
    before = lr_at(step, cfg.optim, cfg.schedule, old_steps)
    after = lr_at(step, cfg.optim, cfg.schedule, cfg.train.steps)
    if before == after:
        return None
    keep = old_steps - cfg.schedule.warmup_steps - (cfg.schedule.constant_steps if cfg.schedule.kind == "wsd" else 0)
    return (f"train.steps = {cfg.train.steps}: the checkpoint's run had {old_steps}; with schedule.decay_steps = 0 "
            f"the decay follows train.steps, so lr at step {step} jumps from {before:.3g} to {after:.3g}; set "
            f"schedule.decay_steps={keep} to keep the old schedule (then min_lr after step {old_steps})")


def optimizer_changes(checkpoint: str, cfg: Config) -> list[str]:
    """Warnings for optim.* and schedule.* values that differ from the checkpoint's run: resuming
    accepts them (that is how a run is re-tuned), but never silently."""
    saved = _saved_config(checkpoint)
    lines = []
    for section in ("optim", "schedule"):
        old = saved.get(section) or {}
        for key, value in (old.items() if isinstance(old, dict) else ()):
            now = getattr(getattr(cfg, section), key, value)
            if now != value:
                lines.append(f"{section}.{key} = {now!r}: the checkpoint's run had {value!r}; the resumed run "
                             f"uses the new value from here on")
    return lines
