"""The data pipeline behind `python -m trainer.prepare CONFIG`: build the packed training data.

read -> normalise -> exact dedup -> near dedup -> tokenize -> pack -> write (DeepSeek-V3
report section 4.1 for cross-dump dedup and document packing). CONFIG is the training YAML;
only its `data:` and `dedup:` sections are used. Output in `data.output_dir/<name of the data>/<fingerprint>/`,
where the fingerprint hashes every field that changes the prepared bytes, so configs that differ
(say in seq_len or tokenizer) never overwrite each other's data:
  train.bin/.idx (+ .doclens*.npy), valid.* when data.valid_fraction > 0, tokenizer.json,
  meta.json (what the stream needs), report.json (the summary, machine-readable) and last
  _COMPLETE.json holding the preparation-relevant config and each input's identity (size, mtime,
  sha256; see `data.identity`); `ensure_prepared` reuses a directory only when that record matches
  the current config and no input changed, and prepares it again otherwise.

Determinism: work is cut into fixed chunks of documents independent of the worker count and
mapped in order, BPE training sees the kept texts in order, and the valid split uses a fixed
seed, so the bytes written are identical for any `data.workers`.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time

import numpy as np

from data.config import DataConfig
from data.dedup.config import DedupConfig
from data.identity import changed_inputs, data_name, input_identities
from data.indexed import IndexedWriter
from data.normalize import BadInputLedger, normalize_chunk
from data.packing import pack, packing_stats
from data.report import StageTimer, summary_text
from data.sources import expand_dumps, is_bundled, read_dump
from data.tokenize import load_tokenizer, resolve_tokenizer, tokenize_chunk, tokenizer_source

_CHUNK = 128
_NOT_PREPARATION = ("workers", "seed", "output_dir", "blend", "weight")
MARKER = "_COMPLETE.json"
log = logging.getLogger("data")


def preparation_record(data_cfg: DataConfig, dedup_cfg: DedupConfig) -> dict:
    """The config fields that change the prepared bytes (workers, seed, output_dir do not)."""
    data = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in _NOT_PREPARATION}
    return {"version": 1, "data": data, "dedup": dataclasses.asdict(dedup_cfg)}


def prepared_dir(data_cfg: DataConfig, dedup_cfg: DedupConfig) -> str:
    """`data.output_dir/<name of the dumps>/<12 hex digits of the preparation record's sha256>`."""
    record = json.dumps(preparation_record(data_cfg, dedup_cfg), sort_keys=True, default=str)
    return os.path.join(data_cfg.output_dir, data_name(data_cfg.dumps),
                        hashlib.sha256(record.encode()).hexdigest()[:12])


def _chunks(items: list, size: int = _CHUNK) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _map(pool, fn, jobs: list, timer: StageTimer) -> list:
    """Ordered map over jobs (in a pool if there is one), reporting progress per job."""
    out = []
    it = pool.imap(fn, jobs) if pool is not None else map(fn, jobs)
    for i, result in enumerate(it, 1):
        out.append(result)
        timer.update(i)
    return out


def _read(cfg: DataConfig, ledger: BadInputLedger, quiet: bool):
    specs = expand_dumps(cfg.dumps)
    texts: list[list[str]] = [[] for _ in specs]
    sources: list[list[str]] = [[] for _ in specs]
    read_counts = [0] * len(specs)
    with StageTimer("read", len(specs), quiet=quiet) as t:
        for d, spec in enumerate(specs):
            for raw in read_dump(spec, cfg.text_field, cfg.bundled_mb if is_bundled(spec) else 0.0):
                read_counts[d] += 1
                if raw.error:
                    ledger.add(raw.error, raw.source)
                else:
                    texts[d].append(raw.text)
                    sources[d].append(raw.source)
            t.update(d + 1)
        t.docs_in = sum(read_counts)
        t.docs_out = sum(map(len, texts))
        t.mb = sum(len(x) for dump in texts for x in dump) / 1e6
    return specs, texts, sources, read_counts, t


def _normalise(cfg, pool, texts, sources, ledger, quiet):
    jobs = [(chunk, cfg.normalize, cfg.max_doc_chars) for dump in texts for chunk in _chunks(dump)]
    with StageTimer("normalise", len(jobs), quiet=quiet) as t:
        results = [r for chunk in _map(pool, normalize_chunk, jobs, t) for r in chunk]
        out, pos = [], 0
        for d, dump in enumerate(texts):
            kept = []
            for i in range(len(dump)):
                text, reason = results[pos]
                pos += 1
                if reason:
                    ledger.add(reason, sources[d][i], dump[i])
                else:
                    kept.append(text)
            out.append(kept)
        t.docs_in, t.docs_out = len(results), sum(map(len, out))
        t.mb = sum(len(x) for dump in texts for x in dump) / 1e6
    return out, t


def _dedup(dedup_cfg: DedupConfig, texts: list[list[str]], quiet: bool):
    with StageTimer("dedup", len(texts), quiet=quiet) as t:
        if dedup_cfg.exact or dedup_cfg.near:
            from data.dedup import dedup_dumps
            result = dedup_dumps(texts, dedup_cfg)
            keep, stats = result.keep, result.stats
        else:
            keep, stats = [np.ones(len(x), bool) for x in texts], {}
        t.docs_in = sum(map(len, texts))
        t.docs_out = int(sum(k.sum() for k in keep))
        t.mb = sum(len(x) for dump in texts for x in dump) / 1e6
    kept = [[x for x, k in zip(dump, mask) if k] for dump, mask in zip(texts, keep)]
    return kept, keep, stats, t


def _tokenize(tok_path: str, allow_fast: bool, pool, docs: list[str], quiet: bool):
    jobs = [(tok_path, allow_fast, chunk) for chunk in _chunks(docs)]
    with StageTimer("tokenize", len(jobs), quiet=quiet) as t:
        tokens = [a for chunk in _map(pool, tokenize_chunk, jobs, t) for a in chunk]
        t.docs_in = t.docs_out = len(docs)
        t.mb = sum(len(x.encode("utf-8")) for x in docs) / 1e6
    return tokens, t


def _write(out_dir: str, cfg: DataConfig, tokens, sequences, vocab_size: int, quiet: bool):
    valid = np.zeros(len(sequences), bool)
    n_valid = int(round(cfg.valid_fraction * len(sequences)))
    valid[np.random.default_rng(0).permutation(len(sequences))[:n_valid]] = True
    writers = {"train": IndexedWriter(os.path.join(out_dir, "train"), vocab_size)}
    if n_valid:
        writers["valid"] = IndexedWriter(os.path.join(out_dir, "valid"), vocab_size)
    with StageTimer("write", len(sequences), quiet=quiet) as t:
        for i, seq in enumerate(sequences):
            arr = np.concatenate([tokens[p.doc][p.start:p.end] for p in seq])
            writers["valid" if valid[i] else "train"].add(arr, [p.length for p in seq])
            if i % 256 == 0:
                t.update(i)
        counts = {name: w.finalize() for name, w in writers.items()}
        t.docs_in = t.docs_out = len(sequences)
    counts.setdefault("valid", 0)
    return counts, t


def prepare(data_cfg: DataConfig, dedup_cfg: DedupConfig, quiet: bool = False) -> dict:
    """Run the whole pipeline into `data_cfg.output_dir`; returns the report dict."""
    out_dir = data_cfg.output_dir
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MARKER)):
        os.remove(os.path.join(out_dir, MARKER))
    if not data_cfg.tokenizer.startswith("bpe:"):
        tokenizer_source(data_cfg.tokenizer)  # a missing tokenizer fails before any work
    inputs = input_identities(data_cfg.dumps)  # before reading: an edit made meanwhile is seen next time
    workers = data_cfg.workers or min(os.cpu_count() or 1, 8)
    t_start = time.perf_counter()
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        ledger = BadInputLedger()
        specs, texts, sources, read_counts, t_read = _read(data_cfg, ledger, quiet)
        texts, t_norm = _normalise(data_cfg, pool, texts, sources, ledger, quiet)
        ledger.check(sum(read_counts), data_cfg.max_error_fraction)
        kept, keep, dedup_stats, t_dedup = _dedup(dedup_cfg, texts, quiet)
        docs = [x for dump in kept for x in dump]
        if not docs:
            raise ValueError(f"data.dumps = {data_cfg.dumps}: no document survived reading, "
                             "normalisation and dedup")
        tok_path = os.path.join(out_dir, "tokenizer.json")
        with StageTimer("tokenizer", 1, quiet=quiet) as t_tok:
            resolve_tokenizer(data_cfg.tokenizer, docs, tok_path)
            tok = load_tokenizer(tok_path, data_cfg.fast_tokenizer)
        vocab_warning = _vocab_shortfall(data_cfg.tokenizer, tok.vocab_size)
        fast = tok.fast is not None
        tokens, t_tokz = _tokenize(tok_path, data_cfg.fast_tokenizer, pool, docs, quiet)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    doc_lens = np.asarray([len(a) for a in tokens], dtype=np.int64)
    with StageTimer("pack", len(docs), quiet=quiet) as t_pack:
        sequences = list(pack(doc_lens, data_cfg.seq_len, data_cfg.packing, data_cfg.pack_buffer))
        t_pack.docs_in, t_pack.docs_out = len(docs), len(sequences)
    counts, t_write = _write(out_dir, data_cfg, tokens, sequences, tok.vocab_size, quiet)
    report = {
        "stages": [t.row() for t in (t_read, t_norm, t_dedup, t_tok, t_tokz, t_pack, t_write)],
        "dumps": [{"dump": s, "read": read_counts[d], "bad": read_counts[d] - len(keep[d]),
                   "duplicates": int((~keep[d]).sum()), "kept": int(keep[d].sum()),
                   "exact_removed": (dedup_stats.get("exact_removed") or [0] * len(specs))[d],
                   "near_removed": (dedup_stats.get("near_removed") or [0] * len(specs))[d]}
                  for d, s in enumerate(specs)],
        "dedup": dedup_stats, "bad_input": ledger.to_dict(),
        "tokenizer": {"spec": data_cfg.tokenizer, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                      "pad_id": tok.pad_id, "fast_path": fast, "warning": vocab_warning},
        "packing_mode": data_cfg.packing, "seq_len": data_cfg.seq_len,
        "packing": packing_stats(sequences, doc_lens, data_cfg.seq_len),
        "sequences": counts, "seconds": round(time.perf_counter() - t_start, 3),
    }
    meta = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "seq_len": data_cfg.seq_len, "packing": data_cfg.packing, "sequences": counts,
            "tokenizer": "tokenizer.json"}
    _write_json(os.path.join(out_dir, "meta.json"), meta)
    _write_json(os.path.join(out_dir, "report.json"), report)
    _write_json(os.path.join(out_dir, MARKER), {"config": preparation_record(data_cfg, dedup_cfg),
                                                "inputs": inputs})
    return report


def _vocab_shortfall(spec: str, reached: int) -> str | None:
    """A warning when 'bpe:N' reached fewer than N tokens (the corpus has too few distinct merges)."""
    if not spec.startswith("bpe:") or reached >= int(spec[4:]):
        return None
    msg = (f"data.tokenizer = {spec!r}: the corpus only supports a {reached}-token vocabulary; "
           f"use data.tokenizer=bpe:{reached} (and model.vocab_size >= {reached}) or add more text")
    log.warning(msg)
    return msg


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def stale_reason(out_dir: str, data_cfg: DataConfig, dedup_cfg: DedupConfig) -> str | None:
    """Why `out_dir` must be prepared (again), or None when it is complete and its inputs unchanged."""
    path = os.path.join(out_dir, MARKER)
    if not os.path.isfile(path):
        return "not prepared yet"
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        config, inputs = recorded["config"], recorded["inputs"]
    except (ValueError, KeyError, TypeError):
        return f"{MARKER} unreadable or from an older version"
    if config != json.loads(json.dumps(preparation_record(data_cfg, dedup_cfg), default=str)):
        return "the data config differs"
    changed = changed_inputs(inputs, data_cfg.dumps)
    return f"input changed: {', '.join(changed)}" if changed else None


def _complete(out_dir: str, data_cfg: DataConfig, dedup_cfg: DedupConfig) -> bool:
    return stale_reason(out_dir, data_cfg, dedup_cfg) is None


def ensure_prepared(data_cfg: DataConfig, dedup_cfg: DedupConfig, quiet: bool = False) -> str:
    """The prepared output dir, preparing it first unless a matching completion record exists.

    Safe to call from every rank at once: a file lock lets one process prepare while the
    others wait, then they all see the record.
    """
    data_cfg = dataclasses.replace(data_cfg, output_dir=prepared_dir(data_cfg, dedup_cfg))
    if _complete(data_cfg.output_dir, data_cfg, dedup_cfg):
        return data_cfg.output_dir
    os.makedirs(data_cfg.output_dir, exist_ok=True)
    with open(os.path.join(data_cfg.output_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            reason = stale_reason(data_cfg.output_dir, data_cfg, dedup_cfg)
            if reason is not None:
                if not quiet:
                    log.info("preparing %s (%s)", data_cfg.output_dir, reason)
                report = prepare(data_cfg, dedup_cfg, quiet=quiet)
                if not quiet:
                    print(summary_text(report), file=sys.stderr)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return data_cfg.output_dir
