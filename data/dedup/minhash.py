"""Vectorised MinHash signatures: word hashing, n-gram shingles, one-permutation hashing.

Near-duplicate detection follows Broder (1997) MinHash over word n-gram shingles with LSH
banding (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", section 3.4), as used
for cross-dump deduplication of web corpora (DeepSeek LLM, arXiv 2401.02954, section 2;
RefinedWeb, arXiv 2306.01116, section G). Instead of K independent hash permutations we use
one-permutation hashing (Li, Owen & Zhang, NeurIPS 2012): each shingle hash picks one of K
bins with its high bits and competes for that bin's minimum with its low bits, so signing
costs O(shingles) instead of O(shingles * K). Bins left empty by short documents are filled
by optimal densification (Shrivastava, ICML 2017): an empty bin copies the value of a donor
bin chosen by a hash sequence that depends only on the bin, so two documents with the same
non-empty bins fill them identically and the estimator stays unbiased.

Everything below works on a whole batch at once in numpy; no Python loop runs per word:
  * texts are UTF-8 encoded and joined with '\\n' into one byte buffer;
  * a word is a run of ASCII letters/digits (case-folded) or one non-ASCII character (so
    CJK text gets character n-grams); every other byte separates words;
  * word hashes come from prefix sums of a polynomial hash (mod 2**32): the hash of
    bytes[s..e] is (H[e] - H[s-1]) * P**-s, computed for all words in one pass;
  * shingle j of a document = mix(sum_i word[j+i] * A_i); documents shorter than n words
    get one shingle made of all their words; documents without words get no signature.

Legend: N documents, W words, S shingles, K = bands*rows signature bins, B bands.
"""
from __future__ import annotations

import numpy as np

from data.dedup.config import DedupConfig

EMPTY = np.uint64(1 << 32)  # sentinel above every 32-bit bin value
_M64 = (1 << 64) - 1
_POLY = 0x01000193  # odd multiplier of the byte polynomial (mod 2**32)
_DENSIFY_TRIES = 64


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (Steele et al. 2014): a bijection on uint64 with full avalanche."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _byte_tables() -> tuple[np.ndarray, np.ndarray]:
    """Read-only lookup tables: byte class and case-folded byte value (+1, as uint32)."""
    cls = np.zeros(256, np.uint8)  # 0 separator, 1 ASCII alnum, 2 UTF-8 lead byte, 3 continuation
    for lo, hi in ((48, 58), (65, 91), (97, 123)):
        cls[lo:hi] = 1
    cls[0x80:0xC0] = 3
    cls[0xC0:] = 2
    fold = np.arange(256, dtype=np.uint32)
    fold[65:91] += 32
    fold += 1  # so that byte 0 still changes the hash
    cls.flags.writeable = False
    fold.flags.writeable = False
    return cls, fold


_CLS, _FOLD = _byte_tables()


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i mod 2**32 for i < n (P odd, so the inverse exists)."""
    inv = pow(int(_POLY), -1, 1 << 32)
    pw = np.full(n, _POLY, np.uint32)
    pw[0] = 1
    ipw = np.full(n, inv, np.uint32)
    ipw[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(pw, dtype=np.uint32), np.cumprod(ipw, dtype=np.uint32)


def word_hashes(texts: list[str], chunk_bytes: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Hash every word of every text. Returns (hash_W uint64, doc_W int64), in text order.

    Texts are processed in groups of about `chunk_bytes` so temporaries stay small.
    """
    enc = [t.encode("utf-8", "surrogatepass") for t in texts]
    bounds, acc, longest = [0], 0, 0
    for i, e in enumerate(enc):
        acc += len(e) + 1
        if acc >= chunk_bytes:
            bounds.append(i + 1)
            longest, acc = max(longest, acc), 0
    if bounds[-1] != len(enc):
        bounds.append(len(enc))
    powers = _powers(max(longest, acc, 1))
    out_w, out_d = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        w, d = _word_hashes_chunk(enc[lo:hi], powers)
        out_w.append(w)
        out_d.append(d + lo)
    return np.concatenate(out_w), np.concatenate(out_d)


def _word_hashes_chunk(enc: list[bytes], powers) -> tuple[np.ndarray, np.ndarray]:
    buf = np.frombuffer(b"\n".join(enc) + b"\n", np.uint8)
    cls = _CLS[buf]
    alnum = cls == 1
    nxt = np.concatenate((cls[1:], [0]))
    starts = np.flatnonzero((alnum & ~np.concatenate(([False], alnum[:-1]))) | (cls == 2))
    ends = np.flatnonzero((alnum & (nxt != 1)) | ((cls >= 2) & (nxt != 3)))
    assert starts.size == ends.size, "word boundary mismatch (invalid UTF-8?)"
    # 32-bit polynomial word hash from prefix sums: hash(bytes[s..e]) = (H[e] - H[s-1]) * P**-s;
    # a 32-bit word-hash collision only merges two words, harmless for MinHash
    prefix = _FOLD[buf]
    with np.errstate(over="ignore"):
        np.multiply(prefix, powers[0][:buf.size], out=prefix)
        np.cumsum(prefix, out=prefix)
        before = prefix[starts - 1]
        before[starts == 0] = 0
        raw = (prefix[ends] - before) * powers[1][starts]
    doc_end = np.cumsum(np.fromiter((len(e) + 1 for e in enc), np.int64, len(enc)))
    words_per_doc = np.diff(np.searchsorted(starts, doc_end), prepend=0)
    doc = np.repeat(np.arange(len(enc), dtype=np.int64), words_per_doc)
    return mix64(raw.astype(np.uint64)), doc


def _seeded(seed: int, tag: int, n: int) -> np.ndarray:
    """n odd uint64 multipliers derived from (seed, tag)."""
    rng = np.random.Generator(np.random.PCG64([seed, tag]))
    return rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def shingle_hashes(word_W: np.ndarray, doc_W: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of word n-grams that stay inside one document. Returns (hash_S, doc_S)."""
    W = word_W.size
    if W == 0:
        return word_W, doc_W
    mult = _seeded(seed, 1, n)
    pad_w = np.concatenate((word_W, np.zeros(n - 1, np.uint64)))
    pad_d = np.concatenate((doc_W, np.full(n - 1, -1, np.int64)))
    acc = np.zeros(W, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            same = pad_d[i:i + W] == doc_W
            acc += np.where(same, pad_w[i:i + W] * mult[i], np.uint64(0))
    full = pad_d[n - 1:n - 1 + W] == doc_W
    first = np.concatenate(([True], doc_W[1:] != doc_W[:-1]))
    # a document shorter than n words contributes exactly one (truncated) shingle
    keep = full | (first & ~full)
    return mix64(acc[keep] ^ np.uint64(seed & _M64)), doc_W[keep]


def oph_signatures(sh_S: np.ndarray, doc_S: np.ndarray, n_docs: int, k: int, seed: int) -> np.ndarray:
    """One-permutation MinHash with optimal densification. Returns sig_NK uint32.

    Rows of documents without any shingle are all 0xFFFFFFFF; `has_signature` marks the rest.
    """
    sig = np.full(n_docs * k, EMPTY, np.uint64)
    if sh_S.size:
        # shingle hashes are already seeded and mixed: high bits pick the bin, low bits compete
        bins = ((sh_S >> np.uint64(32)) * np.uint64(k)) >> np.uint64(32)
        np.minimum.at(sig, doc_S * k + bins.astype(np.int64), sh_S & np.uint64(0xFFFFFFFF))
    sig_NK = sig.reshape(n_docs, k)
    _densify(sig_NK, seed)
    sig_NK[sig_NK == EMPTY] = np.uint64(0xFFFFFFFF)
    return sig_NK.astype(np.uint32)


def _densify(sig_NK: np.ndarray, seed: int) -> None:
    """Fill empty bins in place from donor bins (Shrivastava 2017, optimal densification)."""
    n, k = sig_NK.shape
    full = sig_NK != EMPTY
    has_any = full.any(axis=1)
    d_idx, j_idx = np.nonzero(~full & has_any[:, None])
    if d_idx.size == 0:
        return
    orig = sig_NK.copy()
    rng = np.random.Generator(np.random.PCG64([seed, 3]))
    donors_TK = rng.integers(0, k, (_DENSIFY_TRIES, k))
    for t in range(_DENSIFY_TRIES):
        val = orig[d_idx, donors_TK[t, j_idx]]
        hit = val != EMPTY
        sig_NK[d_idx[hit], j_idx[hit]] = val[hit]
        d_idx, j_idx = d_idx[~hit], j_idx[~hit]
        if d_idx.size == 0:
            return
    # very sparse rows: fall back to the next non-empty bin to the right (rotation)
    for d, j in zip(d_idx.tolist(), j_idx.tolist()):
        row = orig[d]
        nz = np.flatnonzero(row != EMPTY)
        sig_NK[d, j] = row[nz[np.searchsorted(nz, j) % nz.size]]


def band_keys(sig_NK: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """64-bit key per (document, band): a hash of the band's rows. Returns keys_NB uint64."""
    n = sig_NK.shape[0]
    mult = _seeded(seed, 4, rows)
    s = sig_NK[:, :bands * rows].reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        acc = (s * mult).sum(axis=2, dtype=np.uint64)
        acc += np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return mix64(acc)


def sign_texts(texts: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures of a batch. Returns (sig_NK uint32, has_signature_N bool)."""
    word_W, doc_W = word_hashes(texts)
    sh_S, doc_S = shingle_hashes(word_W, doc_W, cfg.shingle_size, cfg.seed)
    sig = oph_signatures(sh_S, doc_S, len(texts), cfg.num_perm, cfg.seed)
    has = np.zeros(len(texts), bool)
    has[doc_S] = True
    return sig, has
