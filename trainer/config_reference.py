"""Render the config reference (every section, field, default and doc text) as Markdown.

`python -m trainer.config_reference` prints it; the README embeds the output between two marker
comments and a test checks the README is current, so the reference cannot drift from the code.
"""
from __future__ import annotations

import dataclasses
import re

from trainer.config import SECTIONS

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def reference_markdown() -> str:
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"**`{section}:`** {(cls.__doc__ or '').strip().splitlines()[0]}\n")
        out.append("| field | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            text = f.metadata.get("doc", "").replace("|", "\\|")
            out.append(f"| `{f.name}` | `{_default(f)!r}` | {text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the block between the markers; returns True if the file changed."""
    text = open(path, encoding="utf-8").read()
    block = f"{BEGIN}\n{reference_markdown()}{END}"
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    if new != text:
        open(path, "w", encoding="utf-8").write(new)
    return new != text


if __name__ == "__main__":
    import sys
    if "--update" in sys.argv:
        print("README.md updated" if update_readme() else "README.md already current")
    else:
        print(reference_markdown())
