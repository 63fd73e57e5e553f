"""The inference pool: greedy output equals the plain model's, bad input gets a 4xx naming the
field, the queue limit answers 429, a dead replica is replaced while requests complete, and a
weight sync during traffic switches greedy output to the new weights."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from orchestrator.config import compose as compose_job
from orchestrator.errors import ConfigError
from orchestrator.inference.client import Client, ServerError
from orchestrator.inference.config import compose
from orchestrator.inference.replica import load_model
from orchestrator.inference.server import Background, build
from orchestrator.job import run_job
from orchestrator.models.generate import sample
from tests.conftest import parity_overrides, single_run

PROMPTS = ["ROMEO:", "First Citizen:\nWe are", "O", "KING HENRY", "What say you, my lord? I"]


@pytest.fixture(scope="module")
def source(ray_cluster, tmp_path_factory, data_cache):
    """A checkpoint whose greedy continuations vary (weights drawn wide, two steps)."""
    return single_run(tmp_path_factory, data_cache, "serve-source", "trainer.max_steps=2", "model.init_std=0.3")[0]


@pytest.fixture(scope="module")
def server(source):
    bg = Background(build(compose([f"checkpoint={source}", "inference.replicas=2", "inference.port=0",
                                   "inference.max_tokens_limit=64", "inference.queue_limit=12",
                                   "inference.block_size=8", "inference.kv_cache_tokens=512"])))
    yield bg
    bg.stop()


def reference(model, tok, eos, prompt: str, n: int) -> str:
    ids = sample(model, tok.encode(prompt).ids, n, model.args.max_seq_len, temperature=0, stop_id=eos)
    return tok.decode(ids)


def test_greedy_equals_plain_model_under_concurrency(server, source):
    model, tok, eos = load_model(str(source))
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


def test_bearer_token(server, source):
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
        compose([f"checkpoint={source}", "inference.host=0.0.0.0"])
    assert err.value.key == "inference.token"


def test_dead_replica_is_replaced_and_requests_complete(server, source):
    model, tok, eos = load_model(str(source))
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


def test_weight_sync_during_traffic(server, source):
    model, tok, eos = load_model(str(source))
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


def test_training_job_publishes_weights_to_the_pool(server, tmp_path, data_cache, source):
    """A job on the pool's Ray cluster syncs every 2 steps; afterwards the pool serves its weights."""
    summary = run_job(compose_job(parity_overrides(tmp_path, data_cache, "strategy=ddp", "cluster.num_workers=2",
                                                   "trainer.max_steps=4", f"model.init_from={source}",
                                                   "inference.sync_every=2", "inference.pool=default")))
    assert summary["status"] == "succeeded", summary["error"]
    sync = summary["inference"]
    assert sync["replicas_per_step"] == [None, 2.0, None, 2.0]
    assert sync["sync_s"] > 0 and sync["copy_s"] > 0
    model, tok, eos = load_model(str(tmp_path))  # the job's final checkpoint: the weights of step 4
    client = Client(server.url)
    for prompt in PROMPTS[:2]:
        assert client.complete(prompt, max_tokens=16, temperature=0)["choices"][0]["text"] == reference(
            model, tok, eos, prompt, 16)


def test_tensor_parallel_replica(source):
    """inference.tp=2: one replica over two ranks (heads and MLP split, partial outputs
    all-reduced) gives the plain model's greedy text, and takes a weight sync during traffic."""
    with pytest.raises(ConfigError) as err:  # the tiny model: 4 heads, 2 KV heads, ffn_dim 172
        compose([f"checkpoint={source}", "inference.tp=3"])
    assert err.value.key == "inference.tp" and "n_heads=4" in err.value.message and "ffn_dim=172" in err.value.message
    with pytest.raises(ConfigError, match="quantize"):
        compose([f"checkpoint={source}", "inference.tp=2", "inference.quantize=int8"])

    bg = Background(build(compose([f"checkpoint={source}", "inference.tp=2", "inference.name=tp", "inference.port=0",
                                   "inference.block_size=8", "inference.kv_cache_tokens=512"])))
    try:
        model, tok, eos = load_model(str(source))
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
            bg.call(bg.server.pool.load_weights(new))
            assert all(f.result()["choices"][0]["finish_reason"] for f in busy)
        model.load_state_dict(new)
        for prompt in PROMPTS[:2]:
            got = client.complete(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
            assert got == reference(model, tok, eos, prompt, 24)
    finally:
        bg.stop()
