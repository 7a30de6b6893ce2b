"""How many intra-op threads a CPU run uses: the cores this process may really use, shared among
the ranks of its node.

PyTorch's default is one thread per visible core. On a laptop or a shared node where other jobs
hold cores, OpenMP threads then wait for each other at every parallel region: measured on a
2-core machine with other work running, the tiny run did ~300 tokens/s with 2 threads and
1,000-1,200 with 1 thread, with the same losses. The count here is the smallest of: the CPU
affinity mask, the cgroup CPU quota, and the cores not busy with other processes (the 1-minute
load average at start), divided among the local ranks. `OMP_NUM_THREADS` set by the user wins
(torchrun sets it to 1 for several local ranks). fp32 sums depend slightly on the thread count, so
a CPU run that must repeat bit for bit across sessions pins OMP_NUM_THREADS.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuShare:
    affinity: int            # cores in this process's affinity mask
    quota: float | None      # cgroup CPU quota in cores, None when unlimited
    load: float              # 1-minute load average of the machine when the run starts
    local_ranks: int         # processes of this run on this node


def cgroup_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The cgroup CPU limit in cores (v2 `cpu.max` or v1 `cpu.cfs_quota_us`), None if unlimited."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def read_share() -> CpuShare:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return CpuShare(affinity, cgroup_quota(), load, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def choose_threads(share: CpuShare, env_threads: str | None) -> tuple[int, str]:
    """(threads per rank, why). Pure: the inputs are the machine's figures and OMP_NUM_THREADS."""
    if env_threads:
        try:
            return max(1, int(env_threads)), f"OMP_NUM_THREADS={env_threads}"
        except ValueError:
            pass
    cores = float(share.affinity)
    why = [f"{share.affinity} cores in the affinity mask"]
    if share.quota is not None and share.quota < cores:
        cores = share.quota
        why.append(f"cgroup quota {share.quota:g} cores")
    # Our own processes have barely started, so the load is other work: leave those cores to it.
    free = float(max(1, share.affinity - round(share.load)))
    if free < cores:
        cores = free
        why.append(f"load {share.load:.1f} from other processes")
    threads = max(1, math.floor(cores / max(1, share.local_ranks)))
    if share.local_ranks > 1:
        why.append(f"shared by {share.local_ranks} local ranks")
    return threads, ", ".join(why) + "; set OMP_NUM_THREADS to choose"


def set_cpu_threads() -> str:
    """Sets torch's intra-op threads for a CPU run; returns the log line saying what and why."""
    import torch
    threads, why = choose_threads(read_share(), os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(threads)
    return f"cpu threads: {threads} per rank ({why})"
