"""The pool of replicas and the HTTP server in front of it (aiohttp, OpenAI-style completions).

Endpoints: POST /v1/completions, GET /health, GET /metrics (Prometheus text). Requests are
checked before any replica sees them (a 400 names the field), counted against the pool's
queue limit (429 beyond it), and sent to the replica with the fewest requests in flight.
A replica that dies is replaced; a request it held is retried once on another replica if it
had not yet streamed anything, and otherwise fails with a clear error.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import ray
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.inference.config import ServeConfig

log = logging.getLogger(__name__)
NAMESPACE = "forgeline"
FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "model", "user"}


class BadRequest(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ReplicaLost(Exception):
    pass


@dataclass
class Slot:
    handle: object
    index: int
    inflight: int = 0
    alive: bool = True
    ready: object = None  # the ObjectRef of its ready() call


class Pool:
    def __init__(self, cfg: ServeConfig):
        from orchestrator.inference.replica import Replica

        self.cfg = cfg
        self.actor_cls = ray.remote(Replica)
        self.spawned = 0
        self.synced = None  # the ObjectRef of the last weights pushed, for replacements
        self.slots = [self._spawn(i) for i in range(cfg.inference.replicas)]
        self.replaced = 0

    def _spawn(self, index: int) -> Slot:
        i = self.cfg.inference
        options = {k: v for k, v in asdict(i).items() if k in ("block_size", "kv_cache_tokens", "max_batch",
                                                                  "quantize", "tp")}
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.spawned += 1
        handle = self.actor_cls.options(num_cpus=i.cpus_per_replica, num_gpus=gpus, max_concurrency=1000,
                                        name=f"{i.name}/replica-{index}.{self.spawned}", namespace=NAMESPACE,
                                        ).remote(self.cfg.checkpoint, options, i.cpus_per_replica)
        ready = handle.ready.remote()
        if self.synced is not None:  # a replacement serves the weights its peers serve
            ready = handle.load_weights.remote(self.synced)
        return Slot(handle, index, ready=ready)

    def wait_ready(self, timeout_s: float = 300.0) -> list[dict]:
        return ray.get([s.ready for s in self.slots], timeout=timeout_s)

    def _pick(self, avoid: Slot | None = None) -> Slot:
        alive = [s for s in self.slots if s.alive and s is not avoid] or [s for s in self.slots if s.alive]
        return min(alive, key=lambda s: s.inflight)

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

    async def stream(self, request: dict, whole: bool = False):
        """Events of one request, from the least busy replica; one retry if its replica dies
        before it produced anything. ``whole``: one event with the finished request."""
        tried: Slot | None = None
        for attempt in range(2):
            slot = self._pick(avoid=tried)
            slot.inflight += 1
            produced = False
            try:
                await slot.ready
                if whole:
                    event = await slot.handle.complete.remote(request)
                    produced = True
                    yield event
                    return
                async for ref in slot.handle.generate.remote(request):
                    event = await ref
                    produced = True
                    yield event
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                self._replace(slot)
                if produced or attempt == 1:
                    raise ReplicaLost(f"replica {slot.index} died while generating ({type(exc).__name__}); "
                                      "the request was not completed") from None
                tried = slot
            finally:
                slot.inflight -= 1

    async def load_weights(self, weights: dict) -> list[int]:
        ref = self.synced = ray.put(weights)
        return await asyncio.gather(*[s.handle.load_weights.remote(ref) for s in self.slots if s.alive])

    @property
    def inflight(self) -> int:
        return sum(s.inflight for s in self.slots)

    def shutdown(self) -> None:
        for s in self.slots:
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:
                pass


def publish(pool: str, weights: dict, timeout_s: float = 120.0) -> int:
    """Sends full weights (our names) to every live replica of the named pool, from any process
    on the pool's Ray cluster; they swap them in between decode steps. Returns how many took them."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and a["name"].startswith(f"{pool}/replica-")]
    handles = []
    for name in names:
        try:
            handles.append(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:  # gone since it was listed
            pass
    ref = ray.put(weights)
    ray.get([h.load_weights.remote(ref) for h in handles], timeout=timeout_s)
    return len(handles)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("forgeline_serve_requests", "Completion requests by outcome", ["status"],
                                registry=self.registry)
        self.tokens = Counter("forgeline_serve_tokens", "Tokens processed", ["kind"], registry=self.registry)
        self.queue = Gauge("forgeline_serve_queue_depth", "Requests in flight over the pool", registry=self.registry)
        self.latency = Histogram("forgeline_serve_request_latency_seconds", "Time from request to last token",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.replicas = Gauge("forgeline_serve_replicas_alive", "Replicas serving", registry=self.registry)


def parse_request(body: bytes, tokenizer, max_seq_len: int, max_tokens_limit: int) -> dict:
    """The checked request: {prompts: [ids...], texts, max_tokens, temperature, top_p, stop, seed, stream}."""
    try:
        data = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("body", f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest("body", "must be a JSON object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise BadRequest(unknown[0], f"unknown field; allowed: {', '.join(sorted(FIELDS))}")
    if "prompt" not in data:
        raise BadRequest("prompt", "is required: a string or a list of strings")
    prompt = data["prompt"]
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise BadRequest("prompt", "must be a non-empty string or a non-empty list of non-empty strings")
    max_tokens = data.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise BadRequest("max_tokens", f"must be an integer in [1, {max_tokens_limit}], got {max_tokens!r}")
    temperature = data.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise BadRequest("temperature", f"must be a number in [0, 2], got {temperature!r}")
    top_p = data.get("top_p", 1.0)
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise BadRequest("top_p", f"must be a number in (0, 1], got {top_p!r}")
    stop = data.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop", "must be a string or a list of up to 4 non-empty strings")
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise BadRequest("seed", f"must be a non-negative integer, got {seed!r}")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", f"must be true or false, got {stream!r}")
    prompts = [tokenizer.encode(t).ids for t in texts]
    for n, ids in enumerate(prompts):
        if len(ids) + 1 > max_seq_len:
            raise BadRequest("prompt", f"prompt {n} has {len(ids)} tokens; the context holds {max_seq_len}")
    return {"prompts": prompts, "texts": texts, "max_tokens": max_tokens, "temperature": float(temperature),
            "top_p": float(top_p), "stop": tuple(stop), "seed": seed, "stream": stream}


def error(status: int, field: str, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": f"{field}: {message}", "type": kind, "param": field}},
                             status=status)


class Server:
    def __init__(self, cfg: ServeConfig, pool: Pool, tokenizer, max_seq_len: int, model_name: str):
        self.cfg = cfg
        self.pool = pool
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.model_name = model_name
        self.metrics = Metrics()
        self.app = web.Application(middlewares=[self._auth], client_max_size=1 << 20)
        self.app.add_routes([web.post("/v1/completions", self.completions), web.get("/health", self.health),
                             web.get("/metrics", self.prometheus)])

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        token = self.cfg.inference.token
        if token and request.path != "/health" and request.headers.get("Authorization") != f"Bearer {token}":
            return error(401, "Authorization", "a valid bearer token is required", "authentication_error")
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        alive = sum(s.alive for s in self.pool.slots)
        return web.json_response({"status": "ok" if alive else "down", "replicas": alive,
                                  "inflight": self.pool.inflight}, status=200 if alive else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.queue.set(self.pool.inflight)
        self.metrics.replicas.set(sum(s.alive for s in self.pool.slots))
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        m = self.metrics
        try:
            req = parse_request(await request.read(), self.tokenizer, self.max_seq_len,
                                self.cfg.inference.max_tokens_limit)
        except BadRequest as exc:
            m.requests.labels("bad_request").inc()
            return error(400, exc.field, exc.message)
        if self.pool.inflight + len(req["prompts"]) > self.cfg.inference.queue_limit:
            m.requests.labels("rejected").inc()
            return error(429, "queue", f"the pool holds {self.pool.inflight} requests, its limit is "
                                       f"{self.cfg.inference.queue_limit}; retry later", "rate_limit_error")
        start = time.perf_counter()
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        subs = [{"id": f"{cid}-{n}", "prompt_ids": ids, "max_tokens": req["max_tokens"],
                 "temperature": req["temperature"], "top_p": req["top_p"], "stop": req["stop"],
                 "seed": None if req["seed"] is None else req["seed"] + n} for n, ids in enumerate(req["prompts"])]
        m.tokens.labels("prompt").inc(sum(len(ids) for ids in req["prompts"]))
        try:
            if req["stream"]:
                return await self._stream(request, cid, subs, start)
            results = await asyncio.wait_for(asyncio.gather(*[self._collect(s) for s in subs]),
                                             self.cfg.inference.request_timeout_s)
        except ReplicaLost as exc:
            m.requests.labels("failed").inc()
            return error(503, "replica", str(exc), "server_error")
        except asyncio.TimeoutError:
            m.requests.labels("failed").inc()
            return error(504, "request", f"not finished within {self.cfg.inference.request_timeout_s} s",
                         "server_error")
        m.latency.observe(time.perf_counter() - start)
        m.requests.labels("ok").inc()
        completion = sum(r["completion_tokens"] for r in results)
        m.tokens.labels("completion").inc(completion)
        return web.json_response({
            "id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": n, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                        for n, r in enumerate(results)],
            "usage": {"prompt_tokens": sum(len(ids) for ids in req["prompts"]), "completion_tokens": completion,
                      "total_tokens": completion + sum(len(ids) for ids in req["prompts"])},
        })

    async def _collect(self, sub: dict) -> dict:
        text, last = [], None
        async for event in self.pool.stream(sub, whole=True):
            text.append(event["text"])
            last = event
        return {"text": "".join(text), "finish_reason": last["finish_reason"],
                "completion_tokens": last["completion_tokens"]}

    async def _stream(self, request: web.Request, cid: str, subs: list[dict], start: float) -> web.StreamResponse:
        """Server-sent events: one chunk per step per prompt, then ``data: [DONE]``."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(n: int, sub: dict) -> None:
            try:
                async for event in self.pool.stream(sub):
                    await queue.put((n, event))
            except ReplicaLost as exc:
                await queue.put((n, {"error": str(exc)}))
            await queue.put((n, None))

        tasks = [asyncio.create_task(pump(n, s)) for n, s in enumerate(subs)]
        open_ = len(subs)
        completion = 0
        failed = False
        try:
            while open_:
                n, event = await queue.get()
                if event is None:
                    open_ -= 1
                    continue
                if "error" in event:
                    failed = True
                    chunk = {"error": {"message": event["error"], "type": "server_error", "param": "replica"}}
                else:
                    completion += len(event["token_ids"])
                    chunk = {"id": cid, "object": "text_completion", "created": int(time.time()),
                             "model": self.model_name, "choices": [{"index": n, "text": event["text"],
                                                                    "finish_reason": event["finish_reason"]}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        finally:
            for t in tasks:
                t.cancel()
        self.metrics.requests.labels("failed" if failed else "ok").inc()
        self.metrics.tokens.labels("completion").inc(completion)
        self.metrics.latency.observe(time.perf_counter() - start)
        return resp


def build(cfg: ServeConfig) -> Server:
    """Starts the pool's replicas (on the connected Ray cluster) and returns the server for them."""
    from tokenizers import Tokenizer

    from orchestrator import pretrained
    from orchestrator.inference.replica import model_shape

    pre = pretrained.locate(cfg.checkpoint)
    pool = Pool(cfg)
    pool.wait_ready()
    return Server(cfg, pool, Tokenizer.from_file(pre.tokenizer_path), model_shape(pre)["max_seq_len"],
                  pre.path)


class Background:
    """A server on its own event loop thread (tests, benchmarks): ``url``, ``stop()``."""

    def __init__(self, server: Server):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(server.app, access_log=None)
        started = threading.Event()
        i = server.cfg.inference

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, i.host, i.port)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not started.wait(60):
            raise RuntimeError("the server did not start")
        self.url = f"http://{i.host}:{self.port}"

    def call(self, coro):
        """Runs a coroutine on the server's loop (e.g. pool.load_weights) and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.server.pool.shutdown()
