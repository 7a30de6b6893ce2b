"""traced_collectives on 2 real gloo ranks: every collective, sync or async (through Work.wait), is
numbered per step in the heartbeat; a rank waiting for a late peer is seen, from another thread, as
inside that collective; the originals are back afterwards."""
from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from parallel.heartbeat import Heartbeat, traced_collectives
from tests.distributed.spawn import run_ranks


def _watch(beat, seen, limit=2.5):
    """From another thread, as the watchdog does: where is the training thread while it waits?"""
    end = time.monotonic() + limit
    while time.monotonic() < end and not seen:
        if beat.collective is not None and beat.seqs.get("all_reduce") == 2:
            seen.append(beat.where())
        time.sleep(0.01)


def _traced_step(rank, world):
    original = dist.all_reduce
    beat = Heartbeat(rank, world)
    seen = []
    with traced_collectives(beat):
        beat.begin_step(1)
        beat.set_phase("forward_backward")
        t = torch.ones(4)
        dist.all_reduce(t)
        if rank == 1:
            time.sleep(3.0)  # rank 0 waits in all_reduce #2 meanwhile
        else:
            threading.Thread(target=_watch, args=(beat, seen), daemon=True).start()
        dist.all_reduce(t)
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        out = torch.empty(4)
        pair = dist.new_group([0, 1])
        dist.all_to_all_single(out, torch.arange(4.0) + 10 * rank, group=pair)
        peers = beat.peers
        peer = 1 - rank
        ops = [dist.P2POp(dist.isend, torch.full((2,), float(rank)), peer),
               dist.P2POp(dist.irecv, buf := torch.empty(2), peer)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        beat.end_step()
        window = beat.take_window()
    return {"peers": peers, "seqs": beat.seqs, "seen": seen, "inside": beat.collective, "comm": window["comm"],
            "restored": dist.all_reduce is original, "sum": t.tolist(), "recv": buf.tolist()}


def test_collectives_are_named_and_numbered_on_real_ranks():
    r0, r1 = run_ranks(_traced_step, 2, timeout=120)
    for r in (r0, r1):
        assert r["seqs"] == {"all_reduce": 3, "all_to_all": 1, "send/recv": 1}
        assert r["inside"] is None and r["restored"] and r["peers"] == [0, 1]
        assert r["sum"] == [8.0] * 4  # 1 -> 2 -> 4 -> 8: the traced calls really reduced
    assert r0["recv"] == [1.0, 1.0] and r1["recv"] == [0.0, 0.0]
    assert r0["seen"] == ["all_reduce #2 of step 1"]
    assert r0["comm"] > 0 and r1["comm"] > 0
