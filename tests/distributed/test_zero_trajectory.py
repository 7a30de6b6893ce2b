"""ZeRO-1 over 20 steps follows the same loss trajectory as plain data parallelism.

Two ranks, dp = 2, the tiny model with a small vocabulary, two random batches per rank cycled.
Both runs start from the same seeded weights on each rank. Plain data parallel:
`_average_gradients` below (all-reduce, mean over dp), global-norm clipping and the
project's AdamW on full replicas. ZeRO-1: `ZeroAdamW` (reduce-scatter, sharded fp32 master and moments,
all-gather). Same arithmetic up to reduction order, so the per-step losses agree to rtol 1e-5 over all
20 steps (they drift apart if the shards, clipping or bias correction were wrong).
"""
import torch

from tests.distributed.spawn import run_ranks

STEPS, LR, CLIP = 20, 3e-3, 0.5


def _cfg():
    from trainer.config import Config
    cfg = Config()
    cfg.model.vocab_size = 256
    cfg.model.num_layers = 2
    cfg.moe.bias_update_speed = 0.01
    return cfg


def _batch(rank, step, cfg, L=32):
    from model.batch import make_batch
    g = torch.Generator().manual_seed(1000 * step + rank)
    return make_batch(torch.randint(0, cfg.model.vocab_size, (2, L), generator=g), [[L], [L // 2, L // 2]])


def _average_gradients(model, topology) -> None:
    """Plain (non-ZeRO) data parallel: gradients all-reduced over dp and averaged (no experts
    are sharded here, so every parameter is replicated over dp)."""
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, group=topology.group("dp"))
            p.grad.div_(topology.dp)


def _train(rank, world, zero: bool) -> list[float]:
    from parallel.config import ParallelConfig
    from parallel.data_parallel import ZeroAdamW
    from parallel.expert import global_expert_counts
    from parallel.topology import Topology
    from model.transformer import build_model
    from parallel.adamw import AdamW, param_groups

    cfg = _cfg()
    topo = Topology.from_config(ParallelConfig(), world_size=world, rank=rank)
    torch.manual_seed(0)
    model = build_model(cfg)
    if zero:
        opt = ZeroAdamW(model, topo, lr=LR, weight_decay=0.1, grad_clip=CLIP)
    else:
        opt = AdamW(param_groups(model, 0.1), lr=LR)
    losses = []
    for step in range(STEPS):
        out = model(_batch(rank, step % 2, cfg))  # two batches per rank, cycled: learnable
        out.loss.backward()
        if zero:
            opt.step(LR)
        else:
            _average_gradients(model, topo)
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        model.zero_grad(set_to_none=True)
        model.update_router_bias(global_expert_counts(out.expert_counts, topo))
        mean = torch.tensor([out.loss.item()], dtype=torch.float64)
        torch.distributed.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def _both(rank, world):
    return _train(rank, world, zero=False), _train(rank, world, zero=True)


def test_zero1_matches_plain_data_parallel_for_20_steps():
    (plain, zero), (plain1, zero1) = run_ranks(_both, 2)
    assert plain == plain1 and zero == zero1          # every rank logs the same global loss
    assert plain[-1] < plain[0] - 0.5                 # the runs actually train
    for step, (a, b) in enumerate(zip(plain, zero)):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)


def _overlap_vs_after(rank, world):
    """ep=2 x dp=2 (4 ranks): the same step with reduce-scatters started from gradient hooks during
    backward and with all of them issued after backward gives bitwise-equal parameters."""
    from parallel.config import ParallelConfig
    from parallel.data_parallel import ZeroAdamW
    from parallel.expert import parallelize_experts
    from parallel.topology import Topology
    from model.transformer import build_model

    cfg = _cfg()
    topo = Topology.from_config(ParallelConfig(ep=2), world_size=world, rank=rank, num_experts=cfg.moe.num_experts)
    params, launched = [], []
    for overlap in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg)
        parallelize_experts(model, topo)
        opt = ZeroAdamW(model, topo, lr=LR, weight_decay=0.1, grad_clip=CLIP, bucket_mb=0.05)
        for step in range(2):
            if overlap:
                opt.overlap_next_backward()
            model(_batch(rank, step, cfg)).loss.backward()
            opt.step(LR)
            model.zero_grad(set_to_none=True)
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        launched.append(opt.launched_in_backward)
    return torch.equal(params[0], params[1]), launched, len(opt.buckets)


def test_reduce_scatter_overlapped_with_backward_is_bitwise_identical():
    for same, launched, buckets in run_ranks(_overlap_vs_after, 4):
        assert same
        assert launched[0] == 0 and launched[1] > 0 and buckets > 2  # some buckets left during backward
