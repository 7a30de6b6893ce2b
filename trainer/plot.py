"""Pictures of a run: `python -m trainer.plot RUN_DIR` (also at the end of every training run).

From RUN_DIR/metrics.jsonl (one record per step, resumed steps de-duplicated) into RUN_DIR/plots/:
  loss.png         training loss (total and lm), MTP loss, and validation loss at its steps
  lr.png           learning rate
  grad_norm.png    gradient norm before clipping
  maxvio.png       MaxVio = max load / mean load - 1 (DeepSeek-V3's balance measure)
  expert_load.png  per MoE layer, load of every expert / mean load over the logged steps: the
                   auxiliary-loss-free bias update (DeepSeek-V3 section 2.1.2) at work shows as
                   the picture turning uniform
  ranks.png        multi-rank runs: every rank's seconds per step in compute, collective wait and
                   data at the logged steps (a straggler is the line on top of compute and at
                   the bottom of collective wait)
  schedule.png     runs that log tokens seen: each scheduled quantity (lr, global batch, bias
                   update speed, MTP weight, balance-loss weight) and the loss against tokens,
                   with the phase boundaries (where a step's phase differs from the last one's,
                   trainer.schedule) marked and named on every panel
Every PNG also carries the series it draws as JSON in its `moepipe:series` text chunk, so a test
(or a reader) can check a picture against the data. For a sweep's output directory (run
directories below it) it prints the sweep's results table and writes plots/loss_overlay.png,
every run's training and validation loss on one axis.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from trainer.cli import user_errors
from trainer.metrics import read_metrics

SERIES_KEY = "moepipe:series"


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records where `key` is a number."""
    pts = [(r["step"], float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in pts], [v for _, v in pts]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str, data: dict) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={SERIES_KEY: json.dumps(data)})
    _pyplot().close(fig)
    return path


def line_plot(records: list[dict], keys: list[str], title: str, path: str, log_y: bool = False) -> str | None:
    plt = _pyplot()
    data = {k: series(records, k) for k in keys}
    data = {k: v for k, v in data.items() if v[0]}
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (steps, values) in data.items():
        ax.plot(steps, values, label=key, linewidth=1, marker="o" if len(steps) < 30 else None, markersize=3)
    ax.set(xlabel="step", title=title)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path, {k: {"step": s, "value": v} for k, (s, v) in data.items()})


def _relative(loads: list[float]) -> list[float]:
    mean = max(sum(loads) / len(loads), 1e-12)
    return [x / mean for x in loads]


def _edges(steps: list[int]) -> list[float]:
    """Cell edges around logged steps that may be unevenly spaced (midpoints, half a gap at the ends)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [2 * steps[0] - mids[0]] + mids + [2 * steps[-1] - mids[-1]]


def moe_layer_names(run_dir: str, n_layers: int) -> list[str]:
    """Names of the MoE layers in metrics order: main-model blocks, then MTP blocks (from the run's
    config.yaml; plain indices when it is missing)."""
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            model = (yaml.safe_load(f) or {}).get("model") or {}
        first, main = int(model["first_k_dense"]), int(model["num_layers"]) - int(model["first_k_dense"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return [f"MoE layer {i}" for i in range(n_layers)]
    return [f"block {first + i}" if i < main else f"MTP block {i - main + 1}" for i in range(n_layers)]


def expert_load_heatmap(records: list[dict], path: str, names: list[str] | None = None) -> str | None:
    """One panel per MoE layer: experts x logged steps, load / mean load (1 = balanced)."""
    recs = [r for r in records if isinstance(r.get("expert_load"), list) and r["expert_load"]]
    if not recs:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in recs]
    n_layers = len(recs[0]["expert_load"])
    rel = [[_relative(r["expert_load"][layer]) for r in recs] for layer in range(n_layers)]  # [layer][step][E]
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.2 + 1.6 * n_layers), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        grid = list(map(list, zip(*rel[layer])))                             # [expert][step]
        im = ax.pcolormesh(_edges(steps), [e - 0.5 for e in range(len(grid) + 1)], grid, cmap="viridis")
        ax.invert_yaxis()
        name = names[layer] if names else f"MoE layer {layer}"
        ax.set(ylabel=f"{name}\nexpert", title="expert load / mean load" if layer == 0 else None)
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("step")
    return _save(fig, path, {"step": steps, "relative_load": rel, "layers": names or []})


RANK_FIELDS = (("rank_compute_s", "compute"), ("rank_comm_s", "collective wait"), ("rank_data_s", "data"))


def rank_times(records: list[dict], path: str) -> str | None:
    """One panel per part of the step (compute, collective wait, data), one line per rank."""
    recs = [r for r in records if isinstance(r.get("rank_compute_s"), list)]
    if not recs:
        return None
    plt = _pyplot()
    steps, n_ranks = [r["step"] for r in recs], len(recs[0]["rank_compute_s"])
    data = {"step": steps}
    fig, axes = plt.subplots(len(RANK_FIELDS), 1, figsize=(7, 2.2 * len(RANK_FIELDS)), sharex=True)
    for ax, (key, title) in zip(axes, RANK_FIELDS):
        data[key] = [[r[key][rank] for r in recs] for rank in range(n_ranks)]  # [rank][logged step]
        for rank, values in enumerate(data[key]):
            ax.plot(steps, values, label=f"rank {rank}", linewidth=1, marker="o" if len(steps) < 30 else None,
                    markersize=3)
        ax.set(ylabel="s / step", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=min(n_ranks, 8))
    axes[-1].set_xlabel("step")
    return _save(fig, path, data)


SCHEDULED = (("lr", "learning rate"), ("global_batch", "global batch (sequences)"),
             ("bias_update_speed", "bias update speed gamma"), ("mtp_loss_weight", "MTP weight lambda"),
             ("seq_aux_loss_alpha", "balance weight alpha"), ("loss", "loss"))


def phase_boundaries(records: list[dict]) -> list[tuple[float, str]]:
    """(tokens, what changed) where a step's phase differs from the previous step's; the tokens
    are those seen before the step, where the new values take over."""
    out = []
    for prev, rec in zip(records, records[1:]):
        if rec.get("phase") != prev.get("phase") and rec["step"] == prev["step"] + 1:
            old = _phase_parts(prev.get("phase"))
            parts = [p for p in _phase_parts(rec.get("phase")) if p not in old]
            out.append((float(prev["tokens"]), ", ".join(parts) or "warmup ends"))
    return out


def _phase_parts(phase) -> list[str]:
    """'warmup lr 1/4 batch 2/2' -> ['warmup', 'lr 1/4', 'batch 2/2']."""
    words, parts = str(phase or "").split(), []
    while words:
        take = 1 if words[0] == "warmup" else 2
        parts.append(" ".join(words[:take]))
        words = words[take:]
    return parts


def schedule_plot(records: list[dict], path: str) -> str | None:
    """Every scheduled quantity against the tokens seen before its step, phase boundaries marked."""
    recs = [r for r in records if isinstance(r.get("tokens"), (int, float))]
    if not recs:
        return None
    plt = _pyplot()
    x = []
    for i, r in enumerate(recs):
        prev = recs[i - 1] if i and recs[i - 1]["step"] == r["step"] - 1 else None
        x.append(float(prev["tokens"]) if prev else 0.0 if r["step"] == 1 else float(r["tokens"]))
    bounds = phase_boundaries(recs)
    keys = [(k, t) for k, t in SCHEDULED if any(isinstance(r.get(k), (int, float)) for r in recs)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 1.7 * len(keys) + 0.6), sharex=True, squeeze=False)
    data = {"tokens": x, "boundaries": bounds}
    for (key, title), ax in zip(keys, axes[:, 0]):
        ys = [r.get(key) for r in recs]
        data[key] = ys
        if key == "loss":
            ax.plot(x, ys, linewidth=1)
        else:
            ax.step(x, ys, where="post", linewidth=1.2)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
        for t, label in bounds:
            ax.axvline(t, color="tab:red", linestyle=":", linewidth=0.8)
            if ax is axes[0, 0]:
                ax.annotate(label, (t, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=6,
                            va="top", ha="right", color="tab:red")
    axes[-1, 0].set_xlabel("tokens seen")
    axes[0, 0].set_title("scheduled values against tokens (dotted: phase boundaries)")
    return _save(fig, path, data)


def plot_run(run_dir: str) -> list[str]:
    """All pictures of one run into run_dir/plots/; returns the paths written."""
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl records; give a run's train.output_dir")
    out = os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    made = [line_plot(records, ["loss", "lm_loss", "mtp_loss", "val_loss", "val_mtp_loss"], "loss",
                      os.path.join(out, "loss.png")),
            line_plot(records, ["lr"], "learning rate", os.path.join(out, "lr.png")),
            line_plot(records, ["grad_norm"], "gradient norm (before clipping)", os.path.join(out, "grad_norm.png"),
                      log_y=True),
            line_plot(records, ["maxvio"], "MaxVio (max / mean expert load - 1)", os.path.join(out, "maxvio.png")),
            expert_load_heatmap(records, os.path.join(out, "expert_load.png"), _names_for(run_dir, records)),
            rank_times(records, os.path.join(out, "ranks.png")),
            schedule_plot(records, os.path.join(out, "schedule.png"))]
    return [p for p in made if p]


def _names_for(run_dir: str, records: list[dict]) -> list[str] | None:
    loads = next((r["expert_load"] for r in records if isinstance(r.get("expert_load"), list)), None)
    return moe_layer_names(run_dir, len(loads)) if loads else None


def run_dirs(sweep_dir: str) -> list[str]:
    """Directories below sweep_dir that hold a metrics.jsonl (a sweep's runs), sorted."""
    found = []
    for root, _, files in os.walk(sweep_dir):
        if "metrics.jsonl" in files:
            found.append(root)
    return sorted(found)


def loss_overlay(dirs: list[str], path: str, base: str) -> str:
    """Every run's training loss (solid) and validation loss (dashed) on one axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    data = {}
    for d in dirs:
        name = os.path.relpath(d, base)
        records = read_metrics(d)
        train, valid = series(records, "loss"), series(records, "val_loss")
        line = ax.plot(*train, linewidth=1, label=name)[0]
        if valid[0]:
            ax.plot(*valid, linestyle="--", marker="o", markersize=3, color=line.get_color())
        data[name] = {"loss": {"step": train[0], "value": train[1]},
                      "val_loss": {"step": valid[0], "value": valid[1]}}
    ax.set(xlabel="step", ylabel="loss", title="training loss (solid), validation loss (dashed)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path, data)


def plot_sweep(sweep_dir: str) -> list[str]:
    dirs = [d for d in run_dirs(sweep_dir) if os.path.abspath(d) != os.path.abspath(sweep_dir)]
    table = os.path.join(sweep_dir, "results.md")
    if os.path.isfile(table):
        with open(table, encoding="utf-8") as f:
            print(f.read())
    out = os.path.join(sweep_dir, "plots")
    os.makedirs(out, exist_ok=True)
    return [loss_overlay(dirs, os.path.join(out, "loss_overlay.png"), sweep_dir)]


def read_series(path: str) -> dict:
    """The series a PNG written here claims to draw."""
    from PIL import Image
    with Image.open(path) as im:
        return json.loads(im.text[SERIES_KEY])


@user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run's train.output_dir (or a sweep's output_dir)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        raise FileNotFoundError(f"RUN_DIR = {args.run_dir}: no such directory; give a run's train.output_dir")
    if os.path.isfile(os.path.join(args.run_dir, "metrics.jsonl")):
        paths = plot_run(args.run_dir)
    elif run_dirs(args.run_dir):
        paths = plot_sweep(args.run_dir)
    else:
        raise FileNotFoundError(f"RUN_DIR = {args.run_dir}: no metrics.jsonl in it or below it; give a run's "
                                "train.output_dir or a sweep's output_dir")
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
