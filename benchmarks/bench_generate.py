"""Decoding speed: MLA's latent cache vs re-running the whole prefix for every new token.

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py [--config configs/tiny.yaml] [--context 512]
        [--new 32] [--repeats 3]

Both paths use the same model and weights (the tiny config, random init; speed does not depend
on the weights). Each path starts from `--context` tokens of context and produces `--new`
tokens greedily: the latent path runs the context once into the cache (c_KV + shared RoPE key,
`model.decode`) and then one token per step; the recompute path calls the training forward on
the whole prefix for each new token (what decoding without a cache costs). Repeats alternate the
two paths; the table shows the median decode tokens/s of each, the speedup, and the cache bytes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.decode import LatentDecoder, full_logits
from model.transformer import build_model
from trainer.config import load_config


def latent(model, context, new: int) -> tuple[float, list[int]]:
    dec = LatentDecoder(model)
    logits = dec.forward(context)[0, -1]
    out = []
    t0 = time.perf_counter()
    for _ in range(new):
        out.append(int(logits.argmax()))
        logits = dec.forward(torch.tensor([[out[-1]]]))[0, -1]
    return new / (time.perf_counter() - t0), out


def recompute(model, context, new: int) -> tuple[float, list[int]]:
    tokens, out = context, []
    t0 = time.perf_counter()
    for _ in range(new):
        out.append(int(full_logits(model, tokens)[0, -1].argmax()))
        tokens = torch.cat([tokens, torch.tensor([[out[-1]]])], dim=1)
    return new / (time.perf_counter() - t0), out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    length = args.context + args.new
    cfg = load_config(args.config, [f"model.max_seq_len={length}", f"data.seq_len={min(256, length)}"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    context = torch.randint(0, cfg.model.vocab_size, (1, args.context))
    speeds = {"latent cache": [], "recompute prefix": []}
    for _ in range(args.repeats):
        s_lat, ids_lat = latent(model, context, args.new)
        s_rec, ids_rec = recompute(model, context, args.new)
        speeds["latent cache"].append(s_lat)
        speeds["recompute prefix"].append(s_rec)
    same = sum(a == b for a, b in zip(ids_lat, ids_rec))
    bpt = LatentDecoder(model).cache.bytes_per_token
    att = cfg.attention
    plain = 2 * att.num_heads * (att.qk_nope_head_dim + att.qk_rope_head_dim) * cfg.model.num_layers * 4
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"{cfg.model.num_layers} layers, context {args.context}, {args.new} new tokens, greedy, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternated repeats (median)\n")
    print("| path | decode tokens/s | cache bytes/token |")
    print("|---|---|---|")
    print(f"| latent cache (c_KV + k_R, absorbed) | {med['latent cache']:.1f} | {bpt} |")
    print(f"| recompute the whole prefix | {med['recompute prefix']:.1f} | 0 (a plain KV cache: {plain}) |")
    print(f"\nspeedup {med['latent cache'] / med['recompute prefix']:.1f}x; greedy tokens equal in "
          f"{same}/{args.new} steps")
    return med


if __name__ == "__main__":
    main()
