"""LSH banding, verification and connected components over MinHash signatures.

Banding (Mining of Massive Datasets, section 3.4.1): the K = b*r signature bins are cut
into b bands of r rows; two documents are candidates when some band agrees on all r rows,
which happens with probability 1 - (1 - J**r)**b for Jaccard similarity J. Candidates are
found by sorting each band's 64-bit keys: equal neighbours in sorted order are linked (a
chain per bucket, so a bucket of m documents costs m-1 edges, never m**2).

Verification drops band collisions whose estimated Jaccard (fraction of equal bins over
all K, an unbiased estimate under one-permutation hashing with densification) is under the
threshold; this is what keeps false positives near zero with a permissive, high-recall
band layout. Surviving edges form a graph whose connected components are the duplicate
clusters; the lowest document index of each component is kept (min-label propagation with
pointer jumping, all in numpy).

Legend: N documents, K signature bins, B bands, E edges.
"""
from __future__ import annotations

import numpy as np


def edges_within(keys_NB: np.ndarray) -> np.ndarray:
    """Candidate pairs (i < j) among one batch's documents. Returns edges_E2 int64."""
    n, n_bands = keys_NB.shape
    out = [np.zeros((0, 2), np.int64)]
    for b in range(n_bands):
        order = np.argsort(keys_NB[:, b], kind="stable")
        k = keys_NB[order, b]
        same = np.flatnonzero(k[1:] == k[:-1])
        if same.size:
            out.append(np.stack((order[same], order[same + 1]), axis=1))
    edges = np.concatenate(out).astype(np.int64)
    if edges.size == 0:
        return edges
    edges.sort(axis=1)
    return np.unique(edges, axis=0)


def edges_to_sorted(keys_NB: np.ndarray, sorted_keys_BM: np.ndarray, sorted_rows_BM: np.ndarray) -> np.ndarray:
    """Candidate pairs (new doc, stored row) against a stored shard whose band keys are sorted.

    `sorted_keys_BM[b]` is band b's keys in ascending order and `sorted_rows_BM[b]` the shard
    rows they belong to. One stored match per (document, band) is linked.
    """
    out = [np.zeros((0, 2), np.int64)]
    m = sorted_keys_BM.shape[1]
    if m == 0:
        return out[0]
    for b in range(keys_NB.shape[1]):
        ref = np.asarray(sorted_keys_BM[b])
        pos = np.minimum(np.searchsorted(ref, keys_NB[:, b]), m - 1)
        hit = np.flatnonzero(ref[pos] == keys_NB[:, b])
        if hit.size:
            rows = np.asarray(sorted_rows_BM[b])[pos[hit]]
            out.append(np.stack((hit, rows), axis=1))
    edges = np.concatenate(out).astype(np.int64)
    return np.unique(edges, axis=0) if edges.size else edges


def sort_band_keys(keys_NB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored form of a shard's band keys: per band, keys ascending and their rows."""
    order_BN = np.argsort(keys_NB.T, axis=1, kind="stable")
    return np.take_along_axis(keys_NB.T, order_BN, axis=1), order_BN.astype(row_dtype(len(keys_NB)))


def row_dtype(n_rows: int):
    """int32 row numbers while a shard has fewer than 2**31 rows (halves the stored size)."""
    return np.int32 if n_rows < 2**31 else np.int64


def similarity(sig_a_EK: np.ndarray, sig_b_EK: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of each pair: the fraction of equal signature bins."""
    if len(sig_a_EK) == 0:
        return np.zeros(0)
    return (sig_a_EK == sig_b_EK).mean(axis=1)


def components(n: int, edges_E2: np.ndarray) -> np.ndarray:
    """Connected-component label of each node: the lowest node index in its component."""
    labels = np.arange(n, dtype=np.int64)
    if edges_E2.size == 0:
        return labels
    a, b = edges_E2[:, 0], edges_E2[:, 1]
    while True:
        low = np.minimum(labels[a], labels[b])
        new = labels.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]  # pointer jumping: follow labels to their own labels
        while True:
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, labels):
            return labels
        labels = new
