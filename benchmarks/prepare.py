"""Data preparation: our Ray Data pipeline on 2 workers against datasketch's MinHash LSH
deduplication run single-process, on the same generated corpus (sample speeches drawn at random,
with planted exact and near duplicates, private items, low-quality documents).

    python benchmarks/prepare.py [--docs 20000] [--out /tmp/prepare-bench]

One run measures, side by side:
  - peer: datasketch (MinHash + MinHashLSH, query-then-insert in input order) over every document,
    from reading the files to the set of removed documents, single-process;
  - ours, near-deduplication only (normalization, then MinHash LSH; the other stages off), on an
    embedded Ray cluster of 2 CPUs with prepare.workers=2: the same work as the peer;
  - ours, the whole pipeline (all seven stages, the cleaned documents written, the tokenizer
    trained on the first prepare.tokenize.train_docs of them, tokenized shards).
Prints documents/s of each and the ratios to the peer, how our time splits across stages, the
Jaccard agreement of the removed sets (ours near-dedup-only vs the peer), and each stage's
precision and recall on the planted truth; one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

from orchestrator.cluster import init_loopback
from orchestrator.prepare.config import PrepareConfig
from orchestrator.prepare.corpus import FILES, make_corpus, read_output, score
from orchestrator.prepare.peer import datasketch_removed
from orchestrator.prepare.pipeline import Preparation
from orchestrator.prepare.text import normalize


def read_corpus(folder: Path) -> list[tuple[int, str]]:
    """(our document id, text) of every document, read as the peer would read the files."""
    docs = []
    with open(folder / FILES[0]) as f:
        docs += [((0 << 32) | row, json.loads(line)["text"]) for row, line in enumerate(f)]
    texts = pq.read_table(folder / FILES[1], columns=["text"]).column(0).to_pylist()
    docs += [((1 << 32) | row, t) for row, t in enumerate(texts)]
    return docs


def ours(corpus: Path, out: Path, near_only: bool, blocklist: str) -> tuple[dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    overrides = dict(inputs=[str(corpus / f) for f in FILES], output=str(out), workers=2, progress=False)
    cfg = PrepareConfig(**overrides)
    if near_only:
        cfg.quality.enabled = cfg.exact_dedup.enabled = cfg.scrub.enabled = cfg.tokenize.enabled = False
    else:
        cfg.blocklist.path = blocklist
    prep = Preparation(cfg, log=lambda *a: None)
    t0 = time.perf_counter()
    report = prep.run()
    return report, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20000, help="base documents (the corpus has about 16%% more)")
    parser.add_argument("--out", default="/tmp/prepare-bench")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    corpus = root / "corpus"
    truth = make_corpus(corpus, args.docs, seed=0, sampled=True)
    n = len(truth["docs"])
    mb = sum((corpus / f).stat().st_size for f in FILES) / 1e6
    print(f"corpus: {n:,} documents, {mb:.1f} MB in {', '.join(FILES)}")

    d = PrepareConfig(inputs=["x"], output="x").near_dedup
    t0 = time.perf_counter()
    docs = [(i, normalize(t)) for i, t in read_corpus(corpus)]
    peer_removed = datasketch_removed(docs, d.threshold, d.num_perm, d.ngram, d.seed)
    peer_s = time.perf_counter() - t0
    print(f"peer (datasketch MinHashLSH, 1 process): {peer_s:.1f} s, {n / peer_s:,.0f} docs/s, "
          f"removed {len(peer_removed)}")

    init_loopback(num_cpus=2, include_dashboard=False)
    try:
        near_report, near_s = ours(corpus, root / "near-only", True, truth["blocklist"])
        full_report, full_s = ours(corpus, root / "full", False, truth["blocklist"])
    finally:
        ray.shutdown()
    removed_near, _ = read_output(str(root / "near-only"))
    ours_removed = {r["doc_id"] for r in removed_near if r["stage"] == "near_dedup"}
    both = len(ours_removed & peer_removed)
    agreement = both / max(1, len(ours_removed | peer_removed))
    print(f"ours, near-dedup only (2 workers): {near_s:.1f} s, {n / near_s:,.0f} docs/s, removed {len(ours_removed)}; "
          f"ratio to peer {peer_s / near_s:.2f}x")
    clean_s = sum(v for k, v in full_report["passes_s"].items() if k != "write_and_tokenize")
    print(f"ours, stages 1-6, before the pass that writes and tokenizes (2 workers): {clean_s:.1f} s, "
          f"{n / clean_s:,.0f} docs/s; ratio to peer {peer_s / clean_s:.2f}x")
    print(f"ours, all of it: cleaned documents written, tokenizer trained, shards (2 workers): {full_s:.1f} s, "
          f"{n / full_s:,.0f} docs/s; "
          f"ratio to peer {peer_s / full_s:.2f}x")
    print(f"removed-set agreement with the peer (Jaccard): {agreement:.4f} ({both} in both, "
          f"{len(ours_removed - peer_removed)} ours only, {len(peer_removed - ours_removed)} peer only)")
    print("\nwhere our full run's time goes: the workers' CPU seconds in each stage")
    split = {s["stage"]: s["cpu_s"] for s in full_report["stages"]}
    total = sum(split.values())
    for k, v in split.items():
        print(f"  {k:<16} {v:7.2f} s  {100 * v / total:5.1f}%")
    print("and the wall time of each pass (the driver waits on the workers):")
    passes = dict(full_report["passes_s"], of_which_tokenizer_training=full_report["tokenize"]["tokenizer_s"])
    for k, v in passes.items():
        print(f"  {k:<36} {v:7.2f} s")
    removed, documents = read_output(str(root / "full"))
    quality = score(truth["docs"], truth["files"], removed, documents)
    print("\nprecision / recall per stage on the planted truth (this corpus's base documents are random lines,"
          "\nsome of which the quality filters rightly call low quality: the test's corpus of whole speeches is the"
          "\nmeasure of precision; here recall is the figure to read):")
    for k, v in quality.items():
        print(f"  {k:<12} precision {v['precision']:.4f} recall {v['recall']:.4f} ({v['true']} of {v['expected']} "
              f"expected, {v['found']} found)")
    print(json.dumps({"docs": n, "peer_s": round(peer_s, 3), "ours_near_s": round(near_s, 3), "ours_clean_s": round(clean_s, 3), "ours_full_s": round(full_s, 3),
                      "ratio_clean": round(peer_s / clean_s, 3),
                      "ratio_near": round(peer_s / near_s, 3), "ratio_full": round(peer_s / full_s, 3),
                      "agreement": round(agreement, 4), "cpu_s": split, "passes_s": passes,
                      "precision_recall": {k: [round(v["precision"], 4), round(v["recall"], 4)] for k, v in quality.items()}}))


if __name__ == "__main__":
    main()
