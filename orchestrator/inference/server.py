"""The HTTP front of a pool (aiohttp): OpenAI-style handlers, validation, Prometheus metrics.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize,
POST /detokenize, GET /tokenizer_info, GET /openapi.json, GET /health, GET /metrics.

A request is checked (api.py) before any replica sees it: a 400 names the field. Then it is
counted against the queue limit (429 beyond it), and only then tokenized, off the event loop.
``inference.request_timeout_s`` bounds every request, streams included; a stream always ends
with ``data: [DONE]``. A client that disconnects or times out has its work cancelled in the
replica (the pool holds its place in the queue until the replica confirms).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orchestrator.inference import api
from orchestrator.inference.api import BadRequest
from orchestrator.inference.config import ServeConfig
from orchestrator.inference.pool import Pool, ReplicaLost, Ticket
from orchestrator.inference.types import MAX_SEED, Event, Request

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("forgeline_serve_requests", "Requests by outcome", ["status"], registry=self.registry)
        self.tokens = Counter("forgeline_serve_tokens", "Tokens processed", ["kind"], registry=self.registry)
        self.queue = Gauge("forgeline_serve_queue_depth", "Sequences admitted and not yet ended",
                           registry=self.registry)
        self.latency = Histogram("forgeline_serve_request_latency_seconds", "Time from request to last token",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.replicas = Gauge("forgeline_serve_replicas_alive", "Replicas serving", registry=self.registry)
        self.replaced = Gauge("forgeline_serve_replicas_replaced", "Replicas replaced since start",
                              registry=self.registry)
        self.prefix_hit_rate = Gauge("forgeline_serve_prefix_cache_hit_rate",
                                     "Prompt tokens found in the replicas' prefix caches, of those looked up",
                                     registry=self.registry)
        self.prefix_tokens = Gauge("forgeline_serve_prefix_cache_tokens", "Prompt tokens looked up and found in "
                                   "the prefix caches of the live replicas", ["kind"], registry=self.registry)
        self.shared_prefills = Gauge("forgeline_serve_shared_prefills",
                                     "Samples that took their group's prefill (n > 1)", registry=self.registry)


def error(status: int, field: str, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response(api.error_body(field, message, kind), status=status)


def sub_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else (seed + index) % (MAX_SEED + 1)


class Server:
    def __init__(self, cfg: ServeConfig, pool: Pool, tokenizer, max_seq_len: int, model_name: str, eos: str):
        self.cfg = cfg
        self.pool = pool
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.eos = eos
        vocab = tokenizer.get_vocab_size()
        longest = max(len(tokenizer.decode([t])) for t in range(vocab))
        self.limits = api.Limits(max_seq_len=max_seq_len, vocab_size=vocab,
                                 max_tokens_limit=cfg.inference.max_tokens_limit,
                                 max_sequences=cfg.inference.max_sequences_per_request,
                                 max_prompt_chars=max_seq_len * max(1, longest))
        self.shapes = api.Shapes(tokenizer)
        self.metrics = Metrics()
        self.tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.app = web.Application(middlewares=[self._errors, self._auth], client_max_size=MAX_BODY)
        self.app.add_routes([
            web.post("/v1/completions", self.completions), web.post("/v1/chat/completions", self.chat),
            web.get("/v1/models", self.models), web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize), web.get("/tokenizer_info", self.tokenizer_info),
            web.get("/openapi.json", self.openapi), web.get("/health", self.health),
            web.get("/metrics", self.prometheus)])
        self.app.on_startup.append(self._start_watch)
        self.app.on_cleanup.append(self._stop_watch)
        self.watcher: asyncio.Task | None = None

    async def _start_watch(self, app) -> None:
        self.watcher = asyncio.get_running_loop().create_task(self.pool.watch(self.cfg.inference.health_interval_s))

    async def _stop_watch(self, app) -> None:
        if self.watcher is not None:
            self.watcher.cancel()

    # -- middlewares -------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except BadRequest as exc:
            self.metrics.requests.labels("bad_request").inc()
            return error(exc.status, exc.field, exc.message, exc.kind)
        except web.HTTPException as exc:
            if exc.status == 413:
                return error(413, "body", f"larger than {MAX_BODY} bytes")
            if exc.status >= 400:
                return error(exc.status, "path", exc.reason or "not found")
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # a fault of ours: answered, logged, and the server goes on
            log.exception("unhandled error in %s", request.path)
            self.metrics.requests.labels("failed").inc()
            return error(500, "server", f"{type(exc).__name__}: {exc}", "server_error")

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        token = self.cfg.inference.token
        if token and request.path != "/health":
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):  # constant time
                return error(401, "Authorization", "a valid bearer token is required", "authentication_error")
        return await handler(request)

    # -- plain endpoints ---------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        alive = sum(s.alive for s in self.pool.slots)
        return web.json_response({"status": "ok" if alive else "down", "replicas": alive,
                                  "inflight": self.pool.inflight, "replaced": self.pool.replaced},
                                 status=200 if alive else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.queue.set(self.pool.inflight)
        self.metrics.replicas.set(sum(s.alive for s in self.pool.slots))
        self.metrics.replaced.set(self.pool.replaced)
        stats = await self.pool.stats()
        queried = sum(s.prefix_queried_tokens for s in stats)
        hit = sum(s.prefix_hit_tokens for s in stats)
        self.metrics.prefix_tokens.labels("queried").set(queried)
        self.metrics.prefix_tokens.labels("hit").set(hit)
        self.metrics.prefix_hit_rate.set(hit / queried if queried else 0.0)
        self.metrics.shared_prefills.set(sum(s.shared_prefills for s in stats))
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "forgeline",
            "max_model_len": self.limits.max_seq_len}]})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(api.openapi(self.model_name))

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        return web.json_response({"eos_token": self.eos, "bos_token": None, "pad_token": None,
                                  "max_model_len": self.limits.max_seq_len, "vocab_size": self.limits.vocab_size})

    async def tokenize(self, request: web.Request) -> web.Response:
        text = api.parse_tokenize(await self._json(request), self.limits)
        ids = await self._off_loop(lambda: self.tokenizer.encode(text).ids)
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": self.limits.max_seq_len})

    async def detokenize(self, request: web.Request) -> web.Response:
        ids = api.parse_detokenize(await self._json(request), self.limits)
        return web.json_response({"prompt": await self._off_loop(lambda: self.tokenizer.decode(ids))})

    # -- helpers -----------------------------------------------------------------------------
    async def _json(self, request: web.Request) -> dict:
        return api.load_json(await request.read())

    async def _off_loop(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn)

    def _check_model(self, data: dict) -> None:
        model = data.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest("model", f"{str(model)[:100]!r} is not served here; GET /v1/models lists "
                                      f"{self.model_name!r}", status=404)

    def _admit(self, k: int) -> Ticket:
        ticket = self.pool.admit(k)
        if ticket is None:
            self.metrics.requests.labels("rejected").inc()
            raise BadRequest("queue", f"the pool holds {self.pool.inflight} sequences, its limit is "
                                      f"{self.cfg.inference.queue_limit}; retry later", 429, "rate_limit_error")
        return ticket

    def _encode(self, prompts: list, max_tokens: int) -> list[list[int]]:
        """Token ids of each prompt (in the tokenizer's thread); a 400 for one past the context."""
        out = []
        room = self.limits.max_seq_len - (0 if max_tokens == 0 else 1)
        for n, p in enumerate(prompts):
            ids = self.tokenizer.encode(p).ids if isinstance(p, str) else list(p)
            if not ids:
                raise BadRequest("prompt", f"prompt {n} has no tokens")
            if len(ids) > room:
                raise BadRequest("prompt", f"prompt {n} has {len(ids)} tokens; the context holds "
                                           f"{self.limits.max_seq_len} with the first new token")
            out.append(ids)
        return out

    def _requests(self, cid: str, prompts: list[list[int]], s: api.Sampling, logprobs, echo: bool) -> list[Request]:
        """One request per (prompt, sample); choice index = prompt * n + sample (OpenAI's order)."""
        return [Request(id=f"{cid}-{p * s.n + j}", prompt_ids=tuple(ids), max_tokens=s.max_tokens,
                        temperature=s.temperature, top_p=s.top_p, stop=s.stop,
                        seed=sub_seed(s.seed, p * s.n + j), logprobs=logprobs, echo=echo)
                for p, ids in enumerate(prompts) for j in range(s.n)]

    async def _whole(self, sub: Request, ticket: Ticket) -> Event:
        async with contextlib.aclosing(self.pool.stream(sub, ticket, whole=True)) as events:
            async for event in events:
                return event
        raise ReplicaLost("no answer")

    async def _run_whole(self, subs: list[Request], ticket: Ticket) -> list[Event]:
        timeout = self.cfg.inference.request_timeout_s
        try:
            results = await asyncio.wait_for(asyncio.gather(*[self._whole(s, ticket) for s in subs]), timeout)
        except ReplicaLost as exc:
            self.metrics.requests.labels("failed").inc()
            raise BadRequest("replica", str(exc), 503, "server_error") from None
        except asyncio.TimeoutError:
            self.metrics.requests.labels("timeout").inc()
            raise BadRequest("request", f"not finished within inference.request_timeout_s="
                                        f"{timeout} s", 504, "server_error") from None
        failed = [e for e in results if e.error]
        if failed:
            self.metrics.requests.labels("failed").inc()
            raise BadRequest("request", f"the engine failed it: {failed[0].error}", 500, "server_error")
        return results

    async def _generate(self, request: web.Request, texts: list, s: api.Sampling, logprobs, echo: bool,
                        kind: str, chunk, answer) -> web.StreamResponse:
        """What both endpoints do: admission (429), tokenizing off the loop, then either a stream of
        ``chunk(head, index, event)`` or one answer of ``answer(head, requests, events)``'s fields.
        ``head``: the id, object ``kind``, time and model every chunk and answer carry."""
        ticket = self._admit(len(texts) * s.n)
        try:
            start = time.perf_counter()
            prompts = await self._off_loop(lambda: self._encode(texts, s.max_tokens))
            cid = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            head = {"id": cid, "object": kind, "created": int(time.time()), "model": self.model_name}
            subs = self._requests(cid, prompts, s, logprobs, echo)
            self.metrics.tokens.labels("prompt").inc(sum(map(len, prompts)) * s.n)
            if s.stream:
                return await self._stream(request, subs, ticket, lambda n, e: chunk(head, n, e), start,
                                          s.include_usage, {**head, "choices": []})
            results = await self._run_whole(subs, ticket)
        finally:
            ticket.close()
        completion = sum(e.completion_tokens for e in results)
        self.metrics.latency.observe(time.perf_counter() - start)
        self.metrics.requests.labels("ok").inc()
        self.metrics.tokens.labels("completion").inc(completion)
        return web.json_response({**head, **answer(head, subs, results),
                                  "usage": self.shapes.usage(sum(map(len, prompts)), completion)})

    # -- completions -------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        data = await self._json(request)
        body = api.parse_completion(data, self.limits)
        self._check_model(data)

        def chunk(head: dict, index: int, event: Event) -> dict:
            return {**head, "choices": [self.shapes.completion_choice(index, event, None, body.logprobs)]}

        def answer(head: dict, subs: list[Request], results: list[Event]) -> dict:
            return {"choices": [self.shapes.completion_choice(
                n, e, self.tokenizer.decode(list(subs[n].prompt_ids)) if body.echo else None, body.logprobs)
                for n, e in enumerate(results)]}

        return await self._generate(request, body.prompts, body.sampling, body.logprobs, body.echo,
                                    "text_completion", chunk, answer)

    # -- chat --------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        data = await self._json(request)
        body = api.parse_chat(data, self.limits)
        self._check_model(data)
        started: set[int] = set()

        def logprobs(event: Event):
            return None if body.logprobs is None else self.shapes.chat_logprobs(event.logprobs or [])

        def chunk(head: dict, index: int, event: Event) -> dict:
            delta = {"content": event.text}
            if index not in started:
                started.add(index)
                delta = {"role": "assistant", **delta}
            return {**head, "choices": [{"index": index, "delta": delta, "finish_reason": event.finish_reason,
                                         "logprobs": logprobs(event)}]}

        def answer(head: dict, subs: list[Request], results: list[Event]) -> dict:
            return {"object": "chat.completion", "choices": [
                {"index": n, "message": {"role": "assistant", "content": e.text}, "finish_reason": e.finish_reason,
                 "logprobs": logprobs(e)} for n, e in enumerate(results)]}

        return await self._generate(request, [body.text], body.sampling, body.logprobs, False,
                                    "chat.completion.chunk", chunk, answer)

    # -- streams -----------------------------------------------------------------------------
    async def _stream(self, request: web.Request, subs: list[Request], ticket: Ticket, chunk, start: float,
                      include_usage: bool, usage_head: dict) -> web.StreamResponse:
        """Server-sent events: a chunk per step per sequence, then ``data: [DONE]``, always: a
        failed sequence or the request timeout sends an error chunk first."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(n: int, sub: Request) -> None:
            try:
                async with contextlib.aclosing(self.pool.stream(sub, ticket)) as events:
                    async for event in events:
                        queue.put_nowait((n, event))
            except ReplicaLost as exc:
                queue.put_nowait((n, Event(sub.id, "", [], "error", error=str(exc))))
            finally:
                queue.put_nowait((n, None))

        tasks = [asyncio.create_task(pump(n, s)) for n, s in enumerate(subs)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.inference.request_timeout_s
        open_, completion, outcome = len(subs), 0, "ok"
        try:
            while open_:
                try:
                    n, event = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    outcome = "timeout"
                    await resp.write(b"data: " + json.dumps(api.error_body(
                        "request", f"not finished within inference.request_timeout_s="
                                   f"{self.cfg.inference.request_timeout_s} s", "server_error")).encode() + b"\n\n")
                    break
                if event is None:
                    open_ -= 1
                    continue
                if event.error:
                    outcome = "failed"
                    payload = api.error_body("request", event.error, "server_error")
                else:
                    completion += len(event.token_ids)
                    payload = chunk(n, event)
                await resp.write(f"data: {json.dumps(payload)}\n\n".encode())
            if include_usage:
                usage = self.shapes.usage(sum(len(s.prompt_ids) for s in subs), completion)
                await resp.write(f"data: {json.dumps({**usage_head, 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            outcome = "disconnected"
            raise
        finally:
            for t in tasks:
                t.cancel()  # what is still running is cancelled in its replica
            self.metrics.requests.labels(outcome).inc()
            self.metrics.tokens.labels("completion").inc(completion)
            self.metrics.latency.observe(time.perf_counter() - start)
        return resp


def build(cfg: ServeConfig, replica_cls=None) -> Server:
    """Starts the pool's replicas (on the connected Ray cluster) and returns the server for them.
    ``replica_cls``: a subclass of replica.Replica (tests)."""
    from tokenizers import Tokenizer

    from orchestrator import pretrained
    from orchestrator.tokens import EOS
    from orchestrator.inference.weights import expected_shapes
    from orchestrator.models import Llama, llama_args

    pre = pretrained.locate(cfg.checkpoint)
    import torch

    shape = llama_args(pre.arch)
    with torch.device("meta"):
        expected = expected_shapes(Llama(shape))
    pool = Pool(cfg, expected, replica_cls)
    try:
        pool.wait_ready()
    except BaseException:
        pool.shutdown()
        raise
    name = cfg.inference.model_name or cfg.checkpoint
    return Server(cfg, pool, Tokenizer.from_file(pre.tokenizer_path), shape.max_seq_len, name, EOS)


class Background:
    """A server on its own event loop thread (tests, benchmarks): ``url``, ``stop()``."""

    def __init__(self, server: Server):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(server.app, access_log=None, handler_cancellation=True)
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

    def call(self, coro, timeout_s: float | None = 300):
        """Runs a coroutine on the server's loop (e.g. pool.load_weights) and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.server.pool.shutdown()
