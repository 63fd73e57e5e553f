"""The peer that near-deduplication is checked and benchmarked against: datasketch's MinHash and
MinHashLSH (https://github.com/ekzhu/datasketch), used the way its documentation deduplicates a
stream: each document is queried against those kept so far, removed if it has a candidate, else
inserted. Shingles are the same word n-grams as ours (``minhash.shingle_words``). datasketch is a
test dependency (pip install -e '.[test]')."""
from __future__ import annotations


def datasketch_removed(docs: list[tuple[int, str]], threshold: float, num_perm: int, ngram: int,
                       seed: int = 1) -> set[int]:
    """The ids that datasketch's LSH deduplication removes from (id, text) pairs taken in order."""
    from datasketch import MinHash, MinHashLSH

    from orchestrator.prepare.minhash import shingle_words

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    removed = set()
    for doc_id, text in docs:
        words = shingle_words(text)
        n = min(ngram, len(words)) or 1
        shingles = {" ".join(words[i:i + n]).encode() for i in range(max(1, len(words) - n + 1))}
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(list(shingles))
        if lsh.query(m):
            removed.add(doc_id)
        else:
            lsh.insert(doc_id, m)
    return removed
