"""The report and meta of a finished sharded preparation, from its units' markers.

report.json keeps the shape `data.report.summary_text` renders (per stage, per dump, packing
totals, bad input by reason); meta.json is what the token stream reads, including the list of
per-shard indexed files of each split, in shard order.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from data.stages import ORDER, n_units
from data.tasks import PLAN, Context, load_context, unit_stats
from data.tokenize import load_tokenizer

log = logging.getLogger("data")
MARKER = "_COMPLETE.json"  # the completion record of a prepared directory
_PACK_SUMS = ("sequences", "tokens", "padding_tokens", "docs", "docs_cut", "docs_longer_than_seq")


def build_report(ctx: Context, stage_seconds: dict | None = None) -> tuple[dict, dict]:
    st = {stage: unit_stats(ctx, stage, n_units(ctx, stage)) for stage in ORDER}
    signs, cl, toks = st["sign"], st["clusters"][0], st["tokenize"]
    tok = load_tokenizer(ctx.work("tokenizer", "000000", "tokenizer.json"), ctx.data.fast_tokenizer)
    dumps = _per_dump(ctx, signs, cl)
    packing = {k: sum(t["packing"][k] for t in toks) for k in _PACK_SUMS}
    slots = packing["sequences"] * ctx.data.seq_len
    packing["padding_fraction"] = packing["padding_tokens"] / slots if slots else 0.0
    packing["docs_cut_fraction"] = packing["docs_cut"] / packing["docs"] if packing["docs"] else 0.0
    counts = {split: sum(t["sequences"][split] for t in toks) for split in ("train", "valid")}
    docs, kept = sum(s["docs"] for s in signs), sum(d["kept"] for d in dumps)
    rows = {"sign": (sum(s["read"] for s in signs), docs, sum(s["bytes"] for s in signs)),
            "buckets": (docs, docs - sum(cl["exact_removed"]), 0),
            "clusters": (docs, kept, 0),
            "tokenizer": (st["tokenizer"][0]["docs"], st["tokenizer"][0]["docs"], st["tokenizer"][0]["bytes"]),
            "tokenize": (kept, kept, sum(t["bytes"] for t in toks))}
    stages = []
    for stage in ORDER:
        secs = (stage_seconds or {}).get(stage, sum(u["seconds"] for u in st[stage]))
        d_in, d_out, nbytes = rows[stage]
        stages.append({"stage": stage, "units": len(st[stage]), "docs_in": d_in, "docs_out": d_out,
                       "mb": round(nbytes / 1e6, 3), "seconds": round(secs, 3),
                       "mb_per_s": round(nbytes / 1e6 / secs, 2) if secs > 0 else 0.0})
    report = {
        "stages": stages, "dumps": dumps,
        "dedup": {"docs": [d["read"] - d["bad"] for d in dumps], "exact_removed": cl["exact_removed"],
                  "near_removed": cl["near_removed"], "kept": [d["kept"] for d in dumps],
                  "candidates": cl["candidates"], "rejected": cl["rejected"], "clusters": cl["clusters"]},
        "bad_input": _bad_input(signs),
        "tokenizer": {"spec": ctx.data.tokenizer, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                      "pad_id": tok.pad_id, "fast_path": tok.fast is not None,
                      "warning": _vocab_shortfall(ctx.data.tokenizer, tok.vocab_size),
                      "sample_docs": st["tokenizer"][0]["docs"]},
        "packing_mode": ctx.data.packing, "seq_len": ctx.data.seq_len, "packing": packing,
        "sequences": counts, "shards": len(ctx.shards), "buckets": ctx.buckets,
        "seconds": round(sum(s["seconds"] for s in stages), 3),
    }
    meta = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "seq_len": ctx.data.seq_len, "packing": ctx.data.packing, "sequences": counts,
            "tokenizer": "tokenizer.json",
            "shards": {split: [[f"work/tokenize/{s:06d}/{split}", t["sequences"][split]]
                               for s, t in enumerate(toks) if t["sequences"][split]]
                       for split in ("train", "valid")}}
    return report, meta


def _per_dump(ctx: Context, signs: list[dict], cl: dict) -> list[dict]:
    n_dumps = len(cl["exact_removed"])
    read, bad, docs = [0] * n_dumps, [0] * n_dumps, [0] * n_dumps
    specs = [""] * n_dumps
    for shard, s in zip(ctx.shards, signs):
        specs[shard.dump] = shard.spec
        read[shard.dump] += s["read"]
        bad[shard.dump] += sum(s["bad"].values())
        docs[shard.dump] += s["docs"]
    out = []
    for d in range(n_dumps):
        dup = cl["exact_removed"][d] + cl["near_removed"][d]
        out.append({"dump": specs[d], "read": read[d], "bad": bad[d], "duplicates": dup, "kept": docs[d] - dup,
                    "exact_removed": cl["exact_removed"][d], "near_removed": cl["near_removed"][d]})
    return out


def _bad_input(signs: list[dict]) -> dict:
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for s in signs:
        for k, v in s["bad"].items():
            counts[k] = counts.get(k, 0) + v
            ex = examples.setdefault(k, [])
            ex.extend(s["examples"][k][:3 - len(ex)])
    return {"total": sum(counts.values()), "by_reason": dict(sorted(counts.items())),
            "examples": dict(sorted(examples.items()))}


def _vocab_shortfall(spec: str, reached: int) -> str | None:
    """A warning when 'bpe:N' reached fewer than N tokens (the corpus has too few distinct merges)."""
    if not spec.startswith("bpe:") or reached >= int(spec[4:]):
        return None
    msg = (f"data.tokenizer = {spec!r}: the corpus only supports a {reached}-token vocabulary; "
           f"use data.tokenizer=bpe:{reached} (and model.vocab_size >= {reached}) or add more text")
    log.warning(msg)
    return msg


def finalize(out_dir: str, stage_seconds: dict | None = None, seconds: float | None = None) -> dict:
    """Collect every unit's counters into report.json and meta.json, then write the completion record."""
    ctx = load_context(out_dir)
    report, meta = build_report(ctx, stage_seconds)
    if seconds is not None:
        report["seconds"] = round(seconds, 3)
    shutil.copyfile(ctx.work("tokenizer", "000000", "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "meta.json"), meta)
    write_json(os.path.join(out_dir, "report.json"), report)
    plan_json = read_json(ctx.work(PLAN))
    write_json(os.path.join(out_dir, MARKER), {"config": plan_json["record"], "inputs": plan_json["inputs"]})
    return report


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)
