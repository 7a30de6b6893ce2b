"""Optional Weights & Biases logging (`logging.wandb`), beside TensorBoard: the same scalars per
step and the resolved config. The package is imported only when the section is set; when it is
missing the run says so in one line and goes on without it.

    logging:
      wandb: {project: moepipe-tiny, name: lr-3e-3, offline: true}

`offline: true` writes the run under output_dir/wandb/ for a later `wandb sync`, for clusters
whose compute nodes have no internet.
"""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger("moepipe")
KEYS = {"project": "a W&B project name (required)", "name": "the run's name (default: W&B picks one)",
        "offline": "true: write locally for a later `wandb sync` (default false)",
        "entity": "the W&B team or user (default: the logged-in user's)"}


def check_settings(settings: dict) -> None:
    """Raises ValueError naming the key for a bad `logging.wandb` mapping ({} = off)."""
    if not isinstance(settings, dict):
        raise ValueError(f"wandb = {settings!r}: must be a mapping, e.g. {{project: my-project, offline: true}}")
    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        raise ValueError(f"wandb = {settings!r}: unknown key {unknown[0]!r}; keys: "
                         + "; ".join(f"{k} ({v})" for k, v in KEYS.items()))
    if settings and not settings.get("project"):
        raise ValueError(f"wandb = {settings!r}: needs a project, e.g. {{project: moepipe}}")


def open_run(settings: dict, config: dict, output_dir: str):
    """A started wandb run, or None when off or when the package is missing (one warning line)."""
    if not settings:
        return None
    try:
        wandb = importlib.import_module("wandb")
    except ImportError:
        log.warning("logging.wandb is set but the wandb package is not installed (pip install wandb); "
                    "this run logs to metrics.jsonl (and TensorBoard, if on) only")
        return None
    return wandb.init(project=settings["project"], name=settings.get("name"), entity=settings.get("entity"),
                      mode="offline" if settings.get("offline") else "online", dir=output_dir, config=config)


def scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
