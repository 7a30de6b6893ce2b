"""The model mode's report: the equivalence check, the step-time table and the simulator section.

Table, per injected latency and runtime: step ms (the schedule plus the shared-gradient
reduction; the slowest rank per round, median over rounds), blocked ms (time a rank waits on
row exchanges, mean over ranks, median over rounds) and the ratio to torch's schedule of the
same placement family (1F1B and ZB1P to `Schedule1F1B`, DualPipe and DualPipeV to
`ScheduleDualPipeV`). A runtime that cannot run is a row "n/a: <reason>".
"""
from __future__ import annotations

import os
import statistics

from pipeline_gantt import draw, format_sim, sim_row
from pipeline_model import RUNTIMES, TORCH_OF, ModelOpts

GRAD_RTOL, LOSS_ATOL = 1e-4, 1e-5


def check_lines(results: list, o: ModelOpts) -> tuple[list[str], bool]:
    """Every runtime's losses and gradients vs the single-model reference, over all ranks."""
    failures, worst_grad, worst_loss = [], 0.0, 0.0
    for label in results[0]["checks"]:
        for ep in sorted({r["ep_rank"] for r in results}):
            mine = [r["checks"][label] for r in results if r["ep_rank"] == ep]
            names = set().union(*(set(c["names"]) for c in mine))
            micros = sorted(m for c in mine for m in c["micros"])
            worst_grad = max([worst_grad] + [c["grad_err"] for c in mine])
            worst_loss = max([worst_loss] + [c["loss_err"] for c in mine])
            if names != set(mine[0]["ref_names"]):
                failures.append(f"{label} (ep {ep}): gradients of {len(names)} parameters, expected "
                                f"{len(mine[0]['ref_names'])}")
            if micros != list(range(o.micro)):
                failures.append(f"{label} (ep {ep}): losses of micro-batches {micros}, expected 0..{o.micro - 1}")
        if any(c["grad_err"] > GRAD_RTOL or c["loss_err"] > LOSS_ATOL for c in (r["checks"][label] for r in results)):
            failures.append(f"{label}: gradient or loss off the reference")
    head = (f"check: losses and gradients of every runtime vs one whole model on the same rank: "
            f"{'equal' if not failures else 'MISMATCH'} (max relative gradient difference {worst_grad:.1e}, "
            f"max loss difference {worst_loss:.1e})")
    return [head, *failures], not failures


def _stats(results: list, key) -> tuple[float, float]:
    """(step ms, blocked ms) of one (latency, label) over all ranks, warm-up round dropped."""
    series = [r["series"][key] for r in results]
    rounds = range(1, len(series[0].step))
    step = statistics.median(max(s.step[i] for s in series) for i in rounds)
    blocked = statistics.median(statistics.mean(s.blocked[i] for s in series) for i in rounds)
    return 1000 * step, 1000 * blocked


def table_lines(results: list, o: ModelOpts) -> list[str]:
    na = results[0]["na"]
    lines = [f"{'a2a latency':<12} {'runtime':<24} {'step ms':>8} {'blocked ms':>11}  ratio to torch's"]
    for ms in o.latencies_ms:
        stats = {label: _stats(results, (ms, label)) for label in o.labels if label not in na}
        for label in o.labels:
            head = f"{ms:>9g} ms {label:<24}"
            if label in na:
                lines.append(f"{head} {na[label]}")
                continue
            step, blocked = stats[label]
            lines.append(f"{head} {step:>8.1f} {blocked:>11.1f}  {_ratio(label, step, stats, na)}")
    return lines


def _ratio(label: str, step: float, stats: dict, na: dict) -> str:
    kind, name, _ = RUNTIMES[label]
    torch_label = label if kind == "torch" else TORCH_OF[name]
    if torch_label in na:
        return f"{torch_label} {na[torch_label]}"
    if torch_label not in stats:
        return "-"
    return f"{step / stats[torch_label][0]:.2f}x {torch_label.split()[1]}"


def sim_sections(results: list, o: ModelOpts, png: str | None) -> list[str]:
    """The simulator vs measured section per latency; the Gantt PNG per latency if `png`."""
    out = []
    ours = [label for label in o.labels if RUNTIMES[label][0] == "ours" and label not in results[0]["na"]]
    if not ours:
        return out
    for ms in o.latencies_ms:
        ranks = [{"pp_rank": r["pp_rank"], "ep_rank": r["ep_rank"], "series": r["series"][(ms, label)]}
                 for label in ours for r in results]
        per = len(results)
        rows = [sim_row(label, o.micro, ranks[i * per:(i + 1) * per]) for i, label in enumerate(ours)]
        out += ["", format_sim(rows, ms)]
        if png:
            path = png_path(png, ms)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            draw(rows, ms, path)
            out.append(f"wrote {path}")
    return out


def png_path(png: str, ms: float) -> str:
    stem = png[:-4] if png.endswith(".png") else png
    return f"{stem}_{ms:g}ms.png"
