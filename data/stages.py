"""The preparation stages, each a function of one unit: `fn(ctx, unit, out) -> stats`.

  sign       per input shard: read, normalise, exact hash (xxh3_128), MinHash signature and
             LSH band keys; band keys and exact hashes are written partitioned by bucket
  buckets    per hash bucket: exact duplicates (every copy of a hash but the earliest) and
             near-duplicate candidate pairs among documents sharing a band key (exact copies
             left out): within a dedup batch each is paired with the next in global-id order,
             across batches with the earliest of every earlier batch; pairs verified by
             estimated Jaccard
  clusters   one unit: within each batch, connected components of the verified pairs keep
             their earliest document, and a component that matched an earlier batch is
             dropped whole (plus the exact duplicates). It holds only the ids of documents
             that have a duplicate, never documents
  tokenizer  one unit: the tokenizer.json ('bpe:N' trains on a seeded sample of kept text)
  tokenize   per input shard: read and normalise again, skip dropped ids, tokenize, pack,
             write the shard's Megatron .bin/.idx (train, and valid when asked)

Cross-dump dedup keeping the earliest dump's copy is DeepSeek LLM's (arXiv 2401.02954,
section 2), kept by DeepSeek-V3 (arXiv 2412.19437, section 4.1). The decisions are exactly
those of `data.dedup.dedup_dumps` (one process feeding `DedupIndex.add` batch after batch of
`dedup.batch_docs` documents per dump): the same exact-first rule, the same candidate pairs,
verification and components; a batch is (dump, position in the dump // batch_docs), known
from the sign stage's counts, so no decision waits on an earlier one.

Memory: a sign or tokenize unit holds one shard; a bucket unit holds its slice of every
shard's band keys (about 12 bytes per document and band over the bucket count).
Legend: N documents of a shard, K signature bins, B bands, R bucket records, E edges.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np

from data.dedup import lsh
from data.dedup.index import sign_batch
from data.dedup.minhash import mix64
from data.indexed import IndexedWriter
from data.normalize import normalize_text
from data.packing import pack, packing_stats
from data.shards import RECORD_BITS, global_ids, read_shard
from data.tasks import unit_array
from data.tokenize import load_tokenizer, tokenize_chunk, train_bpe, tokenizer_source

_EXAMPLES = 3
log = logging.getLogger("data")
_SAMPLE_TAG = np.uint64(0x5A17E5A17E)


def _save(out: str, **arrays) -> None:
    for name, a in arrays.items():
        np.save(os.path.join(out, f"{name}.npy"), a)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def sample_priority(gids: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random rank per document (the tokenizer sample takes the lowest)."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(gids, np.uint64) ^ _SAMPLE_TAG)


# ---------------------------------------------------------------------------------- read

def clean_docs(ctx, s: int, bad: dict | None = None):
    """(records int64, normalised texts, records read) of shard s; counts rejects into `bad`."""
    cfg = ctx.data
    records, texts, n = [], [], 0
    for i, raw in enumerate(read_shard(ctx.shards[s], cfg.text_field, cfg.bundled_mb)):
        n = i + 1
        reason, text = raw.error, None
        if reason is None:
            if len(raw.text) > cfg.max_doc_chars:
                reason = "too_long"
            else:
                text = normalize_text(raw.text, cfg.normalize)
                reason = None if text else "empty"
        if reason is not None:
            if bad is not None:
                entry = bad.setdefault(reason, [0, []])
                entry[0] += 1
                if len(entry[1]) < _EXAMPLES:
                    entry[1].append(f"{raw.source} {raw.text[:80]!r}" if raw.text else raw.source)
                    log.warning("bad input (%s): %s", reason, entry[1][-1])
            continue
        records.append(i)
        texts.append(text)
    return np.asarray(records, np.int64), texts, n


# ---------------------------------------------------------------------------------- sign

def sign(ctx, s: int, out: str) -> dict:
    bad: dict = {}
    records, texts, n_read = clean_docs(ctx, s, bad)
    cfg = ctx.dedup
    parts = [sign_batch(texts[lo:lo + cfg.batch_docs], cfg) for lo in range(0, len(texts), cfg.batch_docs)]
    if not parts:
        parts = [sign_batch([], cfg)]
    exact = np.concatenate([p.exact_N2 for p in parts])
    sig = np.concatenate([p.sig_NK for p in parts])
    has = np.concatenate([p.has_sig_N for p in parts])
    keys = np.concatenate([p.keys_NB for p in parts])
    nbytes = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), np.int64, len(texts))
    _save(out, records=records.astype(np.int32), exact=exact, sig=sig, has=has, nbytes=nbytes)
    _partition_near(out, keys, has, ctx.buckets, cfg.near)
    _partition_exact(out, exact, ctx.buckets, cfg.exact)
    gids = global_ids(s, records)
    pick = sample_priority(gids) <= np.uint64(min(int(ctx.sample_fraction * 2**64), 2**64 - 1))
    if ctx.data.tokenizer.startswith("bpe:"):
        _write_json(os.path.join(out, "sample.json"), [[int(g), texts[i]] for i, g in
                                                       zip(np.flatnonzero(pick).tolist(), gids[pick].tolist())])
    return {"read": n_read, "docs": len(texts), "bytes": int(nbytes.sum()),
            "bad": {k: v[0] for k, v in bad.items()}, "examples": {k: v[1] for k, v in bad.items()}}


def _partition_near(out: str, keys_NB: np.ndarray, has_N: np.ndarray, n_buckets: int, near: bool) -> None:
    """Band keys of signed documents as records (key, row), grouped by bucket = key mod buckets."""
    rows = np.flatnonzero(has_N) if near else np.zeros(0, np.int64)
    key_R = keys_NB[rows].reshape(-1) if near else np.zeros(0, np.uint64)
    row_R = np.repeat(rows, keys_NB.shape[1]) if near else np.zeros(0, np.int64)
    bucket = (key_R % np.uint64(n_buckets)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    offsets = np.concatenate(([0], np.cumsum(np.bincount(bucket, minlength=n_buckets))))
    _save(out, band_key=key_R[order], band_row=row_R[order].astype(np.int32), band_off=offsets)


def _partition_exact(out: str, exact_N2: np.ndarray, n_buckets: int, exact: bool) -> None:
    rows = np.arange(len(exact_N2)) if exact else np.zeros(0, np.int64)
    bucket = (exact_N2[rows, 0] % np.uint64(n_buckets)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    offsets = np.concatenate(([0], np.cumsum(np.bincount(bucket, minlength=n_buckets))))
    _save(out, exact_row=rows[order].astype(np.int32), exact_off=offsets)


# ---------------------------------------------------------------------------------- buckets

def _gather(ctx, b: int, kind: str):
    """This bucket's records from every shard: (shard_R, row_R, key_R or None)."""
    shard, row, key = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.uint64)]
    for s in range(len(ctx.shards)):
        off = unit_array(ctx, "sign", s, f"{kind}_off")
        lo, hi = int(off[b]), int(off[b + 1])
        if hi == lo:
            continue
        row.append(np.asarray(unit_array(ctx, "sign", s, f"{kind}_row")[lo:hi], np.int64))
        shard.append(np.full(hi - lo, s, np.int64))
        if kind == "band":
            key.append(np.asarray(unit_array(ctx, "sign", s, "band_key")[lo:hi]))
    return np.concatenate(shard), np.concatenate(row), np.concatenate(key)


def _per_shard(ctx, name: str, shard_R: np.ndarray, row_R: np.ndarray) -> np.ndarray:
    """Row `row_R[i]` of shard `shard_R[i]`'s array `name`, for every record."""
    first = unit_array(ctx, "sign", 0, name)
    out = np.zeros((len(row_R),) + first.shape[1:], first.dtype)
    for s in np.unique(shard_R).tolist():
        at = np.flatnonzero(shard_R == s)
        out[at] = np.asarray(unit_array(ctx, "sign", s, name)[row_R[at]])
    return out


def _gids(ctx, shard_R: np.ndarray, row_R: np.ndarray) -> np.ndarray:
    return global_ids(shard_R, _per_shard(ctx, "records", shard_R, row_R).astype(np.int64))


def buckets(ctx, b: int, out: str) -> dict:
    exact_dups = _exact_duplicates(ctx, b)
    within, linked, hits, st = _near_pairs(ctx, b)
    _save(out, exact_dups=exact_dups, within=within, linked=linked, hits=hits)
    return {**st, "exact": len(exact_dups)}


def _exact_duplicates(ctx, b: int) -> np.ndarray:
    """Global ids of every copy of an exact hash but the earliest, sorted."""
    shard_R, row_R, _ = _gather(ctx, b, "exact")
    if len(row_R) == 0:
        return np.zeros(0, np.int64)
    h = _per_shard(ctx, "exact", shard_R, row_R)
    g = _gids(ctx, shard_R, row_R)
    order = np.lexsort((g, h[:, 1], h[:, 0]))
    h, g = h[order], g[order]
    first = np.concatenate(([True], (h[1:] != h[:-1]).any(axis=1)))
    return np.sort(g[~first])


def dedup_batches(ctx, shard_R: np.ndarray, row_R: np.ndarray) -> np.ndarray:
    """The dedup batch of each record: (dump, position among the dump's documents // dedup.batch_docs).

    Decisions follow `DedupIndex.add` fed batch after batch: a document is dropped when it
    matches one of an earlier batch, or when it is not the earliest of its cluster in its own
    batch; so the batches are part of what "exactly as one process" means.
    """
    from data.tasks import unit_stats
    docs = np.asarray([st["docs"] for st in unit_stats(ctx, "sign", len(ctx.shards))], np.int64)
    dump = np.asarray([sh.dump for sh in ctx.shards], np.int64)
    before = np.zeros(len(docs), np.int64)  # documents of the same dump in earlier shards
    for s in range(1, len(docs)):
        before[s] = before[s - 1] + docs[s - 1] if dump[s] == dump[s - 1] else 0
    return (dump[shard_R] << 40) | ((before[shard_R] + row_R) // ctx.dedup.batch_docs)


def _near_pairs(ctx, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """This bucket's verified within-batch pairs, and the documents verified against an earlier batch.

    Per band key, documents in global-id order (exact copies dropped): within a batch each is
    paired with the next (a chain: m documents cost m-1 pairs); across batches each is paired
    with the earliest document of every earlier batch that has the key, as `DedupIndex.add`
    does against its stored shards.
    """
    empty = np.zeros((0, 2), np.int64)
    st = {"candidates": 0, "rejected": 0}
    shard_R, row_R, key_R = _gather(ctx, b, "band")
    if len(row_R) == 0:
        return empty, np.zeros(0, np.int64), empty, st
    g = _gids(ctx, shard_R, row_R)
    if ctx.dedup.exact:  # exact copies share every band key: keep each hash's earliest only
        h = _per_shard(ctx, "exact", shard_R, row_R)
        order = np.lexsort((g, h[:, 1], h[:, 0], key_R))
        k_s, h_s = key_R[order], h[order]
        first = np.concatenate(([True], (k_s[1:] != k_s[:-1]) | (h_s[1:] != h_s[:-1]).any(axis=1)))
        keep = order[first]
        shard_R, row_R, key_R, g = shard_R[keep], row_R[keep], key_R[keep], g[keep]
    order = np.lexsort((g, key_R))
    shard_R, row_R, key_R, g = shard_R[order], row_R[order], key_R[order], g[order]
    batch = dedup_batches(ctx, shard_R, row_R)
    within = np.flatnonzero((key_R[1:] == key_R[:-1]) & (batch[1:] == batch[:-1]))
    within = np.stack((within, within + 1), axis=1)
    cross = _cross_pairs(key_R, batch)
    pairs = np.concatenate((within, cross))
    if len(pairs) == 0:
        return empty, np.zeros(0, np.int64), empty, st
    used = np.unique(pairs)
    sig = _per_shard(ctx, "sig", shard_R[used], row_R[used])
    at = np.searchsorted(used, pairs)
    ok = lsh.similarity(sig[at[:, 0]], sig[at[:, 1]]) >= ctx.dedup.threshold
    n_in = len(within)
    w = np.unique(np.stack((g[within[ok[:n_in], 0]], g[within[ok[:n_in], 1]]), axis=1), axis=0) \
        if ok[:n_in].any() else empty
    c_ok = cross[ok[n_in:]]
    hits = np.unique(np.stack((batch[c_ok[:, 1]], g[c_ok[:, 0]]), axis=1), axis=0) if len(c_ok) else empty
    st.update(candidates=len(pairs), rejected=int((~ok).sum()))
    return w, np.unique(g[c_ok[:, 1]]), hits, st


def _cross_pairs(key_R: np.ndarray, batch_R: np.ndarray) -> np.ndarray:
    """(head, record) pairs: each record with the first record of every earlier batch of its key.

    Records are sorted by (key, global id), so batches of a key are contiguous and ascending.
    """
    n = len(key_R)
    new_key = np.concatenate(([True], key_R[1:] != key_R[:-1]))
    head = new_key | np.concatenate(([True], batch_R[1:] != batch_R[:-1]))
    head_idx = np.flatnonzero(head)
    heads_so_far = np.cumsum(head) - 1  # index into head_idx of the record's own batch head
    first_head_of_key = (np.cumsum(head) - 1)[np.flatnonzero(new_key)]
    key_no = np.cumsum(new_key) - 1
    count = heads_so_far - first_head_of_key[key_no]  # heads of earlier batches with this key
    if count.sum() == 0:
        return np.zeros((0, 2), np.int64)
    rec = np.repeat(np.arange(n), count)
    start = np.repeat(first_head_of_key[key_no], count)
    offset = np.arange(len(rec)) - np.repeat(np.cumsum(count) - count, count)
    return np.stack((head_idx[start + offset], rec), axis=1)


# ---------------------------------------------------------------------------------- clusters

def clusters(ctx, _unit: int, out: str) -> dict:
    from data.tasks import unit_stats
    signs = unit_stats(ctx, "sign", len(ctx.shards))
    _check_bad_fraction(ctx, signs)
    exact = [unit_array(ctx, "buckets", b, "exact_dups", mmap=False) for b in range(ctx.buckets)]
    exact_dups = np.unique(np.concatenate(exact)) if exact else np.zeros(0, np.int64)
    within = np.concatenate([unit_array(ctx, "buckets", b, "within", mmap=False) for b in range(ctx.buckets)])
    linked = np.unique(np.concatenate([unit_array(ctx, "buckets", b, "linked", mmap=False) for b in range(ctx.buckets)]))
    near, n_clusters = _near_decisions(np.unique(within, axis=0) if len(within) else within, linked)
    if ctx.dedup.index_dir:
        from data.dedup.persistent import drop_against_index
        extra = drop_against_index(ctx, np.union1d(exact_dups, near))
        near = np.union1d(near, extra)
    drop = np.union1d(exact_dups, near)
    _save(out, drop=drop.astype(np.int64))
    dump_of = np.asarray([sh.dump for sh in ctx.shards], np.int64)
    n_dumps = int(dump_of.max()) + 1 if len(dump_of) else 0
    per_dump = lambda ids: np.bincount(dump_of[ids >> RECORD_BITS], minlength=n_dumps).tolist()  # noqa: E731
    bstats = [_bucket_stat(ctx, b) for b in range(ctx.buckets)]
    hits = np.concatenate([unit_array(ctx, "buckets", b, "hits", mmap=False) for b in range(ctx.buckets)])
    n_clusters += len(np.unique(hits, axis=0)) if len(hits) else 0  # earlier documents matched, per batch
    return {"exact_removed": per_dump(exact_dups), "near_removed": per_dump(near), "clusters": n_clusters,
            "candidates": sum(s["candidates"] for s in bstats), "rejected": sum(s["rejected"] for s in bstats)}


def _near_decisions(within_E2: np.ndarray, linked: np.ndarray) -> tuple[np.ndarray, int]:
    """Near-duplicates: every member of a within-batch cluster but the earliest, and whole clusters
    (singletons included) holding a document that matched an earlier batch. Also the count of
    clusters decided within their batch."""
    nodes = np.union1d(np.unique(within_E2), linked)
    labels = lsh.components(len(nodes), np.searchsorted(nodes, within_E2))
    old = np.zeros(len(nodes), bool)
    old[labels[np.searchsorted(nodes, linked)]] = True
    dup = (labels != np.arange(len(nodes))) | old[labels]
    return nodes[dup], int(np.unique(labels[dup & ~old[labels]]).size)


def _bucket_stat(ctx, b: int) -> dict:
    with open(ctx.work("buckets", f"{b:06d}.done.json"), encoding="utf-8") as f:
        return json.load(f)["stats"]


def _check_bad_fraction(ctx, signs: list[dict]) -> None:
    read = sum(s["read"] for s in signs)
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    for st in signs:
        for k, v in st["bad"].items():
            counts[k] = counts.get(k, 0) + v
            examples.setdefault(k, st["examples"][k][0])
    total = sum(counts.values())
    if read and total / read > ctx.data.max_error_fraction:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        ex = "; ".join(f"{k}: {v}" for k, v in sorted(examples.items()))
        raise ValueError(f"data.max_error_fraction = {ctx.data.max_error_fraction}: {total} of {read} "
                         f"input records are bad ({detail}); first examples: {ex}. "
                         "Fix the input or raise data.max_error_fraction")


def dropped_in_shard(ctx, s: int) -> np.ndarray:
    """Records of shard s that dedup drops (sorted)."""
    drop = unit_array(ctx, "clusters", 0, "drop")
    lo, hi = np.searchsorted(drop, [s << RECORD_BITS, (s + 1) << RECORD_BITS])
    return np.asarray(drop[lo:hi]) - (s << RECORD_BITS)


# ---------------------------------------------------------------------------------- tokenizer

def tokenizer(ctx, _unit: int, out: str) -> dict:
    from data.tasks import unit_stats
    docs = sum(st["docs"] for st in unit_stats(ctx, "sign", len(ctx.shards)))
    if docs - len(unit_array(ctx, "clusters", 0, "drop")) <= 0:
        raise ValueError(f"data.dumps = {ctx.data.dumps}: no document survived reading, normalisation and dedup")
    path = os.path.join(out, "tokenizer.json")
    spec = ctx.data.tokenizer
    if not spec.startswith("bpe:"):
        shutil.copyfile(tokenizer_source(spec), path)
        return {"docs": 0, "bytes": 0}
    texts = tokenizer_sample(ctx)
    train_bpe(texts, int(spec[4:])).save(path)
    return {"docs": len(texts), "bytes": sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)}


def tokenizer_sample(ctx) -> list[str]:
    """Kept documents of the lowest sample priority, up to data.tokenizer_sample_mb, in corpus order."""
    drop = unit_array(ctx, "clusters", 0, "drop", mmap=False)
    gid, text = [], []
    for s in range(len(ctx.shards)):
        with open(ctx.work("sign", f"{s:06d}", "sample.json"), encoding="utf-8") as f:
            for g, t in json.load(f):
                gid.append(g)
                text.append(t)
    gid_a = np.asarray(gid, np.int64)
    kept = np.flatnonzero(~np.isin(gid_a, drop))
    order = kept[np.argsort(sample_priority(gid_a[kept]), kind="stable")]
    size = np.cumsum([len(text[i].encode("utf-8", "surrogatepass")) for i in order.tolist()])
    take = order[:max(1, int(np.searchsorted(size, ctx.data.tokenizer_sample_mb * 1e6, side="right")))]
    if len(take) == 0:
        raise ValueError(f"data.tokenizer_sample_mb = {ctx.data.tokenizer_sample_mb}: the tokenizer sample "
                         "holds no kept document (dedup removed them); raise it")
    return [text[i] for i in np.sort(take).tolist()]


# ---------------------------------------------------------------------------------- tokenize

def tokenize(ctx, s: int, out: str) -> dict:
    cfg = ctx.data
    records, texts, _ = clean_docs(ctx, s)
    keep = ~np.isin(records, dropped_in_shard(ctx, s))
    docs = [t for t, k in zip(texts, keep.tolist()) if k]
    tok_path = ctx.work("tokenizer", "000000", "tokenizer.json")
    tok = load_tokenizer(tok_path, cfg.fast_tokenizer)
    tokens = [a for lo in range(0, len(docs), 128)
              for a in tokenize_chunk((tok_path, cfg.fast_tokenizer, docs[lo:lo + 128]))]
    doc_lens = np.asarray([len(a) for a in tokens], np.int64)
    sequences = list(pack(doc_lens, cfg.seq_len, cfg.packing, cfg.pack_buffer))
    valid = np.zeros(len(sequences), bool)
    n_valid = int(round(cfg.valid_fraction * len(sequences)))
    valid[np.random.default_rng([0, s]).permutation(len(sequences))[:n_valid]] = True
    writers = {"train": IndexedWriter(os.path.join(out, "train"), tok.vocab_size),
               "valid": IndexedWriter(os.path.join(out, "valid"), tok.vocab_size)}
    for i, seq in enumerate(sequences):
        arr = np.concatenate([tokens[p.doc][p.start:p.end] for p in seq])
        writers["valid" if valid[i] else "train"].add(arr, [p.length for p in seq])
    counts = {name: w.finalize() for name, w in writers.items()}
    stats = packing_stats(sequences, doc_lens, cfg.seq_len)
    return {"docs": len(docs), "bytes": sum(len(t.encode("utf-8", "surrogatepass")) for t in docs),
            "sequences": counts, "packing": {k: stats[k] for k in ("sequences", "tokens", "padding_tokens",
                                                                   "docs", "docs_cut", "docs_longer_than_seq")}}


STAGES = {"sign": sign, "buckets": buckets, "clusters": clusters, "tokenizer": tokenizer, "tokenize": tokenize}
ORDER = ("sign", "buckets", "clusters", "tokenizer", "tokenize")


def n_units(ctx, stage: str) -> int:
    """Units of a stage: one per input shard, one per bucket, or one."""
    return {"sign": len(ctx.shards), "buckets": ctx.buckets, "tokenize": len(ctx.shards)}.get(stage, 1)
