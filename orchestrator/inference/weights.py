"""Weight sync from training into a pool's replicas, with no HTTP code (training imports this).

A sync is all-or-nothing: the names, shapes and dtypes of the sent tensors are checked against
the model's before any tensor is copied, by the pool's weight store and again by each replica,
so a mismatch leaves every replica serving what it served. The store (the Ray actor
``<pool>/weights``) keeps the latest published weights, versioned, in its own object store
memory: a replica that replaces a dead one loads them before it serves, so the pool never goes
back to the original checkpoint.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Mapping

log = logging.getLogger(__name__)
NAMESPACE = "forgeline"


class WeightMismatch(ValueError):
    pass


class PoolNotFound(LookupError):
    pass


def store_name(pool: str) -> str:
    return f"{pool}/weights"


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every weight a sync must carry: the model's state-dict names and their full shapes."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def check(weights: Mapping, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raises WeightMismatch naming what is missing, unknown, not a floating tensor or mis-shaped."""
    import torch

    if not isinstance(weights, Mapping):
        raise WeightMismatch(f"weights must be a mapping of names to tensors, got {type(weights).__name__}")
    problems = []
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected), key=str)
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:4])}")
    if unknown:
        problems.append(f"unknown {len(unknown)}: {', '.join(map(str, unknown[:4]))}")
    for name in expected:
        w = weights.get(name)
        if w is None:
            continue
        if not (torch.is_tensor(w) and w.is_floating_point()):
            problems.append(f"{name} is {type(w).__name__}{'' if not torch.is_tensor(w) else ' ' + str(w.dtype)}, "
                            "not a floating-point tensor")
        elif tuple(w.shape) != tuple(expected[name]):
            problems.append(f"{name} has shape {tuple(w.shape)}, the model's is {tuple(expected[name])}")
    if problems:
        raise WeightMismatch("weights do not match the model (nothing was copied): " + "; ".join(problems[:8]))


@dataclass
class PublishResult:
    version: int
    replicas: int  # replicas that took the weights
    failed: list[str] = field(default_factory=list)  # one line per replica that did not


class WeightStore:
    """The pool's latest published weights (a Ray actor, ``<pool>/weights``) and the fan-out of
    each publish to the pool's live replicas."""

    def __init__(self, expected: dict[str, tuple[int, ...]]):
        self.expected = expected
        self.version = 0
        self.ref = None  # owned here: it outlives the process that published it
        self.replicas: dict[int, object] = {}

    def set_replica(self, index: int, handle) -> None:
        self.replicas[index] = handle

    def latest(self) -> tuple[int, list]:
        """(version, [ref of the weights]) or (0, []) before the first publish."""
        return self.version, [] if self.ref is None else [self.ref]

    async def publish(self, weights: dict) -> PublishResult:
        import ray

        check(weights, self.expected)
        self.version += 1
        version, self.ref = self.version, ray.put(weights)
        handles = dict(self.replicas)
        results = await asyncio.gather(*[h.load_weights.remote(self.ref, version) for h in handles.values()],
                                       return_exceptions=True)
        failed = [f"replica {i}: {type(r).__name__}: {str(r).splitlines()[0] if str(r) else ''}"
                  for i, r in zip(handles, results) if isinstance(r, BaseException)]
        for line in failed:
            log.warning("weight sync %d failed on %s", version, line)
        return PublishResult(version, len(handles) - len(failed), failed)


def publish(pool: str, weights: dict, timeout_s: float = 120.0) -> PublishResult:
    """Sends full weights (our names) to the named pool on this Ray cluster, from any process;
    its replicas swap them in between decode steps. Raises WeightMismatch (nothing copied) or
    PoolNotFound; a replica that fails is counted in the result, not raised."""
    import ray

    try:
        store = ray.get_actor(store_name(pool), namespace=NAMESPACE)
    except ValueError:
        raise PoolNotFound(f"no inference pool named {pool!r} runs on this Ray cluster "
                           f"(start one with launch.serve inference.name={pool})") from None
    return ray.get(store.publish.remote(weights), timeout=timeout_s)
