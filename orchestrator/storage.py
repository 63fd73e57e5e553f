"""Storage that every node can reach, and the one owner of a run's places.

``Storage`` is a root URL (a local or NFS path, or ``s3://bucket/prefix`` and any other fsspec
protocol) plus fsspec options. It is a small frozen value: it crosses Ray to the ranks, and each
process opens its own filesystem from it on first use. Endpoints and credentials come from where
fsspec and botocore look (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ..., ``FSSPEC_S3_*``) or
from ``run.storage_options``; the driver hands the variables it has to the ranks, so a node needs
none of its own.

``RunPlaces`` names every file of a run: on the driver's run directory (job.json, tokenizer,
metrics, status, summary, report, TensorBoard) and on the run's storage (checkpoints, and copies
of job.json and the tokenizer, so that a checkpoint on an object store can be exported or served
without the driver's disk). When ``run.storage`` is unset the two are the same directory.
"""
from __future__ import annotations

import functools
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What the driver forwards to its ranks, where set: the variables fsspec and botocore read.
FORWARDED_ENV_PREFIXES = ("AWS_", "FSSPEC_")


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, options: tuple):
    import fsspec

    if protocol == "file":  # a write creates its parent folders, as on an object store
        return fsspec.filesystem(protocol, auto_mkdir=True, **dict(options))
    return fsspec.filesystem(protocol, **dict(options))


def hash_stream(f, h=None):
    """Feeds a binary file object into ``h`` (a new sha256 by default) in 4 MiB reads; returns
    ``h``. The one file hasher: stored checkpoint files, data files, tokenizers."""
    import hashlib

    h = h or hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h


@dataclass(frozen=True)
class Storage:
    """A root on some filesystem. Paths below it are given relative, with '/'."""

    root: str
    options: tuple = ()  # fsspec options as sorted (key, value) pairs: hashable, picklable

    @classmethod
    def at(cls, location: str | os.PathLike, options: dict | None = None) -> "Storage":
        location = os.fspath(location)
        if location.startswith("file://"):
            location = location[len("file://"):]
        if not _is_url(location):
            location = str(Path(os.path.expanduser(location)).resolve())
        return cls(location.rstrip("/") or "/", tuple(sorted((options or {}).items())))

    @property
    def name(self) -> str:
        """The last component of the root."""
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return not _is_url(self.root)

    @property
    def fs(self):
        return _filesystem("file" if self.is_local else self.root.split("://", 1)[0], self.options)

    def url(self, *parts: str) -> str:
        """The full location of ``parts`` below the root."""
        rel = posixpath.join(*parts) if parts else ""
        return posixpath.join(self.root, rel) if rel else self.root

    def child(self, *parts: str) -> "Storage":
        return Storage(self.url(*parts), self.options)

    def _path(self, *parts: str) -> str:
        """The path fsspec's filesystem takes (no protocol)."""
        url = self.url(*parts)
        return url.split("://", 1)[1] if not self.is_local else url

    def exists(self, *parts: str) -> bool:
        self.invalidate()
        return self.fs.exists(self._path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self._path(*parts))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def write_bytes(self, data: bytes, *parts: str, sync: bool = False) -> None:
        """Writes one whole object. On a local filesystem it goes to a temporary name, is fsync'd
        and renamed into place, so a reader sees all of it or nothing (an object store's PUT is
        already all-or-nothing)."""
        path = self._path(*parts)
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if sync:
                fsync_dir(Path(path).parent)
            return
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def write_text(self, text: str, *parts: str, sync: bool = False) -> None:
        self.write_bytes(text.encode(), *parts, sync=sync)

    def sizes(self, *parts: str) -> dict[str, int]:
        """Name -> size of the files directly below ``parts`` (none if it does not exist)."""
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in self._entries(*parts) if e.get("type") == "file"}

    def _entries(self, *parts: str) -> list[dict]:
        """What is directly below ``parts``, freshly listed. An object store may list an emptied
        folder as an entry of itself for a while (SeaweedFS does): that entry is left out."""
        self.invalidate()
        path = self._path(*parts).rstrip("/")
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return [e for e in entries if e["name"].rstrip("/") != path]

    def dirs(self, *parts: str) -> list[str]:
        """Names of the folders directly below ``parts``."""
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in self._entries(*parts)
                      if e.get("type") == "directory")

    def open(self, *parts: str, mode: str = "rb"):
        return self.fs.open(self._path(*parts), mode)

    def remove(self, *parts: str) -> None:
        """Removes a file or a whole folder; nothing if it is not there."""
        path = self._path(*parts)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.invalidate()

    def upload(self, local: str | Path, *parts: str) -> None:
        self.fs.put_file(str(local), self._path(*parts))

    def download(self, local: str | Path, *parts: str) -> None:
        self.fs.get_file(self._path(*parts), str(local))

    def invalidate(self) -> None:
        """Forgets listings fsspec cached (another process may have written since)."""
        self.fs.invalidate_cache()

    def sha256(self, *parts: str) -> str:
        with self.open(*parts) as f:
            return hash_stream(f).hexdigest()

    def probe_write(self, name: str) -> None:
        """Writes and removes a small object below the root: raises what the filesystem raises."""
        self.write_bytes(b"forgeline access check\n", f".probe-{name}")
        self.remove(f".probe-{name}")

    def __str__(self) -> str:
        return self.root


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


REDACTED = "<redacted>"
SECRET_WORDS = ("secret", "key", "token", "password", "credential")


def without_credentials(options: dict) -> dict:
    """fsspec options as job.json records them: values under keys that look like credentials are
    replaced by REDACTED (credentials belong in the environment, which is forwarded, never written)."""
    return {k: (REDACTED if any(w in k.lower() for w in SECRET_WORDS) else v) for k, v in options.items()}


def forwarded_env() -> dict[str, str]:
    """The storage-related variables of this process, for ranks on other nodes."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def apply_env(env: dict[str, str]) -> None:
    """Sets forwarded variables that this process does not set itself (a node's own win)."""
    for key, value in env.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class RunPlaces:
    """Every file of one run, on the driver's run directory and on the run's storage."""

    dir: str  # the driver's run directory (absolute)
    storage: Storage  # checkpoints and what a rank on another node must read
    env: dict = field(default_factory=dict, compare=False)  # forwarded to the ranks

    @classmethod
    def of(cls, run_dir: str, storage: str | None = None, options: dict | None = None) -> "RunPlaces":
        run_dir = str(Path(os.path.expanduser(run_dir)).resolve())
        return cls(run_dir, Storage.at(storage or run_dir, options), forwarded_env())

    @property
    def separate_storage(self) -> bool:
        """Whether checkpoints live somewhere other than the run directory."""
        return not (self.storage.is_local and Path(self.storage.root) == Path(self.dir))

    # The driver's run directory.
    def local(self, name: str) -> Path:
        return Path(self.dir) / name

    @property
    def job_file(self) -> Path:
        return self.local(JOB_FILE)

    @property
    def tokenizer_file(self) -> Path:
        return self.local(TOKENIZER_FILE)

    metrics_file = property(lambda self: self.local(METRICS_FILE))
    status_file = property(lambda self: self.local(STATUS_FILE))
    summary_file = property(lambda self: self.local(SUMMARY_FILE))
    report_file = property(lambda self: self.local("report.png"))
    tensorboard_dir = property(lambda self: self.local("tensorboard"))

    # The run's storage.
    @property
    def checkpoints(self) -> Storage:
        return self.storage.child(CHECKPOINTS)

    def publish_run_files(self) -> None:
        """Copies job.json and the tokenizer to the storage (where they are not the same files)."""
        if self.separate_storage:
            for name in (JOB_FILE, TOKENIZER_FILE):
                self.storage.write_bytes(self.local(name).read_bytes(), name)


JOB_FILE = "job.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"


def places_of(job: Any) -> RunPlaces:
    """The places of a JobConfig."""
    return RunPlaces.of(job.run.dir, job.run.storage, dict(job.run.storage_options))
