"""The one table of hardware numbers the planner uses (`python -m trainer.plan --gpu KIND`).

Per GPU, from the vendors' data sheets (dense numbers, no sparsity):
  peak_bf16 / peak_fp8   tensor-core TFLOP/s of the SXM part;
  memory_gib             HBM capacity (the 80 GB parts hold 80 GiB);
  nvlink_gbps            NVLink bandwidth per direction, GB/s (H800: NVLink cut to 400 GB/s both
                         ways; DeepSeek-V3 section 3.2.2 reaches about 160 GB/s of it);
  net_gbps               inter-node bandwidth per GPU and direction, GB/s: one 400 Gb/s
                         InfiniBand NIC per GPU = 50 GB/s (DeepSeek-V3 section 3.2.2: IB 50 GB/s).
The planner applies efficiencies on top (`Efficiency`): the share of peak a well-tuned kernel
sustains. They are planning assumptions, not measurements of this project: CPU runs calibrate
the shape of the model (benchmarks/RESULTS.md), and a GPU run is what fixes these numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class GPU:
    name: str
    peak_bf16: float      # TFLOP/s
    peak_fp8: float       # TFLOP/s
    memory_gib: float
    nvlink_gbps: float    # GB/s per direction
    net_gbps: float       # GB/s per direction per GPU, across nodes

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h800", peak_bf16=989.0, peak_fp8=1979.0, memory_gib=80, nvlink_gbps=200.0, net_gbps=50.0),
    GPU("h100", peak_bf16=989.0, peak_fp8=1979.0, memory_gib=80, nvlink_gbps=450.0, net_gbps=50.0),
    GPU("h200", peak_bf16=989.0, peak_fp8=1979.0, memory_gib=141, nvlink_gbps=450.0, net_gbps=50.0),
    GPU("b200", peak_bf16=2250.0, peak_fp8=4500.0, memory_gib=180, nvlink_gbps=900.0, net_gbps=50.0),
)}


@dataclass(frozen=True)
class Efficiency:
    """Shares of the peaks that the planner assumes are sustained."""

    gemm: float = 0.55          # of peak_bf16 / peak_fp8 for the matmul FLOPs
    attention: float = 0.40     # of peak_bf16 for the attention core
    nvlink: float = 0.8
    net: float = 0.8
    reserved_gib: float = 4.0   # CUDA context, communication buffers, allocator slack


def gpu_kind(name: str) -> GPU:
    """The table row of `name`; ValueError naming the value and the kinds known."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"--gpu {name}: not in the hardware table; use one of {', '.join(GPUS)} "
                         f"(or add a row to trainer/plan/hardware.py)")
    return GPUS[key]
