"""Every tensor handed to a collective lives on the device of the data, never on the host by default.

An NCCL group takes CUDA tensors only; a tensor built without `device=` lands on the host and
the collective fails on the first multi-GPU step ("No backend type associated with device type
cpu"). CPU cannot show that mistake directly, so these tests make it visible: the training step
runs with the default device set to `meta` while the model and the batches are on the CPU. A
tensor built without an explicit device is then a meta tensor, which gloo refuses exactly as
NCCL refuses a host tensor; tensors built on the data's device stay on the CPU and go through.
Covered on real gloo ranks: the expert all-to-all (count and row exchanges, both directions),
ZeRO-1 reduce-scatters, norms and all-gathers, the pipeline's headers, activations and shared
gradients, metric reductions and the stop agreement.
"""
import pytest
import torch

from model.batch import make_batch
from parallel.config import ParallelConfig
from parallel.engine import build_engine
from parallel.expert import AllToAllDispatcher
from parallel.topology import Topology
from tests.distributed.collective_check import DeviceCheck
from tests.distributed.spawn import run_ranks
from trainer.config import load_config

CPU = torch.device("cpu")


def _cfg(*extra):
    return load_config(None, [*extra, "model.vocab_size=64", "model.max_seq_len=8", "data.seq_len=8",
                              "model.num_layers=4", "model.first_k_dense=1", "model.hidden_size=16",
                              "model.dense_ffn_size=16", "moe.expert_ffn_size=16", "attention.num_heads=2",
                              "train.grad_accum=2", "train.micro_batch_size=2", "mtp.depth=1"])


def _batches(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [make_batch(torch.randint(0, 64, (2, 8), generator=g), [[3, 5], [8]], CPU) for _ in range(n)]


def _step(cfg, topo):
    """One whole training step with the default device set to meta; returns the loss."""
    engine = build_engine(cfg, topo, CPU)
    batches = _batches(topo.dp_rank, cfg.train.grad_accum)
    with DeviceCheck(CPU) as check, torch.device("meta"):
        m = engine.reduce_metrics(engine.forward_backward(batches))
        norm = engine.reduce_and_norm()
        engine.apply(1e-3)
        stop = engine.agree_stop(False)
    assert not stop and m.loss == m.loss and norm == norm
    return sorted(check.names())


def _dispatch(topo):
    g = torch.Generator().manual_seed(topo.rank)
    x = torch.randn(6, 16, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=g)
    disp = AllToAllDispatcher(8, topo, node_limited=True)
    with DeviceCheck(CPU) as check, torch.device("meta"):
        x_SD, counts, state = disp.dispatch(x, ids, w)
        disp.combine(x_SD * 2, state).sum().backward()
    assert x_SD.device == counts.device == x.grad.device == CPU
    return sorted(check.names())


def _cases(rank, world):
    two_nodes = Topology.from_config(ParallelConfig(ep=4, ranks_per_node=2))     # two hops: inter, intra
    out = {"dispatch": _dispatch(two_nodes)}
    out["zero_ep2"] = _step(_cfg("parallel.ep=2"), Topology.from_config(ParallelConfig(ep=2)))
    out["pipeline"] = _step(_cfg("parallel.pp=2", "parallel.ep=2", "parallel.schedule=1f1b"),
                            Topology.from_config(ParallelConfig(pp=2, ep=2)))
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_cases, 4)


def test_expert_all_to_all_keeps_every_exchange_on_the_data_device(results):
    for r in results:
        assert r["dispatch"] == ["all_to_all_single"]


def test_zero_and_pipeline_steps_hand_collectives_device_tensors_only(results):
    # the check saw every kind of collective a step issues (a rank that raised fails the fixture)
    for r in results:
        assert {"all_to_all_single", "all_reduce", "all_gather_flat"} <= set(r["zero_ep2"])
        assert any(name.startswith("reduce_scatter") for name in r["zero_ep2"])
        assert {"batch_isend_irecv", "all_to_all_single", "all_reduce"} <= set(r["pipeline"])
