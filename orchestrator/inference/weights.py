"""Weight sync from training into a pool's replicas, with no HTTP code (training imports this).

Two paths. Direct (``DirectPublisher``, what training uses): the weights go into a flat buffer
the publisher keeps. Replicas on the publisher's Ray node, for CPU weights, map two such buffers
from shared memory (files in /dev/shm, removed as soon as every replica has them mapped): each
publish writes the buffer they do not serve from, and each replica then points its parameters
at it between two engine steps (no copy, no network). Replicas elsewhere (other nodes, CUDA
weights) and publishers with ``shared_memory=False`` form a torch.distributed process group of
their own with the publisher (gloo for CPU tensors, NCCL for CUDA ones; not the training ranks'
world), made at the first publish and again whenever the replicas changed; the buffer goes in
one broadcast into a spare buffer of each replica, which then points its parameters at it.
Through the store (``publish``, and the fallback for tensor-parallel or int8 replicas): the
weights go through Ray's object store.

A sync is all-or-nothing: the names, shapes and dtypes of the sent tensors are checked against
the model's before any tensor is copied, by the pool's weight store and again by each replica,
so a mismatch leaves every replica serving what it served. The store (the Ray actor
``<pool>/weights``) keeps the latest published weights, versioned, in its own object store
memory: a replica that replaces a dead one loads them before it serves, so the pool never goes
back to the original checkpoint.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
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
    shared_memory: int = 0  # of the replicas that took them, those that read them from shared memory


@dataclass
class DirectPlan:
    """What a direct publish needs to know: the version it publishes, the replicas (index, actor
    handle, actor id), the Ray node of each, the order and shapes of the parameters in the flat
    buffer, their dtype."""

    version: int
    members: list[tuple[int, object, str]]
    layout: list[tuple[str, tuple[int, ...]]]
    dtype: str
    expected: dict[str, tuple[int, ...]]
    nodes: list[str] = field(default_factory=list)


class WeightStore:
    """The pool's latest published weights (a Ray actor, ``<pool>/weights``), the fan-out of
    each publish through it to the pool's live replicas, and the versions of direct publishes."""

    def __init__(self, expected: dict[str, tuple[int, ...]]):
        self.expected = expected
        self.version = 0
        self.ref = None  # owned here: it outlives the process that published it
        self.replicas: dict[int, object] = {}
        self.holders: list = []  # after a direct publish: the replicas that took it
        self.layouts: dict[str, tuple | None] = {}  # actor id -> its direct_layout (fixed for its life)

    def set_replica(self, index: int, handle) -> None:
        self.replicas[index] = handle

    def replica_handles(self) -> list:
        """The live replicas' handles, by index: what a training rank sends rollout requests to."""
        return [self.replicas[i] for i in sorted(self.replicas)]

    def latest(self) -> tuple[int, list, list]:
        """(version, [ref of the weights] or [], replicas that hold them): what a replacement
        loads; (0, [], []) before the first publish."""
        return self.version, [] if self.ref is None else [self.ref], list(self.holders)

    async def direct_plan(self, known: list[str] | None = None) -> DirectPlan | int | None:
        """The next version and the replicas for a direct publish, or None where a replica cannot
        take one (tensor-parallel, int8) and the publish goes through the store. Only the version
        where the replicas' actor ids are ``known`` (the caller's last plan): the plan's handles
        took 3-4 ms to send here, most of a plan's round trip."""
        handles = dict(self.replicas)
        ids = {i: h._actor_id.hex() for i, h in handles.items()}
        asked = [i for i in handles if ids[i] not in self.layouts]
        answers = await asyncio.gather(*[handles[i].direct_layout.remote() for i in asked], return_exceptions=True)
        for i, lay in zip(asked, answers):
            if not isinstance(lay, BaseException):
                self.layouts[ids[i]] = lay
        live = set(ids.values())
        self.layouts = {k: v for k, v in self.layouts.items() if k in live}
        members = [(i, h, ids[i]) for i, h in handles.items() if ids[i] in self.layouts]
        usable = [self.layouts[m[2]] for m in members]
        if not usable or any(lay is None for lay in usable):
            return None
        self.version += 1
        if known is not None and known == [m[2] for m in members]:
            return self.version
        return DirectPlan(self.version, members, usable[0][0], usable[0][1], self.expected,
                          [lay[2] for lay in usable])

    def record_direct(self, version: int, holders: list) -> None:
        if version == self.version:
            self.ref, self.holders = None, holders

    async def publish(self, weights: dict) -> PublishResult:
        import ray

        check(weights, self.expected)
        self.version += 1
        version, self.ref, self.holders = self.version, ray.put(weights), []
        handles = dict(self.replicas)
        results = await asyncio.gather(*[h.load_weights.remote(self.ref, version) for h in handles.values()],
                                       return_exceptions=True)
        failed = [f"replica {i}: {type(r).__name__}: {str(r).splitlines()[0] if str(r) else ''}"
                  for i, r in zip(handles, results) if isinstance(r, BaseException)]
        for line in failed:
            log.warning("weight sync %d failed on %s", version, line)
        return PublishResult(version, len(handles) - len(failed), failed)


def find_store(pool: str):
    import ray

    try:
        return ray.get_actor(store_name(pool), namespace=NAMESPACE)
    except ValueError:
        raise PoolNotFound(f"no inference pool named {pool!r} runs on this Ray cluster "
                           f"(start one with launch.serve inference.name={pool})") from None


def publish(pool: str, weights: dict, timeout_s: float = 120.0) -> PublishResult:
    """Sends full weights (our names) to the named pool through its weight store (Ray's object
    store), from any process; its replicas swap them in between decode steps. Raises
    WeightMismatch (nothing copied) or PoolNotFound; a replica that fails is counted in the
    result, not raised."""
    import ray

    return ray.get(find_store(pool).publish.remote(weights), timeout=timeout_s)


def broadcast(pg, tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([tensor], opts).wait()


def sync_group(host: str, port: int, rank: int, world: int, session: str, device: str, timeout_s: float):
    """A process group of its own (not the default world): gloo for CPU tensors, NCCL for CUDA."""
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore(session, dist.TCPStore(host, port, world, rank == 0, timeout))
    if device == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


@dataclass(frozen=True)
class SharedTarget:
    """Where a publish written by several processes goes (DirectPublisher.open_shared): the
    connection, the buffers' files to map where the connection is new (else empty), which buffer
    to write, the parameters' order and shapes in it, its dtype."""

    session: str
    files: list[str]
    turn: int
    layout: list[tuple[str, tuple[int, ...]]]
    dtype: str


class SharedWriter:
    """One process's part of a publish written by several (a training rank's shards): it maps the
    publisher's buffers and writes its pieces of the full weights where they go."""

    def __init__(self):
        self.session = ""
        self.buffers: list = []

    def write(self, target: SharedTarget, pieces: list[tuple[str, tuple[int, ...], "object"]]) -> bool:
        """``pieces``: (name, offsets in the full tensor, values). False where this process cannot
        map the buffers (another node, or files already gone) or a piece does not fit."""
        import torch

        numel = sum(math.prod(shape) for _, shape in target.layout)
        try:
            if target.session != self.session:
                self.session, self.buffers = "", []
                if len(target.files) != 2:
                    return False
                dtype = getattr(torch, target.dtype)
                self.buffers = [torch.from_file(p, shared=True, size=numel, dtype=dtype) for p in target.files]
                self.session = target.session
            buffer, where, offset = self.buffers[target.turn], {}, 0
            for name, shape in target.layout:
                where[name] = (offset, shape)
                offset += math.prod(shape)
            for name, offsets, value in pieces:
                start, shape = where[name]
                full = buffer[start:start + math.prod(shape)].view(shape)
                box = tuple(slice(o, o + n) for o, n in zip(offsets, value.shape))
                full[box].copy_(value.detach())
        except (OSError, RuntimeError, KeyError, ValueError):
            return False
        return True


def shared_file(nbytes: int) -> str | None:
    """A new file of ``nbytes`` in /dev/shm with its room taken, or None where there is no room (a
    write past a tmpfs's room would end the process with SIGBUS, so the room is reserved first)."""
    import uuid

    path = f"/dev/shm/forgeline-sync-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(fd)
    return path


class DirectPublisher:
    """The publishing end of the direct weight sync (a training job's rank 0, a benchmark).

    The weights go into a flat buffer kept from publish to publish. For CPU weights, replicas on
    this Ray node map two such buffers from shared memory (the CPU counterpart of the CUDA IPC
    handles colocated RL frameworks pass): each publish writes the one they do not serve from,
    and they then serve from it, with no copy and no network. The others (other nodes, CUDA
    weights, ``shared_memory=False``) join a process group of their own and take one broadcast."""

    def __init__(self, pool: str, timeout_s: float = 60.0, shared_memory: bool = True):
        self.pool = pool
        self.timeout_s = timeout_s
        self.shared_memory = shared_memory
        self.pg = None
        self.member_ids: list[str] = []
        self.buffers: list = []  # [one] or, with replicas on shared memory, [two] flat buffers
        self.turn = 0  # the buffer the next publish writes
        self.session = ""  # new at each connection
        self.by_shared: set[str] = set()  # the replicas (actor ids) that read the buffers from shared memory
        self.plan: DirectPlan | None = None  # the last plan, its version that of the last publish
        self._store_handle = None
        self.files: list[str] = []  # the shared buffers' files, while others still have to map them

    def _connect(self, plan: DirectPlan, device: str, dtype, keep_files: bool = False) -> None:
        import uuid

        import ray
        import torch

        from orchestrator.worker import free_port

        numel = sum(math.prod(shape) for _, shape in plan.layout)
        self.pg, self.buffers, self.turn, self.by_shared, self.member_ids = None, [], 0, set(), []
        self.session = uuid.uuid4().hex
        here = ray.get_runtime_context().get_node_id()
        local = [m for m, node in zip(plan.members, plan.nodes) if node == here]
        paths = []
        if local and device == "cpu" and self.shared_memory:
            paths = [p for p in (shared_file(numel * dtype.itemsize) for _ in range(2)) if p is not None]
        try:
            if len(paths) == 2:
                self.buffers = [torch.from_file(p, shared=True, size=numel, dtype=dtype) for p in paths]
                joined = [h.join_shared.remote(self.session, paths, numel, plan.dtype) for _, h, _ in local]
                for member, ref in zip(local, joined):
                    try:
                        ray.get(ref, timeout=self.timeout_s)
                        self.by_shared.add(member[2])
                    except Exception as exc:  # it joins the group instead
                        log.warning("replica %d cannot map the shared buffers (%s); it takes a broadcast",
                                    member[0], str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        finally:
            if keep_files and len(paths) == 2 and self.by_shared:
                self.files = paths  # until release_files: other processes of this node map them too
            else:
                for p in paths:
                    os.unlink(p)  # the mappings stay; nothing is left behind if a process dies
        others = [m for m in plan.members if m[2] not in self.by_shared]
        if others:
            host, port = ray.util.get_node_ip_address(), free_port()
            session, world = self.session, len(others) + 1
            joined = [h.join_sync.remote(host, port, rank + 1, world, session, self.timeout_s)
                      for rank, (_, h, _) in enumerate(others)]
            self.pg = sync_group(host, port, 0, world, session, device, self.timeout_s)  # waits for every member
            ray.get(joined, timeout=self.timeout_s)
        if not self.buffers:
            self.buffers = [torch.empty(numel, dtype=dtype, device=device)]
        for buffer in self.buffers:  # every page touched now, not by the first publish into it
            buffer.zero_()
        self.member_ids = [m[2] for m in plan.members]

    def _fill(self, weights: dict) -> int | None:
        """The weights, in the last plan's layout, into the buffer the next publish writes (kept:
        no allocation, no page faults); the values written, or None where they do not fit.

        On the CPU in one thread: the copy is bound by memory, not cores, and a second thread
        (left spinning after each copy) kept the store and the replicas from answering: the
        store's reply came 3-8 ms after the copy with two threads, 0.9-3.4 ms with one."""
        import torch

        buffer = self.buffers[self.turn]
        offset = 0
        threads = torch.get_num_threads()
        if buffer.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            for name, shape in self.plan.layout:
                n = math.prod(shape)
                w = weights[name].detach()
                if w.numel() != n:
                    return None
                buffer[offset:offset + n].copy_(w.reshape(-1))
                offset += n
        except (KeyError, RuntimeError):
            return None
        finally:
            torch.set_num_threads(threads)
        return offset if offset == buffer.numel() else None

    def publish(self, weights: dict, _again: bool = True) -> PublishResult:
        """Raises WeightMismatch (nothing sent) or PoolNotFound; a replica that fails is counted.

        The store's plan (the next version, the replicas) takes a round trip through its actor.
        Once connected, the publish does not wait for it: the weights go to the last plan's
        replicas at once, labelled with the version the store gives next when nobody else
        published in between. If the plan then differs (another version, other replicas), the
        publish is made again by the new plan."""
        import ray
        import torch

        self.release_files()
        store = self._store()
        asked = store.direct_plan.remote(self.member_ids or None)
        device = "cuda" if any(w.is_cuda for w in weights.values()) else "cpu"
        early = None
        if self.member_ids and self.buffers[0].device.type == device:  # connected
            check(weights, self.plan.expected)  # the pool's names and shapes: before anything is sent
            filled = self._fill(weights)
            if filled is not None:
                early = self._send(self.plan.version + 1, self.plan.members, filled)
        try:
            plan = self._plan(ray.get(asked, timeout=self.timeout_s))
        except Exception:
            if early is not None:
                self._finish(early)
            if not _again:
                raise
            self._store_handle = None  # the pool may have a new store: found again
            return self.publish(weights, _again=False)
        if early is not None:
            if plan is not None and early[0] == plan.version and [m[2] for m in plan.members] == self.member_ids:
                return self._finish(early, store)
            self._finish(early)  # superseded: sent again below, by the plan
        if plan is None:
            return ray.get(store.publish.remote(weights), timeout=self.timeout_s)
        check(weights, plan.expected)
        if self._changed(plan, device):
            self._connect(plan, device, getattr(torch, plan.dtype))  # the first publish, or the replicas changed
        self.plan = plan
        filled = self._fill(weights)
        if filled is None:
            raise WeightMismatch("weights do not fit the replicas' layout (nothing was sent)")
        return self._finish(self._send(plan.version, plan.members, filled), store)

    # -- a publish written by several processes of this node (training ranks, each its shards) --
    def open_shared(self) -> SharedTarget | None:
        """The store's plan, and where the next publish is to be written: the two buffers in
        shared memory, the one to write, the layout. None where the buffers are not shared (no
        replica on this node maps them): the caller publishes whole weights instead. The files
        stay until ``release_files``."""
        import ray
        import torch

        self.release_files()
        plan = self._plan(ray.get(self._store().direct_plan.remote(self.member_ids or None), timeout=self.timeout_s))
        if plan is None:
            return None
        if self._changed(plan, "cpu"):
            self._connect(plan, "cpu", getattr(torch, plan.dtype), keep_files=True)
        self.plan = plan
        if not self.by_shared or len(self.buffers) != 2:
            return None
        return SharedTarget(self.session, list(self.files), self.turn, plan.layout, plan.dtype)

    def _plan(self, answer: DirectPlan | int | None) -> DirectPlan | None:
        """The store's answer as a plan: a version alone means the last plan's replicas."""
        return dataclasses.replace(self.plan, version=answer) if isinstance(answer, int) else answer

    def _changed(self, plan: DirectPlan, device: str) -> bool:
        """Whether ``plan``'s replicas or the weights' device differ from the connection's."""
        return [m[2] for m in plan.members] != self.member_ids or self.buffers[0].device.type != device

    def release_files(self) -> None:
        for p in self.files:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.files = []

    def send_written(self) -> PublishResult:
        """After every writer wrote the buffer ``open_shared`` named: the replicas take it."""
        return self._finish(self._send(self.plan.version, self.plan.members, self.buffers[self.turn].numel()),
                            self._store())

    def _store(self):
        if self._store_handle is None:
            self._store_handle = find_store(self.pool)
        return self._store_handle

    def _send(self, version: int, members: list, numel: int) -> tuple:
        """The filled buffer to ``members`` (index, handle, actor id): each is told to take it,
        and the group's broadcast runs. (version, members, their replies)."""
        buffer, shared = self.buffers[self.turn], (self.session, self.turn)
        taking = [h.receive_direct.remote(version, numel, shared if actor in self.by_shared else None)
                  for _, h, actor in members]
        try:
            if self.pg is not None:
                broadcast(self.pg, buffer)
        except Exception:
            self.member_ids = []  # a member left mid-way: a new group next time
            raise
        return version, members, taking

    def _finish(self, sent: tuple, store=None) -> PublishResult:
        """Waits for the replies of a send; with ``store``, records the publish there."""
        import ray

        version, members, taking = sent
        results = [None] * len(taking)
        for n, ref in enumerate(taking):
            try:
                results[n] = ray.get(ref, timeout=self.timeout_s)
            except Exception as exc:
                results[n] = exc
        failed = [f"replica {m[0]}: {type(r).__name__}: {str(r).splitlines()[0] if str(r) else ''}"
                  for m, r in zip(members, results) if isinstance(r, BaseException)]
        if failed:  # one may still serve from the buffer the next publish would write: new ones then
            self.member_ids = []
        else:
            self.turn = (self.turn + 1) % len(self.buffers)
        if store is not None:
            self.plan = dataclasses.replace(self.plan, version=version)
            # Not waited for: the store runs this caller's calls in order, so the next plan follows it.
            store.record_direct.remote(version, [m[1] for m, r in zip(members, results)
                                                 if not isinstance(r, BaseException)])
        took_shared = sum(1 for m, r in zip(members, results)
                          if m[2] in self.by_shared and not isinstance(r, BaseException))
        return PublishResult(version, len(taking) - len(failed), failed, took_shared)
