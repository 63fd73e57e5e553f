"""torch.distributed.checkpoint (DCP), the way this project uses it: in one module.

A checkpoint's tensors are one flat dict of names to tensors, the same names whatever the layout:
``model.<parameter>``, ``optim.exp_avg.<parameter>``, ``optim.exp_avg_sq.<parameter>``. Each rank
hands DCP what it holds: a plain tensor (replicated: DCP writes it once, spreading such tensors
over the ranks), a DTensor (its local shard), or ``Chunks`` (rectangular pieces of a tensor, which is
how a ZeRO partition's slice of a flattened parameter is described). DCP writes each rank's items to
files of its own and loads any layout from any other, reading only the overlapping pieces.

Three things here go beyond DCP's defaults:
- ``HashingWriter`` records the size and sha256 of every file a rank writes, as it writes it, for
  the checkpoint's manifest (no second read of the data);
- ``SafeReader`` reads DCP's ``.metadata`` (a pickle) with an unpickler that admits only DCP's own
  metadata classes, torch dtypes and sizes; tensor data is read with ``weights_only=True``;
- ``TensorsOnlyLoadPlanner`` refuses non-tensor entries, which DCP would unpickle.
The fsspec writer and reader come from DCP's private ``_fsspec_filesystem`` module; the version
check below names the torch release they were checked against.
"""
from __future__ import annotations

import hashlib
import io
import math
import pickle
import posixpath
import threading
import warnings
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

# One process reading a checkpoint (export, serving, pretrained weights) is meant: not worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

CHECKED_TORCH = "2.13"
if not torch.__version__.startswith(CHECKED_TORCH):
    raise ImportError(f"orchestrator.dcp was written against torch {CHECKED_TORCH} (its private fsspec "
                      f"writer and reader, and the .metadata format); this is torch {torch.__version__}")


# ---------------------------------------------------------------------------------------------
# Pieces of a tensor
# ---------------------------------------------------------------------------------------------

def flat_range_boxes(shape: tuple[int, ...], start: int, end: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The elements [start, end) of a row-major tensor of ``shape``, flattened, as rectangular boxes
    (offsets, sizes), in order: at most a partial first row, whole rows, a partial last row (and so
    on down the dimensions). Each box is a contiguous run of the flat range."""
    if end <= start:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))]
    inner = math.prod(shape[1:])
    out = []
    row = start // inner
    if start % inner:  # a partial first row
        stop = min(end, (row + 1) * inner)
        out += [((row, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], start - row * inner, stop - row * inner)]
        start, row = stop, row + 1
    whole = end // inner - row
    if start < end and whole > 0:
        out.append(((row, *([0] * (len(shape) - 1))), (whole, *shape[1:])))
        start, row = start + whole * inner, row + whole
    if start < end:  # a partial last row
        out += [((row, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], 0, end - start)]
    return out


class Chunks(torch.Tensor):
    """A tensor of global ``size`` of which this rank holds rectangular pieces (often views of
    some larger buffer: loading writes through them). It implements DCP's checkpointable protocol
    (``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``) and nothing
    else: it is a description for DCP, not a tensor to compute with."""

    _pieces: list[tuple[tuple[int, ...], torch.Tensor]]

    @staticmethod
    def __new__(cls, size: tuple[int, ...], pieces: list[tuple[tuple[int, ...], torch.Tensor]],
                dtype: torch.dtype | None = None):
        device = pieces[0][1].device if pieces else torch.device("cpu")
        dtype = pieces[0][1].dtype if pieces else (dtype or torch.float32)
        r = torch.Tensor._make_wrapper_subclass(cls, torch.Size(size), dtype=dtype, device=device)
        r._pieces = [(tuple(o), t) for o, t in pieces]
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"Chunks describes a checkpoint entry; {func} is not supported on it")

    @classmethod
    def of_flat_range(cls, size: tuple[int, ...], start: int, flat: torch.Tensor) -> "Chunks":
        """The elements [start, start + flat.numel()) of a tensor of ``size``, held in the 1-D ``flat``."""
        pieces, at = [], 0
        for offsets, sizes in flat_range_boxes(tuple(size), start, start + flat.numel()):
            n = math.prod(sizes)
            pieces.append((offsets, flat.narrow(0, at, n).view(sizes)))
            at += n
        return cls(size, pieces, flat.dtype)

    @property
    def pieces(self) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        return self._pieces

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(o)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(o), t.size()),
                                                      properties=TensorProperties.create_from_tensor(t),
                                                      size=self.size()))
                for o, t in self._pieces]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(o), t.size()) for o, t in self._pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for o, t in self._pieces:
            if torch.Size(o) == index.offset:
                return t
        raise ValueError(f"{index.fqn}: this rank holds no piece at {index.offset}")

    def __repr__(self, *args, **kwargs) -> str:  # noqa: D105
        return f"Chunks(size={tuple(self.shape)}, pieces={[(o, tuple(t.shape)) for o, t in self._pieces]})"


def local_pieces(value: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """This rank's part of a checkpoint entry as rectangular pieces (offsets in the full tensor,
    values): a plain tensor whole, a DTensor's local shard, Chunks' pieces."""
    if isinstance(value, Chunks):
        return list(value.pieces)
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        local = value.to_local()
        if tuple(local.shape) != tuple(shape):  # a padded shard: its leading part
            local = local[tuple(slice(0, n) for n in shape)]
        return [(tuple(offsets), local)] if local.numel() else []
    return [((0,) * value.dim(), value)]


def local_bytes(value: torch.Tensor) -> int:
    """Bytes this rank holds of a checkpoint entry."""
    if isinstance(value, Chunks):
        return sum(t.numel() * t.element_size() for _, t in value.pieces)
    if isinstance(value, DTensor):
        value = value.to_local()
    return value.numel() * value.element_size()


def stage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU copy of this rank's part of every entry, as Chunks: what an asynchronous save writes
    while training goes on changing the originals. Replicated entries keep offsets at the origin,
    so DCP still writes them once."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if isinstance(value, Chunks):
            pieces = [(o, t.detach().to("cpu", copy=True)) for o, t in value.pieces]
        elif isinstance(value, DTensor):
            _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
            pieces = [(tuple(offsets), value.to_local().detach().to("cpu", copy=True))]
        else:
            pieces = [((0,) * value.dim(), value.detach().to("cpu", copy=True))]
        out[name] = Chunks(tuple(value.shape), pieces, value.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------------------------

class _HashingStream:
    """A write stream that hashes what passes through it."""

    def __init__(self, stream):
        self._stream = stream
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.bytes += len(view)
        return self._stream.write(data)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _HashingFileSystem(FileSystem):
    def __init__(self, inner: FileSystem, written: dict[str, tuple[int, str]]):
        super().__init__()
        self.fs = inner.fs
        self._written = written
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream)
            yield hashing
        with self._lock:
            self._written[posixpath.basename(str(path))] = (hashing.bytes, hashing.sha.hexdigest())


class HashingWriter(FsspecWriter):
    """DCP's fsspec writer that records name -> (bytes, sha256) of every file it writes in
    ``written`` (the rank's data files and, on the coordinator, ``.metadata``)."""

    def __init__(self, url: str, options: dict, sync_files: bool):
        super().__init__(url, sync_files=sync_files, overwrite=True, **options)
        self.written: dict[str, tuple[int, str]] = {}
        self.fs = _HashingFileSystem(self.fs, self.written)


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"a checkpoint's .metadata may not name {module}.{name}")


class SafeReader(FsspecReader):
    """DCP's fsspec reader, with .metadata read by an unpickler limited to DCP's own classes."""

    def __init__(self, url: str, options: dict):
        super().__init__(url, **options)

    def read_metadata(self, *args: Any, **kwargs: Any):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        raise ValueError(f"{read_item.dest_index.fqn}: a checkpoint entry that is not a tensor is not loaded "
                         "(it would be unpickled)")


class CheckpointError(RuntimeError):
    """A save or load that failed on some rank (DCP's own CheckpointException is a BaseException,
    which nothing here should have to catch)."""


@contextmanager
def _errors(what: str, url: str):
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        causes = "; ".join(f"rank {rank}: {type(err[0]).__name__}: {err[0]}" for rank, err in exc.failures.items())
        raise CheckpointError(f"{what} {url} failed: {causes}") from None


def save(state: dict[str, torch.Tensor], url: str, options: dict, sync_files: bool,
         group: dist.ProcessGroup | None) -> dict[str, tuple[int, str]]:
    """Collective over ``group``: every rank writes its items to ``url``. Returns what this rank
    wrote: file name -> (bytes, sha256), ``.metadata`` under its final name."""
    writer = HashingWriter(url, options, sync_files)
    with _errors("saving", url):
        dcp.save(state, storage_writer=writer, process_group=group, no_dist=not dist.is_initialized())
    return {(".metadata" if name == ".metadata.tmp" else name): v for name, v in writer.written.items()}


def load(state: dict[str, torch.Tensor], url: str, options: dict, group: dist.ProcessGroup | None = None,
         no_dist: bool = False) -> None:
    """Fills ``state``'s tensors (in place, any layout) from the checkpoint at ``url``."""
    with _errors("loading", url):
        dcp.load(state, storage_reader=SafeReader(url, options), planner=TensorsOnlyLoadPlanner(),
                 process_group=group, no_dist=no_dist or not dist.is_initialized())


def entries(url: str, options: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in the checkpoint at ``url``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = SafeReader(url, options).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def read_full(url: str, options: dict, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with ``prefix``, whole, on the CPU, keyed without the prefix
    (one process: for export, serving and pretrained weights, which need whole tensors)."""
    wanted = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in entries(url, options).items()
              if k.startswith(prefix)}
    load(wanted, url, options, no_dist=True)
    return {k[len(prefix):]: v for k, v in wanted.items()}
