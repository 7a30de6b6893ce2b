"""Shared experts during the dispatch (ep = 2, 2 gloo ranks): run piece by piece
(`pieces.stage_steps`), every MoE block computes its shared experts while its dispatch is in
flight, and their weight gradients while the dispatch's gradients travel back; losses and every
gradient equal the serial order (`model(batch)` with blocking exchanges, shared experts after
the routed ones) on the same ranks, with and without piecewise recomputation; with
`shared_in_flight=False` the pieces keep the serial order (what the benchmark compares against). (The MTP
module's MoE block runs whole, inside the head's losses.)"""
import pytest
import torch
import torch.distributed as dist

from model.batch import make_batch
from model.transformer import build_model
from parallel.config import ParallelConfig
from parallel.expert import parallelize_experts
from parallel.pipeline.pieces import stage_steps
from parallel.steps import drain
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from trainer.config import load_config

N = 2


def _cfg():
    return load_config(None, ["model.vocab_size=64", "model.max_seq_len=8", "data.seq_len=8", "model.num_layers=2",
                              "model.first_k_dense=0", "model.hidden_size=16", "model.dense_ffn_size=16",
                              "moe.expert_ffn_size=8", "attention.num_heads=2", "moe.seq_aux_loss_alpha=0.01",
                              "moe.num_shared_experts=1"])


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [make_batch(torch.randint(0, 64, (2, 8), generator=g), [[3, 5], [8]]) for _ in range(N)]


class _InFlight:
    """Wraps torch.distributed's all_to_all_single: counts row exchanges issued and not yet waited for."""

    def __init__(self):
        self.open, self.inner = 0, dist.all_to_all_single

    def __call__(self, *args, async_op=False, **kwargs):
        work = self.inner(*args, async_op=async_op, **kwargs)
        if not async_op:
            return work
        self.open += 1
        return _Work(work, self)

    def __enter__(self):
        dist.all_to_all_single = self
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.inner


class _Work:
    def __init__(self, work, owner):
        self.work, self.owner, self.waited = work, owner, False

    def wait(self):
        self.work.wait()
        if not self.waited:
            self.waited, self.owner.open = True, self.owner.open - 1
        return True


def _run(topo, pieces: bool, recompute: bool = False, shared_in_flight: bool = True):
    torch.manual_seed(0)
    model = build_model(_cfg())
    parallelize_experts(model, topo)
    seen = {"forward": [], "backward": []}
    with _InFlight() as flight:
        for moe in [block.ffn for block in model.blocks()]:  # the MTP module's block runs whole
            moe.shared.register_forward_hook(lambda *_: seen["forward"].append(flight.open))
            for p in moe.shared.parameters():
                p.register_post_accumulate_grad_hook(lambda _p: seen["backward"].append(flight.open))
        losses = []
        stage = model.stage(model.owned, embed=True, head=True)
        for batch in _batches(topo.dp_rank):
            if pieces:
                res = drain(stage_steps(stage, batch, None, recompute, shared_in_flight))
                drain(res.tape.backward_steps([res.loss / N], [None]))
                losses.append(res.loss.item())
            else:
                out = model(batch)
                (out.loss / N).backward()
                losses.append(out.loss.item())
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
    return losses, grads, seen


def _rank(rank, world):
    topo = Topology.from_config(ParallelConfig(ep=2))
    serial = _run(topo, pieces=False)
    return (serial, _run(topo, pieces=True), _run(topo, pieces=True, recompute=True),
            _run(topo, pieces=True, shared_in_flight=False))


@pytest.fixture(scope="module")
def results():
    return run_ranks(_rank, 2)


def test_pieces_can_run_the_shared_experts_after_the_routed_ones(results):
    for res in results:
        (ref_losses, ref_grads, _), (losses, grads, seen) = res[0], res[3]
        assert seen["forward"] and all(n == 0 for n in seen["forward"]), seen
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=1e-6)
        for k, g in grads.items():
            torch.testing.assert_close(torch.from_numpy(g), torch.from_numpy(ref_grads[k]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("run", [1, 2], ids=["pieces", "pieces_recompute"])
def test_shared_experts_run_during_dispatch_and_match_serial(results, run):
    for r, res in enumerate(results):
        (ref_losses, ref_grads, ref_seen), (losses, grads, seen) = res[0], res[run]
        assert all(n == 0 for n in ref_seen["forward"])       # the serial order: nothing in flight
        assert seen["forward"] and all(n > 0 for n in seen["forward"]), seen
        assert seen["backward"] and all(n > 0 for n in seen["backward"]), seen
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=1e-6)
        assert set(grads) == set(ref_grads)
        for k, g in grads.items():
            torch.testing.assert_close(torch.from_numpy(g), torch.from_numpy(ref_grads[k]), rtol=1e-5, atol=1e-7, msg=lambda m: f"rank {r} {k}: {m}")
