"""A test corpus for data preparation, made from the sample text, with everything each stage
should find planted in it and written down.

    python -m orchestrator.prepare.corpus OUT_DIR [--docs N] [--seed S]

writes ``OUT_DIR/part-0.jsonl``, ``OUT_DIR/part-1.parquet`` (a ``text`` column), ``blocklist.txt``
and ``truth.json``: for every planted document its file and row, and what it is (an exact or near
duplicate of which document, a low-quality kind, the private items inserted, blocklisted). Base
documents are consecutive speeches of the sample text (one paragraph each, without the speaker's name), 120 to 320
words each, no two sharing a speech (``sampled=True`` instead makes paragraphs of random lines, for corpora
larger than the sample text).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import string
from pathlib import Path

from orchestrator.config import SAMPLES_DIR

SAMPLE = SAMPLES_DIR / "tinyshakespeare.txt"
BLOCKED = ["zorbluxian", "quatrimox", "fenthelyx", "grobnatic"]
FILES = ("part-0.jsonl", "part-1.parquet")


def speeches(text: str) -> list[str]:
    """The sample's speeches, each one paragraph (its verse lines joined), speakers' names removed."""
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line.strip()]
        if lines and lines[0].endswith(":") and len(lines[0].split()) <= 4:
            lines = lines[1:]
        if lines:
            out.append(" ".join(lines))
    return out


def base_documents(n: int, rng: random.Random, sampled: bool = False) -> list[str]:
    if sampled:  # paragraphs of 2-6 random lines: two documents share a line only by rare chance
        lines = sorted({line for line in SAMPLE.read_text().split("\n") if len(line.split()) >= 4})
        docs = []
        for _ in range(n):
            target = rng.randint(120, 320)
            doc, words = [], 0
            while words < target:
                paragraph = " ".join(rng.sample(lines, rng.randint(2, 6)))
                doc.append(paragraph)
                words += len(paragraph.split())
            docs.append("\n".join(doc))
        return docs
    parts = speeches(SAMPLE.read_text())
    docs, doc, words, target = [], [], 0, rng.randint(120, 320)
    for sp in parts:
        doc.append(sp)
        words += len(sp.split())
        if words >= target:
            docs.append("\n".join(doc))
            doc, words, target = [], 0, rng.randint(120, 320)
    if len(docs) < n:
        raise ValueError(f"the sample text makes {len(docs)} disjoint documents, {n} asked (use sampled=True)")
    rng.shuffle(docs)
    return docs[:n]


def card_number(rng: random.Random) -> str:
    from orchestrator.prepare.text import luhn_ok

    while True:
        digits = rng.choice(["4", "51", "37", "6011"]) + "".join(rng.choice(string.digits) for _ in range(11))
        for check in string.digits:
            candidate = digits + check
            if len(candidate) in (15, 16) and luhn_ok(candidate):
                break
        else:
            continue
        if len(candidate) == 16:
            style = rng.choice(["plain", "space", "dash"])
            if style == "space":
                return " ".join(candidate[i:i + 4] for i in range(0, 16, 4))
            if style == "dash":
                return "-".join(candidate[i:i + 4] for i in range(0, 16, 4))
        return candidate


def private_item(kind: str, rng: random.Random) -> str:
    d = lambda k: "".join(rng.choice(string.digits) for _ in range(k))  # noqa: E731
    alnum = string.ascii_letters + string.digits
    if kind == "email":
        user = rng.choice(["john.smith", "a.b-c", "mary_q", "ops+alerts", "x9"]) + d(2)
        return f"{user}@{rng.choice(['example.com', 'mail.co.uk', 'corp-net.org', 'uni.edu'])}"
    if kind == "phone":
        return rng.choice([f"({d(3)}) {d(3)}-{d(4)}", f"{d(3)}-{d(3)}-{d(4)}", f"+1 {d(3)} {d(3)} {d(4)}",
                           f"+44 20 {d(4)} {d(4)}", f"{d(3)}.{d(3)}.{d(4)}"])
    if kind == "ipv4":
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    if kind == "ipv6":
        groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
        if rng.random() < 0.5:
            return ":".join(groups)
        return ":".join(groups[:3]) + "::" + ":".join(groups[6:])
    if kind == "card":
        return card_number(rng)
    if kind == "secret":
        return rng.choice([
            "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
            "ghp_" + "".join(rng.choice(alnum) for _ in range(36)),
            "sk-" + "".join(rng.choice(alnum) for _ in range(40)),
            "xoxb-" + d(12) + "-" + "".join(rng.choice(alnum) for _ in range(24)),
        ])
    raise ValueError(kind)


PRIVATE_KINDS = ("email", "phone", "ipv4", "ipv6", "card", "secret")
_LEADS = {"email": "write to", "phone": "call", "ipv4": "host", "ipv6": "host", "card": "card", "secret": "key:"}


def insert_words(doc: str, phrase: str, rng: random.Random) -> str:
    words = doc.split(" ")
    i = rng.randint(1, len(words) - 1)
    return " ".join(words[:i] + [phrase] + words[i:])


def edit_words(doc: str, fraction: float, vocab: list[str], rng: random.Random) -> str:
    """Replaces ``fraction`` of the words (at least one) with other words of the sample."""
    lines = [line.split(" ") for line in doc.split("\n")]
    places = [(i, j) for i, line in enumerate(lines) for j in range(len(line))]
    for i, j in rng.sample(places, max(1, round(fraction * len(places)))):
        lines[i][j] = rng.choice(vocab)
    return "\n".join(" ".join(line) for line in lines)


def low_quality(kind: str, rng: random.Random, vocab: list[str]) -> str:
    if kind == "symbol_soup":
        junk = ["#", "##", "...", "$$", "%&", "@@", "^^", "~~", "|", "*#*", "}{", "<<>>", "0x", "..."]
        return " ".join(rng.choice(junk) if rng.random() < 0.7 else rng.choice(vocab) for _ in range(rng.randint(80, 200)))
    if kind == "repeated_lines":
        line = " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 10))) + "."
        other = [" ".join(rng.choice(vocab) for _ in range(8)) + "." for _ in range(3)]
        return "\n".join([line] * rng.randint(12, 25) + other)
    if kind == "too_short":
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 30))) + "."
    raise ValueError(kind)


LOW_KINDS = ("symbol_soup", "repeated_lines", "too_short")


def make_corpus(out_dir: str | Path, n_docs: int = 600, seed: int = 0, sampled: bool = False,
                duplicate_fraction: float = 0.05, near_fraction: float = 0.05, low_fraction: float = 0.06,
                private_fraction: float = 0.12, blocked_fraction: float = 0.03,
                near_edit: tuple[float, float] = (0.01, 0.03)) -> dict:
    """Writes the corpus and its truth; returns the truth."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base_documents(n_docs, rng, sampled)
    vocab = sorted({w for doc in base for w in doc.split() if w.isalpha() and len(w) > 2})
    order = list(range(len(base)))
    rng.shuffle(order)
    take = lambda frac: [order.pop() for _ in range(max(1, round(frac * len(base))))]  # noqa: E731
    docs: list[dict] = [{"text": t, "kind": "base", "id": i} for i, t in enumerate(base)]
    for i in take(duplicate_fraction):  # copies that differ only in spacing: equal after normalization
        copy = base[i].replace(" ", "  ", 1).replace("\n", " \r\n", 1) + "\n\n\n"
        docs.append({"text": copy, "kind": "exact_duplicate", "of": i})
    for i in take(near_fraction):
        frac = rng.uniform(*near_edit)
        docs.append({"text": edit_words(base[i], frac, vocab, rng), "kind": "near_duplicate", "of": i, "edit": frac})
    for i in take(private_fraction):
        items = []
        text = base[i]
        for kind in rng.sample(PRIVATE_KINDS, rng.randint(1, 3)):
            item = private_item(kind, rng)
            items.append({"kind": kind, "value": item})
            text = insert_words(text, f"{_LEADS[kind]} {item}", rng)
        docs[i] = {**docs[i], "text": text, "private": items}
    for i in take(blocked_fraction):
        docs[i] = {**docs[i], "text": insert_words(base[i], rng.choice(BLOCKED), rng), "blocked": True}
    for k in range(max(3, round(low_fraction * len(base)))):
        docs.append({"text": low_quality(LOW_KINDS[k % 3], rng, vocab), "kind": "low_quality",
                     "reason": LOW_KINDS[k % 3]})
    rng.shuffle(docs)
    # An original must keep its place before its copies only by chance: the truth records clusters.
    import pyarrow as pa
    import pyarrow.parquet as pq

    half = len(docs) // 2
    placed = {}
    with open(out / FILES[0], "w") as f:
        for row, doc in enumerate(docs[:half]):
            f.write(json.dumps({"text": doc["text"], "meta": {"n": row}}) + "\n")
            placed[id(doc)] = (FILES[0], row)
    pq.write_table(pa.table({"text": [d["text"] for d in docs[half:]]}), out / FILES[1])
    for row, doc in enumerate(docs[half:]):
        placed[id(doc)] = (FILES[1], row)
    where = {d["id"]: placed[id(d)] for d in docs if d["kind"] == "base"}
    truth = []
    for doc in docs:
        entry = {k: v for k, v in doc.items() if k not in ("text", "id")}
        entry["file"], entry["row"] = placed[id(doc)]
        if "of" in entry:
            entry["of"] = list(where[entry["of"]])
        truth.append(entry)
    (out / "blocklist.txt").write_text("# words no document may contain\n" + "\n".join(BLOCKED) + "\n")
    (out / "truth.json").write_text(json.dumps(truth))
    return {"docs": truth, "files": [str(out / f) for f in FILES], "blocklist": str(out / "blocklist.txt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--docs", type=int, default=600, help="base documents (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampled", action="store_true", help="draw random lines (any number of documents)")
    args = parser.parse_args()
    truth = make_corpus(args.out_dir, args.docs, args.seed, args.sampled)
    print(f"{len(truth['docs'])} documents in {', '.join(truth['files'])}")


if __name__ == "__main__":
    main()


def _pr(expected: set, found: set) -> dict:
    tp = len(expected & found)
    return {"expected": len(expected), "found": len(found), "true": tp,
            "precision": tp / len(found) if found else 1.0, "recall": tp / len(expected) if expected else 1.0}


def score(truth: list[dict], inputs: list[str], removed: list[dict], documents: list[dict]) -> dict:
    """Each stage's precision and recall on a corpus from ``make_corpus``, given the pipeline's
    removed.parquet rows and its cleaned documents (rows of documents/*.parquet). ``inputs`` is the
    order the files were given in (it decides which copy of a duplicate is the first)."""
    from orchestrator.prepare.text import PLACEHOLDERS

    order = {Path(p).name: i for i, p in enumerate(inputs)}
    place = lambda file, row: (order[Path(file).name], int(row))  # noqa: E731
    by_stage: dict[str, set] = {}
    for r in removed:
        by_stage.setdefault(r["stage"], set()).add(place(r["source"], r["row"]))
    out = {"quality": _pr({place(d["file"], d["row"]) for d in truth if d["kind"] == "low_quality"},
                          by_stage.get("quality", set())),
           "blocklist": _pr({place(d["file"], d["row"]) for d in truth if d.get("blocked")},
                            by_stage.get("blocklist", set()))}
    base_place = {}
    for d in truth:
        if d["kind"] == "base":
            base_place[(d["file"], d["row"])] = place(d["file"], d["row"])
    for kind, stage in (("exact_duplicate", "exact_dedup"), ("near_duplicate", "near_dedup")):
        clusters: dict = {}
        for d in truth:
            if d["kind"] == kind:
                origin = tuple(d["of"])
                clusters.setdefault(origin, {base_place[origin]}).add(place(d["file"], d["row"]))
        expected = {p for members in clusters.values() for p in sorted(members)[1:]}
        out[stage] = _pr(expected, by_stage.get(stage, set()))
    texts = {place(r["source"], r["row"]): r["text"] for r in documents}
    planted = {place(d["file"], d["row"]): d.get("private", []) for d in truth}
    tp = expected_n = found_n = 0
    per_kind = {k: [0, 0, 0] for k in PLACEHOLDERS}  # true, expected, found
    for key, text in texts.items():
        items = planted.get(key, [])
        for kind, token in PLACEHOLDERS.items():
            want = sum(1 for it in items if it["kind"] == kind)
            got = text.count(token)
            gone = sum(1 for it in items if it["kind"] == kind and it["value"] not in text)
            t = min(want, got, gone)
            tp, expected_n, found_n = tp + t, expected_n + want, found_n + got
            per_kind[kind] = [per_kind[kind][0] + t, per_kind[kind][1] + want, per_kind[kind][2] + got]
    out["scrub"] = {"expected": expected_n, "found": found_n, "true": tp,
                    "precision": tp / found_n if found_n else 1.0, "recall": tp / expected_n if expected_n else 1.0,
                    "per_kind": per_kind}
    return out


def read_output(output: str, storage_options: dict | None = None) -> tuple[list[dict], list[dict]]:
    """(removed.parquet's rows, the cleaned documents' rows) of a preparation."""
    import pyarrow.parquet as pq

    from orchestrator.storage import Storage

    out = Storage.at(output, storage_options)
    removed = pq.read_table(io.BytesIO(out.read_bytes("removed.parquet"))).to_pylist()
    documents = []
    for name in sorted(n for n in out.sizes("documents") if n.endswith(".parquet")):
        documents += pq.read_table(io.BytesIO(out.read_bytes("documents", name))).to_pylist()
    return removed, documents
