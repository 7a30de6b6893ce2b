"""`python -m trainer.inspect CONFIG [--set section.key=value ...]`: parameter counts of a config.

Builds the model on the meta device (no memory, any size) and counts its actual parameters per
component, for the main model and the MTP modules separately: total, and activated per token
(routed experts count top-K of E; DeepSeek-V3 report section 4.2: 671B total, 37B activated).
Also prints the analytic counts of `trainer.plan.flops` (they must agree) and training FLOPs/token.
"""
from __future__ import annotations

import argparse
import re
import sys

import torch

from trainer.config import load_config
from trainer.plan.flops import flops_per_token, param_counts
from model.transformer import build_model
from trainer.cli import user_errors

_BLOCK_PARTS = ((".attn.", "attention"), ("_norm.", "norms"), (".ffn.router.", "router"),
                (".ffn.shared.", "moe_shared"), (".ffn.experts.", "moe_routed"), (".ffn.", "dense_ffn"))


def classify(name: str) -> tuple[str, str]:
    """(part, component) of a parameter name: part is 'main' or 'mtp'."""
    if name.startswith("embed."):
        return "main", "embedding"
    if name.startswith(("norm.", "head.")):
        return "main", "head"
    mtp = re.match(r"mtp\.\d+\.(.*)", name)
    if mtp:
        rest = mtp.group(1)
        if rest.startswith("proj."):
            return "mtp", "mtp_proj"
        if rest.startswith(("hnorm.", "enorm.", "norm.")):
            return "mtp", "norms"
        return "mtp", _block_part("." + rest)
    return "main", _block_part(name)


def _block_part(name: str) -> str:
    for key, comp in _BLOCK_PARTS:
        if key in name:
            return comp
    raise ValueError(f"cannot classify parameter {name!r}")


def count_model(model, cfg) -> dict[str, dict[str, tuple[int, int]]]:
    """{'main'|'mtp': {component: (total, activated)}} from a built model."""
    frac = cfg.moe.topk / cfg.moe.num_experts
    out: dict = {"main": {}, "mtp": {}}
    for name, p in model.named_parameters():
        part, comp = classify(name)
        n = p.numel()
        act = n * frac if comp == "moe_routed" else n
        t0, a0 = out[part].get(comp, (0, 0))
        out[part][comp] = (t0 + n, a0 + act)
    if cfg.model.tie_embeddings and "embedding" in out["main"]:  # the tied head is used, not stored twice
        t, a = out["main"].get("head", (0, 0))
        out["main"]["head"] = (t, a + out["main"]["embedding"][1])
    return {part: {k: (t, int(round(a))) for k, (t, a) in comps.items()} for part, comps in out.items()}


def _fmt(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def report(cfg) -> str:
    with torch.device("meta"):
        model = build_model(cfg)
    counts = count_model(model, cfg)
    lines = []
    for part in ("main", "mtp"):
        lines.append(f"{part:<12}{'total':>12}{'activated':>12}")
        for comp, (t, a) in sorted(counts[part].items()):
            lines.append(f"  {comp:<10}{_fmt(t):>12}{_fmt(a):>12}")
        tot = sum(t for t, _ in counts[part].values())
        act = sum(a for _, a in counts[part].values())
        lines.append(f"  {'= ' + part:<10}{_fmt(tot):>12}{_fmt(act):>12}")
    pc = param_counts(cfg)
    lines.append(f"main model: {pc['main_total']:,} total, {pc['main_activated']:,} activated with the "
                 f"input embedding ({pc['main_activated_no_embed']:,} without)")
    lines.append(f"MTP modules (embedding and head shared, not recounted): {pc['mtp_total']:,} total, "
                 f"{pc['mtp_activated']:,} activated")
    lines.append(f"training FLOPs/token at seq_len {cfg.data.seq_len}: {flops_per_token(cfg):.4g} "
                 f"(without MTP: {flops_per_token(cfg, mtp=False):.4g})")
    return "\n".join(lines)


@user_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.inspect", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="YAML config file")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="dotted overrides")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(report(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
