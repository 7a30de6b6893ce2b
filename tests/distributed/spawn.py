"""One small helper to run a function on N real gloo ranks, one process each.

`run_ranks(fn, world_size, *args)` starts `world_size` processes, builds a gloo process
group in each (a fresh free port per call), runs `fn(rank, world_size, *args)` and returns the
per-rank return values in rank order. A rank that raises makes the call raise with that rank's
traceback; a hang past `timeout` kills every rank and raises. `fn` must be importable (a
module-level function).

Ranks come from a fork server (multiprocessing's "forkserver"): one clean process that imports
torch and the project's packages once (`PRELOAD`), before any thread pool exists, and forks each
rank from that state. A rank starts in well under a second instead of importing torch anew (about
2 s of CPU per rank when spawned), and the calling process, which has started torch's thread pools,
is never forked (that can deadlock). The server starts at the first call and keeps the environment
of that moment: pass `env` for what a rank needs set. What a rank prints goes to the server's
stdout and stderr; its exception comes back as the call's error.
"""
from __future__ import annotations

import os
import queue as queue_lib
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, env, group, results):
    import torch
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), **env})
    torch.set_num_threads(1)
    try:
        if group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # report any failure, including asserts, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "model.transformer", "parallel.engine",
           "trainer.train", "trainer.loop", "data.stream", "tests.distributed.spawn"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(fn, world_size: int, *args, timeout: float = 240.0, env: dict | None = None,
              group: bool = True) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return values in rank order.
    `group=False`: the launcher's environment only (MASTER_ADDR, RANK, WORLD_SIZE, ...), for a
    `fn` that builds its own process group, as the trainer does under torchrun."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, env or {}, group, results),
                         daemon=group)  # the trainer's ranks may start data-preparation workers
             for r in range(world_size)]
    for p in procs:
        p.start()
    values, errors = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue_lib.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(values))} did not "
                                   f"finish within {timeout:.0f} s (deadlock?)") from None
            if ok:
                values[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break  # the other ranks may now hang on a collective; do not wait for them
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return [values[r] for r in range(world_size)]
