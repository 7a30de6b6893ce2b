"""`python -m trainer.plan CONFIG --gpus N --gpus-per-node 8 --gpu h800 --seq 4096 [--global-batch B]`.

Ranks the parallel layouts of a model config on a cluster by predicted tokens/s per GPU: for
each, the fullest rank's memory (weights and gradients in `train.param_dtype`, fp32 master and
AdamW moments under ZeRO-1, activations at the schedule's peak, all-to-all buffers, what a
checkpoint save allocates; an async save's host staging copy beside it), the step time, MFU and the
pipeline bubble, and the `--set` overrides that run it. Layouts that do not fit are listed with
the component that puts them over budget. `--png` draws the memory breakdown of the top layouts.
The global batch defaults to the config's largest (`train.global_batch` or its phases). For a run
stated in tokens (`train.tokens`) it also prints the time of the whole run on the top layouts,
batch-size ramp included, in GPU-hours (trainer/plan/run_time.py).
Models: trainer/plan/memory.py, trainer/plan/timing.py, trainer/plan/layouts.py; hardware numbers:
trainer/plan/hardware.py.
"""
from __future__ import annotations

import argparse
import sys

from trainer.config import ConfigError, load_config
from trainer.plan.hardware import GIB, gpu_kind
from trainer.phases import format_tokens
from trainer.plan.layouts import COMPONENTS, Cluster, Estimate, fixed_batch, plan
from trainer.plan.run_time import REPORT_GPU_HOURS, describe, largest_batch, run_time

_HEAD = (f"{'#':>3} {'pp':>3} {'dp':>5} {'ep':>4} {'edp':>4} {'schedule':<9} {'mb':>3} {'n':>4} {'recomp':<6} "
         f"{'fp8':<4} {'m16':<4} {'GiB':>6} {'step s':>7} {'tok/s/GPU':>9} {'MFU':>5} {'bubble':>6}")


def _row(i: int, e: Estimate) -> str:
    c = e.cand
    yn = lambda b: "on" if b else "off"  # noqa: E731
    return (f"{i:>3} {c.pp:>3} {c.dp:>5} {c.ep:>4} {c.dp // c.ep:>4} {c.schedule if c.pp > 1 else '-':<9} "
            f"{c.micro_batch:>3} {c.num_micro:>4} {c.recompute:<6} {yn(c.fp8):<4} {yn(c.bf16_moments):<4} "
            f"{e.total / GIB:>6.1f} {e.step_s:>7.2f} {e.tokens_per_s_gpu:>9.0f} {100 * e.mfu:>4.1f}% "
            f"{100 * e.bubble:>5.1f}%")


def breakdown(e: Estimate) -> str:
    parts = ", ".join(f"{k} {e.memory[k] / GIB:.{2 if 0 < e.memory[k] < 0.1 * GIB else 1}f}" for k in COMPONENTS)
    host = f"; host: async save stages {e.host / GIB:.1f} GiB" if e.host else ""
    return f"pp rank {e.rank}: {parts} = {e.total / GIB:.1f} of {e.budget / GIB:.0f} GiB{host}"


def report(ranked: list[Estimate], failed: list[Estimate], untimed: int, cl: Cluster, top: int,
           why: bool = False) -> str:
    g = cl.gpu
    lines = [f"{cl.gpus} x {g.name} ({cl.gpus_per_node} per node, {g.memory_gib:g} GiB, {g.peak_bf16:g} bf16 / "
             f"{g.peak_fp8:g} fp8 TFLOP/s), seq {cl.seq_len}, global batch {cl.global_batch} sequences",
             f"{len(ranked) + untimed} layouts fit, {len(failed)} do not", "", _HEAD]
    lines += [_row(i, e) for i, e in enumerate(ranked[:top], 1)]
    if untimed:
        lines.append(f"    ({untimed} more fit but cannot be faster than #{top}: not replayed)")
    lines.append("\nmemory of the fullest rank (GiB) and the overrides that run each layout:")
    for i, e in enumerate(ranked[:top], 1):
        lines.append(f"{i:>3} {breakdown(e)}")
        lines.append(f"    --set {e.cand.overrides()}")
    if failed and not why:
        lines.append(f"\n{len(failed)} layouts do not fit; --why lists each with the part over budget")
    elif failed:
        lines.append("\ndo not fit (least memory-hungry settings of each layout):")
        for e in failed:
            c = e.cand
            name = f"pp {c.pp} dp {c.dp} ep {c.ep} {c.schedule if c.pp > 1 else ''}".rstrip()
            lines.append(f"  {name}: {e.reason()}")
    return "\n".join(lines)


def draw_memory(ranked: list[Estimate], path: str, top: int) -> None:
    """Stacked bars: the memory components of the top layouts against the GPU's capacity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ranked[:top]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(shown) + 2), 4.5))
    bottoms = [0.0] * len(shown)
    for comp in COMPONENTS:
        vals = [e.memory[comp] / GIB for e in shown]
        ax.bar(range(len(shown)), vals, bottom=bottoms, label=comp)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    if shown:
        ax.axhline(shown[0].budget / GIB, color="black", linestyle="--", linewidth=1, label="GPU memory")
    labels = [f"#{i} pp{e.cand.pp} ep{e.cand.ep}\n{e.cand.schedule if e.cand.pp > 1 else ''}"
              for i, e in enumerate(shown, 1)]
    ax.set_xticks(range(len(shown)), labels, fontsize=7)
    ax.set_ylabel("GiB on the fullest rank")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="model config (YAML)")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", required=True, help="GPU kind: a row of trainer/plan/hardware.py")
    ap.add_argument("--seq", type=int, default=4096, help="sequence length")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="sequences per optimizer step (default: the config's largest train.global_batch)")
    ap.add_argument("--run-layouts", type=int, default=3, help="time the whole run on this many top layouts")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--why", action="store_true", help="list every layout that does not fit, with the reason")
    ap.add_argument("--png", default=None, help="write the memory breakdown of the top layouts here")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set + [f"data.seq_len={args.seq}",
                                                   f"model.max_seq_len={max(args.seq, 1)}"])
        batch = args.global_batch or largest_batch(cfg)
        if batch is None:
            raise ValueError("--global-batch: needed, as the config sets no train.global_batch; give the sequences "
                             "per optimizer step, e.g. --global-batch 1920")
        cl = Cluster(args.gpus, args.gpus_per_node, gpu_kind(args.gpu), args.seq, batch)
        ranked, failed, untimed = plan(cfg, cl, args.top)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"parameters and gradients in {cfg.train.param_dtype} (train.param_dtype), "
          f"{'async' if cfg.checkpoint.async_save else 'synchronous'} checkpoint saves (checkpoint.async_save)")
    print(report(ranked, failed, untimed, cl, args.top, args.why))
    if cfg.train.tokens and ranked:
        print(f"\nthe whole run ({format_tokens(cfg.train.tokens)} tokens, the config's batch schedule "
              "on each layout):")
        for i, e in enumerate(ranked[:args.run_layouts], 1):
            c = e.cand
            print(f"{i:>3} pp {c.pp} dp {c.dp} ep {c.ep} {c.schedule if c.pp > 1 else ''}: "
                  f"{describe(run_time(cfg, e, cl), cl.gpu.name)}")
        flat = run_time(fixed_batch(cfg, batch), ranked[0], cl)
        print(f"    #1 at a constant {batch:,} sequences instead: {describe(flat, cl.gpu.name)}")
        print(f"    DeepSeek-V3 report (Table 1): {REPORT_GPU_HOURS / 1e6:.3f}M H800 GPU-hours for pre-training")
    if args.png and ranked:
        draw_memory(ranked, args.png, args.top)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
