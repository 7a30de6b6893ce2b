"""Text normalisation and the per-reason bad-input ledger.

Normalisation is deliberately light (the tokenizer sees almost the raw text): Unicode
normalisation form (NFC by default, NFKC optional), CRLF/CR -> LF, NUL bytes removed and
surrounding whitespace stripped. A document that is empty afterwards, or longer than the size
cap, is rejected with a reason. `BadInputLedger` counts every rejection per reason, keeps the
first few examples, and decides whether the run fails (only past `data.max_error_fraction`).
"""
from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field

log = logging.getLogger("data")


def normalize_text(text: str, form: str = "NFC") -> str:
    """The normalised text that dedup, tokenization and the output all see."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        text = text.replace("\x00", "")
    if form != "none" and not text.isascii():
        text = unicodedata.normalize(form, text)
    return text.strip()


def normalize_chunk(args: tuple[list[str], str, int]) -> list[tuple[str | None, str | None]]:
    """Worker: normalise a chunk of texts -> (text, None) or (None, reason) per input."""
    texts, form, max_chars = args
    out: list[tuple[str | None, str | None]] = []
    for text in texts:
        if len(text) > max_chars:
            out.append((None, "too_long"))
            continue
        norm = normalize_text(text, form)
        out.append((norm, None) if norm else (None, "empty"))
    return out


@dataclass
class BadInputLedger:
    """Counts rejected records per reason and keeps the first examples of each."""

    max_examples: int = 3
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, source: str, snippet: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < self.max_examples:
            seen.append(f"{source} {snippet[:80]!r}" if snippet else source)
            log.warning("bad input (%s): %s", reason, seen[-1])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def check(self, n_records: int, max_fraction: float) -> None:
        """Raise when the rejected fraction of all records exceeds `max_fraction`."""
        if n_records and self.total / n_records > max_fraction:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
            examples = "; ".join(f"{k}: {v[0]}" for k, v in sorted(self.examples.items()))
            raise ValueError(f"data.max_error_fraction = {max_fraction}: {self.total} of {n_records} "
                             f"input records are bad ({detail}); first examples: {examples}. "
                             "Fix the input or raise data.max_error_fraction")

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())),
                "examples": dict(sorted(self.examples.items()))}
