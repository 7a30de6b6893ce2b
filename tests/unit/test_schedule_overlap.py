"""The segmented (overlap) form of a model stage, single process: the tape's piecewise backward
and piecewise recomputation give the losses, gradients and expert loads of the plain stage.
(The interleaving with a real all-to-all is tested in tests/distributed/test_pipeline_overlap.py.)"""
import pytest
import torch

from parallel.pipeline.model_stage import ModelChunk, build_union_chunks
from parallel.pipeline.overlap import OverlapModelChunk
from parallel.pipeline.pieces import Tape
from parallel.pipeline.runtime import PipelineRuntime
from parallel.pipeline.schedules import build_schedule
from model.batch import make_batch
from trainer.config import load_config

N = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg():
    return load_config(None, ["model.vocab_size=64", "model.max_seq_len=16", "data.seq_len=16",
                              "model.num_layers=3", "model.first_k_dense=1", "model.hidden_size=32",
                              "model.dense_ffn_size=32", "moe.expert_ffn_size=16", "attention.num_heads=2",
                              "moe.seq_aux_loss_alpha=0.01"])


def _batches():
    g = torch.Generator().manual_seed(5)
    return [make_batch(torch.randint(0, 64, (2, 16), generator=g), [[7, 9], [16]]) for _ in range(N)]


def _run(chunk_cls=ModelChunk, recompute=False):
    s = build_schedule("zb1p", 1, N)
    _, chunks = build_union_chunks(_cfg(), s, 0, _batches(), split_w=True, chunk_cls=chunk_cls)
    for chunk in chunks:  # train.recompute=full reaches chunks only at pp > 1: switch it on the chunk here
        chunk.recompute = recompute
    rt = PipelineRuntime(s, 0, chunks)
    results = rt.run()
    losses = [(o.lm_loss.item(), o.mtp_loss.item(), o.balance_loss.item()) for _, o in results]
    counts = sum(o.expert_counts for _, o in results)
    return losses, {k: p.grad.clone() for k, p in chunks[0].named_parameters() if p.grad is not None}, counts


def test_overlap_chunk_equals_plain_chunk_with_and_without_recompute():
    ref_losses, ref_grads, ref_counts = _run()
    for recompute in (False, True):
        losses, grads, counts = _run(chunk_cls=OverlapModelChunk, recompute=recompute)
        assert losses == ref_losses
        torch.testing.assert_close(counts, ref_counts)
        assert set(grads) == set(ref_grads)
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=f"{recompute} {k}")


def test_tape_backward_runs_cuts_in_reverse_and_sums_fanout():
    tape = Tape()
    x = torch.tensor([2.0], requires_grad=True)
    a = x * 3
    (a_leaf,) = tape.cut(a)
    b = a_leaf ** 2            # used twice after the cut: both gradients must reach x
    (b_leaf,) = tape.cut(b)
    y = b_leaf + a_leaf
    list(tape.backward_steps([y], [None]))
    assert x.grad.item() == (2 * 6 + 1) * 3
    assert not tape.cuts
