"""BF16 vs FP8 GEMMs at DeepSeek-V3 shapes, grouped expert GEMMs, and a model step, side by side.

DeepSeek-V3 (arXiv 2412.19437, section 3.3) runs every Linear's GEMMs in FP8. This script measures
what that buys on the device at hand, with no network access. Three tables, all in TFLOP/s:
  1. dense GEMMs x[M,K] @ W[N,K].T, K = 7168 (the model width), N = 2048 / 4096, M = 512 .. 16384:
     BF16 torch.mm vs torch._scaled_mm (tensorwise, rowwise) on pre-quantized operands (GEMM only),
     block-wise scaled_mm (1x128 x 128x128, quantization included) and TE's Linear forward when TE
     is installed;
  2. grouped expert GEMMs (E local experts, D = 7168, F = 2048, tokens split evenly): BF16 per-expert
     loop vs torch._grouped_mm vs FP8 per-expert rowwise scaled_mm vs torch._scaled_grouped_mm;
  3. end to end: forward + backward of one model (default benchmarks/configs/moe_small.yaml, 2.6B
     parameters with V2-Lite-sized experts) in BF16 and in FP8, eager and torch.compile: ms/step,
     tokens/s, model TFLOP/s (trainer/plan/flops.py) and MFU against the device's dense BF16 peak (so an
     FP8 run can exceed what BF16 reaches, never 2x the peak). FP8 runs fp8.backend auto, or with
     `--recipes` PyTorch's own kernels without Transformer Engine, one row per recipe (rowwise:
     experts through torch._scaled_grouped_mm; blockwise: torch.nn.functional.scaled_mm per GEMM).
     Warm-up steps (and any compilation) run before the timed window.
`--out FILE` appends every table row to FILE as soon as it is measured.
A kernel the installed torch or device lacks shows as n/a (the reason goes to stderr).

Usage: python benchmarks/bench_fp8.py [--quick] [--model-config PATH] [--no-compile | --compile-backend B]
                                      [--device cpu]
Without CUDA it exits 0 after saying so, unless --device cpu is given: then it runs small shapes
through the CPU kernels (tensorwise/rowwise _scaled_mm exist on CPU; timings mean little), which
is how tests/unit/test_bench_fp8.py keeps this script working between GPU runs.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, ".")  # run from the repository root, as the other benchmarks

K_MODEL, NS, MS = 7168, (2048, 4096), (512, 1024, 2048, 4096, 8192, 16384)
GROUP_TOKENS = (2048, 4096, 8192, 16384, 32768)
MODEL_CONFIG = "benchmarks/configs/moe_small.yaml"
CPU_SHAPES = dict(k=256, ns=(128,), ms=(64,), tokens=(64,), experts=4, f=128)


def measure(fn, device: str, warmup: int = 3, iters: int = 10) -> float:
    """Mean seconds per call: CUDA events on a GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _try(fn, device: str, **kw) -> float | None:
    try:
        return measure(fn, device, **kw)
    except Exception as err:  # noqa: BLE001 - a kernel this torch/device lacks is reported as n/a
        print(f"  (n/a: {type(err).__name__}: {str(err).splitlines()[0][:100]})", file=sys.stderr)
        return None


def _tflops(flops: float, secs: float | None) -> str:
    return "n/a" if secs is None else f"{flops / secs / 1e12:.3g}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _te():
    try:
        from parallel.fp8.te import import_te
        return import_te()
    except Exception:  # noqa: BLE001 - TE absent or broken: its columns are left out
        return None, None


def _te_autocast(te_pt, recipe):
    if hasattr(te_pt, "autocast"):
        return te_pt.autocast(enabled=True, recipe=recipe)
    return te_pt.fp8_autocast(enabled=True, fp8_recipe=recipe)


def gemm_table(ms, ns, k: int = K_MODEL, device: str = "cuda") -> tuple[list[str], list[list[str]]]:
    """Dense GEMM TFLOP/s per (M, N); the last column is BF16 time / FP8 rowwise time."""
    from parallel.fp8 import quant
    from parallel.fp8.torch_native import scaled_gemm
    te_pt, te_recipe = _te() if device == "cuda" else (None, None)
    names = ["bf16", "fp8 tensorwise", "fp8 rowwise", "fp8 blockwise+quant"] + \
        (["te.Linear blockwise fwd"] if te_pt is not None else [])
    rows = []
    for n in ns:
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            qx, qw = quant.quantize(x.float(), (m, k)), quant.quantize(w.float(), (n, k))
            rx, rw = quant.quantize(x.float(), (1, k)), quant.quantize(w.float(), (1, k))
            sx, sw, rs = qx.scale.reshape(()), qw.scale.reshape(()), rw.scale.t().contiguous()
            kernels = {
                "bf16": lambda: x @ w.T,
                "fp8 tensorwise": lambda: torch._scaled_mm(qx.data, qw.data.t(), sx, sw, out_dtype=torch.bfloat16),
                "fp8 rowwise": lambda: torch._scaled_mm(rx.data, rw.data.t(), rx.scale, rs,
                                                        out_dtype=torch.bfloat16),
                "fp8 blockwise+quant": lambda: scaled_gemm(x, w, "blockwise", b_is_weight=True),
            }
            if te_pt is not None:
                lin = te_pt.Linear(k, n, bias=False, params_dtype=torch.bfloat16)
                rec = te_recipe.Float8BlockScaling()

                def te_fwd():
                    with _te_autocast(te_pt, rec):
                        lin(x)
                kernels["te.Linear blockwise fwd"] = te_fwd
            times = {name: _try(fn, device) for name, fn in kernels.items()}
            rows.append([str(m), str(n)] + [_tflops(2 * m * n * k, times[name]) for name in names]
                        + [_ratio(times["bf16"], times["fp8 rowwise"])])
    return ["M", "N"] + names + ["fp8 rowwise / bf16"], rows


def grouped_table(tokens_list, experts: int = 8, d: int = K_MODEL, f: int = 2048,
                  device: str = "cuda") -> tuple[list[str], list[list[str]]]:
    """Grouped expert GEMM (x[T,D] split evenly over E experts, W[E,F,D]) TFLOP/s per token count."""
    from parallel.fp8 import quant
    w = torch.randn(experts, f, d, device=device, dtype=torch.bfloat16)
    qw = [quant.quantize(w[e].float(), (1, d)) for e in range(experts)]
    w_fp8 = torch.stack([q.data for q in qw])
    w_scale = torch.stack([q.scale.reshape(-1) for q in qw])
    names = ["bf16 loop", "bf16 _grouped_mm", "fp8 loop rowwise", "fp8 _scaled_grouped_mm"]
    rows = []
    for tokens in tokens_list:
        per = tokens // experts
        x = torch.randn(per * experts, d, device=device, dtype=torch.bfloat16)
        offs = torch.arange(per, per * experts + 1, per, device=device, dtype=torch.int32)
        qx = quant.quantize(x.float(), (1, d))
        kernels = {
            "bf16 loop": lambda: [x[e * per:(e + 1) * per] @ w[e].T for e in range(experts)],
            "bf16 _grouped_mm": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs),
            "fp8 loop rowwise": lambda: [torch._scaled_mm(
                qx.data[e * per:(e + 1) * per], w_fp8[e].t(), qx.scale[e * per:(e + 1) * per],
                w_scale[e].reshape(1, -1).contiguous(), out_dtype=torch.bfloat16) for e in range(experts)],
            "fp8 _scaled_grouped_mm": lambda: torch._scaled_grouped_mm(
                qx.data, w_fp8.transpose(1, 2), qx.scale.reshape(-1), w_scale, offs=offs,
                out_dtype=torch.bfloat16),
        }
        times = {name: _try(fn, device) for name, fn in kernels.items()}
        rows.append([str(per * experts), str(experts)] + [_tflops(2 * per * experts * f * d, times[n]) for n in names]
                    + [_ratio(times["bf16 _grouped_mm"], times["fp8 _scaled_grouped_mm"])])
    return ["tokens", "E"] + names + ["fp8 grouped / bf16 grouped"], rows


STEP_HEADER = ["precision", "backend", "mode", "ms/step", "tokens/s", "model TFLOP/s", "MFU (bf16 peak)"]


def step_table(config_path: str, overrides=(), compile_modes=(None, "inductor"), steps: int = 5,
               device: str = "cuda", recipes=(None,), on_row=None) -> tuple[list[str], list[list[str]]]:
    """Forward+backward of one model, BF16 vs FP8 (per recipe; None = fp8.backend auto) x eager
    (None) vs torch.compile with each backend. `on_row(row)` is called as each row is measured."""
    from trainer.metrics import peak_tflops
    rows = []
    for mode, recipe in [("bf16", None)] + [("fp8", r) for r in recipes]:
        for compiled in compile_modes:
            try:
                r = model_step(config_path, list(overrides), fp8=mode == "fp8", compile_backend=compiled, steps=steps,
                               device=device, recipe=recipe)
            except Exception as err:  # noqa: BLE001 - a backend that cannot run here: its row says n/a
                print(f"  ({mode} {recipe or ''}: {type(err).__name__}: {str(err).splitlines()[0][:200]})",
                      file=sys.stderr)
                r = {"backend": "torch" if recipe else "?", "s_per_step": None, "tokens_per_s": 0.0,
                     "flops_per_token": 0.0}
            peak = peak_tflops(0.0, torch.device(device))
            tflops = r["tokens_per_s"] * r["flops_per_token"] / 1e12 if r["s_per_step"] else None
            rows.append([mode, r["backend"] + (f" {recipe}" if recipe else ""),
                         f"compile ({compiled})" if compiled else "eager",
                         "n/a" if r["s_per_step"] is None else f"{r['s_per_step'] * 1e3:.1f}",
                         "n/a" if r["s_per_step"] is None else f"{r['tokens_per_s']:.0f}",
                         "n/a" if tflops is None else f"{tflops:.3g}",
                         f"{tflops / peak:.1%}" if tflops and peak else "n/a"])
            if on_row:
                on_row(rows[-1])
    return STEP_HEADER, rows


def model_step(config_path: str, overrides: list[str], *, fp8: bool, compile_backend: str | None = None, steps: int = 5,
               device: str = "cuda", batch: int | None = None, recipe: str | None = None) -> dict:
    """Seconds per forward+backward, tokens/s and model FLOPs/token of the config's model."""
    import numpy as np
    from parallel.fp8 import autocast_context, make_provider, select_backend
    from model.batch import make_batch
    from trainer.config import load_config
    from trainer.plan.flops import flops_per_token
    from model.transformer import build_model

    pinned = [f"fp8.backend=torch", f"fp8.recipe={recipe}"] if fp8 and recipe else []
    cfg = load_config(config_path, overrides + [f"fp8.enabled={'true' if fp8 else 'false'}"] + pinned)
    backend = select_backend(cfg.fp8).backend if fp8 else None
    provider = make_provider(cfg.fp8, cfg.model.num_layers, backend=backend) if fp8 else None
    torch.manual_seed(0)
    model = build_model(cfg, provider=provider).to(device)
    fwd = torch.compile(model, backend=compile_backend) if compile_backend else model
    B, L = batch or cfg.train.micro_batch_size, cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (B, L))
    b = make_batch(tokens, [np.array([L], dtype=np.int32)] * B, device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else torch.autocast(device, enabled=False)

    def step():
        with amp, (autocast_context(cfg.fp8, backend=backend) if fp8 else torch.autocast(device, enabled=False)):
            fwd(b).loss.backward()
    secs = _try(step, device, warmup=2, iters=steps)
    del model, fwd, b
    torch._dynamo.reset()  # drop compiled graphs (and the weights they hold) before the next model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"backend": backend or "-", "s_per_step": secs, "tokens_per_s": B * L / secs if secs else 0.0,
            "flops_per_token": flops_per_token(cfg, seq_len=L)}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: small shapes through the CPU kernels, to check the script itself")
    ap.add_argument("--model-config", default=MODEL_CONFIG, help="model for the end-to-end table")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for that config")
    ap.add_argument("--no-compile", action="store_true", help="eager only in the end-to-end table")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    ap.add_argument("--skip", nargs="*", default=[], choices=("gemm", "grouped", "step"))
    ap.add_argument("--recipes", nargs="*", default=None, choices=("tensorwise", "rowwise", "blockwise"),
                    help="FP8 rows of the end-to-end table on PyTorch's kernels (no TE), one per recipe")
    ap.add_argument("--out", default=None, help="append every table row to this file as it is measured")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA, skipping (use --device cpu to check the script on CPU kernels)")
        return 0
    if dev == "cuda":
        print(f"device: {torch.cuda.get_device_name()} "
              f"(sm{''.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}")
        shapes = dict(k=K_MODEL, ns=NS, ms=(1024, 8192) if args.quick else MS,
                      tokens=(4096, 16384) if args.quick else GROUP_TOKENS, experts=8, f=2048)
    else:
        print(f"device: cpu, torch {torch.__version__} (script check: small shapes, timings mean little)")
        shapes = CPU_SHAPES
    if "gemm" not in args.skip:
        emit(args.out, f"\nDense GEMM, K = {shapes['k']}, TFLOP/s\n\n"
             + markdown(*gemm_table(shapes["ms"], shapes["ns"], shapes["k"], dev)))
    if "grouped" not in args.skip:
        emit(args.out, f"\nGrouped expert GEMM, D = {shapes['k']}, F = {shapes['f']}, TFLOP/s\n\n"
             + markdown(*grouped_table(shapes["tokens"], shapes["experts"], shapes["k"], shapes["f"], dev)))
    if "step" not in args.skip:
        title = f"\nForward + backward, {args.model_config} {' '.join(args.set)}\n"
        emit(args.out, title + "\n" + markdown(STEP_HEADER, []))
        modes = (None,) if args.no_compile else (None, args.compile_backend)
        step_table(args.model_config, args.set, modes, steps=2 if args.quick else 5, device=dev,
                   recipes=tuple(args.recipes) if args.recipes else (None,),
                   on_row=lambda row: emit(args.out, "| " + " | ".join(row) + " |"))
    return 0


def emit(path: str | None, text: str) -> None:
    """Print now and append to `path` now: a run killed by its time limit keeps its rows."""
    print(text, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
