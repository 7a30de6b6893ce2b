"""Import a Hugging Face DeepSeek-V3 checkpoint: `python -m trainer.import_hf HF_DIR OUT_CHECKPOINT`.

(Not `trainer.import`: `import` is a Python keyword, so the module is `import_hf`.)
Reads config.json (architecture -> `model`/`attention`/`moe`/`mtp` overrides, see
`trainer.hf.names.CONFIG`) and the safetensors shards, maps the names back (stacking per-expert
weights, un-swapping `eh_proj`), checks every tensor's shape against a model built from the
resulting config, and writes a weights-only checkpoint directory (the model's tensors in dcp/,
state.pt with `step` 0, config.yaml, manifest.json; atomic as every checkpoint). Train from it with
`checkpoint.resume=<dir>`: the optimizer and data stream start fresh. Run-level settings
(data, optim, train ...) come from `--config` and `--set`. Intended for continued pretraining
from released weights of the same architecture at small scale: the whole model is held in memory.
FP8 block-scaled release weights (`*.weight_scale_inv`) must be dequantized to bf16 first.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

import torch

from parallel import checkpoint as ckpt
from trainer.config import ConfigError, dump_yaml, load_config
from trainer.hf.names import HFNameError, from_hf, overrides_from_hf
from trainer.cli import user_errors


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{hf_dir}: no config.json; not a Hugging Face checkpoint directory")
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return out


def read_safetensors(hf_dir: str) -> dict:
    """All tensors of the directory's safetensors files (safetensors cannot run code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise ckpt.CheckpointError(f"{hf_dir}: no *.safetensors files")
    out = {}
    for path in files:
        try:
            part = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        dup = set(part) & set(out)
        if dup:
            raise ckpt.CheckpointError(f"{path}: tensors {sorted(dup)[:3]} also appear in another shard")
        out.update(part)
    scaled = [n for n in out if n.endswith("weight_scale_inv")]
    if scaled:
        raise ckpt.CheckpointError(f"{hf_dir}: FP8 block-scaled weights ({scaled[0]} ...); dequantize "
                                   "them to bf16 first (DeepSeek's fp8_cast_bf16.py)")
    return out


def import_state(hf_dir: str, config: str | None = None, overrides: list[str] | None = None):
    """(cfg, model state dict) from an HF directory; shapes and dtypes checked against our model."""
    from model.transformer import build_model
    arch = overrides_from_hf(read_hf_config(hf_dir))
    cfg = load_config(config, list(overrides or []) + arch)
    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    try:
        state = from_hf(read_safetensors(hf_dir), cfg, expected)
    except HFNameError as e:
        raise ckpt.CheckpointError(f"{hf_dir}: {e.args[0]}") from None
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ckpt.CheckpointError(f"{hf_dir}: {name} has shape {tuple(state[name].shape)}, the config "
                                       f"needs {tuple(ref.shape)}")
        if not torch.isfinite(state[name].float()).all():
            raise ckpt.CheckpointError(f"{hf_dir}: {name} holds NaN/inf values")
        state[name] = state[name].to(ref.dtype)
    return cfg, state


def import_hf(hf_dir: str, out: str, config: str | None = None, overrides: list[str] | None = None) -> str:
    """Write the weights-only checkpoint directory `out`; returns it."""
    cfg, state = import_state(hf_dir, config, overrides)
    tensors = {f"model.{k}": v for k, v in state.items()}
    root, name = os.path.split(os.path.abspath(out))
    if not ckpt.STEP_DIR.match(name):
        # write_checkpoint names directories step_XXXXXXXX; write one, then move it to `out`
        tmp_root = os.path.join(root, f".{name}.import-{os.getpid()}")
        path = ckpt.write_checkpoint(tmp_root, 0, {"step": 0}, dump_yaml(cfg), keep_last=1, tensors=tensors)
        if os.path.exists(out):
            raise ckpt.CheckpointError(f"{out}: exists; remove it or choose another output")
        os.rename(path, out)
        shutil.rmtree(tmp_root, ignore_errors=True)
        return out
    return ckpt.write_checkpoint(root, int(name[5:]), {"step": int(name[5:])}, dump_yaml(cfg), keep_last=1 << 30,
                                 tensors=tensors)


@user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.import_hf", description=__doc__.splitlines()[0])
    p.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--config", default=None, help="YAML for the run-level sections (data, optim, train ...)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    path = import_hf(args.hf_dir, args.out, args.config, args.set)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
