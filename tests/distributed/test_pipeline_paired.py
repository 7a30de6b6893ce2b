"""Paired 1F1B and ZB1P (`schedules.paired_1f1b`) with overlapped F&B pairs on pp 2 x ep 2
(4 gloo ranks): the steady-state pairs really overlap (exchanges in flight while the other half
computes), and the losses and every gradient equal one process's serial forward/backward of the
same micro-batches: a non-expert gradient is the dp rank's own micro-batches', an expert slice
the sum over its ep group."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from model.batch import make_batch
from model.transformer import build_model
from parallel.config import ParallelConfig
from parallel.expert import expert_shards, parallelize_experts
from parallel.pipeline.model_stage import build_union_chunks
from parallel.pipeline.overlap import OverlapModelChunk, OverlapPairExecutor
from parallel.pipeline.runtime import PipelineRuntime, reduce_shared_grads
from parallel.pipeline.schedules import build_schedule
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from trainer.config import load_config

N = 4
NAMES = ("1f1b", "zb1p")


def _cfg():
    return load_config(None, ["model.vocab_size=64", "model.max_seq_len=8", "data.seq_len=8", "model.num_layers=4",
                              "model.first_k_dense=0", "model.hidden_size=16", "model.dense_ffn_size=16",
                              "moe.expert_ffn_size=8", "attention.num_heads=2", "moe.seq_aux_loss_alpha=0.01"])


def _batches(dp_rank):
    g = torch.Generator().manual_seed(50 + dp_rank)
    return [make_batch(torch.randint(0, 64, (2, 8), generator=g), [[3, 5], [8]]) for _ in range(N)]


def _one(topo, name):
    s = build_schedule(name, topo.pp, N, paired=True)
    model, chunks = build_union_chunks(_cfg(), s, topo.pp_rank, _batches(topo.dp_rank), split_w=name == "zb1p",
                                       chunk_cls=OverlapModelChunk)
    parallelize_experts(model, topo)
    pair = OverlapPairExecutor()
    rt = PipelineRuntime(s, topo.pp_rank, chunks, group_ranks=topo.ranks("pp"), group=topo.group("pp"), pair=pair)
    results = rt.run()
    reduce_shared_grads(chunks, topo.pp_rank, topo.pp, topo.ranks("pp"), topo.group("pp"))
    losses = [(o.lm_loss.item(), o.mtp_loss.item()) for _, o in results]
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
    return losses, grads, expert_shards(model), pair.overlapped


def _rank(rank, world):
    topo = Topology.from_config(ParallelConfig(pp=2, ep=2))
    ep_dp = [None] * topo.ep
    dist.all_gather_object(ep_dp, topo.dp_rank, group=topo.group("ep"))
    return topo.dp_rank, ep_dp, {name: _one(topo, name) for name in NAMES}


def _reference(dp_rank):
    model = build_model(_cfg())
    outs = [model(b) for b in _batches(dp_rank)]
    (sum(o.loss for o in outs) / N).backward()
    return [(o.lm_loss.item(), o.mtp_loss.item()) for o in outs], {k: p.grad.numpy() for k, p in model.named_parameters()}


@pytest.fixture(scope="module")
def results():
    return run_ranks(_rank, 4)


@pytest.mark.parametrize("name", NAMES)
def test_paired_schedule_equals_one_process(results, name):
    ref = {d: _reference(d) for d in (0, 1)}
    for rank, (dp_rank, ep_dp, per_name) in enumerate(results):
        losses, grads, shards, overlapped = per_name[name]
        assert overlapped > 0, (rank, name)
        if losses:  # the head stage's rank
            np.testing.assert_allclose(losses, ref[dp_rank][0], rtol=1e-5, atol=1e-6)
        for k, g in grads.items():
            want = ref[dp_rank][1][k]
            if k in shards:
                off = shards[k][0]
                want = sum(ref[d][1][k] for d in ep_dp)[off:off + g.shape[0]]
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6, err_msg=f"rank {rank} {name} {k}")
    assert sum(len(r[2][name][1]) for r in results) > 0
