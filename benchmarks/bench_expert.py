"""Benchmark: one-stage vs two-stage (node-limited) expert-parallel dispatch on gloo ranks.

An MoE layer (64 experts in 8 groups, top-8, hidden 256) runs forward+backward on every rank with
2 emulated nodes; for topk_group = 1, 2, 4 the table shows time per layer step and the bytes a
rank sends across node boundaries and within its node (dispatch + combine), per token.
DeepSeek-V3 section 2.1.2 / 3.2.2: with node-limited routing the two-stage dispatch sends a token
to a remote node once, so cross-node bytes per token track the nodes reached, not K.

    python benchmarks/bench_expert.py [--ranks 4 8] [--tokens 512] [--iters 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from parallel.config import ParallelConfig  # noqa: E402
from parallel.expert import parallelize_experts  # noqa: E402
from parallel.topology import Topology  # noqa: E402
from model.config import MoEConfig  # noqa: E402
from model.experts import LocalDispatcher
from model.moe import MoE  # noqa: E402
from model.provider import LayerProvider  # noqa: E402

HIDDEN, EXPERTS, GROUPS, TOPK = 256, 64, 8, 8


def _bench(rank, world, tokens, iters, topk_groups):
    topo = Topology.from_config(ParallelConfig(ep=world, ranks_per_node=world // 2))
    rows = []
    for tg in topk_groups:
        moe_cfg = MoEConfig(num_experts=EXPERTS, n_group=GROUPS, topk_group=tg, topk=TOPK, expert_ffn_size=128,
                            num_shared_experts=0, seq_aux_loss_alpha=0.0)
        for node_limited in (False, True):
            torch.manual_seed(0)
            layer = MoE(LayerProvider(), LocalDispatcher(EXPERTS), HIDDEN, moe_cfg, layer=1, moe_index=0)
            for p in layer.parameters():
                p.data.normal_(0, 0.05)
            disp = parallelize_experts(torch.nn.ModuleDict({"m": layer}), topo, node_limited)
            x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(rank))
            times = []
            for it in range(iters + 1):
                ctx = types.SimpleNamespace(valid=torch.ones(1, tokens, dtype=torch.bool),
                                            expert_counts=torch.zeros(1, EXPERTS), balance_losses=[])
                disp.stats.reset()
                torch.distributed.barrier()
                t0 = time.perf_counter()
                layer(x, ctx).square().mean().backward()
                times.append(time.perf_counter() - t0)
            s = disp.stats
            rows.append((tg, "two-stage" if node_limited else "one-stage", sorted(times[1:])[len(times[1:]) // 2],
                         s.cross_node_bytes / tokens, s.intra_node_bytes / tokens, s.cross_node_rows / tokens))
    return rows


def main():
    from tests.distributed.spawn import run_ranks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    print(f"MoE layer E={EXPERTS} in {GROUPS} groups, top-{TOPK}, hidden {HIDDEN}, {args.tokens} tokens/rank, "
          f"2 emulated nodes; bytes/token sent by a rank (mean over ranks), dispatch + combine")
    print(f"{'ranks':>5} {'topk_group':>10} {'dispatch':>10} {'ms/step':>8} {'cross B/tok':>12} "
          f"{'intra B/tok':>12} {'cross rows/tok':>15}")
    for world in args.ranks:
        out = run_ranks(_bench, world, args.tokens, args.iters, [1, 2, 4], timeout=600)
        for i, row in enumerate(out[0]):
            tg, kind = row[0], row[1]
            mean = [sum(r[i][j] for r in out) / world for j in (2, 3, 4, 5)]
            print(f"{world:>5} {tg:>10} {kind:>10} {mean[0] * 1e3:>8.1f} {mean[1]:>12.0f} {mean[2]:>12.0f} "
                  f"{mean[3]:>15.2f}")


if __name__ == "__main__":
    main()
