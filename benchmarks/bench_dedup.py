"""Near-duplicate dedup benchmark: moepipe vs datatrove's MinHash pipeline vs datasketch.

All systems see the same two dumps built by `data.dedup.synth.edited_copies_dumps`: dump 0
holds real documents (SOTU address chunks), dump 1 holds copies of some of them with 5-10%
of the words edited plus fresh distinct documents. Reported per system: MB/s (UTF-8 input
bytes per CPU second of this process, as in REFERENCE.md's baselines, so that other load on
the machine distorts less; signing + matching + clustering), recall (copies grouped with
their original) and false positives (distinct documents grouped with another).

    python benchmarks/bench_dedup.py [--orig 400] [--fresh 400] [--skip-datatrove]

datatrove (pip install datatrove spacy; not a project dependency) runs its four stages
(signatures, buckets, clusters) in-process on a temp folder with its defaults: 5-gram, 14
bands x 8 rows, spaCy word splitting (its shingle hash gets the text UTF-8 encoded first:
xxhash 4 refuses str, which datatrove 0.10.1 passes). datasketch MinHashLSH gets the same 3-gram shingles
as moepipe, 128 permutations and LSH threshold 0.4, query-then-insert in document order.
"""
from __future__ import annotations

import argparse
import re
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

from data.dedup import DedupConfig, dedup_dumps
from data.dedup.synth import EditedSet, edited_copies_dumps, recall_and_fp

_WORD = re.compile(r"[A-Za-z0-9]+|[^\x00-\x7f]")


def run_moepipe(es: EditedSet, cfg: DedupConfig) -> tuple[float, float, float]:
    t0 = time.process_time()
    res = dedup_dumps(es.dumps, cfg)
    dt = time.process_time() - t0
    return (dt, *recall_and_fp(es, res.keep))


def _shingles(text: str, n: int) -> list[bytes]:
    w = [x.lower() for x in _WORD.findall(text)]
    return [" ".join(w[i:i + n]).encode() for i in range(max(1, len(w) - n + 1))]


def run_datasketch(es: EditedSet, threshold: float = 0.4, n: int = 3) -> tuple[float, float, float]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.process_time()
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    keep = []
    for d, texts in enumerate(es.dumps):
        k = np.ones(len(texts), bool)
        for i, t in enumerate(texts):
            m = MinHash(num_perm=128, seed=1)
            m.update_batch(_shingles(t, n))
            k[i] = not lsh.query(m)
            lsh.insert(f"{d}:{i}", m)
        keep.append(k)
    return (time.process_time() - t0, *recall_and_fp(es, keep))


def run_datatrove(es: EditedSet) -> tuple[float, float, float]:
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupSignature)
    from loguru import logger

    logger.remove()
    cfg = MinhashConfig()  # 5-gram, 14 buckets x 8 hashes
    with tempfile.TemporaryDirectory() as tmp:
        sig_dir, dup_dir, out_dir = (str(Path(tmp) / x) for x in ("sigs", "dups", "clusters"))
        sign = MinhashDedupSignature(output_folder=sig_dir, config=cfg, language="en")
        # xxhash >= 4 no longer hashes str; datatrove 0.10.1 passes str, so encode first
        sign._hash_func = lambda s, h=xxhash.xxh64_intdigest: h(s.encode("utf-8"))
        sign.get_shingles("warm up the spaCy tokenizer before timing")
        t0 = time.process_time()
        for d, texts in enumerate(es.dumps):
            sign.run(iter(Document(text=t, id=f"{d}:{i}") for i, t in enumerate(texts)), rank=d, world_size=2)
        buckets = MinhashDedupBuckets(input_folder=sig_dir, output_folder=dup_dir, config=cfg)
        for b in range(cfg.num_buckets):
            out = buckets.run(None, rank=b, world_size=cfg.num_buckets)
            if out is not None:
                list(out)
        MinhashDedupCluster(input_folder=dup_dir, output_folder=out_dir, config=cfg, save_cluster_id=True).run()
        dt = time.process_time() - t0
        clusters = [_read_clusters(Path(out_dir) / f"{d:06d}.clusters", len(t)) for d, t in enumerate(es.dumps)]
    return (dt, *_cluster_quality(es, clusters))


def _read_clusters(path: Path, n: int) -> np.ndarray:
    """Cluster id per document (-1 for documents in no cluster)."""
    ids = np.full(n, -1, np.int64)
    if path.exists():
        raw = path.read_bytes()
        for doc, cid in struct.iter_unpack("<2I", raw):
            ids[doc] = cid
    return ids


def _cluster_quality(es: EditedSet, clusters: list[np.ndarray]) -> tuple[float, float]:
    """Recall: copies clustered with their source; FP: distinct docs clustered with another family."""
    n0 = len(es.dumps[0])
    fam1 = np.full(len(es.dumps[1]), -1, np.int64)
    fam1[es.is_copy[1]] = es.source
    fresh = np.flatnonzero(~es.is_copy[1])
    fam1[fresh] = n0 + np.arange(fresh.size)
    fam = np.concatenate((np.arange(n0), fam1))
    cid = np.concatenate(clusters)
    copies = n0 + np.flatnonzero(es.is_copy[1])
    recall = np.mean([cid[c] >= 0 and cid[c] == cid[fam[c]] for c in copies])
    bad = 0
    distinct = np.concatenate((np.arange(n0), n0 + fresh))
    for i in distinct:
        if cid[i] >= 0:
            bad += bool(np.any(fam[cid == cid[i]] != fam[i]))
    return float(recall), bad / len(distinct)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orig", type=int, default=400, help="originals in dump 0 (copies of each in dump 1)")
    ap.add_argument("--fresh", type=int, default=400, help="fresh distinct documents in dump 1")
    ap.add_argument("--skip-datatrove", action="store_true")
    args = ap.parse_args()
    es = edited_copies_dumps(args.orig, args.orig, args.fresh, seed=0)
    mb = sum(len(t.encode()) for d in es.dumps for t in d) / 1e6
    print(f"{sum(map(len, es.dumps))} documents, {mb:.2f} MB, {args.orig} edited copies (5-10% of words)")
    rows = []
    ours = DedupConfig()
    rows.append((f"moepipe ({ours.shingle_size}-gram, {ours.bands}x{ours.rows}, thr {ours.threshold})",
                 *run_moepipe(es, ours)))
    rows.append(("moepipe with datatrove params (5-gram, 14x8, no verify)",
                 *run_moepipe(es, DedupConfig(shingle_size=5, bands=14, rows=8, threshold=0.0))))
    rows.append(("datasketch MinHashLSH (3-gram, 128 perm, thr 0.4)", *run_datasketch(es)))
    if not args.skip_datatrove:
        try:
            rows.append(("datatrove 0.10 MinHash (5-gram, 14x8)", *run_datatrove(es)))
        except ImportError as e:
            print(f"datatrove not available ({e}); pip install datatrove spacy")
    base = next((r[1] for r in rows if r[0].startswith("datatrove")), None)
    print(f"\n{'system':58s} {'MB/s':>8s} {'x datatrove':>12s} {'recall':>8s} {'false pos':>10s}")
    for name, dt, rec, fp in rows:
        speed = f"{base / dt:12.1f}" if base else f"{'-':>12s}"
        print(f"{name:58s} {mb / dt:8.2f} {speed} {rec:8.4f} {fp:10.4f}")


if __name__ == "__main__":
    main()
