"""No host sync inside a training step but the ones that must be there.

A CUDA kernel queue runs ahead of Python only while nothing reads a device value on the host.
Allowed: one read per all-to-all hop (the split sizes, `parallel.expert_comm.exchange_counts`)
and the per-step metrics and gradient norm after the backward. The CUDA test runs a whole step
(batches copied from pinned memory, forward and backward of every micro-batch with the grouped
experts, the optimizer step) under `torch.cuda.set_sync_debug_mode("error")`, which raises at
the first synchronising call. On CPU: the position check reads nothing from rows that fit the
RoPE tables, and the FP8 expert loop reads its counts once per layer.
"""
import os

import pytest
import torch

from model.batch import make_batch
from model.context import check_positions
from parallel.fp8.provider import FP8GroupedExperts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_positions_that_fit_the_tables_are_not_read():
    check_positions(torch.empty(2, 16, dtype=torch.long, device="meta"), 16)   # a read would raise
    check_positions(make_batch(torch.zeros(1, 24, dtype=torch.long), [[8, 8, 8]]).positions, 16)
    with pytest.raises(ValueError, match="position reaches 19 but model.max_seq_len = 16"):
        check_positions(make_batch(torch.zeros(1, 24, dtype=torch.long), [[4, 20]]).positions, 16)


class _Counts(torch.Tensor):
    """int64 counts that count how often the host reads them."""

    reads = 0

    def tolist(self):
        type(self).reads += 1
        return super().tolist()

    def __int__(self):
        type(self).reads += 1
        return super().__int__()

    def __index__(self):
        type(self).reads += 1
        return super().__index__()


def test_fp8_expert_loop_reads_counts_once_per_layer_and_unbinds_the_weights():
    E, D = 6, 16
    linear_weights = []

    def linear(x, w):
        linear_weights.append(w)
        return x @ w.t()
    ex = FP8GroupedExperts(E, D, D, layer=1, backend="emulate", linear=linear)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    counts = torch.tensor([3, 0, 5, 1, 2, 4]).as_subclass(_Counts)
    x = torch.randn(15, D)
    _Counts.reads = 0
    y = ex(x, counts)
    assert _Counts.reads == 1
    # unbind(0) views, not w[e] selects: one backward node for all experts of a weight
    assert {type(w.grad_fn).__name__ for w in linear_weights} == {"UnbindBackward0"}
    y.sum().backward()
    assert ex.w_gate.grad[1].abs().sum() == 0 and ex.w_gate.grad[0].abs().sum() > 0


def _tiny_cfg(*extra):
    from trainer.config import load_config
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["model.vocab_size=512", "train.micro_batch_size=2",
                                             "train.grad_accum=2", "data.seq_len=128", *extra])


@cuda
@pytest.mark.parametrize("extra", [[], ["fp8.enabled=true", "fp8.backend=torch", "fp8.recipe=rowwise"]],
                         ids=["bf16", "fp8-rowwise"])
def test_cuda_training_step_has_no_host_sync(extra):
    from parallel.config import ParallelConfig
    from parallel.engine import build_engine
    from parallel.topology import Topology
    from trainer.train import fp8_provider
    cfg = _tiny_cfg(*extra)
    device = torch.device("cuda")
    torch.manual_seed(0)
    provider, fp8_context = fp8_provider(cfg)
    engine = build_engine(cfg, Topology.from_config(ParallelConfig(), world_size=1, rank=0), device,
                          torch.bfloat16, provider, fp8_context)
    g = torch.Generator().manual_seed(0)

    def step(check: bool):
        tokens = [torch.randint(0, 512, (2, 128), generator=g) for _ in range(2)]
        if check:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")   # any synchronising call below raises
        try:
            batches = [make_batch(t, [[100, 28], [128]], device) for t in tokens]
            losses = []
            for batch in batches:
                with engine.make_context():
                    out = engine.model(batch)
                (out.loss / len(batches)).backward()
                losses.append(out.loss.detach())
            engine.apply(1e-3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return torch.stack(losses)
    step(check=False)                                    # warm-up: lazy init, compiled kernels
    losses = step(check=True)
    assert torch.isfinite(losses).all()
