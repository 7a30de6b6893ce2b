"""Per-step metrics: a readable console line, a JSONL file, and TensorBoard events.

Throughput: tokens/s counts every token position processed (padding included, as Megatron does)
over the wall time of the step. Model FLOPs come from `trainer.plan.flops.flops_per_token` (6 x
activated parameters per token for forward+backward plus the attention score/value products; the
formula is documented there); TFLOP/s = tokens/s x FLOPs/token, MFU = that / the device's peak
dense TFLOP/s. Load balance: MaxVio = max(load)/mean(load) - 1 per MoE layer (DeepSeek-V3's
ablations use it), averaged over MoE layers; at logged steps the record also carries
`expert_load`, each MoE layer's fraction of routed tokens per expert (for the heatmap of
`trainer.plot`).

Time: every console line shows the elapsed wall time, the ETA (this process's mean seconds per
token times the tokens left when train.tokens is set, as a batch-size ramp makes later steps
bigger; else its mean seconds per step times the steps left), tokens/s averaged over the steps since the previous line (single
steps swing with load), and peak memory (the CUDA allocator's peak, or the process's peak RSS
on CPU). `summary` closes the run: steps, time, mean throughput, best validation loss and where
the checkpoints, metrics and plots are.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time

import torch

from trainer.phases import format_tokens

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


def expert_load(counts: torch.Tensor) -> list[list[float]]:
    """Per MoE layer, each expert's fraction of the layer's routed tokens ([n_moe_layers][E])."""
    counts = counts.double()
    return (counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-12)).tolist()


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated by this process, or (CPU) its peak resident set size, in MiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def setup_logging(output_dir: str | None, rank: int = 0) -> None:
    """Console on rank 0 (warnings elsewhere), plus output_dir/train.log."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    log.handlers.clear()
    log.setLevel(level)
    log.propagate = False
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    console.addFilter(lambda record: not getattr(record, "file_only", False))  # the resolved config
    log.addHandler(console)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        file = logging.FileHandler(os.path.join(output_dir, "train.log"))
        file.setFormatter(fmt)
        log.addHandler(file)


class MetricsWriter:
    """Writes every step to metrics.jsonl and TensorBoard; prints every `every` steps. Rank 0 only."""

    def __init__(self, output_dir: str, every: int, tensorboard: bool, enabled: bool = True,
                 wandb: dict | None = None, config: dict | None = None):
        self.every = every
        self.enabled = enabled
        self.output_dir = output_dir
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._t0 = time.perf_counter()
        self._steps = 0                    # steps written by this process
        self._tokens = self._seconds = 0.0          # whole run (this process)
        self._win_tokens = self._win_seconds = 0.0  # since the last console line
        self.best_val: tuple[float, int] | None = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: slow import
            self._tb = SummaryWriter(os.path.join(output_dir, "tb"))
        if wandb:
            from trainer.wandb_log import open_run
            self._wandb = open_run(wandb, config or {}, output_dir)

    def write(self, step: int, total: int, m: dict) -> None:
        counts = m.pop("expert_counts", None)
        if not self.enabled:
            return
        printed = step % self.every == 0 or step == total or step == 1
        self._account(step, total, m, printed)
        if printed and counts is not None and counts.numel():
            m["expert_load"] = expert_load(counts)
        self._jsonl.write(json.dumps({"step": step, **m}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in m.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            from trainer.wandb_log import scalars
            self._wandb.log(scalars(m), step=step)
        if printed:
            log.info(format_line(step, total, m))

    def _account(self, step: int, total: int, m: dict, printed: bool) -> None:
        """Adds elapsed_s, eta_s, peak_mem_MB (and at printed steps tokens_per_s_window) to m."""
        tokens = m.get("tokens_per_s", 0.0) * m.get("step_time", 0.0)
        self._steps += 1
        self._tokens += tokens
        self._seconds += m.get("step_time", 0.0)
        self._win_tokens += tokens
        self._win_seconds += m.get("step_time", 0.0)
        elapsed = time.perf_counter() - self._t0
        m.update(elapsed_s=elapsed, eta_s=eta_seconds(elapsed, self._steps, self._tokens, step, total, m),
                 peak_mem_MB=peak_memory_mb())
        if isinstance(m.get("val_loss"), float) and (self.best_val is None or m["val_loss"] < self.best_val[0]):
            self.best_val = (m["val_loss"], step)
        if printed:
            m["tokens_per_s_window"] = self._win_tokens / self._win_seconds if self._win_seconds else 0.0
            self._win_tokens = self._win_seconds = 0.0

    def summary(self, step: int, checkpoints: str | None, plots: list[str] | None,
                first_eval: int | None = None) -> str:
        """The closing lines of a run (logged and returned); `first_eval`: the step of the first
        validation when it is configured, None when it is not."""
        elapsed = time.perf_counter() - self._t0
        mean = self._tokens / self._seconds if self._seconds else 0.0
        if self.best_val:
            best = f"best validation loss {self.best_val[0]:.4f} at step {self.best_val[1]}"
        elif first_eval:
            best = f"no validation loss yet (the first is due at step {first_eval})"
        else:
            best = "no validation loss (set data.valid_fraction > 0 and eval.every)"
        text = (f"done: {self._steps} steps this session (at step {step}) in {format_duration(elapsed)}, "
                f"mean {mean:,.0f} tokens/s, peak memory {peak_memory_mb():,.0f} MiB; {best}\n"
                f"  checkpoints: {checkpoints or 'none written'}\n"
                f"  metrics:     {os.path.join(self.output_dir, 'metrics.jsonl')}\n"
                f"  plots:       {os.path.dirname(plots[0]) if plots else 'none'}")
        if self.enabled:
            log.info(text)
        return text

    def flush(self) -> None:
        if self._jsonl:
            self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def eta_seconds(elapsed: float, steps: int, tokens: float, step: int, total: int, m: dict) -> float:
    """Time left: by tokens when the run ends at train.tokens (`tokens_total` in m), else by steps."""
    if step >= total:
        return 0.0
    if m.get("tokens_total") and tokens:
        return elapsed / tokens * max(m["tokens_total"] - m.get("tokens", 0), 0)
    return elapsed / steps * (total - step)


def format_line(step: int, total: int, m: dict) -> str:
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    tps = m.get("tokens_per_s_window", m["tokens_per_s"])
    tflops = m["tflops"] * tps / m["tokens_per_s"] if m["tokens_per_s"] else m["tflops"]  # window mean too
    if m.get("mfu") is not None and m["tflops"]:
        mfu = f"{100 * m['mfu'] * tflops / m['tflops']:.1f}%"
    line = (f"step {step:>6}/{total} | loss {m['loss']:.4f} | lm {m['lm_loss']:.4f} | mtp {m['mtp_loss']:.4f} "
            f"| bal {m['balance_loss']:.2e} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} "
            f"| tok/s {tps:,.0f} | TFLOP/s {tflops:.3f} | MFU {mfu} | maxvio {m['maxvio']:.3f}")
    if "tokens" in m:
        line += f" | tokens {format_tokens(m['tokens'])} | batch {m['global_batch']} ({m['grad_accum']} mb)"
        if m.get("phase"):
            line += f" | phase {m['phase']}"
    if "val_loss" in m:
        line += f" | val {m['val_loss']:.4f} ppl {m['val_ppl']:.1f}"
        if m.get("val_mtp_loss") is not None:
            line += f" mtp {m['val_mtp_loss']:.4f}"
        if m.get("val_tokens"):
            line += f" on {m['val_tokens']:,} tok"
    if "elapsed_s" in m:
        line += (f" | {format_duration(m['elapsed_s'])} elapsed, ETA {format_duration(m['eta_s'])} "
                 f"| mem {m['peak_mem_MB']:,.0f} MiB")
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


def read_metrics(output_dir: str) -> list[dict]:
    """Records of output_dir/metrics.jsonl sorted by step, one per step (the last written wins)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    by_step: dict[int, dict] = {}
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed process
    return [by_step[s] for s in sorted(by_step)]
