"""The typed configuration of ``launch.prepare`` (conf/prepare.yaml), and its checks: every bad
input is refused here, naming the key, before any work starts."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from orchestrator.config import ClusterConfig, check_location
from orchestrator.data import LOADERS
from orchestrator.errors import ConfigError
from orchestrator.prepare.text import PLACEHOLDERS, QualityConfig
from orchestrator.storage import Storage

SUFFIXES = tuple(LOADERS)


@dataclass
class NormalizeConfig:
    enabled: bool = True
    nfc: bool = True         # Unicode NFC
    whitespace: bool = True  # spaces and tabs collapsed, lines stripped, at most one blank line


@dataclass
class ExactDedupConfig:
    enabled: bool = True     # one document per normalized text, across the whole corpus


@dataclass
class NearDedupConfig:
    enabled: bool = True
    threshold: float = 0.7   # Jaccard similarity of word n-gram shingles, in (0, 1)
    num_perm: int = 128      # MinHash signature size
    ngram: int = 3           # words per shingle
    seed: int = 1            # of the hash functions


@dataclass
class ScrubConfig:
    enabled: bool = True
    kinds: list[str] = field(default_factory=lambda: list(PLACEHOLDERS))


@dataclass
class BlocklistConfig:
    path: Optional[str] = None  # a word list (one word or phrase per line, '#' comments); null: off
    min_hits: int = 1           # a document with this many blocklisted words is removed


@dataclass
class TokenizeConfig:
    enabled: bool = True
    tokenizer: Optional[str] = None  # a tokenizer.json to use; null: train a byte-level BPE here
    vocab_size: int = 2048
    train_docs: int = 5_000          # documents the tokenizer is trained on (the first ones)
    shard_tokens: int = 1 << 20      # tokens per shard (the last shard holds the rest)


@dataclass
class PrepareConfig:
    inputs: list[str] = MISSING      # local paths or storage URLs: .txt (one document per file), .jsonl/.json, .parquet
    output: str = MISSING            # a folder or storage URL; rerunning with the same settings resumes
    text_field: str = "text"         # the column of .jsonl/.json/.parquet rows that holds the text
    workers: int = 2                 # Ray Data tasks of each stage at once
    batch_size: int = 1024           # documents per batch (each call of a stage; vectorized steps gain from more)
    examples: int = 3                # examples per stage in the report
    # The global steps (exact and near deduplication) group one small row per document and band:
    # up to this many rows are grouped in one pandas groupby on the driver (16 bytes a row);
    # beyond, through Ray Data's hash shuffle across the workers.
    driver_group_rows: int = 20_000_000
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for URLs
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    blocklist: BlocklistConfig = field(default_factory=BlocklistConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)


@dataclass
class PrepareJob:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def storage_of(location: str, options: dict) -> tuple[Storage, str]:
    """(the folder holding ``location``, its file name), for a path or a URL (``options``: fsspec's)."""
    location = os.path.expanduser(location)
    if "://" in location and not location.startswith("file://"):
        folder, name = location.rstrip("/").rsplit("/", 1)
        return Storage.at(folder, dict(options)), name
    path = os.path.abspath(location.removeprefix("file://"))
    return Storage.at(os.path.dirname(path)), os.path.basename(path)


def _range(key: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ConfigError(key, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {value}")


def _check_quality(q: QualityConfig) -> None:
    if q.min_words < 0 or q.max_words < max(1, q.min_words):
        raise ConfigError("prepare.quality.max_words" if q.min_words >= 0 else "prepare.quality.min_words",
                          f"need 0 <= min_words <= max_words, got {q.min_words} and {q.max_words}")
    if not 0 < q.min_mean_word_length <= q.max_mean_word_length:
        raise ConfigError("prepare.quality.min_mean_word_length",
                          f"need 0 < min_mean_word_length <= max_mean_word_length, got {q.min_mean_word_length} "
                          f"and {q.max_mean_word_length}")
    for key in ("min_alpha_word_fraction", "max_duplicate_line_fraction", "max_duplicate_line_char_fraction",
                "min_punctuated_line_fraction"):
        _range(f"prepare.quality.{key}", getattr(q, key), 0.0, 1.0)
    if q.max_symbol_word_ratio < 0:
        raise ConfigError("prepare.quality.max_symbol_word_ratio", f"must be >= 0, got {q.max_symbol_word_ratio}")
    for key, table in (("max_top_ngram_char_fraction", q.max_top_ngram_char_fraction),
                       ("max_duplicate_ngram_char_fraction", q.max_duplicate_ngram_char_fraction)):
        for n, limit in table.items():
            if not str(n).isdigit() or not 1 <= int(n) <= 20:
                raise ConfigError(f"prepare.quality.{key}", f"keys are n-gram sizes from 1 to 20, got {n!r}")
            _range(f"prepare.quality.{key}.{n}", limit, 0.0, 1.0)


def check(cfg: PrepareConfig) -> dict:
    """Checks everything before work starts; returns what the output's fingerprint is made of: the
    inputs' identity (each input's URL with its size and fsspec key) and the contents of the
    blocklist and tokenizer, where given (read once, here)."""
    for key, value, lo in (("workers", cfg.workers, 1), ("batch_size", cfg.batch_size, 1),
                           ("driver_group_rows", cfg.driver_group_rows, 0), ("examples", cfg.examples, 0),
                           ("blocklist.min_hits", cfg.blocklist.min_hits, 1),
                           ("tokenize.shard_tokens", cfg.tokenize.shard_tokens, 1024),
                           ("tokenize.train_docs", cfg.tokenize.train_docs, 1)):
        if value < lo:
            raise ConfigError(f"prepare.{key}", f"must be >= {lo}, got {value}")
    if not cfg.text_field:
        raise ConfigError("prepare.text_field", "must name a column")
    _check_quality(cfg.quality)
    d = cfg.near_dedup
    _range("prepare.near_dedup.threshold", d.threshold, 0.0, 1.0, lo_open=True, hi_open=True)
    if not 2 <= d.num_perm <= 1024:
        raise ConfigError("prepare.near_dedup.num_perm", f"must be in [2, 1024], got {d.num_perm}")
    if not 1 <= d.ngram <= 20:
        raise ConfigError("prepare.near_dedup.ngram", f"must be in [1, 20], got {d.ngram}")
    for kind in cfg.scrub.kinds:
        if kind not in PLACEHOLDERS:
            raise ConfigError("prepare.scrub.kinds", f"{kind!r} is not a kind; allowed: {', '.join(PLACEHOLDERS)}")
    t = cfg.tokenize
    if t.vocab_size < 258:
        raise ConfigError("prepare.tokenize.vocab_size", f"a byte-level tokenizer needs at least 258 entries, got {t.vocab_size}")
    contents = {}
    for name, key, location in (("blocklist", "prepare.blocklist.path", cfg.blocklist.path),
                                ("tokenizer", "prepare.tokenize.tokenizer", t.tokenizer)):
        if location:
            contents[name] = _readable(key, location, cfg).decode("utf-8", errors="replace")
    if t.tokenizer:
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_str(contents["tokenizer"])
        except Exception as exc:
            raise ConfigError("prepare.tokenize.tokenizer", f"{t.tokenizer}: not a tokenizer.json ({exc})") from None
    if not cfg.inputs:
        raise ConfigError("prepare.inputs", "name at least one file")
    identity = [_check_input(location, cfg) for location in cfg.inputs]
    if not cfg.output:
        raise ConfigError("prepare.output", "name a folder or a storage URL")
    check_location("prepare.output", cfg.output)
    return {"inputs": identity, "contents": contents}


def _readable(key: str, location: str, cfg: PrepareConfig) -> bytes:
    check_location(key, location)
    store, name = storage_of(location, cfg.storage_options)
    try:
        return store.read_bytes(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"{location}: cannot be read ({type(exc).__name__}: {exc})") from None


def _check_input(location: str, cfg: PrepareConfig) -> dict:
    check_location("prepare.inputs", location)
    suffix = os.path.splitext(location)[1].lower()
    if suffix not in SUFFIXES:
        raise ConfigError("prepare.inputs", f"{location}: unsupported file type {suffix or '(none)'}; "
                                            f"allowed: {', '.join(SUFFIXES)}")
    store, name = storage_of(location, cfg.storage_options)
    try:
        info = store.fs.info(store._path(name))
        if info.get("type") != "file":
            raise ConfigError("prepare.inputs", f"{location}: not a file")
        with store.open(name) as f:
            head = f.read(1 << 16)
    except (OSError, ValueError) as exc:
        raise ConfigError("prepare.inputs", f"{location}: cannot be read ({type(exc).__name__}: {exc})") from None
    if suffix in (".jsonl", ".json"):
        first = head.split(b"\n", 1)[0].strip()
        try:
            row = json.loads(first) if first else {}
            if isinstance(row, list):  # a JSON array: its first element
                row = row[0] if row else {}
        except ValueError:
            row = None  # one JSON document over several lines: checked when read
        if isinstance(row, dict) and row and cfg.text_field not in row:
            raise ConfigError("prepare.text_field", f"{cfg.text_field!r} is not a field of {location}; "
                                                    f"its fields: {', '.join(sorted(row))}")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        with store.open(name) as f:
            names = pq.read_schema(f).names
        if cfg.text_field not in names:
            raise ConfigError("prepare.text_field", f"{cfg.text_field!r} is not a column of {location}; "
                                                    f"its columns: {', '.join(names)}")
    return {"url": location, "size": int(info.get("size") or 0), "key": str(store.fs.ukey(store._path(name)))}


def fingerprint(cfg: PrepareConfig, identity: dict) -> str:
    """What makes two preparations the same: their inputs and every setting that changes output
    (the blocklist's and tokenizer's contents, not their paths)."""
    settings = asdict(cfg)
    for key in ("workers", "batch_size", "examples", "progress", "storage_options", "output", "inputs",
                "driver_group_rows"):
        settings.pop(key)
    contents = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in identity["contents"].items()}
    return hashlib.sha256(json.dumps([identity["inputs"], settings, contents], sort_keys=True,
                                     default=str).encode()).hexdigest()[:24]
