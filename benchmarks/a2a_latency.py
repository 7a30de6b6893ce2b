"""An artificial all-to-all latency for benchmarks on loopback gloo (expert parallelism, DeepSeek-V3
section 3.2.2).

Loopback gloo moves the expert-parallel rows in microseconds, so hiding an all-to-all behind
compute (DeepSeek-V3 section 3.2.1) cannot show. `LatencyInjector.install()` wraps
`dist.all_to_all_single` in this process: every row exchange (2-D tensors; the tiny count
exchanges are left alone) completes no earlier than `delay_s` after it was issued, as on a real
network. The delay sits in the completion (`wait()` of the work handle), so a blocking exchange
pays it in full and an asynchronous one only for the part not hidden behind other work; every
runtime that goes through the dispatcher gets the very same latency. `blocked_s` accumulates the
seconds spent waiting on row exchanges.
"""
from __future__ import annotations

import time

import torch.distributed as dist


class _Late:
    """A row exchange's work handle that completes no earlier than `t0 + delay_s`."""

    def __init__(self, work, t0: float, injector: "LatencyInjector"):
        self.work, self.t0, self.injector = work, t0, injector

    def wait(self) -> bool:
        t = time.perf_counter()
        if self.work is not None:
            self.work.wait()
        time.sleep(max(0.0, self.t0 + self.injector.delay_s - time.perf_counter()))
        self.injector.blocked_s += time.perf_counter() - t
        return True


class LatencyInjector:
    """Holds the latency (settable between steps) and the blocked time of this process."""

    def __init__(self, delay_s: float = 0.0):
        if delay_s < 0:
            raise ValueError(f"all-to-all latency = {delay_s} s: must be >= 0")
        self.delay_s, self.blocked_s = delay_s, 0.0
        self._real = None

    def install(self) -> "LatencyInjector":
        assert self._real is None, "installed twice"
        self._real = real = dist.all_to_all_single

        def wrapped(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            t0 = time.perf_counter()
            work = real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
            if input.dim() < 2:
                return work
            late = _Late(work, t0, self)
            if async_op:
                return late
            late.wait()
            return None

        dist.all_to_all_single = wrapped
        return self

    def uninstall(self) -> None:
        if self._real is not None:
            dist.all_to_all_single, self._real = self._real, None
