"""Checkpoints: sharded through torch.distributed.checkpoint, written in the background, published
by a manifest written last, on any storage.

Layout of ``<run storage>/checkpoints/step_00000010/``:
  __R_N.distcp            DCP's data files: each rank writes only the pieces it holds
  .metadata               DCP's index of every tensor's pieces (read with a restricted unpickler)
  rng-rank{R}.safetensors each rank's torch RNG state
  trainer.json            step, sampler position, optimizer step, schedule, layout, run id
  manifest.json           every other file's size and sha256, the run id: written last
A checkpoint exists when its manifest does: a save that dies halfway leaves files without one,
which no loader takes. The sha256 of each file is computed by the rank that writes it, as it
writes. Loading takes the newest checkpoint that verifies (sizes and sums), skipping damaged,
unfinished and foreign ones with a warning. Entries are named by the single-device model, so a
checkpoint of one layout loads into any other (DCP reads the overlapping pieces).

The driver reads JSON here and never imports torch; the ranks' side (``Checkpointer``, ``load``)
imports torch and orchestrator.dcp inside its functions.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

from orchestrator import memory
from orchestrator.storage import RunPlaces, Storage

PREFIX = "step_"
MANIFEST = "manifest.json"
TRAINER = "trainer.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerState:
    step: int
    sampler: dict
    world_size: int
    strategy: str
    optimizer_step: int = 0
    scheduler: dict | None = None
    run_id: str = ""


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(name: str) -> int | None:
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX):])
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Reading what is there (driver, export, serving)
# ---------------------------------------------------------------------------------------------

def step_dirs(checkpoints: Storage) -> list[str]:
    """Names of the step folders, oldest first (published or not)."""
    return sorted((n for n in checkpoints.dirs() if step_of(n) is not None), key=step_of)


def read_manifest(ckpt: Storage) -> dict:
    """The manifest, checked for shape. Raises ValueError naming what is wrong (FileNotFoundError
    where there is none)."""
    try:
        manifest = json.loads(ckpt.read_text(MANIFEST))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{MANIFEST} is not JSON: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()):
        raise ValueError(f"{MANIFEST} does not list files as {{name: {{bytes, sha256}}}}")
    return manifest


def verify(ckpt: Storage, deep: bool = True) -> list[str]:
    """What is wrong with a checkpoint (nothing: an empty list). ``deep`` also checks every
    file's sha256 (reading all of it); otherwise sizes only."""
    name = ckpt.name
    try:
        manifest = read_manifest(ckpt)
    except FileNotFoundError:
        return [f"{name}: no {MANIFEST} (an unfinished save)"]
    except (ValueError, OSError) as exc:
        return [f"{name}/{MANIFEST} is unreadable: {exc}"]
    sizes = ckpt.sizes()
    problems = []
    for file, meta in manifest["files"].items():
        if file not in sizes:
            problems.append(f"{name}/{file} is missing")
        elif sizes[file] != meta["bytes"]:
            problems.append(f"{name}/{file} has {sizes[file]} bytes, the manifest says {meta['bytes']}")
        elif deep and ckpt.sha256(file) != meta["sha256"]:
            problems.append(f"{name}/{file} does not match its sha256 in the manifest")
    extra = set(sizes) - set(manifest["files"]) - {MANIFEST}
    problems += [f"{name}/{file} is not in the manifest" for file in sorted(extra)]
    return problems


def latest(checkpoints: Storage, run_id: str | None = None) -> Storage | None:
    """The newest checkpoint that verifies (of run ``run_id`` if given); others are skipped with
    a warning saying why."""
    for name in reversed(step_dirs(checkpoints)):
        ckpt = checkpoints.child(name)
        problems = verify(ckpt)
        if not problems and run_id is not None:
            owner = read_manifest(ckpt).get("run_id")
            if owner != run_id:
                problems = [f"{name} was written by run {owner}, not by this run ({run_id})"]
        if not problems:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt.root, "; ".join(problems))
    return None


def owner(checkpoints: Storage) -> tuple[str | None, int | None]:
    """(run id, step) of the newest checkpoint with a readable manifest, or (None, newest step)
    where only unfinished saves are there, or (None, None) where there are none."""
    names = [n for n in step_dirs(checkpoints) if checkpoints.child(n).sizes()]  # not emptied folders
    for name in reversed(names):
        try:
            return read_manifest(checkpoints.child(name)).get("run_id"), step_of(name)
        except (OSError, ValueError):
            continue
    return None, (step_of(names[-1]) if names else None)


def in_run(run_dir) -> Storage:
    """The checkpoints of a run whose storage is its run directory."""
    return RunPlaces.of(str(run_dir)).checkpoints


def storage_of(ckpt: Storage) -> Storage:
    """The run storage a checkpoint folder (<storage>/checkpoints/step_N) belongs to."""
    return Storage(ckpt.root.rsplit("/", 2)[0], ckpt.options)


def read_trainer_state(ckpt: Storage) -> TrainerState:
    return TrainerState(**json.loads(ckpt.read_text(TRAINER)))


# ---------------------------------------------------------------------------------------------
# Writing (the ranks)
# ---------------------------------------------------------------------------------------------

def prune(checkpoints: Storage, saved_step: int, keep: int) -> list[str]:
    """After the checkpoint of ``saved_step`` was published: keeps it and the ``keep - 1`` newest
    published ones before it, removes the other older ones (unfinished saves among them). Newer
    step folders are left alone (a later save of that step replaces them). Returns what it removed."""
    older = [n for n in step_dirs(checkpoints) if step_of(n) < saved_step]
    kept, removed = 0, []
    for name in reversed(older):
        ckpt = checkpoints.child(name)
        if kept < keep - 1 and ckpt.exists(MANIFEST):
            kept += 1
            continue
        ckpt.remove()
        removed.append(name)
    return removed


class Checkpointer:
    """Saves this rank's part of checkpoints, one at a time, in a background thread when
    ``asynchronous``. Its first save creates a process group of its own (every rank saves at the
    same steps), so that the save's collectives never interleave with training's.

    ``records`` holds, per save, the seconds training was blocked and the total seconds (on rank 0,
    up to the manifest), the bytes this rank wrote, held and copied for the background write, and
    on rank 0 the save's extra memory: its resident high-water mark above what the process held
    when the save began, or the staged copy where that is larger."""

    def __init__(self, places: RunPlaces, rank: int, asynchronous: bool, keep: int, run_id: str):
        self.places = places
        self.rank = rank
        self.asynchronous = asynchronous
        self.keep = keep
        self.run_id = run_id
        self.group = None  # created by the first save: nothing is added to a job's start-up
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None
        self.records: list[dict] = []

    def save(self, step: int, state: dict, trainer_state: TrainerState) -> None:
        """Collective over the job's ranks. ``state`` is the engine's checkpoint_state()."""
        import torch
        import torch.distributed as dist
        from safetensors.torch import save as safetensors_bytes

        from orchestrator import dcp

        begin = time.perf_counter()
        self.wait()  # one save in flight at a time
        if self.group is None and dist.is_initialized():
            self.group = dist.new_group(backend="gloo")
        rss_before = None
        if self.rank == 0:
            rss_before = memory.rss_bytes()
            memory.reset_peak()
        held = sum(dcp.local_bytes(v) for v in state.values())
        if self.asynchronous:
            state = dcp.stage(state)  # training may change the originals from here on
        staged = sum(dcp.local_bytes(v) for v in state.values()) if self.asynchronous else 0
        rng = safetensors_bytes({"torch": torch.get_rng_state()})
        record = {"step": step, "held_bytes": held, "staged_bytes": staged, "async": self.asynchronous,
                  "blocked_s": time.perf_counter() - begin}
        work = (self._write, step, state, trainer_state, rng, record, begin, rss_before)
        if self.asynchronous:
            self._pending = self._executor.submit(*work)
        else:
            self._write(*work[1:])
            record["blocked_s"] = record["total_s"]

    def wait(self) -> None:
        """Until the save in flight (if any) is finished; raises what failed in it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def _write(self, step: int, state: dict, trainer_state: TrainerState, rng: bytes, record: dict,
               begin: float, rss_before: int | None) -> None:
        import hashlib

        import torch.distributed as dist

        from orchestrator import dcp

        cpu_start = time.thread_time()
        if self.asynchronous:
            yield_to_training()
        ckpt = self.places.checkpoints.child(step_name(step))
        sync = ckpt.is_local  # fsync local files before the manifest; an object store's PUT is durable
        cleared = [True]
        if self.rank == 0:
            try:
                ckpt.remove()  # an unfinished save of this step by an earlier attempt
            except OSError as exc:
                log.error("cannot clear %s: %s", ckpt.root, exc)
                cleared = [False]
        if self.group is not None:  # every rank goes on, or none
            dist.broadcast_object_list(cleared, src=0, group=self.group)
        if not cleared[0]:
            raise RuntimeError(f"checkpoint of step {step}: {ckpt.root} could not be cleared")
        written = dcp.save(state, ckpt.root, dict(ckpt.options), sync, self.group)
        error = None
        try:
            name = f"rng-rank{self.rank}.safetensors"
            ckpt.write_bytes(rng, name, sync=sync)
            written[name] = (len(rng), hashlib.sha256(rng).hexdigest())
            if self.rank == 0:
                data = json.dumps(asdict(trainer_state)).encode()
                ckpt.write_bytes(data, TRAINER, sync=sync)
                written[TRAINER] = (len(data), hashlib.sha256(data).hexdigest())
        except Exception as exc:  # reported to rank 0, which then publishes nothing
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        parts = [(written, error)]
        if self.group is not None:
            parts = [None] * dist.get_world_size(self.group) if self.rank == 0 else None
            dist.gather_object((written, error), parts, dst=0, group=self.group)
        record["bytes_written"] = sum(size for size, _ in written.values())
        if self.rank == 0:
            self._publish(ckpt, step, parts, sync)
            # The resident high-water mark above its level when the save began can miss memory the
            # allocator reuses from buffers training freed; the staged copy is counted exactly.
            record["rss_growth_bytes"] = max(0, memory.peak_bytes() - rss_before)
            record["peak_extra_bytes"] = max(record["rss_growth_bytes"], record["staged_bytes"])
        record["total_s"] = time.perf_counter() - begin
        record["write_cpu_s"] = time.thread_time() - cpu_start  # the CPU the writing took from this rank
        self.records.append(record)
        if error:
            raise RuntimeError(f"checkpoint of step {step} failed: {error}")

    def _publish(self, ckpt: Storage, step: int, parts: list, sync: bool) -> None:
        errors = [e for _, e in parts if e]
        if errors:
            raise RuntimeError(f"checkpoint of step {step} not published: {'; '.join(errors)}")
        files = {name: {"bytes": size, "sha256": sha} for written, _ in parts for name, (size, sha) in written.items()}
        sizes = ckpt.sizes()
        wrong = [n for n, m in files.items() if sizes.get(n) != m["bytes"]]
        if wrong:
            raise RuntimeError(f"checkpoint of step {step} not published: the storage does not hold "
                               f"{', '.join(sorted(wrong))} as written")
        manifest = {"run_id": self.run_id, "step": step, "files": dict(sorted(files.items()))}
        ckpt.write_text(json.dumps(manifest, indent=1), MANIFEST, sync=sync)  # the publish
        removed = prune(self.places.checkpoints, step, self.keep)
        if removed:
            log.info("pruned checkpoints %s", ", ".join(removed))


def yield_to_training() -> None:
    """Lowers the calling thread (the background save) to nice 19, so that it yields to the ranks'
    own threads. On the 2-core machine, medium model, ddp, a save every 5 steps: at the ranks'
    priority its writes cost 12% of tokens/s; at nice 19, 0-15% over six measurements, median 7%
    (the write's own CPU still comes out of cores the ranks fill; README, Benchmarks)."""
    import os
    import threading

    if hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


def load(ckpt: Storage, state: dict) -> None:
    """Collective over the job's ranks: fills the engine's checkpoint_state() from ``ckpt``."""
    from orchestrator import dcp

    try:
        dcp.load(state, ckpt.root, dict(ckpt.options))
    except Exception as exc:
        missing = sorted(set(state) - set(dcp.entries(ckpt.root, dict(ckpt.options))))
        if missing:
            raise RuntimeError(f"{ckpt.root} does not hold {', '.join(missing[:4])}"
                               f"{' ...' if len(missing) > 4 else ''}: a checkpoint of another model or "
                               "finetuning setup") from exc
        raise


def load_rng(ckpt: Storage, rank: int) -> None:
    import torch
    from safetensors.torch import load as safetensors_load

    name = f"rng-rank{rank}.safetensors"
    if ckpt.exists(name):
        torch.set_rng_state(safetensors_load(ckpt.read_bytes(name))["torch"])
