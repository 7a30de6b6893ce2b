"""The multi-process helper itself: real gloo collectives, errors and hangs surface."""
import pytest
import torch
import torch.distributed as dist

from tests.distributed.spawn import run_ranks


def _all_reduce(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _uneven_all_to_all(rank, world):
    # rank r sends (j + 1) elements to rank j, each element = 10 * r + j
    send = torch.cat([torch.full((j + 1,), 10.0 * rank + j) for j in range(world)])
    recv = torch.empty((rank + 1) * world)
    dist.all_to_all_single(recv, send, [(rank + 1)] * world, [j + 1 for j in range(world)])
    return recv.tolist()


def _fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()


def test_all_reduce_on_four_ranks():
    assert run_ranks(_all_reduce, 4) == [10.0] * 4


def test_uneven_all_to_all_single():
    out = run_ranks(_uneven_all_to_all, 3)
    for rank, recv in enumerate(out):
        expect = [10.0 * src + rank for src in range(3) for _ in range(rank + 1)]
        assert recv == expect


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_ranks(_fail_on_rank_one, 2, timeout=60)
