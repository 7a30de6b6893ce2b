"""BF16 vs FP8 GEMMs at DeepSeek-V3 shapes, grouped expert GEMMs, and a per-step model comparison.

DeepSeek-V3 (arXiv 2412.19437, section 3.3) runs every Linear's GEMMs in FP8. This script measures
what that buys on the GPU at hand, with no network access:
  1. dense GEMMs x[M,K] @ W[N,K].T, K = 7168 (the model width), N = 2048 / 4096, M = 512 .. 16384:
     BF16 torch.mm vs torch._scaled_mm (tensorwise, rowwise) vs block-wise scaled_mm (1x128 x 128x128)
     on pre-quantized operands (GEMM only), plus TE's Linear forward when TE is installed;
  2. grouped expert GEMMs (E local experts, D = 7168, F = 2048, tokens split evenly):
     BF16 per-expert loop vs torch._grouped_mm vs FP8 per-expert rowwise scaled_mm vs
     torch._scaled_grouped_mm, plus te.GroupedLinear when installed;
  3. `compare_steps`: forward+backward of the same model built with the BF16 and the FP8 provider,
     tokens/s per mode (the per-step comparison hook the trainer benchmark can call).
On a machine without CUDA it prints "no CUDA, skipping" and exits 0.

Usage: python benchmarks/bench_fp8.py [--quick] [--model-config configs/tiny.yaml]
"""
from __future__ import annotations

import argparse
import sys

import torch

K_MODEL, NS, MS = 7168, (2048, 4096), (512, 1024, 2048, 4096, 8192, 16384)


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Mean seconds per call, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _try(fn) -> float | None:
    try:
        return cuda_time(fn)
    except Exception as err:  # noqa: BLE001 - a kernel this torch/GPU lacks is reported as n/a
        print(f"  (n/a: {type(err).__name__}: {str(err).splitlines()[0][:100]})", file=sys.stderr)
        return None


def _fmt(flops: float, secs: float | None) -> str:
    return "n/a" if secs is None else f"{flops / secs / 1e12:7.1f}"


def _te():
    try:
        from parallel.fp8.te import import_te
        return import_te()
    except Exception:  # noqa: BLE001
        return None, None


def gemm_rows(ms, ns, k: int = K_MODEL) -> list[list[str]]:
    from parallel.fp8 import quant
    from parallel.fp8.torch_native import scaled_gemm
    te_pt, te_recipe = _te()
    rows = []
    for n in ns:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            flops = 2 * m * n * k
            qx, qw = quant.quantize(x, (m, k)), quant.quantize(w, (n, k))
            rx, rw = quant.quantize(x, (1, k)), quant.quantize(w, (1, k))
            sx, sw = qx.scale.reshape(()), qw.scale.reshape(())
            wt, rs = qw.data.t(), rw.scale.t().contiguous()
            times = {
                "bf16": _try(lambda: x @ w.T),
                "fp8 tensorwise": _try(lambda: torch._scaled_mm(qx.data, wt, sx, sw, out_dtype=torch.bfloat16)),
                "fp8 rowwise": _try(lambda: torch._scaled_mm(rx.data, rw.data.t(), rx.scale, rs,
                                                             out_dtype=torch.bfloat16)),
                "fp8 blockwise (incl. quant)": _try(lambda: scaled_gemm(x, w, "blockwise", b_is_weight=True)),
            }
            if te_pt is not None:
                lin = te_pt.Linear(k, n, bias=False, params_dtype=torch.bfloat16)
                rec = te_recipe.Float8BlockScaling()

                def te_fwd():
                    with te_pt.autocast(enabled=True, recipe=rec) if hasattr(te_pt, "autocast") else \
                            te_pt.fp8_autocast(enabled=True, fp8_recipe=rec):
                        lin(x)
                times["te.Linear blockwise fwd"] = _try(te_fwd)
            rows.append([str(m), str(n)] + [f"{name}={_fmt(flops, t)}" for name, t in times.items()]
                        + [f"speedup(rowwise)={times['bf16'] / times['fp8 rowwise']:.2f}x"
                           if times["bf16"] and times["fp8 rowwise"] else "speedup=n/a"])
    return rows


def grouped_rows(tokens_list, experts: int = 8, d: int = K_MODEL, f: int = 2048) -> list[list[str]]:
    from parallel.fp8 import quant
    rows = []
    w = torch.randn(experts, f, d, device="cuda", dtype=torch.bfloat16)
    qw = [quant.quantize(w[e], (1, d)) for e in range(experts)]
    w_fp8 = torch.stack([q.data for q in qw])
    w_scale = torch.stack([q.scale.reshape(-1) for q in qw])
    for tokens in tokens_list:
        per = tokens // experts
        x = torch.randn(per * experts, d, device="cuda", dtype=torch.bfloat16)
        offs = torch.arange(per, per * experts + 1, per, device="cuda", dtype=torch.int32)
        qx = quant.quantize(x, (1, d))
        flops = 2 * per * experts * f * d
        times = {
            "bf16 loop": _try(lambda: [x[e * per:(e + 1) * per] @ w[e].T for e in range(experts)]),
            "bf16 _grouped_mm": _try(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs)),
            "fp8 loop rowwise": _try(lambda: [torch._scaled_mm(
                qx.data[e * per:(e + 1) * per], w_fp8[e].t(), qx.scale[e * per:(e + 1) * per],
                w_scale[e].reshape(1, -1).contiguous(), out_dtype=torch.bfloat16) for e in range(experts)]),
            "fp8 _scaled_grouped_mm": _try(lambda: torch._scaled_grouped_mm(
                qx.data, w_fp8.transpose(1, 2), qx.scale.reshape(-1), w_scale, offs=offs,
                out_dtype=torch.bfloat16)),
        }
        rows.append([str(tokens), str(experts)] + [f"{k}={_fmt(flops, t)}" for k, t in times.items()])
    return rows


def compare_steps(config_path: str, overrides: list[str], steps: int = 5, batch: int = 4) -> dict:
    """Seconds per forward+backward and tokens/s of one model in BF16 and in FP8 (backend auto)."""
    import numpy as np
    from parallel.fp8 import autocast_context, make_provider, select_backend
    from trainer.batch import make_batch
    from trainer.config import load_config
    from trainer.model.transformer import build_model

    out = {}
    for mode in ("bf16", "fp8"):
        cfg = load_config(config_path, overrides + [f"fp8.enabled={'true' if mode == 'fp8' else 'false'}"])
        backend = select_backend(cfg.fp8).backend if cfg.fp8.enabled else None
        model = build_model(cfg, provider=make_provider(cfg.fp8, cfg.model.num_layers, backend=backend)).cuda()
        L = cfg.data.seq_len
        tokens = torch.randint(0, cfg.model.vocab_size, (batch, L))
        b = make_batch(tokens, [np.array([L], dtype=np.int32)] * batch, device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16), autocast_context(cfg.fp8, backend=backend):
                model(b).loss.backward()
        secs = cuda_time(step, warmup=2, iters=steps)
        out[mode] = {"backend": backend or "bf16", "s_per_step": secs, "tokens_per_s": batch * L / secs}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--model-config", default=None, help="also compare BF16 vs FP8 steps of this model")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA, skipping")
        return 0
    print(f"device: {torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}; numbers are TFLOP/s")
    ms = (1024, 8192) if args.quick else MS
    for row in gemm_rows(ms, NS):
        print("gemm   M=" + row[0] + " N=" + row[1] + "  " + "  ".join(row[2:]))
    for row in grouped_rows((4096, 16384) if args.quick else (2048, 4096, 8192, 16384, 32768)):
        print("group  tokens=" + row[0] + " E=" + row[1] + "  " + "  ".join(row[2:]))
    if args.model_config:
        for mode, r in compare_steps(args.model_config, []).items():
            print(f"step   {mode:5s} backend={r['backend']:8s} {r['s_per_step'] * 1e3:8.1f} ms  "
                  f"{r['tokens_per_s']:10.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
