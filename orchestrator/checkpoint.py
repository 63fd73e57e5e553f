"""Checkpoints in one layout-independent form, written aside and published with one rename.

Every engine hands over the same canonical state: full fp32 weights and AdamW moments
keyed by parameter name, plus small JSON-able counters. So a checkpoint written by one
strategy or world size loads into any other. Nothing is pickled: tensors go to
safetensors, everything else to JSON.

Layout of ``<run>/checkpoints/step_00000010/``:
  model.safetensors       weights, by parameter name
  optimizer.safetensors   exp_avg.<name>, exp_avg_sq.<name>
  rng-rank{R}.safetensors each rank's torch RNG state
  trainer.json            step, sampler position, optimizer step, schedule, layout
  manifest.json           every other file's size and sha256, written last
Loading takes the newest checkpoint whose manifest verifies, and falls back to the previous
good one with a warning naming what was wrong. torch is imported only where tensors
are read or written: the driver reads JSON here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

PREFIX = "step_"
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerState:
    step: int
    sampler: dict
    world_size: int
    strategy: str
    optimizer_step: int = 0
    scheduler: dict | None = None


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _cpu(tensors: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def save(run_dir: str | Path, step: int, rank: int, engine_state: dict, trainer_state: TrainerState,
         keep: int) -> Path:
    """Collective over all ranks. ``engine_state`` is the canonical state
    ({"model", "exp_avg", "exp_avg_sq": name -> tensor, "optimizer_step", "scheduler"}),
    complete on rank 0, which writes it; every rank writes its RNG state."""
    import torch
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    final = root / _name(step)
    tmp = root / (_name(step) + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if rank == 0:
        save_file(_cpu(engine_state["model"]), str(tmp / "model.safetensors"))
        moments = {f"{k}.{name}": t for k in ("exp_avg", "exp_avg_sq") for name, t in engine_state[k].items()}
        save_file(_cpu(moments), str(tmp / "optimizer.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-rank{rank}.safetensors"))
    _barrier()
    if rank == 0:
        state = TrainerState(**{**asdict(trainer_state), "optimizer_step": engine_state["optimizer_step"],
                                "scheduler": engine_state["scheduler"]})
        (tmp / "trainer.json").write_text(json.dumps(asdict(state)))
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)  # the publish: a checkpoint exists whole or not at all
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob(PREFIX + "*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path) -> None:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify(path: Path) -> list[str]:
    """What is wrong with a published checkpoint (nothing: an empty list)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return [f"{path.name}: no {MANIFEST} (an unfinished or foreign checkpoint)"]
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [f"{path.name}/{MANIFEST} is unreadable: {exc}"]
    problems = []
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{path.name}/{name} is missing")
        elif f.stat().st_size != meta["bytes"]:
            problems.append(f"{path.name}/{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}")
        elif _sha256(f) != meta["sha256"]:
            problems.append(f"{path.name}/{name} does not match its sha256 in the manifest")
    extra = {p.name for p in path.iterdir()} - set(files) - {MANIFEST}
    problems += [f"{path.name}/{name} is not in the manifest" for name in sorted(extra)]
    return problems


def latest(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are skipped with a warning."""
    root = checkpoint_root(run_dir)
    candidates = sorted((p for p in root.glob(PREFIX + "*") if p.is_dir() and not p.name.endswith(".tmp")),
                        reverse=True)
    for path in candidates:
        problems = verify(path)
        if not problems:
            return path
        log.warning("skipping checkpoint %s: %s", path, "; ".join(problems))
    return None


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / "trainer.json").read_text()))


def load_engine_state(path: Path) -> dict:
    """The canonical engine state, on the CPU."""
    from safetensors.torch import load_file

    state = read_trainer_state(path)
    moments = load_file(str(path / "optimizer.safetensors"))
    out: dict = {"model": load_file(str(path / "model.safetensors")), "exp_avg": {}, "exp_avg_sq": {},
                 "optimizer_step": state.optimizer_step, "scheduler": state.scheduler}
    for key, t in moments.items():
        kind, name = key.split(".", 1)
        out[kind][name] = t
    return out


def load_rng(path: Path, rank: int) -> None:
    import torch
    from safetensors.torch import load_file

    f = path / f"rng-rank{rank}.safetensors"
    if f.exists():
        torch.set_rng_state(load_file(str(f))["torch"])
