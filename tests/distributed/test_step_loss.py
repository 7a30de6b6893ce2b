"""One loss for every layout: on a global batch whose rows hold very different numbers of
targets (uneven documents and padding), the first step's losses (total, lm, MTP, balance) and
gradient norm are the same in one process, with 2 micro-batches, at dp 2, at dp 2 x ep 2 and at
pp 2 (4 micro-batches of one row): the step's loss is the sum of its token losses divided by its
number of targets (`parallel.engine.base.with_step_counts`), not a mean of per-rank or
per-micro-batch means."""
import pytest
import torch

from model.batch import make_batch
from parallel.config import ParallelConfig
from parallel.engine import build_engine
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from trainer.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss")
L = 16
DOCS = [[16], [3, 2], [9, 6], [1]]   # targets per row: 15, 3, 13, 0 (one row of padding only)


def _cfg(*extra):
    return load_config(None, ["model.vocab_size=64", f"model.max_seq_len={L}", f"data.seq_len={L}",
                              "model.num_layers=2", "model.first_k_dense=0", "model.hidden_size=16",
                              "model.dense_ffn_size=16", "moe.expert_ffn_size=8", "attention.num_heads=2",
                              "moe.seq_aux_loss_alpha=0.01", "mtp.depth=1", "train.micro_batch_size=1",
                              "train.device=cpu", "train.dtype=fp32", *extra])


def _rows(idx):
    tokens = torch.randint(0, 64, (len(DOCS), L), generator=torch.Generator().manual_seed(5))
    return make_batch(tokens[idx], [DOCS[i] for i in idx])


def _step(cfg, topo, micro_rows):
    engine = build_engine(cfg, topo, torch.device("cpu"))
    m = engine.reduce_metrics(engine.forward_backward([_rows(r) for r in micro_rows]))
    return [*m.losses(), engine.reduce_and_norm()]


def _one_process(micro_rows):
    cfg = _cfg(f"train.grad_accum={len(micro_rows)}")
    return _step(cfg, Topology.from_config(cfg.parallel, world_size=1, rank=0), micro_rows)


def _two_ranks(rank, world):
    out = {}
    for name, par, micro_rows in (("dp2", [], [[2 * rank, 2 * rank + 1]]),
                                  ("dp2_ep2", ["parallel.ep=2"], [[rank], [2 + rank]]),
                                  ("pp2", ["parallel.pp=2", "parallel.schedule=1f1b"], [[0], [1], [2], [3]])):
        cfg = _cfg(f"train.grad_accum={len(micro_rows)}", *par)
        topo = Topology.from_config(ParallelConfig(**{k: getattr(cfg.parallel, k) for k in ("pp", "ep")}),
                                    num_experts=cfg.moe.num_experts)
        out[name] = _step(cfg, topo, micro_rows)
    return out


def test_first_step_loss_and_grad_norm_equal_at_every_layout():
    ref = _one_process([[0, 1, 2, 3]])
    got = {"grad_accum2": _one_process([[0, 1], [2, 3]])}
    ranks = run_ranks(_two_ranks, 2)
    for name in ranks[0]:
        assert ranks[0][name] == pytest.approx(ranks[1][name], rel=1e-12), name  # every rank logs the same
        got[name] = ranks[0][name]
    for name, values in got.items():
        for key, want, value in zip((*KEYS, "grad_norm"), ref, values):
            assert value == pytest.approx(want, rel=1e-5), (name, key)
    # the old mean of per-micro-batch means is 10x the tolerance away (at init, where every token's
    # loss is near ln V): the test tells the two apart
    halves = [_one_process([r]) for r in ([0, 1], [2, 3])]
    assert abs((halves[0][1] + halves[1][1]) / 2 - ref[1]) > 1e-4 * ref[1]
