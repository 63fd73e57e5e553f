"""Checkpoints: written aside, published with one rename, loaded without unpickling code.

Layout of ``<run>/checkpoints/step_00000010/``:
  model-shard{K}.safetensors   the engine's model tensors for shard K
  state-shard{K}.pt            the rest of the engine state (optimizer, schedule),
                               read back with torch.load(weights_only=True)
  rng-rank{R}.pt               each rank's RNG state
  trainer.json                 step, sampler position, layout
``latest`` names the newest published checkpoint.
torch is imported where tensors are read or written: the driver only reads JSON here.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PREFIX = "step_"


@dataclass(frozen=True)
class TrainerState:
    step: int
    sampler: dict
    world_size: int
    strategy: str


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _split_tensors(state: dict) -> tuple[dict, dict]:
    """Engine state -> (model tensors for safetensors, everything else)."""
    model = {k: v.detach().to("cpu").contiguous().clone() for k, v in state["model"].items()}
    rest = {k: v for k, v in state.items() if k != "model"}
    return model, rest


def save(run_dir: str | Path, step: int, rank: int, shard: int | None, engine_state: dict | None,
         trainer_state: TrainerState, keep: int) -> Path:
    """Collective over all ranks: each writes its part, rank 0 publishes."""
    import torch
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    final = root / _name(step)
    tmp = root / (_name(step) + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if shard is not None and engine_state is not None:
        model, rest = _split_tensors(engine_state)
        save_file(model, str(tmp / f"model-shard{shard}.safetensors"))
        torch.save(rest, tmp / f"state-shard{shard}.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state.__dict__))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob(PREFIX + "*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: str | Path) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / "trainer.json").exists():
            return path
    done = sorted(p for p in root.glob(PREFIX + "*") if (p / "trainer.json").exists())
    return done[-1] if done else None


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / "trainer.json").read_text()))


def load_engine_state(path: Path, shard: int, device) -> dict:
    import torch
    from safetensors.torch import load_file

    state = torch.load(path / f"state-shard{shard}.pt", map_location=device, weights_only=True)
    state["model"] = load_file(str(path / f"model-shard{shard}.safetensors"), device=str(device))
    return state


def load_rng(path: Path, rank: int) -> None:
    import torch

    f = path / f"rng-rank{rank}.pt"
    if f.exists():
        torch.set_rng_state(torch.load(f, weights_only=True)["torch"])
