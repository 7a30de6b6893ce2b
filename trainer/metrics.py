"""Per-step metrics: a readable console line, a JSONL file, and TensorBoard events.

Throughput: tokens/s counts every token position processed (padding included, as Megatron does)
over the wall time of the step. Model FLOPs come from `trainer.flops.flops_per_token` (6 x
activated parameters per token for forward+backward plus the attention score/value products; the
formula is documented there); TFLOP/s = tokens/s x FLOPs/token, MFU = that / the device's peak
dense TFLOP/s. Load balance: MaxVio = max(load)/mean(load) - 1 per MoE layer (DeepSeek-V3's
ablations use it), averaged over MoE layers.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

log = logging.getLogger("moepipe")

# Peak dense bf16 TFLOP/s (no sparsity) by device-name substring.
PEAK_TFLOPS = {"H100": 989.0, "H800": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
               "B200": 2250.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(configured: float, device: torch.device) -> float | None:
    """The configured peak, else a lookup by CUDA device name; None when unknown (CPU)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def max_violation(counts: torch.Tensor) -> float:
    """Mean over MoE layers of max(load)/mean(load) - 1; counts is [n_moe_layers, num_experts]."""
    if counts is None or counts.numel() == 0:
        return 0.0
    counts = counts.float()
    mean = counts.mean(dim=1).clamp_min(1e-9)
    return (counts.max(dim=1).values / mean - 1).mean().item()


def setup_logging(output_dir: str | None, rank: int = 0) -> None:
    """Console on rank 0 (warnings elsewhere), plus output_dir/train.log."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    log.handlers.clear()
    log.setLevel(level)
    log.propagate = False
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    log.addHandler(console)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        file = logging.FileHandler(os.path.join(output_dir, "train.log"))
        file.setFormatter(fmt)
        log.addHandler(file)


class MetricsWriter:
    """Writes every step to metrics.jsonl and TensorBoard; prints every `every` steps. Rank 0 only."""

    def __init__(self, output_dir: str, every: int, tensorboard: bool, enabled: bool = True):
        self.every = every
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: slow import
            self._tb = SummaryWriter(os.path.join(output_dir, "tb"))

    def write(self, step: int, total: int, m: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **m}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in m.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if step % self.every == 0 or step == total or step == 1:
            log.info(format_line(step, total, m))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def format_line(step: int, total: int, m: dict) -> str:
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    line = (f"step {step:>6}/{total} | loss {m['loss']:.4f} | lm {m['lm_loss']:.4f} | mtp {m['mtp_loss']:.4f} "
            f"| bal {m['balance_loss']:.2e} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} "
            f"| tok/s {m['tokens_per_s']:,.0f} | TFLOP/s {m['tflops']:.3f} | MFU {mfu} | maxvio {m['maxvio']:.3f}")
    if "a2a_cross_node_MB" in m:
        line += f" | a2a MB x-node {m['a2a_cross_node_MB']:.2f} in-node {m['a2a_intra_node_MB']:.2f}"
    return line


class StepTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.t0
