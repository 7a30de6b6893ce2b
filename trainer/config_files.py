"""Where a config value came from: the file and line that set a field (`with_location`), and the
near-miss of a config path (`similar_file`), for error lines that point at the fix."""
from __future__ import annotations

import difflib
import os
import re

import yaml


def similar_file(path: str) -> str:
    """'did you mean configs/tiny.yaml?' for a near-miss of an existing file, else ''."""
    folder = os.path.dirname(path) or "."
    try:
        names = os.listdir(folder)
    except OSError:
        return ""
    match = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.85)
    return f"did you mean {os.path.join(os.path.dirname(path), match[0])}?" if match else ""


def with_location(message: str, path: str | None, overrides: list[str]) -> str:
    """The error with the file and line that set its field, `(configs/x.yaml line 12)`; unchanged when
    the field came from --set or a default."""
    m = re.match(r"unknown key '([a-z0-9_]+)\.([a-z0-9_]+)'|([a-z0-9_]+)\.([a-z0-9_]+) = [^:]*", message)
    if not m:
        return message
    section, key = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    from_set = any(o.split("=", 1)[0].strip() == f"{section}.{key}" for o in overrides)
    where = key_location(path, section, key) if path and not from_set else None
    return f"{message[:m.end()]} ({where}){message[m.end():]}" if where else message


def key_location(path: str, section: str, key: str, _seen: tuple = ()) -> str | None:
    """'FILE line N' where `section.key` is set in path or the files it inherits from (the child first)."""
    path = os.path.abspath(path)
    if path in _seen:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            root = yaml.compose(f)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(root, yaml.MappingNode):
        return None
    base = None
    for k, v in root.value:
        if k.value == "base" and isinstance(v, yaml.ScalarNode):
            base = v.value
        if k.value == section and isinstance(v, yaml.MappingNode):
            for k2, _ in v.value:
                if k2.value == key:
                    shown = os.path.relpath(path)
                    return f"{path if shown.startswith('..') else shown} line {k2.start_mark.line + 1}"
    if base is None:
        return None
    return key_location(os.path.join(os.path.dirname(path), base), section, key, _seen + (path,))
