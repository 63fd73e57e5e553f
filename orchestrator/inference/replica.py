"""A replica: one Ray actor holding the model and its GenerationEngine.

The actor is asynchronous: requests arrive as calls of ``generate`` (a streaming generator of
events), join the engine's queue, and the engine loop runs one step at a time in the actor's
event loop, so new requests and weight swaps land between decode steps.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import random
from datetime import timedelta

import ray
import torch

from orchestrator.inference.engine import GenerationEngine, flat_parameters, point_parameters
from orchestrator.inference.types import EngineOptions, Event, ReplicaInfo, Request, Stats, kv_bytes_per_token
from orchestrator.inference.weights import WeightMismatch, check, expected_shapes


def load_model(checkpoint: str, device: str = "cpu", quantize: str = "none"):
    """(model, tokenizer, eos id) for a run directory, checkpoint or Hugging Face directory."""
    from tokenizers import Tokenizer

    from orchestrator import pretrained
    from orchestrator.tokens import EOS
    from orchestrator.models import Llama, llama_args

    pre = pretrained.locate(checkpoint)
    tok = Tokenizer.from_file(pre.tokenizer_path)
    model = Llama(llama_args(pre.arch))
    model.load_state_dict(pretrained.load_weights(pre))
    model.init_buffers()
    model = model.to(device).eval()
    if quantize == "int8":
        from orchestrator.inference.quantize import quantize_int8

        quantize_int8(model)
    return model, tok, tok.token_to_id(EOS)


def shard_blocks(model, tp_mesh) -> None:
    """The training tensor-parallel split of every block (strategies.mesh.block_plan), outputs
    replicated. The embedding, norms and output layer stay whole on every rank, so all ranks
    compute the same logits and sample the same tokens."""
    from torch.distributed.tensor.parallel import parallelize_module

    from strategies.mesh import block_plan

    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan())


def build_engine(checkpoint: str, options: EngineOptions, rank: int = 0, rendezvous: tuple[str, int] | None = None):
    """(engine, tokenizer) of one replica rank. With options.tp > 1 the rank joins the
    replica's process group at ``rendezvous`` (blocking until every rank has) and keeps its
    slice of the blocks and of the KV cache."""
    torch.set_num_threads(max(1, options.threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, eos = load_model(checkpoint, device, options.quantize)
    if options.tp > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        addr, port = rendezvous
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=rank, world_size=options.tp, timeout=timedelta(seconds=options.tp_timeout_s))
        shard_blocks(model, init_device_mesh(device, (options.tp,)))
    engine = GenerationEngine(model, tokenizer, eos, block_size=options.block_size,
                              num_blocks=options.num_blocks(kv_bytes_per_token(
                                  model.args.n_layers, model.args.n_kv_heads, model.args.head_dim,
                                  next(model.parameters()).element_size(), options.tp), free_memory(device)),
                              max_batch=options.max_batch, tp=options.tp, pack_weights=options.pack_weights,
                              native_attention=options.native_attention)
    return engine, tokenizer


def free_memory(device: str) -> int:
    """Bytes free for the cache now: the GPU's free memory, or the machine's available memory."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def load_into(model, weights: dict, expected: dict) -> None:
    """Copies full weights (our names) into the model's parameters, each rank keeping its slice
    of a tensor-parallel parameter; all of them or, when any does not match, none."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from orchestrator.inference.quantize import Int8Linear

    check(weights, expected)
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        # The int8 layers hold no parameters of those names: a sync would keep the old weights.
        raise WeightMismatch("weight sync into an int8-quantized replica is not supported")
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = weights[name].to(p.device, p.dtype)
            if isinstance(p, DTensor):
                # Every rank has the full tensor: each keeps its slice, no communication.
                local = distribute_tensor(w, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(local)
            else:
                p.copy_(w)


class Shard:
    """Rank > 0 of a tensor-parallel replica: its slice of the model and of the KV cache. It runs
    the engine steps its leader sends, with the same requests in the same order, so that every
    rank schedules the same sequences and meets the leader in each step's all-reduces."""

    def __init__(self, checkpoint: str, options: EngineOptions, rank: int):
        self.args = (checkpoint, options, rank)
        self.engine = None

    def join(self, addr: str, port: int) -> int:
        checkpoint, options, rank = self.args
        self.engine, _ = build_engine(checkpoint, options, rank, (addr, port))
        self.expected = expected_shapes(self.engine.model)
        return os.getpid()

    def step(self, adds: list[Request], cancels: list[str]) -> None:
        apply(self.engine, adds, cancels)
        self.engine.step()

    def load_weights(self, weights: dict) -> None:
        load_into(self.engine.model, weights, self.expected)
        self.engine.weights_changed()


def apply(engine: GenerationEngine, adds: list[Request], cancels: list[str]) -> None:
    for request in adds:
        engine.add(request)
    for rid in cancels:
        engine.cancel(rid)


class Replica:
    """One replica (the leader rank of a tensor-parallel one). ``store``: the pool's weight
    store, whose latest weights it loads before it reports ready."""

    def __init__(self, checkpoint: str, options: EngineOptions, store=None):
        self.shards: list = []
        self.store = store
        rendezvous = None
        if options.tp > 1:  # ranks 1.. are actors of their own, owned by this one (they die with it)
            from orchestrator.worker import free_port

            rendezvous = (ray.util.get_node_ip_address(), free_port())
            gpus = 1 if torch.cuda.is_available() else 0
            shard_cls = ray.remote(Shard)
            self.shards = [shard_cls.options(num_cpus=options.threads, num_gpus=gpus).remote(checkpoint, options, r)
                           for r in range(1, options.tp)]
            joined = [s.join.remote(*rendezvous) for s in self.shards]
        self.engine, self.tokenizer = build_engine(checkpoint, options, 0, rendezvous)
        self.expected = expected_shapes(self.engine.model)
        self.flat = None  # the buffer the parameters point into (direct sync)
        self.private: tuple = ()  # this replica's two buffers: a broadcast goes into the one not served
        self.sync = None  # (session, process group) of the direct sync
        self.shared = None  # (session, the publisher's two buffers in shared memory): a direct sync on this node
        if self.shards:
            ray.get(joined)
        self.adds: list[Request] = []  # requests and cancellations for the next step, on every rank
        self.cancels: list[str] = []
        self.confirm: list[concurrent.futures.Future] = []  # cancellations waiting for the step that applies them
        self.queues: dict[str, asyncio.Queue] = {}
        self.wake: asyncio.Event | None = None
        self.loop: asyncio.Task | None = None
        self.steps = 0
        self.version = 0
        self.engine_faults = 0
        # Steps, weight swaps and cancellations all run on this loop, so each lands between two
        # steps with no lock (a direct sync receives in a thread, then swaps here).
        self.main_loop: asyncio.AbstractEventLoop | None = None

    async def ready(self) -> ReplicaInfo:
        if self.store is not None:
            version, refs, holders = await self.store.latest.remote()
            if version > self.version:
                if refs:
                    await self.load_weights(await refs[0], version)
                else:  # a direct publish: from a replica that took it
                    for holder in holders:
                        try:
                            await self.load_weights(await holder.export_weights.remote(), version)
                            break
                        except Exception:  # gone too: the next holder
                            continue
        e = self.engine
        return ReplicaInfo(os.getpid(), str(e.k.device), self.version, e.pool.total * e.block_size, e.cache_bytes,
                           e.attention)

    async def _run(self) -> None:
        while True:
            if not (self.engine.busy or self.adds or self.cancels):
                self.wake.clear()
                await self.wake.wait()
            adds, cancels, self.adds, self.cancels = self.adds, self.cancels, [], []
            confirm, self.confirm = self.confirm, []
            followers = [s.step.remote(adds, cancels) for s in self.shards]
            try:
                apply(self.engine, adds, cancels)
                self._confirm(confirm)  # cancelled: their blocks are free now
                # On this loop: a step in a thread of its own cost 30% of tokens/s at 8 clients
                # (the threads contend for the GIL). Cancellations arrive on another loop.
                events = self.engine.step()
            except Exception as exc:  # the engine fails requests alone; this is a fault of its own
                events = self._reset(exc)
            try:
                if followers:
                    await asyncio.gather(*followers)
            except Exception:  # a lost tensor-parallel rank: a real fault; the pool replaces this replica
                import traceback

                traceback.print_exc()
                os._exit(1)
            for event in events:
                queue = self.queues.get(event.id)
                if queue is not None:
                    queue.put_nowait(event)
            self.steps += 1
            await asyncio.sleep(0)  # let new requests and weight swaps in between steps

    @staticmethod
    def _confirm(futures: list[concurrent.futures.Future]) -> None:
        for future in futures:
            if not future.done():
                future.set_result(None)

    def _reset(self, exc: Exception) -> list[Event]:
        """An engine step raised outside any one request: every request in it ends with the error
        and the engine starts clean (all blocks free); the replica keeps serving."""
        import traceback

        from orchestrator.inference.engine import describe

        traceback.print_exc()
        self.engine_faults += 1
        e = self.engine
        held = [s.request for s in list(e.waiting) + e.running]
        e.reset()
        return [Event(r.id, "", [], "error", len(r.prompt_ids), error=describe(exc)) for r in held]

    def _ensure_loop(self) -> None:
        if self.loop is None or self.loop.done():
            self.wake = self.wake or asyncio.Event()
            self.main_loop = asyncio.get_running_loop()
            self.loop = self.main_loop.create_task(self._run())

    async def generate(self, request: Request):
        """Streams the request's events until it finishes (or fails: finish_reason "error")."""
        self._ensure_loop()
        rid = request.id
        if request.seed is None:  # drawn here, so that every tensor-parallel rank samples alike
            request = dataclasses.replace(request, seed=random.randrange(2**63))
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = queue
        self.adds.append(request)
        self.wake.set()
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finish_reason is not None
                yield event
        finally:
            self.queues.pop(rid, None)
            if not finished:
                self.cancels.append(rid)
                self.wake.set()

    async def complete(self, request: Request) -> Event:
        """The whole request at once (one Ray round trip rather than one per token)."""
        whole = None
        async for event in self.generate(request):
            whole = event if whole is None else whole.merge(event)
        return whole

    @ray.method(concurrency_group="control")
    async def cancel(self, request_id: str) -> int:
        """Ends the request (its blocks are free when this returns); the free block count. It
        runs on the actor's control loop, in a thread of its own, so it lands while a step of the
        main loop computes, and is applied before the next step."""
        loop = self.main_loop
        if loop is None:  # nothing was ever generated
            return self.engine.pool.n_free
        future: concurrent.futures.Future = concurrent.futures.Future()

        def enqueue() -> None:
            queue = self.queues.pop(request_id, None)
            if queue is not None:  # its generate() ends too
                queue.put_nowait(Event(request_id, "", [], "cancelled"))
            if not self.shards:  # between two steps: applied now
                self.engine.cancel(request_id)
                future.set_result(None)
                return
            self.cancels.append(request_id)  # every tensor-parallel rank applies it in the next step
            self.confirm.append(future)
            self.wake.set()

        loop.call_soon_threadsafe(enqueue)
        await asyncio.wrap_future(future)
        return self.engine.pool.n_free

    async def load_weights(self, weights: dict, version: int = 0) -> int:
        """Swaps in new weights (our parameter names) between two engine steps, all or none;
        returns the version served. A version older than the one served is ignored."""
        if version and version <= self.version:
            return self.version
        check(weights, self.expected)  # before any rank copies anything
        # No await until the copy is done: no step of ours runs in between. The shards take them
        # after the steps already sent to them and before the next.
        taken = [s.load_weights.remote(weights) for s in self.shards]
        load_into(self.engine.model, weights, self.expected)
        self.engine.weights_changed()
        if version:
            self.version = version
        if taken:
            await asyncio.gather(*taken)
        return self.version

    # -- direct weight sync (weights.DirectPublisher) ---------------------------------------
    def direct_layout(self) -> tuple[list[tuple[str, tuple[int, ...]]], str, str] | None:
        """The parameters' order and shapes in the flat buffer, their dtype, and the Ray node this
        replica runs on; None where the direct path does not apply (tensor-parallel ranks, int8
        layers)."""
        from orchestrator.inference.quantize import Int8Linear

        model = self.engine.model
        if self.shards or any(isinstance(m, Int8Linear) for m in model.modules()):
            return None
        params = list(model.named_parameters())
        return ([(n, tuple(p.shape)) for n, p in params], str(params[0][1].dtype).removeprefix("torch."),
                ray.get_runtime_context().get_node_id())

    def _flatten(self) -> None:
        """The buffer the parameters point into (the engine made one) and its twin: a broadcast
        goes into the one not served, then the parameters point at it."""
        self.flat = flat_parameters(self.engine.model)
        self.private = (self.flat, torch.empty_like(self.flat))

    def _point(self, flat: torch.Tensor) -> None:
        point_parameters(self.engine.model, flat)

    def _direct_ready(self) -> None:
        """Refuses where the direct path does not apply; the parameters in one buffer."""
        if self.direct_layout() is None:
            raise WeightMismatch("direct weight sync does not apply to this replica (tensor-parallel or int8)")
        if self.flat is None:
            self._flatten()

    async def join_sync(self, host: str, port: int, rank: int, world: int, session: str, timeout_s: float) -> None:
        from orchestrator.inference.weights import sync_group

        self._direct_ready()
        device = "cuda" if self.flat.is_cuda else "cpu"
        self.sync = None
        pg = await asyncio.to_thread(sync_group, host, port, rank, world, session, device, timeout_s)
        self.sync = (session, pg)

    async def join_shared(self, session: str, paths: list[str], numel: int, dtype: str) -> None:
        """Maps the publisher's two buffers (files in shared memory on this node, which the
        publisher removes once every replica has them mapped). It writes each publish into the
        buffer the replicas do not serve from; they then serve from it, with no copy."""
        self._direct_ready()
        self.shared = None
        if self.flat.is_cuda or self.flat.numel() != numel or str(self.flat.dtype) != f"torch.{dtype}":
            raise WeightMismatch(f"shared-memory sync: this replica holds {self.flat.numel()} {self.flat.dtype} "
                                 f"values on {self.flat.device}, the buffers {numel} {dtype}")
        self.shared = (session, [torch.from_file(p, shared=True, size=numel, dtype=self.flat.dtype) for p in paths])

    async def receive_direct(self, version: int, numel: int, shared: tuple[str, int] | None = None) -> int:
        """New weights, then, between two engine steps, the parameters pointed at them: all of
        them or, if the transfer failed, none. From the group: one broadcast into the spare
        buffer. From shared memory (``shared``: the publisher's session and which of its buffers):
        the buffer itself."""
        from orchestrator.inference.weights import broadcast

        if shared is not None:
            if self.shared is None or self.shared[0] != shared[0] or self.shared[1][shared[1]].numel() != numel:
                raise WeightMismatch("shared-memory sync: this replica has not mapped this publisher's buffers "
                                     "(another publisher joined it since)")
            target = self.shared[1][shared[1]]
        else:
            if self.sync is None or not self.private or self.flat.numel() != numel:
                raise WeightMismatch(f"direct sync: this replica expects "
                                     f"{None if self.flat is None else self.flat.numel()} values in a joined group, "
                                     f"got {numel}")
            # Never into a shared buffer: the publisher that owns it may write it later.
            target = self.private[1] if self.flat is self.private[0] else self.private[0]
            await asyncio.to_thread(broadcast, self.sync[1], target)
        self._point(target)  # on the loop: between two steps
        self.flat = target
        self.engine.weights_changed()
        self.version = max(self.version, version)
        return self.version

    def export_weights(self) -> dict:
        """The weights served (for a replica that replaces a dead one after a direct sync)."""
        return {k: v.detach().clone() for k, v in self.engine.model.state_dict().items()}

    def stats(self) -> Stats:
        stats = self.engine.stats()
        stats.steps, stats.weights_version = self.steps, self.version
        stats.engine_faults = self.engine_faults
        return stats
