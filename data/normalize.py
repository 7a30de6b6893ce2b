"""Text normalisation.

Normalisation is deliberately light (the tokenizer sees almost the raw text): Unicode
normalisation form (NFC by default, NFKC optional), CRLF/CR -> LF, NUL bytes removed and
surrounding whitespace stripped. A document that is empty afterwards, or longer than the size
cap, is rejected with a reason (`data.stages.clean_docs` counts rejections per reason per
shard; the clusters step fails the run past `data.max_error_fraction`).
"""
from __future__ import annotations

import unicodedata


def normalize_text(text: str, form: str = "NFC") -> str:
    """The normalised text that dedup, tokenization and the output all see."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        text = text.replace("\x00", "")
    if form != "none" and not text.isascii():
        text = unicodedata.normalize(form, text)
    return text.strip()
