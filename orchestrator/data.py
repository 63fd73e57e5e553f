"""Data: local files -> datasets -> a locally trained byte-level BPE -> packed blocks.

``prepare`` runs once on the driver and caches its output (tokenizer.json and a
flat array of token ids) under ``data.cache_dir``, keyed by the content of the
input files and the tokenizer settings. Where the job has storage that every node
reaches (``data.storage``, or ``run.storage``'s ``data/``), ``publish`` copies that
folder there under the same key, once for every job that prepares the same data;
each rank's ``localize`` then gives it a copy on its own node's disk (downloaded once
per node and key, into the node's ``data.cache_dir``). Ranks memory-map the token
array and draw fixed-length blocks through ``BlockSampler``, whose position is one
integer (global samples consumed) that a checkpoint saves and restores.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.encoder import Encoder
from orchestrator.errors import ConfigError
from orchestrator.storage import Storage
from orchestrator.tokens import EOS

# Nothing is ever fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FORMAT_VERSION = 2
# File suffix -> how it is read (the datasets builder): training data and launch.prepare alike.
LOADERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class PreparedData:
    tokens_path: str
    tokenizer_path: str
    n_tokens: int
    eos_id: int | None
    vocab_size: int
    mask_path: str | None = None  # SFT: which target positions are trained
    key: str = ""  # the content key: the folder's name in every cache and on storage
    remote: Storage | None = None  # the published copy every node reads, if any

    @property
    def local_dir(self) -> Path:
        return Path(self.tokens_path).parent


META = "meta.json"  # written last: a folder with it is complete


def _files_digest(paths: list[Path]) -> str:
    from orchestrator.storage import hash_stream

    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            hash_stream(f, h)
    return h.hexdigest()


def load_documents(paths: list[Path], text_field: str, cache_dir: Path):
    """One ``datasets.Dataset`` with a single ``text`` column, one row per document."""
    import datasets

    datasets.disable_progress_bars()
    by_builder: dict[str, list[str]] = {}
    for p in paths:
        builder = LOADERS.get(p.suffix.lower())
        if builder is None:
            raise ConfigError("data.paths", f"{p}: unsupported file type; allowed: {', '.join(sorted(LOADERS))}")
        by_builder.setdefault(builder, []).append(str(p))
    parts = []
    for builder, files in by_builder.items():
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=str(cache_dir / "hf"), **kwargs)
        field = "text" if builder == "text" else text_field
        if field not in ds.column_names:
            raise ConfigError("data.text_field", f"{field!r} is not a column of {files}; columns: {ds.column_names}")
        ds = ds.select_columns([field])
        if field != "text":
            ds = ds.rename_column(field, "text")
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _split_lines(text: str, chunk_chars: int = 1 << 16) -> list[str]:
    """Cuts a long document at line ends so that the tokenizer can work in parallel."""
    if len(text) <= chunk_chars:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def tokenizer_for(texts: list[str], vocab_size: int, tokenizer_path: str | None):
    """The given (pretrained) tokenizer, or a byte-level BPE trained on ``texts``."""
    if tokenizer_path:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(tokenizer_path)
    return train_tokenizer(texts, vocab_size)


def _build_text(paths: list[Path], cfg: DataConfig, vocab_size: int, tokenizer_path: str | None, cache_root: Path):
    """Documents -> one stream of token ids, documents separated by EOS."""
    docs = load_documents(paths, cfg.text_field, cache_root)
    texts = [t for t in docs["text"] if t]
    tok = tokenizer_for(texts, vocab_size, tokenizer_path)
    eos_id = tok.token_to_id(EOS)  # None for a foreign tokenizer without it: no separator then
    encoder = Encoder(tok)
    chunks = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(texts), 1024):
        pieces = [_split_lines(doc) for doc in texts[start:start + 1024]]
        tokens, lengths = encoder.encode_arrays([p for doc in pieces for p in doc])
        if eos_id is not None:  # after each document's last piece
            tokens = np.insert(tokens, np.cumsum(lengths)[np.cumsum([len(doc) for doc in pieces]) - 1], eos_id)
        chunks.append(tokens.astype(np.int64))
    return {"tokens": np.concatenate(chunks)}, tok, {}


PREPARED_MANIFEST = "shards/manifest.json"  # launch.prepare's list of shards; complete when its last says so


def _prepared_source(cfg: DataConfig, storage_options: dict | None) -> tuple[Storage, dict]:
    src = Storage.at(cfg.path, storage_options)
    manifest = json.loads(src.read_text(PREPARED_MANIFEST))
    return src, manifest


def check_prepared(cfg: DataConfig, storage_options: dict | None, model) -> None:
    """data.path holds a complete preparation whose tokenizer fits the model (ConfigError if not)."""
    from orchestrator.config import check_location

    if not cfg.path:
        raise ConfigError("data.path", "data.format=prepared reads launch.prepare's output: set data.path")
    check_location("data.path", cfg.path)
    try:
        src, manifest = _prepared_source(cfg, storage_options)
    except (OSError, ValueError) as exc:
        raise ConfigError("data.path", f"{cfg.path}: no complete preparation there ({type(exc).__name__}: {exc}); "
                                       f"run launch.prepare with prepare.output={cfg.path}") from None
    shards = manifest.get("shards") or []
    if not shards or not shards[-1].get("last"):
        raise ConfigError("data.path", f"{cfg.path}: the preparation is not finished ({len(shards)} shards so far); "
                                       f"rerun its launch.prepare command to complete it")
    if manifest.get("vocab_size", 0) > model.vocab_size:
        raise ConfigError("model.vocab_size", f"{model.vocab_size} is smaller than the prepared tokenizer's "
                                              f"{manifest['vocab_size']} entries ({cfg.path})")
    if model.init_from:
        from orchestrator import pretrained

        from orchestrator.storage import hash_stream

        with open(pretrained.locate(model.init_from).tokenizer_path, "rb") as f:
            own = hash_stream(f).hexdigest()
        if own != manifest.get("tokenizer_sha256"):
            raise ConfigError("data.path", f"{cfg.path} was tokenized with another tokenizer than model.init_from's; "
                                           f"prepare it with prepare.tokenize.tokenizer=<that tokenizer.json>")


def _build_prepared(cfg: DataConfig, storage_options: dict | None, out: Path) -> None:
    """launch.prepare's shards, checked against their hashes and joined in order into one token
    stream, with its tokenizer, written to ``out``."""
    src, manifest = _prepared_source(cfg, storage_options)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    try:
        pieces = []
        for shard in manifest["shards"]:
            data = src.read_bytes("shards", shard["name"])
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise OSError(f"{src.url('shards', shard['name'])}: content does not match its manifest")
            pieces.append(np.load(io.BytesIO(data), allow_pickle=False))
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
        np.save(tmp / "tokens.npy", tokens)
        (tmp / "tokenizer.json").write_bytes(src.read_bytes("tokenizer.json"))
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        meta = {"n_tokens": int(tokens.size), "eos_id": tok.token_to_id(EOS), "vocab_size": tok.get_vocab_size(),
                "files": [cfg.path]}
        (tmp / META).write_text(json.dumps(meta))
        os.rename(tmp, out)
    except OSError:
        if not (out / META).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(cfg: DataConfig, vocab_size: int, tokenizer_path: str | None = None,
            storage_options: dict | None = None) -> PreparedData:
    """Tokenizer + token arrays for the files in ``cfg``, from cache when possible. The tokenizer
    is trained here unless ``tokenizer_path`` names one (a pretrained model's). data.format=text
    gives one token stream; sft gives padded examples with a mask of the trained positions;
    prepared reads launch.prepare's shards and tokenizer from data.path."""
    from orchestrator import sft

    cache_root = Path(os.path.expanduser(cfg.cache_dir))
    if cfg.format == "prepared":
        _, manifest = _prepared_source(cfg, storage_options)
        key = hashlib.sha256(json.dumps([FORMAT_VERSION, "prepared", [s["sha256"] for s in manifest["shards"]],
                                         manifest.get("tokenizer_sha256")]).encode()).hexdigest()[:24]
        out = cache_root / "tokenized" / key
        if not (out / META).exists():
            _build_prepared(cfg, storage_options, out)
        return _read_prepared(out, key)

    paths = [Path(os.path.expanduser(p)).resolve() for p in cfg.paths]
    given = _files_digest([Path(tokenizer_path)]) if tokenizer_path else None
    fields = [cfg.format, cfg.text_field] + ([cfg.prompt_field, cfg.response_field, cfg.messages_field, cfg.seq_len]
                                             if cfg.format == "sft" else [])
    if cfg.format == "preference":
        fields += [cfg.prompt_field, cfg.chosen_field, cfg.rejected_field, cfg.seq_len]
    key = hashlib.sha256(
        json.dumps([FORMAT_VERSION, _files_digest(paths), vocab_size, fields, given]).encode()
    ).hexdigest()[:24]
    out = cache_root / "tokenized" / key
    meta_path = out / META
    if not meta_path.exists():
        cache_root.mkdir(parents=True, exist_ok=True)
        from orchestrator.alignment.data import build_preference

        build = {"sft": sft.build, "preference": build_preference}.get(cfg.format, _build_text)
        arrays, tok, extra = build(paths, cfg, vocab_size, tokenizer_path, cache_root)
        dtype = np.uint16 if tok.get_vocab_size() <= np.iinfo(np.uint16).max else np.uint32
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr if arr.dtype == np.bool_ else arr.astype(dtype))
        tok.save(str(tmp / "tokenizer.json"))
        meta = {"n_tokens": int(arrays["tokens"].size), "eos_id": tok.token_to_id(EOS),
                "vocab_size": tok.get_vocab_size(), "files": [str(p) for p in paths], **extra}
        (tmp / META).write_text(json.dumps(meta))
        try:
            os.rename(tmp, out)  # atomic publish; a concurrent writer may have won
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return _read_prepared(out, key)


def _read_prepared(folder: Path, key: str) -> PreparedData:
    meta = json.loads((folder / META).read_text())
    return PreparedData(
        tokens_path=str(folder / "tokens.npy"),
        tokenizer_path=str(folder / "tokenizer.json"),
        n_tokens=meta["n_tokens"],
        eos_id=meta["eos_id"],
        vocab_size=meta["vocab_size"],
        mask_path=str(folder / "mask.npy") if (folder / "mask.npy").exists() else None,
        key=key,
    )


def _data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != META)


def publish(data: PreparedData, store: Storage) -> PreparedData:
    """Copies the prepared folder to ``store/tokenized/<key>/`` unless a complete copy is there
    (its meta.json, uploaded last, says so). Returns the data with that copy as its source."""
    remote = store.child("tokenized", data.key)
    if not remote.exists(META):
        for name in _data_files(data.local_dir):
            remote.upload(data.local_dir / name, name)
        remote.upload(data.local_dir / META, META)
    return replace(data, remote=remote)


def localize(data: PreparedData, cache_dir: str) -> PreparedData:
    """The prepared data on this node's disk. Published data is downloaded once per node into
    ``cache_dir`` (checked against the published sizes); unpublished data must be readable where
    the driver wrote it. Raises what reading fails with (FileNotFoundError, PermissionError, ...)."""
    if data.remote is None:
        for path in (data.tokens_path, data.tokenizer_path, data.mask_path):
            if path:
                with open(path, "rb"):
                    pass
        return data
    out = Path(os.path.expanduser(cache_dir)) / "tokenized" / data.key
    if not (out / META).exists():
        sizes = data.remote.sizes()
        if META not in sizes:
            raise FileNotFoundError(f"{data.remote.url(META)} (no complete published copy)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        try:
            for name, size in sizes.items():
                data.remote.download(tmp / name, name)
                if (tmp / name).stat().st_size != size:
                    raise OSError(f"{data.remote.url(name)}: downloaded {(tmp / name).stat().st_size} bytes of {size}")
            os.rename(tmp, out)  # atomic; another rank of this node may have won
        except OSError:
            if not (out / META).exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return replace(_read_prepared(out, data.key), remote=data.remote)


def open_blocks(data: PreparedData, seq_len: int, val_fraction: float):
    """The training examples of prepared data: packed text blocks, or SFT examples."""
    if data.mask_path:
        from orchestrator.alignment.data import Pairs
        from orchestrator.sft import Examples

        paired = np.load(data.tokens_path, mmap_mode="r").ndim == 3  # (pairs, 2, seq_len + 1)
        return (Pairs if paired else Examples)(data.tokens_path, data.mask_path, val_fraction)
    return TokenBlocks(data.tokens_path, seq_len, val_fraction)


class TokenBlocks:
    """Fixed-length blocks of seq_len + 1 tokens over a memory-mapped id array."""

    def __init__(self, tokens_path: str, seq_len: int, val_fraction: float = 0.0):
        self.tokens = np.load(tokens_path, mmap_mode="r")
        self.seq_len = seq_len
        total = (len(self.tokens) - 1) // seq_len
        n_val = int(total * val_fraction)
        self.n_train = total - n_val
        self.n_val = n_val
        if self.n_train < 1:
            raise ConfigError("data.seq_len", f"the data holds {len(self.tokens)} tokens, too few for one block of {seq_len}")

    def batch(self, block_ids: np.ndarray, split: str = "train"):
        import torch

        offset = 0 if split == "train" else self.n_train
        starts = (np.asarray(block_ids) + offset) * self.seq_len
        arr = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(arr)
        return t[:, :-1], t[:, 1:]


class BlockSampler:
    """Deterministic, resumable, sharded order over ``n_blocks`` blocks.

    Step k uses global samples [k*G, (k+1)*G) of an endless sequence made of one
    seeded permutation per epoch. Data-parallel rank r takes the r-th contiguous
    slice of G/dp samples and cuts it into micro-batches. The state is the count
    of global samples consumed, so it does not depend on the world size.
    """

    def __init__(self, n_blocks: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True):
        if global_batch % (micro_batch * dp_size):
            raise ValueError("global_batch must be divisible by micro_batch * dp_size")
        self.n_blocks = n_blocks
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            else:
                self._perms[epoch] = np.arange(self.n_blocks)
        return self._perms[epoch]

    def global_indices(self, start: int, count: int) -> np.ndarray:
        return np.array([self._perm(i // self.n_blocks)[i % self.n_blocks] for i in range(start, start + count)])

    def next_step(self) -> list[np.ndarray]:
        per_rank = self.global_batch // self.dp_size
        mine = self.global_indices(self.consumed + self.dp_rank * per_rank, per_rank)
        self.consumed += self.global_batch
        return [mine[i : i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
