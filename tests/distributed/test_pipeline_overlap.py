"""Overlapped F&B pairs on ep = 2 x pp = 2 (4 gloo ranks, DualPipeV): while one micro-batch's
dispatch/combine all-to-all is in flight the other computes, and the losses, every gradient
and the expert loads equal the serial pair executor's, also with piecewise (full) and selective
recomputation, which issue exactly as many all-to-alls as no recomputation, and with the blocks'
compute pieces compiled (backend "aot_eager", see test_pipeline_compile.py): compile never
captures an exchange, so the count stays the same."""
import torch
import torch.distributed as dist

from parallel.config import ParallelConfig
from parallel.expert import parallelize_experts
from parallel.pipeline.model_stage import ModelChunk, build_union_chunks
from parallel.pipeline.overlap import OverlapModelChunk, OverlapPairExecutor
from parallel.pipeline.policies import apply_stage_compile, apply_stage_recompute
from parallel.pipeline.runtime import PairExecutor, PipelineRuntime, reduce_shared_grads
from parallel.pipeline.schedules import build_schedule
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from model.batch import make_batch
from trainer.config import load_config

N = 4


def _cfg(*extra):
    return load_config(None, [*extra, "model.vocab_size=64", "model.max_seq_len=8", "data.seq_len=8",
                              "model.num_layers=4", "model.first_k_dense=0", "model.hidden_size=16",
                              "model.dense_ffn_size=16", "moe.expert_ffn_size=8", "attention.num_heads=2",
                              "moe.seq_aux_loss_alpha=0.01"])


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [make_batch(torch.randint(0, 64, (2, 8), generator=g), [[3, 5], [8]]) for _ in range(N)]


class _CountAllToAll:
    """Counts the all-to-alls issued while installed in place of torch.distributed's."""

    def __init__(self):
        self.calls, self.inner = 0, dist.all_to_all_single

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __enter__(self):
        dist.all_to_all_single = self
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.inner


def _one(topo, pair, chunk_cls, recompute="none", compile=False):
    cfg = _cfg("parallel.pp=2", "parallel.ep=2", f"train.recompute={recompute}")
    s = build_schedule("dualpipev", topo.pp, N)
    model, chunks = build_union_chunks(cfg, s, topo.pp_rank, _batches(topo.dp_rank), split_w=True,
                                       chunk_cls=chunk_cls)
    parallelize_experts(model, topo)
    assert bool(apply_stage_recompute(model, recompute)) == (recompute == "selective")
    if compile:
        apply_stage_compile(model, torch.device("cpu"), backend="aot_eager")
    rt = PipelineRuntime(s, topo.pp_rank, chunks, group_ranks=topo.ranks("pp"), pair=pair)
    with _CountAllToAll() as a2a:
        results = rt.run()
    reduce_shared_grads(chunks, topo.pp_rank, topo.pp, topo.ranks("pp"), topo.group("pp"))
    losses = [(o.lm_loss.item(), o.mtp_loss.item()) for _, o in results]
    counts = sum(i.expert_counts if hasattr(i, "expert_counts") else i for i in rt.infos.values())
    grads = {k: p.grad.numpy().copy() for ch in chunks for k, p in ch.named_parameters() if p.grad is not None}
    return losses, grads, counts.numpy().copy(), a2a.calls


RUNS = ("none", "full", "selective", "selective compiled")


def _rank(rank, world):
    topo = Topology.from_config(ParallelConfig(pp=2, ep=2))
    out = {"serial": _one(topo, PairExecutor(), chunk_cls=ModelChunk)}
    for run in RUNS:
        pair = OverlapPairExecutor()
        recompute, _, compiled = run.partition(" ")
        out[run] = _one(topo, pair, chunk_cls=OverlapModelChunk, recompute=recompute, compile=bool(compiled))
        out[f"overlapped {run}"] = pair.overlapped
    return out


def test_overlapped_pairs_equal_serial_pairs_ep2_pp2_dualpipev():
    for r, res in enumerate(run_ranks(_rank, 4, timeout=240)):
        ref_losses, ref_grads, ref_counts, _ = res["serial"]
        assert res["none"][3] > 0
        for run in RUNS:
            # every MoE block of both halves of every pair exchanged while the other computed
            assert res[f"overlapped {run}"] > 0, (r, run)
            losses, grads, counts, a2a = res[run]
            assert a2a == res["none"][3], (r, run, a2a, res["none"][3])  # no exchange re-issued
            assert len(losses) == len(ref_losses)
            for a, b in zip(losses, ref_losses):
                assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (r, run, a, b)
            torch.testing.assert_close(torch.from_numpy(counts), torch.from_numpy(ref_counts))
            assert set(grads) == set(ref_grads), (r, run)
            for k, v in grads.items():
                torch.testing.assert_close(torch.from_numpy(v), torch.from_numpy(ref_grads[k]), rtol=1e-5,
                                           atol=1e-7, msg=lambda m: f"rank {r} {run} {k}: {m}")
