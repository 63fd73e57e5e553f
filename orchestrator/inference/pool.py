"""The pool: replica actors, their placement and replacement, retries, admission and weight sync.
No HTTP here; the front (server.py) hands it typed requests and reads typed events.

Admission: ``admit(k)`` takes k sequences against ``inference.queue_limit``; each sequence gives
its unit back only when its replica confirms it ended (finished, failed, or cancelled and its
blocks freed), so a client that disconnects or times out keeps counting until the work is gone.

Failures: the engine fails a request alone (an error event), so a replica does not die of a
request it was given; a replica that dies anyway (killed, out of memory, a lost tensor-parallel
rank) is replaced, and a request it held is retried once on another replica if it had not yet
streamed anything. A request under which two replicas died is not tried a third time.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import ray

from orchestrator.inference.config import ServeConfig, engine_options
from orchestrator.inference.types import Event, ReplicaInfo, Request, Stats
from orchestrator.inference.weights import NAMESPACE, PublishResult, WeightStore, store_name

log = logging.getLogger(__name__)
ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class ReplicaLost(Exception):
    pass


@dataclass
class Slot:
    handle: object
    index: int
    inflight: int = 0  # sequences sent and not confirmed ended
    alive: bool = True
    ready: object = None  # the ObjectRef of its ready() call


class Ticket:
    """k admitted sequences; each stream that starts takes one and gives it back when it ended."""

    def __init__(self, pool: "Pool", k: int):
        self.pool, self.unused = pool, k

    def take(self) -> None:
        self.unused -= 1

    def close(self) -> None:
        """Gives back the units no stream took (the request ended before starting them)."""
        self.pool.held -= self.unused
        self.unused = 0


class Pool:
    def __init__(self, cfg: ServeConfig, expected: dict[str, tuple[int, ...]], replica_cls=None,
                 num_cpus: float | None = None):
        """``num_cpus``: the Ray CPUs each replica takes (default inference.cpus_per_replica, which
        is also its torch threads); 0 shares the cores of whatever else runs there."""
        from orchestrator.inference.replica import Replica

        self.cfg = cfg
        self.num_cpus = cfg.inference.cpus_per_replica if num_cpus is None else num_cpus
        self.options = engine_options(cfg)
        # "control": cancellations, on a loop of their own (replica.Replica.cancel).
        self.actor_cls = ray.remote(concurrency_groups={"control": 16})(replica_cls or Replica)
        self.store = ray.remote(WeightStore).options(name=store_name(cfg.inference.name), namespace=NAMESPACE,
                                                     num_cpus=0).remote(expected)
        self.spawned = 0
        self.replaced = 0
        self.held = 0  # admitted sequences not yet confirmed ended
        self.turn = 0
        self.slots = [self._spawn(i) for i in range(cfg.inference.replicas)]

    def _spawn(self, index: int) -> Slot:
        i = self.cfg.inference
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.spawned += 1
        handle = self.actor_cls.options(num_cpus=self.num_cpus, num_gpus=gpus, max_concurrency=1000,
                                        name=f"{i.name}/replica-{index}.{self.spawned}", namespace=NAMESPACE,
                                        ).remote(self.cfg.checkpoint, self.options, self.store)
        self.store.set_replica.remote(index, handle)
        # A replacement loads the store's latest weights before it reports ready.
        return Slot(handle, index, ready=handle.ready.remote())

    def wait_ready(self, timeout_s: float = 300.0) -> list[ReplicaInfo]:
        self.info = ray.get([s.ready for s in self.slots], timeout=timeout_s)
        return self.info

    def admit(self, k: int) -> Ticket | None:
        """A ticket for k sequences, or None when they would pass the queue limit."""
        if self.held + k > self.cfg.inference.queue_limit:
            return None
        self.held += k
        return Ticket(self, k)

    def _pick(self, avoid: Slot | None = None) -> Slot:
        """The replica with the fewest sequences in flight; ties in turn."""
        alive = [s for s in self.slots if s.alive and s is not avoid] or [s for s in self.slots if s.alive]
        self.turn += 1
        return min(alive, key=lambda s: (s.inflight, (s.index - self.turn) % len(self.slots)))

    async def watch(self, interval_s: float) -> None:
        """Replaces a replica that died while idle (requests find the others): asks each for its
        stats every ``interval_s``; only a dead actor counts, not a slow answer."""
        while True:
            await asyncio.sleep(interval_s)
            for slot in [s for s in self.slots if s.alive]:
                try:
                    await asyncio.wait_for(asyncio.shield(slot.handle.stats.remote()), interval_s)
                except ACTOR_DIED:
                    self._replace(slot)
                except Exception:  # busy or starting: not a death
                    pass

    def _replace(self, slot: Slot) -> None:
        if not slot.alive:
            return
        slot.alive = False
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # already gone
            pass
        log.warning("replica %d died; starting a replacement", slot.index)
        self.slots[self.slots.index(slot)] = self._spawn(slot.index)
        self.replaced += 1

    async def _end(self, slot: Slot, request_id: str | None) -> None:
        """Gives the sequence's unit back once its replica confirmed it ended (cancelling it first
        when ``request_id`` is given)."""
        try:
            if request_id is not None and slot.alive:
                await slot.handle.cancel.remote(request_id)
        except Exception:  # the replica died: its work is gone with it
            pass
        finally:
            slot.inflight -= 1
            self.held -= 1

    async def stream(self, request: Request, ticket: Ticket, whole: bool = False):
        """Events of one request from the least busy replica. ``whole``: one event with the
        finished request. Leaving early (disconnect, timeout) cancels it in the replica."""
        ticket.take()
        tried: Slot | None = None
        for attempt in range(2):
            slot = self._pick(avoid=tried)
            slot.inflight += 1
            ended = retry = produced = False
            try:
                await slot.ready
                if whole:
                    event = await slot.handle.complete.remote(request)
                    ended = True
                    yield event
                    return
                async for ref in slot.handle.generate.remote(request):
                    event: Event = await ref
                    produced = True
                    ended = event.finish_reason is not None
                    yield event
                return
            except ACTOR_DIED as exc:
                ended = True  # its work is gone with it
                self._replace(slot)
                if whole and attempt == 0 or not (whole or produced or attempt == 1):
                    retry, tried = True, slot
                    continue
                raise ReplicaLost(f"replica {slot.index} died while generating ({type(exc).__name__}); "
                                  "the request was not completed") from None
            finally:
                if ended:
                    slot.inflight -= 1
                    if not retry:
                        self.held -= 1
                else:  # the consumer left before the end: cancel in the replica, hold until confirmed
                    asyncio.get_running_loop().create_task(self._end(slot, request.id))

    async def load_weights(self, weights: dict) -> PublishResult:
        """Publishes through the pool's weight store (what training's publish does)."""
        return await self.store.publish.remote(weights)

    async def stats(self) -> list[Stats]:
        """Of the replicas that answer (a dead one is left out; the watch replaces it)."""
        got = await asyncio.gather(*[s.handle.stats.remote() for s in self.slots if s.alive], return_exceptions=True)
        return [g for g in got if isinstance(g, Stats)]

    @property
    def inflight(self) -> int:
        return self.held

    def shutdown(self) -> None:
        for handle in [s.handle for s in self.slots] + [self.store]:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
