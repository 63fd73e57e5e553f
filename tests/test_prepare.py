"""Data preparation on Ray Data (launch.prepare): on a generated corpus with planted duplicates,
near-duplicates, private items, low-quality and blocklisted documents, every stage finds what was
planted (precision and recall >= 0.95); near-deduplication agrees with datasketch's MinHash LSH;
tokenization resumes by shard; bad input is refused before any work, naming the key; and a
training job reads the shards (locally and from an object store) to the same losses."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import ConfigError
from orchestrator.prepare.config import PrepareConfig
from orchestrator.prepare.corpus import make_corpus, read_output, score
from orchestrator.prepare.pipeline import Preparation
from orchestrator.prepare.text import normalize
from tests.conftest import ROOT

SHARD = 20_000  # tokens: the 600-document corpus makes about 13 shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return make_corpus(tmp_path_factory.mktemp("corpus"), 600, seed=0)


def config(corpus: dict, output: Path, **kw) -> PrepareConfig:
    cfg = PrepareConfig(inputs=list(corpus["files"]), output=str(output), workers=2, progress=False)
    cfg.blocklist.path = corpus["blocklist"]
    cfg.tokenize.shard_tokens = SHARD
    for key, value in kw.items():
        obj = cfg
        *parts, last = key.split(".")
        for p in parts:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg


@pytest.fixture(scope="module")
def prepared(ray_cluster, corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "out"
    report = Preparation(config(corpus, out), log=lambda *a: None).run()
    return out, report


def test_every_stage_finds_what_was_planted(prepared, corpus):
    out, report = prepared
    removed, documents = read_output(str(out))
    figures = score(corpus["docs"], corpus["files"], removed, documents)
    for stage, f in figures.items():
        assert f["expected"] > 0, stage
        assert f["precision"] >= 0.95 and f["recall"] >= 0.95, (stage, f)
    assert set(figures) == {"quality", "exact_dedup", "near_dedup", "scrub", "blocklist"}

    # The report: every stage in order, documents and bytes chained, examples, and the picture.
    stages = [s["stage"] for s in report["stages"]]
    assert stages == ["read", "normalize", "quality", "exact_dedup", "near_dedup", "scrub", "blocklist"]
    for a, b in zip(report["stages"], report["stages"][1:]):
        assert b["docs_in"] == a["docs_out"] and b["bytes_in"] == a["bytes_out"]
        assert b["docs_out"] == b["docs_in"] - sum(b["removed"].values()), b
    by = {s["stage"]: s for s in report["stages"]}
    assert by["exact_dedup"]["removed"] == {"exact_duplicate": figures["exact_dedup"]["found"]}
    assert by["normalize"]["changed"] >= figures["exact_dedup"]["expected"]  # copies differ only in spacing
    assert sum(by["scrub"]["replaced"].values()) == figures["scrub"]["found"]
    for name in ("normalize", "quality", "exact_dedup", "near_dedup", "scrub", "blocklist"):
        assert by[name]["examples"], name
    assert by["blocklist"]["docs_out"] == len(documents)
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["stages"] == json.loads(json.dumps(report["stages"]))
    assert (out / "prepare_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The cleaned documents: in input order, each with its source and row, scrubbed.
    ids = [d["doc_id"] for d in documents]
    assert ids == sorted(ids)
    for d in documents:
        assert d["source"] in corpus["files"] and d["doc_id"] == (corpus["files"].index(d["source"]) << 32) | d["row"]
        assert "@example.com" not in d["text"]

    # The shards: the documents' tokens end to end, each closed by EOS, cut at SHARD tokens.
    from tokenizers import Tokenizer

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    sizes = [s["tokens"] for s in manifest["shards"]]
    assert manifest["shards"][-1]["last"] and all(n == SHARD for n in sizes[:-1]) and 0 < sizes[-1] <= SHARD
    tokens = np.concatenate([np.load(out / "shards" / s["name"]) for s in manifest["shards"]])
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    assert int((tokens == eos).sum()) == len(documents)
    first = tokens[: int(np.argmax(tokens == eos))]
    assert tok.decode(first.tolist()) == documents[0]["text"]
    assert report["tokenize"]["tokens"] == tokens.size


def test_near_dedup_agrees_with_datasketch_through_the_shuffle(ray_cluster, corpus, tmp_path):
    """Near-deduplication alone (its global step through Ray Data's hash shuffle) against
    datasketch's MinHashLSH at the same threshold and signature size, on the same documents."""
    from orchestrator.prepare.minhash import lsh_params
    from orchestrator.prepare.peer import datasketch_removed

    cfg = config(corpus, tmp_path / "out", driver_group_rows=0, **{"quality.enabled": False,
                 "exact_dedup.enabled": False, "scrub.enabled": False, "tokenize.enabled": False,
                 "blocklist.path": None})
    report = Preparation(cfg, log=lambda *a: None).run()
    assert report["grouping"]["where"].startswith("ray_data_hash_shuffle")
    removed, _ = read_output(str(tmp_path / "out"))
    ours = {r["doc_id"] for r in removed if r["stage"] == "near_dedup"}
    from datasketch.lsh import _optimal_param

    d = cfg.near_dedup
    assert lsh_params(d.threshold, d.num_perm) == _optimal_param(d.threshold, d.num_perm, 0.5, 0.5)
    docs = []
    for index, path in enumerate(corpus["files"]):
        if path.endswith(".jsonl"):
            texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]
        else:
            import pyarrow.parquet as pq

            texts = pq.read_table(path)["text"].to_pylist()
        docs += [((index << 32) | row, normalize(t)) for row, t in enumerate(texts)]
    peer = datasketch_removed(docs, d.threshold, d.num_perm, d.ngram, d.seed)
    agreement = len(ours & peer) / len(ours | peer)
    # Exact copies are near-duplicates too here (no exact stage): 30 + 30 planted.
    assert len(ours) >= 57 and agreement >= 0.95, (len(ours), len(peer), agreement)


def test_tokenization_resumes_by_shard(ray_cluster, prepared, corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    manifest_path = out / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    full = [s["sha256"] for s in manifest["shards"]]
    # As if stopped after 10 shards: the rest of the files and of the manifest are gone.
    for s in manifest["shards"][10:]:
        (out / "shards" / s["name"]).unlink()
    manifest["shards"] = manifest["shards"][:10]
    manifest_path.write_text(json.dumps(manifest))
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard-*.npy")}
    lines = []
    report = Preparation(config(corpus, out), log=lines.append).run()
    assert any("resuming at tokenization" in line for line in lines), lines
    assert report["tokenize"]["written_now"] == len(full) - 10
    after = json.loads(manifest_path.read_text())
    assert [s["sha256"] for s in after["shards"]] == full
    for s in after["shards"]:
        assert hashlib.sha256((out / "shards" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert {n: (out / "shards" / n).stat().st_mtime_ns for n in kept} == kept  # not rewritten
    # A finished preparation run again writes nothing.
    again = Preparation(config(corpus, out), log=lambda *a: None).run()
    assert again["tokenize"]["written_now"] == 0


def test_a_stop_in_the_pass_that_writes_and_tokenizes_resumes(ray_cluster, prepared, corpus, tmp_path):
    """Stopped inside the last pass (documents being written and tokenized, 10 shards done): the
    rerun cleans again, writes the documents again, and keeps the shards already written; stopped
    after the last shard, it writes the documents and no shard."""
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    manifest_path = out / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    full = [s["sha256"] for s in manifest["shards"]]
    documents = sorted(p.name for p in (out / "documents").glob("*.parquet"))
    for s in manifest["shards"][10:]:
        (out / "shards" / s["name"]).unlink()
    manifest["shards"] = manifest["shards"][:10]
    manifest_path.write_text(json.dumps(manifest))
    shutil.rmtree(out / "documents")
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard-*.npy")}
    lines = []
    report = Preparation(config(corpus, out), log=lines.append).run()
    assert not any("resuming at tokenization" in line for line in lines), lines
    assert report["tokenize"]["written_now"] == len(full) - 10
    assert [s["sha256"] for s in json.loads(manifest_path.read_text())["shards"]] == full
    assert {n: (out / "shards" / n).stat().st_mtime_ns for n in kept} == kept
    assert sorted(p.name for p in (out / "documents").glob("*.parquet")) == documents
    assert (out / "documents" / "_done.json").exists()

    (out / "documents" / "_done.json").unlink()
    again = Preparation(config(corpus, out), log=lambda *a: None).run()
    assert again["tokenize"]["written_now"] == 0
    assert sorted(p.name for p in (out / "documents").glob("*.parquet")) == documents
    assert [s["sha256"] for s in json.loads(manifest_path.read_text())["shards"]] == full


def test_bad_input_is_refused_before_any_work(corpus, prepared, tmp_path):
    out = tmp_path / "new"
    cases = [
        ({"inputs": [str(tmp_path / "missing.jsonl")]}, "prepare.inputs", "cannot be read"),
        ({"inputs": [str(tmp_path)]}, "prepare.inputs", "unsupported file type"),
        ({"inputs": [corpus["files"][0] + ".csv"]}, "prepare.inputs", "unsupported file type"),
        ({"text_field": "body"}, "prepare.text_field", "'body' is not a field"),
        ({"near_dedup.threshold": 1.5}, "prepare.near_dedup.threshold", "(0, 1)"),
        ({"near_dedup.num_perm": 1}, "prepare.near_dedup.num_perm", "[2, 1024]"),
        ({"quality.min_alpha_word_fraction": -0.1}, "prepare.quality.min_alpha_word_fraction", "[0, 1]"),
        ({"quality.max_top_ngram_char_fraction": {"x": 0.2}}, "prepare.quality.max_top_ngram_char_fraction", "n-gram"),
        ({"blocklist.path": str(tmp_path / "nope.txt")}, "prepare.blocklist.path", "cannot be read"),
        ({"scrub.kinds": ["email", "passport"]}, "prepare.scrub.kinds", "'passport'"),
        ({"tokenize.tokenizer": corpus["blocklist"]}, "prepare.tokenize.tokenizer", "not a tokenizer.json"),
        ({"workers": 0}, "prepare.workers", ">= 1"),
    ]
    for overrides, key, words in cases:
        cfg = config(corpus, out)
        inputs = overrides.pop("inputs", None)
        if inputs:
            cfg.inputs = inputs
        for k, v in overrides.items():
            obj = cfg
            *parts, last = k.split(".")
            for p in parts:
                obj = getattr(obj, p)
            setattr(obj, last, v)
        with pytest.raises(ConfigError) as err:
            Preparation(cfg)
        assert err.value.key == key and words in str(err.value), (overrides, str(err.value))
        assert not out.exists(), overrides  # nothing written
    # An output holding another preparation (other settings), or other files, is left alone.
    before = {p: p.stat().st_mtime_ns for p in prepared[0].rglob("*")}
    with pytest.raises(ConfigError) as err:
        Preparation(config(corpus, prepared[0], **{"near_dedup.threshold": 0.8}))
    assert err.value.key == "prepare.output" and "different preparation" in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in prepared[0].rglob("*")} == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as err:
        Preparation(config(corpus, tmp_path / "busy"))
    assert err.value.key == "prepare.output" and "holds no preparation" in str(err.value)

    # The command: exit 2 and one line naming the key, for a bad value and for a misspelt key.
    for args, key in ((["prepare.near_dedup.threshold=1.5"], "prepare.near_dedup.threshold"),
                      (["prepare.near_dedup.treshold=0.5"], "treshold")):
        proc = subprocess.run([sys.executable, "-m", "launch.prepare", f"prepare.inputs=[{corpus['files'][0]}]",
                               f"prepare.output={out}", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_training_reads_the_shards_locally_and_from_the_object_store(ray_cluster, prepared, make_job, tmp_path,
                                                                     s3_url):
    from orchestrator.job import run_job
    from orchestrator.storage import Storage

    local = prepared[0]
    remote = Storage.at(f"{s3_url}/prepared")
    for path in local.rglob("*"):
        if path.is_file() and (path.name == "tokenizer.json" or path.parent.name == "shards"):
            remote.upload(path, str(path.relative_to(local)))
    losses = []
    for where in (str(local), remote.root):
        job = make_job("strategy=single", "cluster.num_workers=1", "model.vocab_size=2048", "data=prepared",
                       f"data.path={where}",
                       f"data.cache_dir={tmp_path / ('cache-' + str(len(losses)))}", "trainer.max_steps=4",
                       "precision=fp32", run_dir=tmp_path / f"run-{len(losses)}")
        summary = run_job(job)
        assert summary["status"] == "succeeded", summary["error"]
        losses.append(summary["losses"])
    assert losses[0] == losses[1] and len(losses[0]) == 4

    # A path that holds no finished preparation is refused before training, naming data.path.
    from orchestrator.config import compose

    with pytest.raises(ConfigError) as err:
        compose(["model=tiny", "model.vocab_size=2048", "data=prepared", f"data.path={tmp_path}",
                 f"run.dir={tmp_path / 'x'}"])
    assert err.value.key == "data.path"
    with pytest.raises(ConfigError) as err:
        compose(["model=tiny", "model.vocab_size=1024", "data=prepared", f"data.path={local}",
                 f"run.dir={tmp_path / 'x'}"])
    assert err.value.key == "model.vocab_size"
