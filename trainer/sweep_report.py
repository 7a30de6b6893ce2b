"""Results of a sweep: final metrics per run as CSV + Markdown tables, and a PNG of the curves.

Each run's `metrics.jsonl` holds one JSON object per optimizer step. A resumed run appends the
steps it re-did after its last checkpoint, so records are de-duplicated by step (the latest wins).
A run's final value of a metric is its mean over the last `summary_window` steps: single-step
values of a tiny model are noisy, and DeepSeek's MaxVio tables also report a training-window
value rather than one batch. The plot has the loss curve of every run, then one panel per metric
against the swept value named by `plot_x` (or against the run when there is no numeric axis).
Outputs: `<sweep output_dir>/results.csv`, `results.md`, `results.png`, and
`plots/loss_overlay.png` (training and validation loss of every run on one axis, `trainer.plot`).
"""
from __future__ import annotations

import csv
import math
import os

from trainer.metrics import read_metrics



def summarize(records: list[dict], metrics: list[str], window: int) -> dict:
    """Mean of each metric over the last `window` records (None where never logged)."""
    out = {}
    tail = records[-window:]
    for name in metrics:
        vals = [float(r[name]) for r in tail if isinstance(r.get(name), (int, float))]
        out[name] = sum(vals) / len(vals) if vals else None
    return out


def result_rows(sweep, runs, configs) -> list[dict]:
    rows = []
    for run, cfg in zip(runs, configs):
        records = read_metrics(run.output_dir)
        step = records[-1]["step"] if records else 0
        tokens = max((int(r.get("tokens", 0)) for r in records), default=0)
        done = (cfg.train.steps and step >= cfg.train.steps) or (cfg.train.tokens and tokens >= cfg.train.tokens)
        status = "done" if done else ("partial" if records else "missing")
        row = {"run": run.name}
        row.update({key: run.overrides.get(key) for key in sweep.swept_keys})
        if sweep.seeds:
            row["seed"] = run.seed
        row.update(status=status, steps=step)
        row.update(summarize(records, sweep.metrics, sweep.summary_window))
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot(sweep, runs, rows: list[dict], path: str) -> None:
    """Loss curves per run, then each metric against plot_x (or per run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in sweep.metrics if any(r.get(m) is not None for r in rows)]
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 4), squeeze=False)
    ax = axes[0][0]
    for run in runs:
        recs = [r for r in read_metrics(run.output_dir) if isinstance(r.get("loss"), (int, float))]
        if recs:
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=run.name, linewidth=1)
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    if ax.lines:
        ax.legend(fontsize=6)
    xkey = sweep.plot_x
    use_x = xkey is not None and all(_numeric(r.get(xkey)) for r in rows)
    for ax, name in zip(axes[0][1:], metrics):
        pts = [(i, r) for i, r in enumerate(rows) if r.get(name) is not None]
        xs = [r[xkey] if use_x else i for i, r in pts]
        ax.scatter(xs, [r[name] for _, r in pts])
        if use_x:
            ax.set_xlabel(xkey)
            if all(x > 0 for x in xs) and max(xs) / min(xs) > 100:
                ax.set_xscale("log")
        else:
            ax.set_xticks(xs, [r["run"] for _, r in pts], rotation=30, ha="right", fontsize=7)
        ax.set(ylabel=name, title=f"final {name} (mean of last {sweep.summary_window} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def collect_and_report(sweep, runs, configs) -> list[dict]:
    """Write results.csv / results.md / results.png under the sweep's output_dir; return rows."""
    rows = result_rows(sweep, runs, configs)
    os.makedirs(sweep.output_dir, exist_ok=True)
    out = os.path.join(sweep.output_dir, "results")
    write_csv(rows, out + ".csv")
    table = markdown_table(rows)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(f"# Sweep {sweep.name}\n\nbase: `{sweep.base}`; final metrics are means over the last "
                f"{sweep.summary_window} steps.\n\n{table}")
    try:
        plot(sweep, runs, rows, out + ".png")
        from trainer.plot import loss_overlay
        os.makedirs(os.path.join(sweep.output_dir, "plots"), exist_ok=True)
        loss_overlay([r.output_dir for r in runs if read_metrics(r.output_dir)],
                     os.path.join(sweep.output_dir, "plots", "loss_overlay.png"), sweep.output_dir)
    except ImportError:
        print("matplotlib is not installed: skipped results.png (pip install matplotlib)")
    print(table + f"\nwrote {out}.csv, {out}.md, {out}.png")
    return rows
