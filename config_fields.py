"""Config field helpers shared by every component config (model, data, parallel, fp8): pure stdlib, a leaf.

`doc(default, text)` makes a field with a help text (rendered into the README's config reference);
`require(ok, name, value, why)` raises `ValueError("name = value: why")`, which the loader in
`trainer.config` turns into a ConfigError naming the section.
"""
from __future__ import annotations

from dataclasses import field


def doc(default, text: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def require(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"{name} = {value!r}: {why}")
