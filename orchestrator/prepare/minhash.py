"""Near-duplicate detection: MinHash signatures over word n-gram shingles, LSH banding, and the
clusters that candidate pairs form.

Signatures are vectorized with numpy: each word is hashed once (xxh64), a shingle's hash combines
its words' hashes, and each of the ``num_perm`` hash functions is a multiply-shift hash
``((a * h + b) mod 2**64) >> 32`` with ``a`` odd, whose minimum over the document's shingles is
one signature entry. The band count and width for a Jaccard threshold minimize the weighted sum
of false-positive and false-negative probability mass, the rule MinHash LSH libraries use
(datasketch's MinHashLSH weighs both 0.5).
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

_TOKEN = re.compile(r"\w+")
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9,
                 0x27D4EB2F165667C5, 0x85EBCA77C2B2AE63], dtype=np.uint64)


def shingle_words(text: str) -> list[str]:
    """The words shingles are made of: lowercased runs of letters and digits (punctuation and
    spacing do not tell two documents apart)."""
    return _TOKEN.findall(text.lower())


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """The distinct 64-bit hashes of the document's word n-grams (one n-gram if it is shorter)."""
    import xxhash

    words = shingle_words(text)
    if not words:
        return np.zeros(1, dtype=np.uint64)
    h = np.fromiter(map(xxhash.xxh64_intdigest, map(str.encode, words)), dtype=np.uint64, count=len(words))
    n = min(ngram, len(words))
    with np.errstate(over="ignore"):
        g = np.zeros(len(words) - n + 1, dtype=np.uint64)
        for j in range(n):
            g = (g ^ (h[j:len(words) - n + 1 + j] * _MIX[j % len(_MIX)])) * np.uint64(0x100000001B3)
    return np.unique(g)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def signature(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature (num_perm uint32 values) of a set of shingle hashes."""
    values = np.empty((len(hashes), len(a)), dtype=np.uint64)
    with np.errstate(over="ignore"):  # in place: one array instead of three temporaries
        np.multiply(hashes[:, None], a[None, :], out=values)
        np.add(values, b[None, :], out=values)
    return (values.min(axis=0) >> np.uint64(32)).astype(np.uint32)  # the shift keeps the order


def _integral(f, lo: float, hi: float, steps: int = 200) -> float:
    x = np.linspace(lo, hi, steps + 1)
    y = f(x)
    return float(np.sum((y[1:] + y[:-1]) * 0.5 * np.diff(x)))


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) with bands * rows <= num_perm minimizing fp_weight * P(false positive)
    + fn_weight * P(false negative), each integrated over the Jaccard range on its side of the
    threshold."""
    best, best_err = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _integral(lambda s: 1 - (1 - s ** rows) ** bands, 0.0, threshold)
            fn = _integral(lambda s: 1 - (1 - (1 - s ** rows) ** bands), threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One int64 key per band: the band's index and its rows' values, hashed."""
    import xxhash

    keys = [xxhash.xxh64_intdigest(sig[i * rows:(i + 1) * rows].tobytes(), seed=i) for i in range(bands)]
    return np.array(keys, dtype=np.uint64).view(np.int64)


def clusters_to_drop(edges: np.ndarray) -> dict[int, int]:
    """Union-find over candidate pairs (an (n, 2) array of document ids). Every cluster keeps its
    smallest id; returns {dropped id: the id kept in its cluster}."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for u, v in edges.tolist():
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    return {x: r for x in list(parent) if (r := find(x)) != x}
