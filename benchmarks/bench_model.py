"""Benchmark: one training step (forward + loss + backward) of the moepipe model, variants alternated.

Rows: routed experts as grouped GEMMs (the default) vs the per-expert loop (the reference), and
the recomputation policies (none / selective / full, DeepSeek-V3 section 3.2.3). The variants
run alternately in one process, on the same weights and the same batch (one document per row),
so load from other processes hits them alike; the table gives step ms (min and median),
tokens/s, the bytes autograd keeps for backward (saved activations; on CPU the only memory
figure, exact) and, on CUDA, the peak allocated memory of a step.

Sizes: tiny = configs/tiny.yaml without MTP; medium = hidden 512, 8 layers (1 dense), 8 heads,
q/kv rank 128/64, nope/rope/v 32/16/32, 16 experts top-4 + 1 shared, expert ffn 256, dense ffn
1024, vocab 8192, 4 x 512 tokens; b1 (CUDA, bf16) = about 1.4B activated parameters: hidden 2048,
16 layers (1 dense), 16 heads, q/kv rank 768/512, nope/rope/v 128/64/128, 64 experts top-6 + 2
shared, expert ffn 1408, vocab 32768, 2 x 4096 tokens.

    python benchmarks/bench_model.py --size tiny medium [--steps 5] [--device cpu] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.batch import make_batch  # noqa: E402
from model.transformer import build_model  # noqa: E402
from parallel.recompute import apply_recompute  # noqa: E402
from trainer.config import load_config  # noqa: E402

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
SIZES = {"tiny": (os.path.join(ROOT, "configs", "tiny.yaml"), ["mtp.depth=0"]),
         "medium": (None, MEDIUM + ["mtp.depth=0"]), "b1": (None, B1 + ["mtp.depth=0"]),
         "micro": (os.path.join(ROOT, "configs", "tiny.yaml"),   # plumbing checks only
                   ["mtp.depth=0", "model.num_layers=2", "data.seq_len=32", "train.micro_batch_size=2"])}
VARIANTS = ("grouped", "loop", "grouped+selective", "grouped+full")


def build_variant(cfg, variant: str, device, dtype):
    model = build_model(cfg).to(device=device, dtype=dtype)
    if "loop" in variant:
        for mod in model.modules():
            if hasattr(mod, "reference_forward"):
                mod.forward = mod.reference_forward
    apply_recompute(model, variant.split("+")[1] if "+" in variant else "none")
    return model


def step(model, batch) -> int:
    """Forward + loss + backward; returns the bytes autograd saved for backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved)


def run_size(size: str, steps: int, device: torch.device, dtype) -> list[dict]:
    path, sets = SIZES[size]
    cfg = load_config(path, sets)
    B, L = cfg.train.micro_batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    batch = make_batch(torch.randint(0, cfg.model.vocab_size, (B, L), generator=g), None, device=device)
    models = {v: build_variant(cfg, v, device, dtype) for v in VARIANTS}
    first = {v: m(batch).loss.item() for v, m in models.items()}   # warm-up; same weights, same loss
    times = {v: [] for v in VARIANTS}
    saved, peak = {}, {}
    for _ in range(steps):
        for v, m in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            saved[v] = step(m, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak[v] = torch.cuda.max_memory_allocated()
            times[v].append(time.perf_counter() - t0)
    return [{"size": size, "variant": v, "first_loss": first[v], "min_ms": 1e3 * min(times[v]),
             "median_ms": 1e3 * statistics.median(times[v]), "tokens_s": B * L / statistics.median(times[v]),
             "saved_mb": saved[v] / 2**20, "peak_mb": peak.get(v, float("nan")) / 2**20} for v in VARIANTS]


def table(rows: list[dict]) -> str:
    head = "| size | variant | first loss | step ms min | step ms median | tokens/s | saved for backward MB | peak MB |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['size']} | {r['variant']} | {r['first_loss']:.6f} | {r['min_ms']:.1f} | "
                     f"{r['median_ms']:.1f} | {r['tokens_s']:.0f} | {r['saved_mb']:.1f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", nargs="+", default=["tiny", "medium"], choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--out", default=None, help="also write the table to DIR/bench_model.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    rows = [r for size in args.size for r in run_size(size, args.steps, device, dtype)]
    text = (f"device {device}, {dtype}, {torch.get_num_threads()} threads, {args.steps} steps per variant, "
            f"variants alternated in one process\n\n" + table(rows))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_model.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
