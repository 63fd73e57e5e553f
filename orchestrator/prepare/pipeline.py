"""Data preparation on Ray Data: read, normalize, filter, deduplicate, scrub, blocklist, write the
cleaned documents, tokenize into shards.

Every document gets an id from its place in the inputs (file index << 32 | row), the order that
decides which copy of a duplicate is kept (the first) and the order of the output. Per-document
stages are ``map_batches`` over pandas batches; each stage is materialized once, so that the report
can count what it removed or changed and time it. The global steps:

- exact deduplication hashes each normalized text (xxh64) and groups the corpus by hash
  (``groupby().map_groups``): every group keeps its smallest id;
- near-deduplication computes MinHash signatures and one key per LSH band (``map_batches``),
  groups the band keys (``groupby().map_groups``) into candidate pairs, joins the pairs into
  clusters on the driver (union-find over ids only) and keeps each cluster's smallest id.

The cleaned documents are sorted by id and written as parquet by the workers (``documents/``).
Tokenization runs in the workers; the driver cuts the ordered token stream into fixed-size shards,
each written whole (``shards/shard-00000.npy``, ...) and listed in ``shards/manifest.json`` with
where it ends, so that a rerun with the same settings writes only the shards still missing.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np

from orchestrator.data import LOADERS
from orchestrator.errors import ConfigError
from orchestrator.prepare import minhash, text as T
from orchestrator.prepare.config import PrepareConfig, check, fingerprint, storage_of
from orchestrator.storage import Storage, apply_env, forwarded_env

PLAN = "prepare.json"          # the output's settings fingerprint: written before any work
DOCS_DONE = "documents/_done.json"
MANIFEST = "shards/manifest.json"  # orchestrator.data reads it (PREPARED_MANIFEST)
REPORT = "prepare_report.json"
PICTURE = "prepare_report.png"
NOTE_CHARS = 240
DOCS_PER_FILE = 8192  # cleaned documents per parquet file
BLOCK_BYTES = 16 << 20  # of input per block of the per-document passes


def _stage_of(reason: str) -> str:
    """The stage that removes a document for this reason."""
    return {"": "", "empty": "read", "empty_after_normalize": "normalize", "exact_duplicate": "exact_dedup",
            "near_duplicate": "near_dedup", "blocklist": "blocklist"}.get(reason, "quality")


def _snippet(text: str) -> str:
    return text if len(text) <= NOTE_CHARS else text[:NOTE_CHARS] + "..."


# --- worker functions (module level: Ray ships them by reference) --------------------------------

def _read_file(item: dict, inputs: list[str], text_field: str, options: dict, env: dict) -> list[dict]:
    apply_env(env)
    t0 = time.perf_counter()
    index = int(item["file"])
    location = inputs[index]
    store, name = storage_of(location, options)
    kind = LOADERS[os.path.splitext(name)[1].lower()]
    raw = store.read_bytes(name)
    if kind == "text":
        texts = [raw.decode("utf-8", errors="replace")]
    elif kind == "parquet":
        import pyarrow.parquet as pq

        texts = pq.read_table(io.BytesIO(raw), columns=[text_field]).column(0).to_pylist()
    else:
        body = raw.decode("utf-8", errors="replace")
        try:
            whole = json.loads(body)
            rows = whole if isinstance(whole, list) else [whole]
        except ValueError:
            rows = [json.loads(line) for line in body.splitlines() if line.strip()]
        texts = [r.get(text_field) if isinstance(r, dict) else None for r in rows]
    share = (time.perf_counter() - t0) / max(1, len(texts))
    return [{"doc_id": (index << 32) | row, "source": location, "row": row,
             "text": t if isinstance(t, str) else ("" if t is None else str(t)), "t_read": share}
            for row, t in enumerate(texts)]


def _live(df):
    return df[df["drop"] == ""].reset_index(drop=True)


def _words(text: str) -> int:
    return len(text.split())


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", errors="replace"))


def _resize(df, changed: list[bool], nbytes, nwords) -> None:
    """The size columns after a stage: those before it, measured again where it changed the text."""
    df["nbytes"] = [_nbytes(t) if c else int(b) for t, c, b in zip(df["text"], changed, nbytes)]
    df["nwords"] = [_words(t) if c else int(w) for t, c, w in zip(df["text"], changed, nwords)]


class _Notes:
    """The report's examples from one batch: the first few flagged documents of each stage, as one
    JSON column ({stage: example})."""

    def __init__(self, n: int, limit: int):
        self.rows: list[dict] = [{} for _ in range(n)]
        self.left: dict[str, int] = {}
        self.limit = limit

    def add(self, i: int, stage: str, example) -> None:
        left = self.left.setdefault(stage, self.limit)
        if left > 0:
            self.rows[i][stage] = example() if callable(example) else example
            self.left[stage] = left - 1

    def column(self) -> list[str]:
        return [json.dumps(r) if r else "" for r in self.rows]


def _first_pass(df, cfg: PrepareConfig, bands: int, rows: int):
    """Stages 1 and 2, and what the global steps need: each live document's text hash (exact
    deduplication) and LSH band keys (near deduplication), as bytes. Each stage's time in this
    batch is spread over its rows (columns t_<stage>)."""
    import xxhash

    n = len(df)
    texts = list(df["text"])
    notes = _Notes(n, cfg.examples)
    drop = ["" if t.strip() else "empty" for t in texts]
    df["nbytes_in"] = [_nbytes(t) for t in texts]
    df["nwords_in"] = [_words(t) for t in texts]
    t0 = time.perf_counter()
    changed = [False] * n
    if cfg.normalize.enabled:
        for i, t in enumerate(texts):
            if drop[i]:
                continue
            new = T.normalize(t, cfg.normalize.nfc, cfg.normalize.whitespace)
            if new != t:
                changed[i] = True
                notes.add(i, "normalize", lambda t=t, new=new: {"before": _snippet(t), "after": _snippet(new)})
                texts[i] = new
                if not new:
                    drop[i] = "empty_after_normalize"
    t1 = time.perf_counter()
    if cfg.quality.enabled:
        for i, t in enumerate(texts):
            if not drop[i]:
                reason = T.quality_reason(t, cfg.quality)
                if reason:
                    drop[i] = reason
                    notes.add(i, "quality", lambda t=t, reason=reason: {"reason": reason, "text": _snippet(t)})
    t2 = time.perf_counter()
    hashes = [0] * n
    if cfg.exact_dedup.enabled:
        for i, t in enumerate(texts):
            if not drop[i]:
                hashes[i] = int(np.uint64(xxhash.xxh64_intdigest(t.encode("utf-8", errors="replace"))).view(np.int64))
    t3 = time.perf_counter()
    keys = [b""] * n
    if cfg.near_dedup.enabled:
        d = cfg.near_dedup
        a, b = minhash.permutations(d.num_perm, d.seed)
        for i, t in enumerate(texts):
            if not drop[i]:
                keys[i] = minhash.band_keys(minhash.signature(minhash.shingle_hashes(t, d.ngram), a, b), bands, rows).tobytes()
    t4 = time.perf_counter()
    df["text"] = texts
    df["drop"] = drop
    df["changed"] = changed
    _resize(df, changed, df["nbytes_in"], df["nwords_in"])
    df["hash"] = np.asarray(hashes, dtype=np.int64)
    df["bands"] = keys
    df["note"] = notes.column()
    df["node"] = _node()
    for stage, seconds in (("normalize", t1 - t0), ("quality", t2 - t1), ("exact_dedup", t3 - t2), ("near_dedup", t4 - t3)):
        df[f"t_{stage}"] = seconds / max(1, n)
    return df


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def _keys(df, exact: bool, near: bool):
    """The rows the global steps group: (kind 0, text hash, id) and (kind 1, band key, id)."""
    import pandas as pd

    df = _live(df)
    ids = df["doc_id"].to_numpy(np.int64)
    parts = []
    if exact and len(df):
        parts.append(pd.DataFrame({"kind": np.zeros(len(ids), np.int8), "key": df["hash"].to_numpy(np.int64),
                                   "doc_id": ids}))
    if near and len(df):
        keys = [np.frombuffer(b, dtype=np.int64) for b in df["bands"]]
        counts = np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys))
        parts.append(pd.DataFrame({"kind": np.ones(int(counts.sum()), np.int8), "key": np.concatenate(keys),
                                   "doc_id": np.repeat(ids, counts)}))
    if not parts:
        return pd.DataFrame({"kind": np.zeros(0, np.int8), "key": np.zeros(0, np.int64), "doc_id": np.zeros(0, np.int64)})
    return pd.concat(parts, ignore_index=True)


def _group_pairs(df):
    """A hash partition of keys (every row of a key is in the same one): for each (kind, key) group,
    its members paired with its smallest member: exact copies (kind 0) and LSH candidate pairs
    (kind 1)."""
    import pandas as pd

    df = df.drop_duplicates()
    first = df.groupby(["kind", "key"])["doc_id"].transform("min")
    other = (df["doc_id"] != first).to_numpy()
    return pd.DataFrame({"kind": df["kind"].to_numpy(np.int8)[other], "a": first.to_numpy(np.int64)[other],
                         "b": df["doc_id"].to_numpy(np.int64)[other]})


def _second_pass(df, cfg: PrepareConfig, dropped: dict, names: dict, words: list[str]):
    """The global steps' verdicts (dropped: id -> (reason, id kept)), then stages 5 and 6."""
    df = _live(df).drop(columns=["hash", "bands"])
    n = len(df)
    texts, ids = list(df["text"]), [int(i) for i in df["doc_id"]]
    notes = _Notes(n, cfg.examples)
    drop = [""] * n
    t0 = time.perf_counter()
    for i, doc_id in enumerate(ids):
        verdict = dropped.get(doc_id)
        if verdict:
            drop[i] = verdict[0]
            stage = "exact_dedup" if verdict[0] == "exact_duplicate" else "near_dedup"
            notes.add(i, stage, lambda i=i, v=verdict: {"duplicate_of": names.get(v[1], str(v[1])),
                                                        "text": _snippet(texts[i])})
    t1 = time.perf_counter()
    counts = {k: [0] * n for k in T.PLACEHOLDERS}
    changed = [False] * n
    if cfg.scrub.enabled:
        kinds = tuple(cfg.scrub.kinds)
        for i, t in enumerate(texts):
            if drop[i]:
                continue
            new, found = T.scrub(t, kinds)
            if found:
                changed[i] = True
                texts[i] = new
                for k, v in found.items():
                    counts[k][i] = v
                notes.add(i, "scrub", lambda new=new, found=found: {"replaced": dict(found), "after": _snippet(new)})
    t2 = time.perf_counter()
    pattern = T.blocklist_pattern(words)
    if pattern is not None:
        for i, t in enumerate(texts):
            if not drop[i]:
                hits = T.blocklist_hits(t, pattern)
                if hits >= cfg.blocklist.min_hits:
                    drop[i] = "blocklist"
                    notes.add(i, "blocklist", lambda t=t, hits=hits: {"hits": hits, "text": _snippet(t)})
    t3 = time.perf_counter()
    df["text"] = texts
    df["drop"] = drop
    df["changed"] = changed
    for k in T.PLACEHOLDERS:
        df[f"pii_{k}"] = counts[k]
    _resize(df, changed, df["nbytes"], df["nwords"])
    df["note"] = notes.column()
    for stage, seconds in (("dedup_verdicts", t1 - t0), ("scrub", t2 - t1), ("blocklist", t3 - t2)):
        df[f"t_{stage}"] = seconds / max(1, n)
    return df


def _write_documents(df, out: Storage, env: dict, tokenizer_json: str | None = None):
    """Writes one batch of cleaned documents (in id order) as parquet, named by its first id; with
    a tokenizer, returns the batch's tokens as ``_tokenize`` does (one pass over the documents)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    apply_env(env)
    df = _live(df)
    if len(df):
        table = pa.table({"text": list(df["text"]), "source": list(df["source"]), "row": df["row"].to_numpy(np.int64),
                          "doc_id": df["doc_id"].to_numpy(np.int64)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        out.write_bytes(buf.getvalue(), "documents", f"part-{int(df['doc_id'].iloc[0]):020d}.parquet")
    return pd.DataFrame({"n": [len(df)]}) if tokenizer_json is None else _tokenize(df, tokenizer_json)


def _documents(df):
    """The documents the second pass kept, as the written files hold them."""
    return _live(df)[["doc_id", "text"]]


def _read_documents(batch, out: Storage, env: dict):
    """One parquet file of cleaned documents (a batch of one file name) -> its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    apply_env(env)
    tables = [pq.read_table(io.BytesIO(out.read_bytes("documents", str(name))), columns=["doc_id", "text"])
              for name in batch["name"]]
    return pa.concat_tables(tables)


def _tokenize(df, tokenizer_json: str):
    """A batch of documents -> one row: their token ids end to end (each document closed by EOS)
    and each document's length, as bytes (cheap to move, where a column of arrays is not)."""
    import pandas as pd
    from orchestrator.encoder import encoder_of
    from orchestrator.tokens import EOS

    encoder = encoder_of(tokenizer_json)
    eos = encoder.tok.token_to_id(EOS)
    tokens, lengths = encoder.encode_arrays(list(df["text"]), tail=() if eos is None else (eos,))
    return pd.DataFrame({"tokens": [tokens.tobytes()], "lengths": [lengths.tobytes()]})


def _prompt_resource_limits() -> None:
    """Ray Data 2.60 reads the cluster's resources as zero when an execution starts (its
    autoscaling coordinator has not answered yet) and looks again only a second later: until
    then it runs one task at a time. Every pass of this pipeline started with one worker idle
    for that second (measured: 8 tasks of 1.2 s on 2 CPUs took 6.3 s; 5.5 s with this). Looking
    again after 50 ms costs one small asynchronous call to Ray Data's coordinator actor each time."""
    from ray.data._internal.execution import resource_manager

    manager = getattr(resource_manager, "ResourceManager", None)
    if manager is not None and getattr(manager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0) > 0.05:
        manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = 0.05


# --- the driver -----------------------------------------------------------------------------------

class Preparation:
    def __init__(self, cfg: PrepareConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.identity = check(cfg)
        self.key = fingerprint(cfg, self.identity)
        self.out = Storage.at(cfg.output, dict(cfg.storage_options))
        self.env = forwarded_env()
        self.partitions = cfg.workers * 2  # of the shuffle that the global steps make
        self.claim_output()

    def claim_output(self) -> None:
        """An output that holds another preparation, or other files, is refused; the same
        preparation resumes."""
        try:
            held = json.loads(self.out.read_text(PLAN)) if self.out.exists(PLAN) else None
            entries = self.out.sizes() or self.out.dirs()
        except (OSError, ValueError) as exc:
            raise ConfigError("prepare.output", f"{self.cfg.output}: cannot be read ({exc})") from None
        if held is not None and held.get("fingerprint") != self.key:
            raise ConfigError("prepare.output", f"{self.cfg.output} already holds a different preparation "
                                                f"(fingerprint {held.get('fingerprint')}, these settings and inputs "
                                                f"make {self.key}); choose another folder or the same settings")
        if held is None and entries:
            raise ConfigError("prepare.output", f"{self.cfg.output} is not empty and holds no preparation; "
                                                f"choose an empty or new folder")
        try:
            self.out.write_text(json.dumps({"fingerprint": self.key, "inputs": self.identity["inputs"],
                                            "settings": asdict(self.cfg) | {"storage_options": "(not recorded)"}},
                                           indent=1, default=str), PLAN)
        except (OSError, ValueError) as exc:
            raise ConfigError("prepare.output", f"{self.cfg.output}: cannot be written ({exc})") from None

    def run(self) -> dict:
        import ray
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = self.cfg.progress
        ctx.print_on_execution_start = False
        # The global steps hash-partition rows by a key (a text's hash, a band key, a part):
        # every row with the same key lands in the same partition, which a map then reads whole.
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.HASH_SHUFFLE
        _prompt_resource_limits()
        if not sys.stderr.isatty() or not self.cfg.progress:  # no bars: Ray Data would log each execution
            import logging

            logging.getLogger("ray.data").setLevel(logging.WARNING)
        t_start = time.perf_counter()
        tokenize = self.cfg.tokenize.enabled
        if self.out.exists(DOCS_DONE):
            report = json.loads(self.out.read_text(REPORT))
            self.log(f"documents already prepared in {self.out.url('documents')}: resuming at tokenization")
            if tokenize:
                report["tokenize"] = self._tokenize(self._documents_dataset(), write=False)
        else:
            report = {"fingerprint": self.key, "inputs": self.identity["inputs"], "stages": []}
            kept = self._clean(report)  # stages 1-6 done, the documents still in Ray's object store
            # One more pass writes them, and tokenizes each batch it writes.
            t0 = time.perf_counter()
            self.out.remove("documents")
            if tokenize:
                report["tokenize"] = self._tokenize(kept, write=True)
            else:
                self._write(kept).materialize()
            report["passes_s"]["write_and_tokenize" if tokenize else "write"] = round(time.perf_counter() - t0, 3)
            self.log(f"documents: {report['stages'][0]['docs_in']} read, {report['stages'][-1]['docs_out']} kept -> "
                     f"{self.out.url('documents')}")
            self.out.write_text(json.dumps(report, indent=1), REPORT)
            self.out.write_text(json.dumps({"documents": report["stages"][-1]["docs_out"]}), DOCS_DONE)
        report["seconds"] = round(time.perf_counter() - t_start, 3)
        report["cluster_nodes"] = sorted({n["NodeID"][:12] for n in ray.nodes() if n.get("Alive")})
        self.out.write_text(json.dumps(report, indent=1), REPORT)
        from orchestrator.prepare.report import picture

        self.out.write_bytes(picture(report), PICTURE)
        return report

    def _blocks(self) -> int:
        """How many blocks the documents are cut into for the per-document passes: one task each,
        two per worker at least (fewer and larger tasks lose less to scheduling between them; two
        each keeps both busy while the other's result moves), and about BLOCK_BYTES of input each."""
        size = sum(int(i.get("size") or 0) for i in self.identity["inputs"])
        return max(self.cfg.workers * 2, len(self.cfg.inputs), -(-size // BLOCK_BYTES))

    # stages 0-6
    def _map(self, ds, fn, batch_size: int | None = None, **kwargs):
        import ray.data

        return ds.map_batches(fn, batch_format="pandas", batch_size=batch_size or self.cfg.batch_size,
                              compute=ray.data.TaskPoolStrategy(size=self.cfg.workers), fn_kwargs=kwargs)

    def _clean(self, report: dict):
        """Stages 1-6, their report in ``report``; returns the last pass's blocks (every document,
        the removed ones marked in ``drop``), materialized in the object store."""
        import ray.data

        cfg = self.cfg
        d = cfg.near_dedup
        bands, rows = minhash.lsh_params(d.threshold, d.num_perm) if d.enabled else (0, 0)
        t0 = time.perf_counter()
        files = ray.data.from_items([{"file": i} for i in range(len(cfg.inputs))], override_num_blocks=len(cfg.inputs))
        ds = files.flat_map(_read_file, fn_kwargs={"inputs": list(cfg.inputs), "text_field": cfg.text_field,
                                                    "options": dict(cfg.storage_options), "env": self.env})
        # Order is kept throughout (preserve_order): the documents stay in id order, no sort needed.
        ds = ds.repartition(self._blocks())
        ds = self._map(ds, _first_pass, cfg=cfg, bands=bands, rows=rows).materialize()
        first = ds.select_columns(["doc_id", "source", "row", "drop", "note", "node", "changed", "nbytes_in", "nwords_in",
                                   "nbytes", "t_read", "t_normalize", "t_quality", "t_exact_dedup",
                                   "t_near_dedup"]).to_pandas()
        wall_first = time.perf_counter() - t0
        live_docs = int((first["drop"] == "").sum())

        t1 = time.perf_counter()
        dropped: dict[int, tuple[str, int]] = {}
        near_info = {}
        if cfg.exact_dedup.enabled or d.enabled:
            keys = self._map(ds, _keys, exact=cfg.exact_dedup.enabled, near=d.enabled)
            n_keys = int(live_docs * (int(cfg.exact_dedup.enabled) + bands))
            if n_keys <= cfg.driver_group_rows:  # small: one pandas groupby here beats a shuffle's start
                pairs = _group_pairs(keys.to_pandas())
                how = "driver"
            else:
                pairs = keys.repartition(self.partitions, keys=["key"]) \
                    .map_batches(_group_pairs, batch_format="pandas", batch_size=None).to_pandas()
                how = f"ray_data_hash_shuffle({self.partitions})"
            report["grouping"] = {"key_rows": n_keys, "where": how}
            exact = pairs[pairs["kind"] == 0]
            for a, b in zip(exact["a"].tolist(), exact["b"].tolist()):
                dropped[b] = ("exact_duplicate", a)
            near = pairs[pairs["kind"] == 1]
            gone = np.fromiter(dropped, dtype=np.int64, count=len(dropped))
            near = near[~near["a"].isin(gone) & ~near["b"].isin(gone)]  # exact copies left the corpus first
            clusters = minhash.clusters_to_drop(near[["a", "b"]].to_numpy(np.int64))
            for b, root in clusters.items():
                dropped[b] = ("near_duplicate", root)
            near_info = {"bands": bands, "rows": rows, "candidate_pairs": int(len(near)),
                         "clusters": len(set(clusters.values()))}
        keep_of = {v[1] for v in dropped.values()}
        names = {int(i): f"{s}:{int(r)}" for i, s, r in zip(first["doc_id"], first["source"], first["row"])
                 if int(i) in keep_of}
        wall_global = time.perf_counter() - t1

        t2 = time.perf_counter()
        words = T.read_blocklist(self.identity["contents"].get("blocklist", ""))
        ds = self._map(ds, _second_pass, cfg=cfg, dropped=dropped, names=names, words=words).materialize()
        second = ds.select_columns(["doc_id", "drop", "note", "changed", "nbytes", "nwords", "t_dedup_verdicts",
                                    "t_scrub", "t_blocklist"] + [f"pii_{k}" for k in T.PLACEHOLDERS]).to_pandas()
        wall_second = time.perf_counter() - t2

        self._report(report, first, second, near_info)
        report["worker_nodes"] = sorted(set(first["node"]))  # where the per-document stages ran
        report["passes_s"] = {"read_and_per_document_stages": round(wall_first, 3),
                              "global_steps": round(wall_global, 3),
                              "verdicts_scrub_blocklist": round(wall_second, 3)}
        import pandas as pd

        removed = pd.concat([first[first["drop"] != ""][["doc_id", "source", "row", "drop"]],
                             second[second["drop"] != ""][["doc_id", "drop"]].merge(
                                 first[["doc_id", "source", "row"]], on="doc_id")], ignore_index=True)
        self._write_removed(removed)
        return ds

    def _report(self, report: dict, first, second, near_info: dict) -> None:
        """Documents, bytes, removals, changes, examples and worker CPU time of every stage."""
        cfg = self.cfg
        nbytes = dict(zip(first["doc_id"].tolist(), first["nbytes"].tolist()))
        notes1 = [json.loads(n) for n in first["note"] if n]
        notes2 = [json.loads(n) for n in second["note"] if n]

        def examples(stage):
            return [n[stage] for n in notes1 + notes2 if stage in n][: cfg.examples]

        def reasons(frame, stage):
            picked = frame[frame["drop"].map(_stage_of) == stage]["drop"]
            return {k: int(v) for k, v in picked.value_counts().items()}

        read_ok = first["drop"] != "empty"
        norm_ok = read_ok & (first["drop"] != "empty_after_normalize")
        live1 = first["drop"] == ""
        ex = second["drop"] == "exact_duplicate"
        after_exact = second[~ex]
        after_near = after_exact[after_exact["drop"] != "near_duplicate"]
        final = second[second["drop"] == ""]
        rows = [("read", len(first), int(first["nbytes_in"].sum()), int(read_ok.sum()),
                 int(first["nbytes_in"][read_ok].sum()), reasons(first, "read"), first["t_read"].sum()),
                ("normalize", None, None, int(norm_ok.sum()), int(first["nbytes"][norm_ok].sum()),
                 reasons(first, "normalize"), first["t_normalize"].sum()),
                ("quality", None, None, int(live1.sum()), int(first["nbytes"][live1].sum()),
                 reasons(first, "quality"), first["t_quality"].sum()),
                ("exact_dedup", None, None, len(after_exact), int(sum(nbytes[i] for i in after_exact["doc_id"])),
                 reasons(second, "exact_dedup"), first["t_exact_dedup"].sum()),
                ("near_dedup", None, None, len(after_near), int(sum(nbytes[i] for i in after_near["doc_id"])),
                 reasons(second, "near_dedup"), first["t_near_dedup"].sum()),
                ("scrub", None, None, len(after_near), int(after_near["nbytes"].sum()), {}, second["t_scrub"].sum()),
                ("blocklist", None, None, len(final), int(final["nbytes"].sum()), reasons(second, "blocklist"),
                 second["t_blocklist"].sum())]
        enabled = {"normalize": cfg.normalize.enabled, "quality": cfg.quality.enabled,
                   "exact_dedup": cfg.exact_dedup.enabled, "near_dedup": cfg.near_dedup.enabled,
                   "scrub": cfg.scrub.enabled, "blocklist": bool(cfg.blocklist.path)}
        prev = None
        for name, docs_in, bytes_in, docs_out, bytes_out, removed, cpu in rows:
            if not enabled.get(name, True):
                continue
            entry = {"stage": name, "docs_in": docs_in if prev is None else prev["docs_out"],
                     "docs_out": docs_out, "bytes_in": bytes_in if prev is None else prev["bytes_out"],
                     "bytes_out": bytes_out, "removed": removed, "cpu_s": round(float(cpu), 3),
                     "examples": examples(name)}
            if name == "normalize":
                entry["changed"] = int(first["changed"].sum())
            if name == "scrub":
                entry["changed"] = int(second["changed"].sum())
                entry["replaced"] = {k: int(second[f"pii_{k}"].sum()) for k in T.PLACEHOLDERS}
            if name == "near_dedup":
                entry.update(near_info)
            report["stages"].append(entry)
            prev = entry
            self.log(f"stage {name:<11} {entry['docs_in']:>9,} -> {entry['docs_out']:>9,} documents "
                     f"{entry['bytes_in'] / 1e6:>9.2f} -> {entry['bytes_out'] / 1e6:>9.2f} MB  {entry['cpu_s']:>7.2f} CPU s")

        def histogram(words):
            return np.histogram(np.log10(np.maximum(np.asarray(words, dtype=np.float64), 1)), bins=20, range=(0, 6))[0].tolist()

        report["histogram"] = {"words_in": histogram(first["nwords_in"]), "words_out": histogram(final["nwords"])}

    def _write_removed(self, df) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"doc_id": df["doc_id"].to_numpy(np.int64), "source": list(df["source"]),
                          "row": df["row"].to_numpy(np.int64), "stage": [_stage_of(r) for r in df["drop"]],
                          "reason": list(df["drop"])})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.out.write_bytes(buf.getvalue(), "removed.parquet")

    def _documents_dataset(self):
        import ray.data

        names = sorted(n for n in self.out.sizes("documents") if n.endswith(".parquet"))
        items = ray.data.from_items([{"name": n} for n in names], override_num_blocks=max(1, len(names)))
        docs = items.map_batches(_read_documents, batch_size=1, batch_format="pandas",
                                 fn_kwargs={"out": self.out, "env": self.env})
        return docs.repartition(self.cfg.workers * 2)  # splits in order

    # stage 7
    def _tokenizer_json(self, docs) -> str:
        t = self.cfg.tokenize
        if self.out.exists("tokenizer.json"):
            return self.out.read_text("tokenizer.json")
        if t.tokenizer:
            text = self.identity["contents"]["tokenizer"]
        else:
            from orchestrator.data import train_tokenizer

            batches = docs.limit(t.train_docs).iter_batches(batch_format="pyarrow", batch_size=None)
            text = train_tokenizer((x for b in batches for x in b.column("text").to_pylist()), t.vocab_size).to_str()
        self.out.write_text(text, "tokenizer.json")
        return text

    def _write(self, blocks, tokenizer_json: str | None = None):
        """The cleaned documents of the second pass's blocks written as parquet files (lazily: a
        dataset of one row per file, or of each file's tokens with a tokenizer)."""
        return self._map(blocks, _write_documents, batch_size=DOCS_PER_FILE, out=self.out, env=self.env,
                         tokenizer_json=tokenizer_json)

    def _tokenize(self, docs, write: bool) -> dict:
        """Stage 7: the tokenizer (trained on the first documents unless given), then the shards,
        from where the manifest stops. With ``write``, ``docs`` are the second pass's blocks and
        the map that writes each file of documents tokenizes it."""
        t = self.cfg.tokenize
        t0 = time.perf_counter()
        tokenizer_json = self._tokenizer_json(self._map(docs, _documents) if write else docs)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size()
        dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max else np.uint32
        import hashlib

        manifest = json.loads(self.out.read_text(MANIFEST)) if self.out.exists(MANIFEST) else {"shards": []}
        manifest["vocab_size"] = vocab
        manifest["tokenizer_sha256"] = hashlib.sha256(tokenizer_json.encode()).hexdigest()
        done = manifest["shards"]
        if done and done[-1].get("last"):
            if write:
                self._write(docs).materialize()
            self.log(f"all {len(done)} shards already written")
            return self._shard_summary(manifest, vocab, time.perf_counter() - t0, 0)
        end_doc, end_offset = (done[-1]["end"] if done else (0, 0))
        t_train = time.perf_counter() - t0
        stream = self._write(docs, tokenizer_json) if write else self._map(docs, _tokenize, tokenizer_json=tokenizer_json)
        buf: list[np.ndarray] = []
        filled = 0
        position = 0  # index of the next document in output order
        written = 0
        from tqdm import tqdm

        bar = tqdm(desc="shards", unit="shard", disable=not self.cfg.progress, file=sys.stderr)
        for batch in stream.iter_batches(batch_format="pandas", batch_size=None):
            pieces = []
            for tokens, lengths in zip(batch["tokens"], batch["lengths"]):
                lengths = np.frombuffer(lengths, dtype=np.int64)
                pieces += np.split(np.frombuffer(tokens, dtype=np.int32), np.cumsum(lengths)[:-1]) if len(lengths) else []
            for ids in pieces:
                if position < end_doc:
                    position += 1
                    continue
                if position == end_doc and end_offset:
                    ids = ids[end_offset:]
                offset = end_offset if position == end_doc else 0
                while len(ids):
                    room = t.shard_tokens - filled
                    take, ids = ids[:room], ids[room:]
                    buf.append(take)
                    filled += len(take)
                    offset += len(take)
                    if filled == t.shard_tokens:
                        at = (position, offset) if len(ids) else (position + 1, 0)
                        self._write_shard(manifest, np.concatenate(buf).astype(dtype), at, last=False)
                        written += 1
                        bar.update(1)
                        buf, filled = [], 0
                position += 1
        if filled or not done:
            self._write_shard(manifest, np.concatenate(buf).astype(dtype) if buf else np.zeros(0, dtype),
                              (position, 0), last=True)
            written += 1
        elif done:
            done[-1]["last"] = True
            self.out.write_text(json.dumps(manifest, indent=1), MANIFEST)
        bar.close()
        summary = self._shard_summary(manifest, vocab, time.perf_counter() - t0, written)
        summary["tokenizer_s"] = round(t_train, 3)
        self.log(f"tokens: {summary['tokens']:,} in {len(manifest['shards'])} shards ({written} written now) "
                 f"-> {self.out.url('shards')}")
        return summary

    def _write_shard(self, manifest: dict, arr: np.ndarray, end: tuple[int, int], last: bool) -> None:
        import hashlib

        index = len(manifest["shards"])
        name = f"shard-{index:05d}.npy"
        buf = io.BytesIO()
        np.save(buf, arr)
        data = buf.getvalue()
        self.out.write_bytes(data, "shards", name)
        manifest["shards"].append({"name": name, "tokens": int(arr.size), "sha256": hashlib.sha256(data).hexdigest(),
                                   "end": [int(end[0]), int(end[1])], "last": last})
        manifest["dtype"] = str(arr.dtype)
        self.out.write_text(json.dumps(manifest, indent=1), MANIFEST)

    def _shard_summary(self, manifest: dict, vocab: int, seconds: float, written: int) -> dict:
        return {"shards": len(manifest["shards"]), "written_now": written,
                "tokens": int(sum(s["tokens"] for s in manifest["shards"])), "vocab_size": vocab,
                "shard_tokens": self.cfg.tokenize.shard_tokens, "seconds": round(seconds, 3)}


def run(cfg: PrepareConfig, cluster, log=print) -> dict:
    """Checks ``cfg`` (ConfigError naming the key), connects to Ray (embedded, or cluster.address)
    and prepares; returns the report."""
    from orchestrator.cluster import connect

    prep = Preparation(cfg, log)
    with connect(cluster):
        return prep.run()
