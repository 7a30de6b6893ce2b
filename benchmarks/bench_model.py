"""Benchmark: one training step (forward + loss + backward) of moepipe against torchtitan's DeepSeek-V3.

Models (`--models`): moepipe (routed experts as grouped GEMMs, the default path), its variants
moepipe-loop (the per-expert loop, the reference), moepipe+selective and moepipe+full (the
recomputation policies, DeepSeek-V3 section 3.2.3), and torchtitan 0.3.0's DeepSeek-V3 model
(`benchmarks/torchtitan_peer.py`) at the same dimensions holding the same weights, copied by
name. Where torchtitan cannot be imported (e.g. with a torch it was not built against), the peer
is `eager`: the same model and weights as plain eager PyTorch would write it, a per-expert loop
over the stacked weights and scaled_dot_product_attention under a dense document mask. All run alternately in one process (the order flips every round) on the same batch (one
document per row), so load from other processes hits them alike; the first losses are checked
equal (1e-5 relative in fp32) and printed. Each model computes its own loss (torchtitan: its
cross_entropy_loss over fp32 logits / non-ignored targets; moepipe: model/loss.py). The balance
loss is off (moe.seq_aux_loss_alpha = 0): torchtitan has none. torchtitan's adaptations are
printed with the table.

Columns: step ms (min and median over the rounds; wall clock, and the process's CPU time, which a
core shared with other jobs inflates less), the ratios to the peer, tokens/s (from the wall
median), MFU (tokens/s x the project's training FLOPs per token, `trainer/plan/flops.py` without MTP,
over the device's dense bf16 peak, `trainer/metrics.py`; printed above the table; n/a on CPU),
step memory and
the bytes autograd keeps for backward (exact, from a saved-tensors hook). Step memory is the
peak above the memory held before the step: on CUDA from the allocator's peak statistics, in
process; on CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs) above
the resident set before the second step of a fresh process per model, with glibc's mmap threshold
at 64 KiB so that freed tensors leave the resident set.

Sizes: tiny = configs/tiny.yaml without MTP; medium = hidden 512, 8 layers (1 dense), 8 heads,
q/kv rank 128/64, nope/rope/v 32/16/32, 16 experts top-4 + 1 shared, expert ffn 256, dense ffn
1024, vocab 8192, 4 x 512 tokens; b1 (CUDA, bf16) = about 1.4B activated parameters: hidden 2048,
16 layers (1 dense), 16 heads, q/kv rank 768/512, nope/rope/v 128/64/128, 64 experts top-6 + 2
shared, expert ffn 1408, vocab 32768, 2 x 4096 tokens. medium-2k / medium-4k = medium on one row of 2048 / 4096 tokens
(attention memory at L and 2L: no L x L tensor on moepipe's path).

    python benchmarks/bench_model.py --size tiny medium [--rounds 10] [--models moepipe torchtitan]
        [--device cpu|cuda] [--dtype fp32|bf16] [--no-memory] [--out DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import torchtitan_peer as peer  # noqa: E402
from model.batch import make_batch  # noqa: E402
from model.context import make_context  # noqa: E402
from model.transformer import build_model  # noqa: E402
from parallel.recompute import apply_recompute  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.plan.flops import flops_per_token  # noqa: E402
from trainer.metrics import peak_tflops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIUM = ["model.hidden_size=512", "model.num_layers=8", "model.first_k_dense=1", "model.dense_ffn_size=1024",
          "model.vocab_size=8192", "model.max_seq_len=512", "attention.num_heads=8", "attention.q_lora_rank=128",
          "attention.kv_lora_rank=64", "attention.qk_nope_head_dim=32", "attention.qk_rope_head_dim=16",
          "attention.v_head_dim=32", "moe.num_experts=16", "moe.topk=4", "moe.n_group=4", "moe.topk_group=2",
          "moe.num_shared_experts=1", "moe.expert_ffn_size=256", "data.seq_len=512", "train.micro_batch_size=4"]
B1 = ["model.hidden_size=2048", "model.num_layers=16", "model.first_k_dense=1", "model.dense_ffn_size=10944",
      "model.vocab_size=32768", "model.max_seq_len=4096", "attention.num_heads=16", "attention.q_lora_rank=768",
      "attention.kv_lora_rank=512", "attention.qk_nope_head_dim=128", "attention.qk_rope_head_dim=64",
      "attention.v_head_dim=128", "moe.num_experts=64", "moe.topk=6", "moe.n_group=8", "moe.topk_group=4",
      "moe.num_shared_experts=2", "moe.expert_ffn_size=1408", "data.seq_len=4096", "train.micro_batch_size=2"]
COMMON = ["mtp.depth=0", "moe.seq_aux_loss_alpha=0"]
SIZES = {"tiny": (os.path.join(ROOT, "configs", "tiny.yaml"), COMMON),
         "medium": (None, MEDIUM + COMMON), "b1": (None, B1 + COMMON),
         # the medium model on one long row: attention memory at L and 2L
         **{f"medium-{k}k": (None, MEDIUM + COMMON + [f"model.max_seq_len={1024 * k}", f"data.seq_len={1024 * k}",
                                                      "train.micro_batch_size=1"]) for k in (2, 4)},
         "micro": (os.path.join(ROOT, "configs", "tiny.yaml"),   # plumbing checks only
                   COMMON + ["model.num_layers=2", "data.seq_len=32", "train.micro_batch_size=2"])}
MODELS = ("moepipe", "moepipe-loop", "moepipe+selective", "moepipe+full", "torchtitan", "eager")
PEERS = ("torchtitan", "eager")
LOSS_RTOL = 1e-5


def size_config(size: str):
    path, sets = SIZES[size]
    return load_config(path, sets)


def size_batch(cfg, device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=g)
    return make_batch(tokens, None, device=device)


def build_moepipe(cfg, name: str, device, dtype):
    model = build_model(cfg).to(device=device, dtype=dtype)
    if name in ("moepipe-loop", "eager"):
        for mod in model.modules():
            if hasattr(mod, "reference_forward"):
                mod.forward = mod.reference_forward
    if name == "eager":   # SDPA under the dense additive document mask on every device
        model.make_context = lambda batch, m=model: make_context(batch, m.rope_cos, m.rope_sin, m.n_moe_layers,
                                                                  m.cfg.moe.num_experts, attention="dense")
    apply_recompute(model, name.split("+")[1] if "+" in name else "none")
    return model


def build_models(cfg, names, device, dtype) -> dict:
    """name -> loss function of a batch (its graph attached); torchtitan gets moepipe's weights."""
    base = build_moepipe(cfg, "moepipe", device, dtype)
    fns = {}
    for name in names:
        if name == "torchtitan":
            titan = peer.build_titan(cfg, base, device, dtype)
            fns[name] = (lambda b, m=titan: peer.titan_loss(m, b, device), titan)
        else:
            model = base if name == "moepipe" else build_moepipe(cfg, name, device, dtype)
            if model is not base:
                model.load_state_dict(base.state_dict())
            fns[name] = (lambda b, m=model: m(b).loss, model)
    return fns


def step(loss_fn, model, batch) -> int:
    """Forward + loss + backward; returns the bytes autograd saved for backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved)


def resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def cpu_step_memory(size: str, name: str) -> float:
    """MB: peak resident set above the pre-step one, second step of a fresh process (see the docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-of", name, "--size", size],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["step_mb"]


def memory_child(size: str, name: str) -> int:
    """In a fresh process: one warm-up step, then the second step's peak above its starting RSS."""
    cfg = size_config(size)
    batch = size_batch(cfg, torch.device("cpu"))
    fns = build_models(cfg, [name], torch.device("cpu"), torch.float32)
    (loss_fn, model), = fns.values()
    step(loss_fn, model, batch)
    gc.collect()
    before = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # reset VmHWM to the current resident set
    step(loss_fn, model, batch)
    print(json.dumps({"step_mb": (resident_kib("VmHWM") - before) / 1024}))
    return 0


def timed_step(loss_fn, model, batch, device) -> tuple[float, float, int, float]:
    """(wall seconds, process CPU seconds, bytes saved for backward, CUDA peak MB above the
    pre-step memory or nan)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    t0, c0 = time.perf_counter(), time.process_time()
    saved = step(loss_fn, model, batch)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    return time.perf_counter() - t0, time.process_time() - c0, saved, peak


def run_size(size: str, names: list[str], rounds: int, device, dtype, memory: bool) -> list[dict]:
    cfg = size_config(size)
    batch = size_batch(cfg, device)
    fns = build_models(cfg, names, device, dtype)
    first = {n: fn(batch).item() for n, (fn, _) in fns.items()}   # also the warm-up (compiles on CUDA)
    for n, (fn, m) in fns.items():
        step(fn, m, batch)
    times, cpu = {n: [] for n in names}, {n: [] for n in names}
    saved, peak = {}, {}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t, c, saved[n], peak[n] = timed_step(*fns[n], batch, device)
            times[n].append(t)
            cpu[n].append(c)
    if memory and device.type == "cpu":
        peak = {n: cpu_step_memory(size, n) for n in names}
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg, mtp=False)
    return [{"size": size, "model": n, "first_loss": first[n], "min_ms": 1e3 * min(times[n]), "flops_token": flops,
             "median_ms": 1e3 * statistics.median(times[n]), "cpu_min_ms": 1e3 * min(cpu[n]),
             "cpu_median_ms": 1e3 * statistics.median(cpu[n]), "tokens_s": tokens / statistics.median(times[n]),
             "step_mb": peak.get(n, float("nan")), "saved_mb": saved[n] / 2**20} for n in names]


def run_size_or_without_peer(size: str, names: list[str], args, device, dtype, notes: list[str]) -> list[dict]:
    """run_size; on CUDA, where the peers have never run, a failing peer is dropped with a note."""
    try:
        return run_size(size, names, args.rounds, device, dtype, not args.no_memory)
    except Exception as exc:
        peers = [n for n in names if n in PEERS]
        if not peers or device.type != "cuda":
            raise
        notes.append(f"{size}: no {'/'.join(peers)} row, the run failed: {type(exc).__name__}: {str(exc)[:300]}")
        print(notes[-1], flush=True)
        torch.cuda.empty_cache()
        return run_size(size, [n for n in names if n not in PEERS], args.rounds, device, dtype, False)


def loss_check(rows: list[dict], dtype) -> list[str]:
    """One line per size: the largest relative first-loss difference to moepipe's; raises past 1e-5 in fp32."""
    lines = []
    for size in dict.fromkeys(r["size"] for r in rows):
        group = [r for r in rows if r["size"] == size]
        ref = next((r["first_loss"] for r in group if r["model"] == "moepipe"), group[0]["first_loss"])
        worst = max(abs(r["first_loss"] - ref) / abs(ref) for r in group)
        lines.append(f"{size}: first losses equal to {worst:.1e} relative (limit {LOSS_RTOL:g} in fp32)")
        if dtype == torch.float32 and worst > LOSS_RTOL:
            raise AssertionError(lines[-1] + ": the models do not compute the same loss")
    return lines


TABLE_HEAD = ("| size | model | first loss | step ms min | step ms median | CPU ms min | CPU ms median | "
              "/ peer: min, median, CPU min, CPU median | tokens/s | MFU | step memory MB | saved for backward MB |\n"
              + "|" + "---|" * 12)


def table_rows(rows: list[dict], peak: float | None) -> list[str]:
    """One markdown line per row; ratios against the size's peer row (torchtitan or eager)."""
    keys = ("min_ms", "median_ms", "cpu_min_ms", "cpu_median_ms")
    peers = {r["size"]: r for r in rows if r["model"] in PEERS}
    lines = []
    for r in rows:
        ref = peers.get(r["size"])
        ratio = ", ".join(f"{r[k] / ref[k]:.2f}" for k in keys) if ref else "-"
        mfu = f"{r['tokens_s'] * r['flops_token'] / (peak * 1e12):.1%}" if peak else "n/a"
        lines.append(f"| {r['size']} | {r['model']} | {r['first_loss']:.6f} | {r['min_ms']:.1f} | "
                     f"{r['median_ms']:.1f} | {r['cpu_min_ms']:.1f} | {r['cpu_median_ms']:.1f} | {ratio} | "
                     f"{r['tokens_s']:.0f} | {mfu} | {r['step_mb']:.1f} | {r['saved_mb']:.1f} |")
    return lines


def table(rows: list[dict], peak: float | None = None) -> str:
    return "\n".join([TABLE_HEAD, *table_rows(rows, peak)])


def append(path: str | None, text: str) -> None:
    """Append to the results file right away: a step killed by its time limit keeps what it measured."""
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", nargs="+", default=["tiny", "medium"], choices=sorted(SIZES))
    ap.add_argument("--models", nargs="+", default=["moepipe", "torchtitan"], choices=MODELS)
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per model, the models alternated")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the per-model memory subprocesses")
    ap.add_argument("--out", default=None, help="also write the table to DIR/bench_model.md")
    ap.add_argument("--memory-of", default=None, choices=MODELS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="In CPU autocast")
    if args.memory_of:
        return memory_child(args.size[0], args.memory_of)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    names, notes = list(dict.fromkeys(args.models)), []
    if "torchtitan" in names:
        reason = peer.unavailable_reason()
        if reason:
            names[names.index("torchtitan")] = "eager"
            names = list(dict.fromkeys(names))
            notes.append(f"no torchtitan rows: {reason}; the peer is `eager`: the same model and weights in plain "
                         f"eager PyTorch (per-expert loop, SDPA under a dense document mask)")
        else:
            notes += peer.adaptations(device, dtype)
    peak = peak_tflops(0.0, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out = os.path.join(args.out, "bench_model.md")
    head = (f"device {gpu}, torch {torch.__version__}, {dtype}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
            f"models alternated in one process (order flipped every round); MFU against a dense bf16 peak of "
            f"{f'{peak:g} TFLOP/s' if peak else 'n/a (unknown device)'}; step memory: "
            f"{'CUDA allocator peak above pre-step' if device.type == 'cuda' else 'peak RSS above pre-step RSS, fresh process per model'}\n"
            + "".join(f"- {n}\n" for n in notes) + "\n" + TABLE_HEAD)
    print(head, flush=True)
    append(out, head)
    rows = []
    for size in args.size:
        got = run_size_or_without_peer(size, names, args, device, dtype, notes)
        rows += got
        lines = "\n".join(table_rows(got, peak))
        print(lines, flush=True)
        append(out, lines)
    checks = "".join(f"- {n}\n" for n in loss_check(rows, dtype))
    print(checks, flush=True)
    append(out, "\n" + checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
