"""Pipeline runtime on the DeepSeek-V3 model (MoE + MTP + balance loss) over gloo ranks:
per-micro-batch losses, every gradient and the expert loads equal one process's. The chunks are
the ones training runs (`build_union_chunks`: one model per rank, a stage of it per chunk).

Kept small for CI time: all four schedules at pp = 2 (4 micro-batches); at pp = 4 only the
two-chunk schedules (DualPipe, DualPipeV: cross-rank hand-offs in both directions, the V turn,
two model copies) with their minimum 8 micro-batches; 1F1B/ZB1P at pp = 4 are covered by the
toy-model test. 8 blocks so that DualPipeV at pp = 4 has one block per stage. Selective
recomputation (checkpointed norms, up-projections and SwiGLU activations) gives the gradients of
none under 1F1B, ZB1P's split backward and DualPipeV at pp = 2."""
import pytest
import torch

from parallel.pipeline.model_stage import build_union_chunks
from parallel.pipeline.policies import apply_stage_recompute
from parallel.pipeline.runtime import PipelineRuntime, reduce_shared_grads
from parallel.pipeline.schedules import build_schedule
from tests.distributed.spawn import run_ranks
from model.batch import make_batch
from trainer.config import load_config
from model.transformer import build_model

NAMES = ["1f1b", "zb1p", "dualpipe", "dualpipev"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(recompute="none"):
    return load_config(None, [f"train.recompute={recompute}", "model.vocab_size=64", "model.max_seq_len=8", "data.seq_len=8",
                              "model.num_layers=8", "model.hidden_size=16", "model.dense_ffn_size=16",
                              "moe.expert_ffn_size=8", "attention.num_heads=2", "moe.seq_aux_loss_alpha=0.01"])


def _batches(n):
    g = torch.Generator().manual_seed(3)
    return [make_batch(torch.randint(0, 64, (2, 8), generator=g), [[3, 5], [8]]) for _ in range(n)]


def _reference(n):
    cfg = _cfg()
    model = build_model(cfg)
    outs = [model(b) for b in _batches(n)]
    (sum(o.loss for o in outs) / n).backward()
    counts = sum(o.expert_counts for o in outs)
    return [(o.lm_loss.item(), o.mtp_loss.item()) for o in outs], {k: p.grad for k, p in model.named_parameters()}, counts


def _rank(rank, world, n, names):
    out = {}
    for run in names:
        name, _, recompute = run.partition(":")
        cfg, s = _cfg(recompute or "none"), build_schedule(name, world, n)
        model, chunks = build_union_chunks(cfg, s, rank, _batches(n), split_w=name in ("zb1p", "dualpipev"))
        assert bool(apply_stage_recompute(model, cfg.train.recompute)) == (recompute == "selective")
        rt = PipelineRuntime(s, rank, chunks)
        results = rt.run()
        reduce_shared_grads(chunks, rank, world)
        micros = sorted(m for m in range(n) if s.placement.routes[m][-1][0] == rank)
        # the head stage's loss holds only its own balance losses: compare lm and mtp
        losses = {m: (o.lm_loss.item(), o.mtp_loss.item()) for m, (_, o) in zip(micros, results)}
        counts = sum(info.expert_counts if hasattr(info, "expert_counts") else info for info in rt.infos.values())
        grads = {k: p.grad.detach().numpy().copy() for ch in chunks for k, p in ch.named_parameters()
                 if p.grad is not None}
        copies = s.placement.copies
        out[run] = (losses, grads, (counts / copies).numpy().copy())
    return out


def _check(results, n, names):
    ref_losses, ref_grads, ref_counts = _reference(n)
    for name in names:
        losses, grads, counts = {}, {}, 0
        for per_rank in results:
            l, g, c = per_rank[name]
            losses.update(l)
            grads.update({k: torch.from_numpy(v) for k, v in g.items()})
            counts = counts + torch.from_numpy(c)
        assert sorted(losses) == list(range(n))
        for m in range(n):
            assert max(abs(a - b) for a, b in zip(losses[m], ref_losses[m])) < 1e-5, (name, m, losses[m], ref_losses[m])
        assert set(grads) == {k for k, v in ref_grads.items() if v is not None}, name
        for k, v in grads.items():
            torch.testing.assert_close(v, ref_grads[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")
        # DualPipe's counts are halved per copy above; both directions saw disjoint micro-batches
        torch.testing.assert_close(counts * (2 if name.split(":")[0] == "dualpipe" else 1), ref_counts)


def _grads_of(results, run):
    return {k: v for per_rank in results for k, v in per_rank[run][1].items()}


def test_model_pipeline_pp2():
    selective = ["1f1b:selective", "zb1p:selective", "dualpipev:selective"]
    results = run_ranks(_rank, 2, 4, NAMES + selective, timeout=180)
    _check(results, 4, NAMES + selective)
    for run in selective:  # and the gradients of no recomputation, parameter by parameter
        got, ref = _grads_of(results, run), _grads_of(results, run.split(":")[0])
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(torch.from_numpy(got[k]), torch.from_numpy(ref[k]), rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"{run} {k}: {m}")


def test_model_pipeline_pp4_dualpipe_dualpipev():
    names = ["dualpipe", "dualpipev"]
    _check(run_ranks(_rank, 4, 8, names, timeout=120), 8, names)
