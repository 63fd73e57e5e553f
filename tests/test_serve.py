"""The inference pool: greedy output equals the plain model's (with n and logprobs too), bad
input gets a 4xx naming the field, the queue limit answers 429, a request that fails in the
engine fails alone, a dead replica is replaced while requests complete and serves the latest
published weights, a weight sync during traffic switches greedy output to the new weights, and
a sync that does not match the model changes nothing."""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import torch

from orchestrator.config import compose as compose_job
from orchestrator.errors import ConfigError
from orchestrator.inference.client import Client, ServerError
from orchestrator.inference.config import compose
from orchestrator.inference.replica import load_model
from orchestrator.inference.server import Background, build
from orchestrator.inference.types import Request
from orchestrator.inference.weights import DirectPublisher, WeightMismatch, publish
from orchestrator.job import run_job
from orchestrator.models.generate import sample
from tests.conftest import parity_overrides
from tests.serving import PROMPTS, logprobs_of, on_replica, perturbed, reference, replica_pids, replica_stats


@pytest.fixture(scope="module")
def server(serve_source):
    bg = Background(build(compose([f"checkpoint={serve_source}", "inference.replicas=2", "inference.port=0",
                                   "inference.max_tokens_limit=64", "inference.queue_limit=12",
                                   "inference.block_size=8", "inference.kv_cache_tokens=512"])))
    yield bg
    bg.stop()


def test_greedy_equals_plain_model_under_concurrency(server, serve_source):
    model, tok, eos = load_model(str(serve_source))
    client = Client(server.url)
    with ThreadPoolExecutor(len(PROMPTS)) as ex:  # together, so that replicas batch them
        got = list(ex.map(lambda p: client.complete(p, max_tokens=24, temperature=0), PROMPTS))
    for prompt, response in zip(PROMPTS, got):
        assert response["choices"][0]["text"] == reference(model, tok, eos, prompt, 24), prompt
    assert len({r["choices"][0]["text"] for r in got}) > 1  # the continuations differ: a real check
    # A list of prompts and a stream give the same greedy text.
    batch = client.complete(PROMPTS[:2], max_tokens=24, temperature=0)
    assert [c["text"] for c in batch["choices"]] == [g["choices"][0]["text"] for g in got[:2]]
    assert "".join(client.stream(PROMPTS[0], max_tokens=24, temperature=0)) == got[0]["choices"][0]["text"]
    # Sampling is reproducible for a seed; stop strings cut the text.
    a = client.complete(PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = client.complete(PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    text = got[0]["choices"][0]["text"]
    stop = text[3:5]
    cut = client.complete(PROMPTS[0], max_tokens=24, temperature=0, stop=stop)["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"


def test_bad_input_is_a_4xx_naming_the_field(server):
    client = Client(server.url)
    cases = [
        (b"{not json", "body"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 65}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ({"prompt": "word " * 400}, "prompt"),  # longer than the context
        ({"prompt": []}, "prompt"),
    ]
    for payload, field in cases:
        with pytest.raises(ServerError) as err:
            client.post("/v1/completions", payload)
        assert err.value.status == 400 and err.value.param == field, (payload, err.value)
    assert client.health()["status"] == "ok"
    assert client.complete("ROMEO:", max_tokens=2)["choices"][0]["finish_reason"] == "length"


def test_queue_limit_answers_429(server):
    client = Client(server.url)
    statuses = []

    def one(_):
        try:
            client.complete(PROMPTS[0], max_tokens=64, temperature=0)
            return 200
        except ServerError as exc:
            return exc.status

    with ThreadPoolExecutor(24) as ex:
        statuses = list(ex.map(one, range(24)))
    assert 429 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 429}
    metrics = client.metrics()
    assert 'forgeline_serve_requests_total{status="rejected"}' in metrics
    assert "forgeline_serve_request_latency_seconds_bucket" in metrics
    assert client.complete(PROMPTS[0], max_tokens=2)["choices"]  # still serving


def test_bearer_token(server, serve_source):
    client = Client(server.url)
    server.server.cfg.inference.token = "s3cret"
    try:
        with pytest.raises(ServerError) as err:
            client.complete("ROMEO:", max_tokens=2)
        assert err.value.status == 401
        assert Client(server.url, token="s3cret").complete("ROMEO:", max_tokens=2)["choices"]
        assert client.health()["status"] == "ok"  # health needs no token
    finally:
        server.server.cfg.inference.token = None
    with pytest.raises(ConfigError) as err:
        compose([f"checkpoint={serve_source}", "inference.host=0.0.0.0"])
    assert err.value.key == "inference.token"


def test_n_and_logprobs_keep_greedy_output_and_match_the_model(server, serve_source):
    """n greedy samples are all the plain model's text; logprobs (with echo: the prompt's too) are
    the model's own log-softmax, and top-k lists its most likely tokens."""
    model, tok, eos = load_model(str(serve_source))
    client = Client(server.url)
    want = reference(model, tok, eos, PROMPTS[1], 12)
    got = client.complete(PROMPTS[1], max_tokens=12, temperature=0, n=3)
    assert [c["text"] for c in got["choices"]] == [want] * 3 and [c["index"] for c in got["choices"]] == [0, 1, 2]
    got = client.complete(PROMPTS[1], max_tokens=12, temperature=0, logprobs=3, echo=True)["choices"][0]
    prompt_ids = tok.encode(PROMPTS[1]).ids
    assert got["text"] == PROMPTS[1] + want
    lp = got["logprobs"]
    ids = prompt_ids + sample(model, prompt_ids, 12, model.args.max_seq_len, temperature=0, stop_id=eos)
    direct = logprobs_of(model, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(ids) and lp["tokens"] == [tok.decode([t]) for t in ids]
    for j in range(1, len(ids)):
        assert abs(lp["token_logprobs"][j] - float(direct[j - 1, ids[j]])) < 1e-4, j
        top = direct[j - 1].topk(3)
        assert max(lp["top_logprobs"][j].values()) == pytest.approx(float(top.values[0]), abs=1e-4)
    # Token-id prompts and max_tokens=0 with echo (how lm-eval scores a continuation).
    scored = client.post("/v1/completions", {"prompt": [prompt_ids], "max_tokens": 0, "echo": True, "logprobs": 0})
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:len(prompt_ids)])
    assert scored["usage"]["completion_tokens"] == 0


def test_a_request_that_fails_in_the_engine_fails_alone(server, serve_source):
    """Values that once killed a replica (a denormal temperature or top_p) are served; a request the
    engine cannot run (sent past the HTTP checks) fails with an error naming the cause while a
    request beside it completes; no replica restarts."""
    model, tok, eos = load_model(str(serve_source))
    client = Client(server.url)
    pool = server.server.pool
    pids, replaced = replica_pids(server), pool.replaced
    want = reference(model, tok, eos, PROMPTS[0], 12)
    for options in ({"temperature": 5e-324}, {"temperature": 1.0, "top_p": 5e-324}, {"temperature": 2.2250738585072014e-308}):
        assert client.complete(PROMPTS[0], max_tokens=12, **options)["choices"][0]["text"] == want, options
    slot = pool.slots[0]
    bad = Request("poison", (10**9,), 4)
    good = Request("good", tuple(tok.encode(PROMPTS[0]).ids), 12)
    with ThreadPoolExecutor(2) as ex:
        bad_f, good_f = ex.submit(on_replica, server, slot, bad), ex.submit(on_replica, server, slot, good)
        failed, ok = bad_f.result(60), good_f.result(60)
    assert failed.finish_reason == "error" and "prompt" in failed.error, failed
    assert ok.text == want and ok.error is None
    assert replica_pids(server) == pids and pool.replaced == replaced
    assert all(s.free_blocks == s.total_blocks for s in replica_stats(server))


def test_dead_replica_is_replaced_and_requests_complete(server, serve_source):
    model, tok, eos = load_model(str(serve_source))
    client = Client(server.url)
    pool = server.server.pool
    results: list = [None] * 6
    started = threading.Event()

    def one(i):
        started.set()
        results[i] = client.complete(PROMPTS[i % len(PROMPTS)], max_tokens=48, temperature=0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    started.wait()
    victim = pool.slots[0]
    while victim.inflight == 0 and any(t.is_alive() for t in threads):
        pass
    ray.kill(victim.handle, no_restart=True)
    for t in threads:
        t.join(120)
    for i, r in enumerate(results):
        assert r is not None and r["choices"][0]["text"] == reference(model, tok, eos, PROMPTS[i % len(PROMPTS)], 48)
    assert pool.replaced >= 1
    assert client.health()["replicas"] == 2
    assert client.complete(PROMPTS[0], max_tokens=4, temperature=0)["choices"]


def test_a_replacement_replica_serves_the_latest_published_weights(server, serve_source):
    model, tok, eos = load_model(str(serve_source))
    client = Client(server.url)
    pool = server.server.pool
    new = perturbed(model, 5)
    result = server.call(pool.load_weights(new))
    assert result.replicas == 2 and not result.failed
    model.load_state_dict(new)
    want = reference(model, tok, eos, PROMPTS[2], 16)
    replaced = pool.replaced
    ray.kill(pool.slots[1].handle, no_restart=True)
    deadline = time.monotonic() + 60
    while pool.replaced == replaced and time.monotonic() < deadline:  # requests, or the watch, find it
        assert client.complete(PROMPTS[2], max_tokens=16, temperature=0)["choices"][0]["text"] == want
        time.sleep(0.2)
    assert pool.replaced == replaced + 1
    ray.get(pool.slots[1].ready, timeout=120)
    fresh = on_replica(server, pool.slots[1], Request("fresh", tuple(tok.encode(PROMPTS[2]).ids), 16))
    assert fresh.text == want
    assert [s.weights_version for s in replica_stats(server)] == [result.version] * 2


def test_a_weight_sync_that_does_not_match_changes_nothing(server, serve_source):
    """Names and shapes are checked before any tensor is copied: a sync with one mis-shaped layer
    (late in the order), an unknown name or a missing one is refused by the pool and by a
    replica sent it directly, and every replica serves what it served."""
    model, tok, eos = load_model(str(serve_source))
    client = Client(server.url)
    pool = server.server.pool
    before = [client.complete(p, max_tokens=16, temperature=0)["choices"][0]["text"] for p in PROMPTS[:3]]
    new = perturbed(model, 6)
    last = [k for k in new if k.endswith("w_down.weight")][-1]
    bad_shape = {**new, last: new[last][:, :-1]}
    unknown = {**new, "layers.99.attn.wq.weight": new[last]}
    missing = {k: v for k, v in new.items() if k != last}
    for weights, words in ((bad_shape, "shape"), (unknown, "unknown"), (missing, "missing")):
        with pytest.raises(WeightMismatch, match=words):
            server.call(pool.load_weights(weights))
        with pytest.raises(WeightMismatch, match=words):
            ray.get(pool.slots[0].handle.load_weights.remote(weights, 0))
    after = [client.complete(p, max_tokens=16, temperature=0)["choices"][0]["text"] for p in PROMPTS[:3]]
    assert after == before
    with pytest.raises(ConfigError) as err:  # 3 blocks of 40 tokens cannot hold the context of 128
        compose([f"checkpoint={serve_source}", "inference.block_size=40", "inference.kv_cache_tokens=130"])
    assert err.value.key == "inference.kv_cache_tokens" and "inference.block_size=40" in err.value.message
    assert "max_seq_len=128" in err.value.message


def test_weight_sync_during_traffic(server, serve_source):
    model, tok, eos = load_model(str(serve_source))
    client = Client(server.url)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) if v.ndim == 2 else v
           for k, v in model.state_dict().items()}
    stop = threading.Event()
    errors: list = []

    def traffic():
        while not stop.is_set():
            try:
                client.complete(PROMPTS[1], max_tokens=32, temperature=0)
            except Exception as exc:  # a dropped request fails the test
                errors.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    server.call(server.server.pool.load_weights(new))
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    model.load_state_dict(new)
    for prompt in PROMPTS[:3]:
        got = client.complete(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
        assert got == reference(model, tok, eos, prompt, 24)
    assert json.loads(json.dumps(client.health()))["replicas"] == 2


def publish_during_traffic(publisher, client, model, tok, eos, seed: int):
    """Publishes perturbed weights with 3 requests in flight (each must finish), then checks
    greedy output against the new weights (which ``model`` then holds); returns the result."""
    new = perturbed(model, seed)
    with ThreadPoolExecutor(3) as ex:
        busy = [ex.submit(client.complete, PROMPTS[1], max_tokens=32, temperature=0) for _ in range(3)]
        result = publisher.publish(new)
        assert all(f.result()["choices"][0]["finish_reason"] for f in busy)
    assert result.replicas == 2 and not result.failed, result
    model.load_state_dict(new)
    for prompt in PROMPTS[:3]:
        assert client.complete(prompt, max_tokens=16, temperature=0)["choices"][0]["text"] == reference(
            model, tok, eos, prompt, 16)
    return result


def test_direct_weight_sync_during_traffic_and_after_a_replacement(server, serve_source):
    """The direct path, replicas on the publisher's node (two buffers in shared memory that the
    replicas serve from in turn): with requests in flight, then again over the same buffers
    (each replica serving from the other one), then after a replica was replaced (new buffers;
    the replacement first loads the weights from a replica that holds them); outputs match the
    new weights each time. The buffers' files are gone once mapped."""
    model, tok, eos = load_model(str(serve_source))
    client = Client(server.url)
    pool = server.server.pool
    publisher = DirectPublisher("default")
    for seed in (11, 12):
        assert publish_during_traffic(publisher, client, model, tok, eos, seed).shared_memory == 2
    assert publisher.pg is None and not list(Path("/dev/shm").glob(f"forgeline-sync-{os.getpid()}-*"))
    group = publisher.session
    # Another publish through the store in between: the direct publisher's early send is labelled
    # with a version the store no longer gives next, so it publishes again by the store's plan.
    stored = publish("default", perturbed(model, 15))
    again = perturbed(model, 14)
    result = publisher.publish(again)
    assert result.replicas == 2 and result.version == stored.version + 1 and publisher.session == group
    assert [ray.get(slot.handle.stats.remote()).weights_version for slot in pool.slots] == [result.version] * 2
    model.load_state_dict(again)
    replaced = pool.replaced
    ray.kill(pool.slots[0].handle, no_restart=True)
    deadline = time.monotonic() + 60
    while pool.replaced == replaced and time.monotonic() < deadline:
        time.sleep(0.2)
    ray.get(pool.slots[0].ready, timeout=120)
    want = reference(model, tok, eos, PROMPTS[4], 16)  # the replacement serves the latest weights
    assert on_replica(server, pool.slots[0], Request("r", tuple(tok.encode(PROMPTS[4]).ids), 16)).text == want
    newest = perturbed(model, 13)
    result = publisher.publish(newest)
    assert result.replicas == 2 and publisher.session != group
    model.load_state_dict(newest)
    assert client.complete(PROMPTS[4], max_tokens=16, temperature=0)["choices"][0]["text"] == reference(
        model, tok, eos, PROMPTS[4], 16)


def test_direct_weight_sync_through_the_group(server, serve_source):
    """Without shared memory (what replicas on other nodes get): a gloo group of the publisher
    and the replicas, one broadcast into each replica's spare buffer, with requests in flight;
    twice over the same group."""
    model, tok, eos = load_model(str(serve_source))
    client = Client(server.url)
    publisher = DirectPublisher("default", shared_memory=False)
    for seed in (21, 22):
        assert publish_during_traffic(publisher, client, model, tok, eos, seed).shared_memory == 0
        assert publisher.pg is not None


@pytest.mark.parametrize("strategy", ["strategy=zero3", "strategy=tp"])
def test_training_job_publishes_weights_to_the_pool(server, tmp_path, data_cache, serve_source, strategy):
    """A job on the pool's Ray cluster syncs every 2 steps, each rank writing the pieces it holds
    (ZeRO-3's fp32 partitions, tensor-parallel shards) into the shared buffers, nothing gathered;
    afterwards the pool serves its weights."""
    summary = run_job(compose_job(parity_overrides(tmp_path, data_cache, strategy, "cluster.num_workers=2",
                                                   "trainer.max_steps=4", f"model.init_from={serve_source}",
                                                   "inference.sync_every=2", "inference.pool=default")))
    assert summary["status"] == "succeeded", summary["error"]
    sync = summary["inference"]
    assert sync["replicas_per_step"] == [None, 2.0, None, 2.0]
    assert sync["sync_from_shards_per_step"] == [None, 1.0, None, 1.0]
    assert sync["sync_s"] > 0 and sync["copy_s"] > 0
    model, tok, eos = load_model(str(tmp_path))  # the job's final checkpoint: the weights of step 4
    client = Client(server.url)
    for prompt in PROMPTS[:2]:
        assert client.complete(prompt, max_tokens=16, temperature=0)["choices"][0]["text"] == reference(
            model, tok, eos, prompt, 16)


def test_tensor_parallel_replica(serve_source):
    """inference.tp=2: one replica over two ranks (heads and MLP split, partial outputs
    all-reduced) gives the plain model's greedy text, and takes a weight sync during traffic."""
    with pytest.raises(ConfigError) as err:  # the tiny model: 4 heads, 2 KV heads, ffn_dim 172
        compose([f"checkpoint={serve_source}", "inference.tp=3"])
    assert err.value.key == "inference.tp" and "n_heads=4" in err.value.message and "ffn_dim=172" in err.value.message
    with pytest.raises(ConfigError, match="quantize"):
        compose([f"checkpoint={serve_source}", "inference.tp=2", "inference.quantize=int8"])

    bg = Background(build(compose([f"checkpoint={serve_source}", "inference.tp=2", "inference.name=tp", "inference.port=0",
                                   "inference.block_size=8", "inference.kv_cache_tokens=512"])))
    try:
        model, tok, eos = load_model(str(serve_source))
        client = Client(bg.url)
        with ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda p: client.complete(p, max_tokens=24, temperature=0)["choices"][0]["text"],
                              PROMPTS[:3]))
        assert got == [reference(model, tok, eos, p, 24) for p in PROMPTS[:3]]
        a = client.complete(PROMPTS[1], max_tokens=16, temperature=1.0, seed=3)["choices"][0]["text"]
        assert a == client.complete(PROMPTS[1], max_tokens=16, temperature=1.0, seed=3)["choices"][0]["text"]

        new = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) if v.ndim == 2 else v
               for k, v in model.state_dict().items()}
        with ThreadPoolExecutor(2) as ex:  # requests in flight while the ranks swap weights
            busy = [ex.submit(client.complete, PROMPTS[1], max_tokens=32, temperature=0) for _ in range(2)]
            result = DirectPublisher("tp").publish(new)  # tensor-parallel: through the store instead
            assert result.replicas == 1 and not result.failed
            assert all(f.result()["choices"][0]["finish_reason"] for f in busy)
        model.load_state_dict(new)
        for prompt in PROMPTS[:2]:
            got = client.complete(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
            assert got == reference(model, tok, eos, prompt, 24)
    finally:
        bg.stop()


def test_a_batched_forward_that_fails_is_retried_per_request(serve_source):
    """The engine alone (no Ray): when a batched decode raises because of one sequence, each
    sequence runs alone; only that one fails and the others give the plain model's text."""
    from orchestrator.inference.engine import GenerationEngine

    model, tok, eos = load_model(str(serve_source))
    engine = GenerationEngine(model, tok, eos, block_size=8, num_blocks=64)
    forward = engine._forward_cached

    def failing(seqs):
        if any(s.request.id == "bad" for s in seqs):
            raise RuntimeError("a fault of this sequence")
        return forward(seqs)

    engine._forward_cached = failing
    for rid, prompt in (("a", PROMPTS[0]), ("bad", PROMPTS[1]), ("b", PROMPTS[2])):
        engine.add(Request(rid, tuple(tok.encode(prompt).ids), 10))
    engine.add(Request("refused", (0,), 4, temperature=float("nan")))
    text: dict[str, str] = {}
    errors: dict[str, str] = {}
    while engine.busy:
        for event in engine.step():
            text[event.id] = text.get(event.id, "") + event.text
            if event.error:
                errors[event.id] = event.error
    assert set(errors) == {"bad", "refused"} and "a fault of this sequence" in errors["bad"]
    assert "temperature" in errors["refused"]
    assert text["a"] == reference(model, tok, eos, PROMPTS[0], 10)
    assert text["b"] == reference(model, tok, eos, PROMPTS[2], 10)
    assert engine.pool.n_free == engine.pool.total and engine.stats().failed_requests == 2
