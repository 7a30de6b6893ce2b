"""Paired micro-batches without a pipeline: the ZeRO engine at dp 2 x ep 2 (4 gloo ranks, pp = 1,
ep = 2 inside dp = 4), `parallel.overlap: auto`, grad_accum 3, runs F0, F1&B0, F2&B1, B2 as
overlapped F&B pairs; every rank's losses, expert loads and every local gradient (before the
ZeRO reduce-scatter) equal one process's serial forward/backward of the same micro-batches:
a non-expert gradient is the rank's own micro-batches', an expert slice the sum over the ranks
of its ep group. `parallel.overlap: off` runs the plain serial order."""
import numpy as np
import pytest
import torch

from model.batch import make_batch
from model.transformer import build_model
from parallel.engine import build_engine
from parallel.expert import expert_shards
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from trainer.config import load_config

N, WORLD = 3, 4


def _cfg(overlap="auto"):
    return load_config(None, ["model.vocab_size=64", "model.max_seq_len=8", "data.seq_len=8", "model.num_layers=2",
                              "model.first_k_dense=0", "model.hidden_size=16", "model.dense_ffn_size=16",
                              "moe.expert_ffn_size=8", "attention.num_heads=2", "moe.seq_aux_loss_alpha=0.01",
                              "parallel.ep=2", f"parallel.overlap={overlap}", f"train.grad_accum={N}"])


def _batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [make_batch(torch.randint(0, 64, (2, 8), generator=g), [[3, 5], [8]]) for _ in range(N)]


def _rank(rank, world, overlap):
    cfg = _cfg(overlap)
    topo = Topology.from_config(cfg.parallel, num_experts=cfg.moe.num_experts)
    engine = build_engine(cfg, topo, torch.device("cpu"))
    assert (engine.paired is not None) == (overlap == "auto")
    m = engine.forward_backward(_batches(rank))
    grads = {k: p.grad.numpy().copy() for k, p in engine.model.named_parameters() if p.grad is not None}
    pairs = engine.paired.pair.overlapped if engine.paired is not None else 0
    return (m.losses(), m.expert_counts.numpy().copy(), grads, expert_shards(engine.model), topo.ranks("ep"),
            pairs)


def _reference():
    """Per rank (one process): its share of the step's losses, its expert loads and the gradients
    of that share. Every micro-batch of every rank holds the same numbers of rows and targets, so a
    rank's share of the step's per-token loss is the sum of its micro-batch means / (N x WORLD)."""
    out = []
    for rank in range(WORLD):
        model = build_model(_cfg())
        outs = [model(b) for b in _batches(rank)]
        (sum(o.loss for o in outs) / (N * WORLD)).backward()
        losses = [float(sum(getattr(o, k).item() for o in outs) / (N * WORLD))
                  for k in ("loss", "lm_loss", "mtp_loss", "balance_loss")]
        grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
        out.append((losses, sum(o.expert_counts for o in outs).numpy(), grads))
    return out


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("overlap", ["auto", "off"])
def test_paired_micro_batches_equal_one_process(reference, overlap):
    results = run_ranks(_rank, WORLD, overlap)
    for rank, (losses, counts, grads, shards, ep_ranks, pairs) in enumerate(results):
        ref_losses, ref_counts, ref_grads = reference[rank]
        if overlap == "auto":
            assert pairs > 0  # exchanges of one micro-batch were in flight while the other computed
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(counts, ref_counts)
        assert set(grads) == set(ref_grads)
        for k, g in grads.items():
            want = ref_grads[k]
            if k in shards:  # an expert slice: every rank of the ep group sent it tokens
                off = shards[k][0]
                want = sum(reference[r][2][k] for r in ep_ranks)[off:off + g.shape[0]]
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6, err_msg=f"rank {rank} {k}")
