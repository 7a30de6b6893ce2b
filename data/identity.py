"""What a prepared dataset was built from: each input's identity and a directory name for the data.

An input file's identity is its size, modification time and sha256. `inputs_unchanged` compares
a recorded identity with the files on disk: equal size and mtime count as unchanged without
reading the file; otherwise the content hash decides, so a file touched but not edited is still
reused while an edited one (even of the same size) is prepared again. A folder of .txt files is
the list of its files' identities. A bundled dump is named by the version of the wheel it comes from.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re

from data.sources import expand_dumps, is_bundled

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def data_name(dumps: list[str]) -> str:
    """A readable directory name for a list of dumps: 'bundled', 'kjv+sotu', 'my_corpus'..."""
    if list(dumps) == ["bundled"]:
        return "bundled"
    parts = []
    for spec in dumps:
        if spec.startswith("bible:"):
            parts.append(spec[6:])
        elif is_bundled(spec) or spec == "bundled":
            parts.append(spec)
        else:
            base = os.path.basename(os.path.normpath(spec))
            parts.append(base.split(".")[0] or base)
    name = _UNSAFE.sub("_", "+".join(parts)).strip("._") or "data"
    return name[:60]


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path: str, with_hash: bool = True) -> dict:
    st = os.stat(path)
    ident = {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_hash:
        ident["sha256"] = sha256_file(path)
    return ident


def _folder_files(folder: str) -> list[str]:
    paths = []
    for root, _, files in os.walk(folder):
        paths.extend(os.path.join(root, f) for f in files if f.endswith(".txt"))
    return sorted(paths)


def dump_identity(spec: str, with_hash: bool = True) -> dict:
    """{'dump': spec, 'files': [...]} for a file or folder, {'dump': spec, 'package': version} when bundled."""
    if is_bundled(spec):
        package = "sotu" if spec == "sotu" else f"pythonbible-{spec[6:]}"
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"dump": spec, "package": package, "version": version}
    if os.path.isdir(spec):
        return {"dump": spec, "files": [file_identity(p, with_hash) for p in _folder_files(spec)]}
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"data.dumps = {spec!r}: no such file or folder; fix the path in data.dumps")
    return {"dump": spec, "files": [file_identity(spec, with_hash)]}


def input_identities(dumps: list[str]) -> list[dict]:
    return [dump_identity(spec) for spec in expand_dumps(dumps)]


def _same_file(recorded: dict, path: str) -> bool:
    if recorded.get("path") != os.path.abspath(path) or not os.path.isfile(path):
        return False
    now = file_identity(path, with_hash=False)
    if (now["bytes"], now["mtime_ns"]) == (recorded.get("bytes"), recorded.get("mtime_ns")):
        return True
    return now["bytes"] == recorded.get("bytes") and sha256_file(path) == recorded.get("sha256")


def changed_inputs(recorded: list[dict], dumps: list[str]) -> list[str]:
    """The dumps whose files differ from `recorded` (empty = every input is as when prepared)."""
    specs = expand_dumps(dumps)
    if [r.get("dump") for r in recorded] != specs:
        return specs
    changed = []
    for rec, spec in zip(recorded, specs):
        if "files" not in rec:
            if rec != dump_identity(spec):
                changed.append(spec)
            continue
        paths = _folder_files(spec) if os.path.isdir(spec) else [spec]
        if len(paths) != len(rec["files"]) or \
                not all(_same_file(r, p) for r, p in zip(rec["files"], paths)):
            changed.append(spec)
    return changed
