"""The pool's API with real clients (the official `openai` package, lm-evaluation-harness), a
fuzz of every endpoint, and what ends a request early: a client that disconnects and the
request timeout, streams included, each freeing the replica's KV blocks at once."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray

from orchestrator.inference.client import Client, ServerError
from orchestrator.inference.config import compose
from orchestrator.inference.replica import Replica, load_model
from orchestrator.inference.server import Background, build
from orchestrator.models.generate import sample
from tests.serving import PROMPTS, logprobs_of, reference, replica_pids, replica_stats

MODEL = "tiny-serve"
TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def served(serve_source):
    """(server, model, tokenizer, eos id)."""
    bg = Background(build(compose([f"checkpoint={serve_source}", "inference.replicas=2", "inference.port=0",
                                   f"inference.model_name={MODEL}", "inference.max_tokens_limit=32",
                                   "inference.block_size=8", "inference.kv_cache_tokens=512",
                                   "inference.queue_limit=64", "inference.max_sequences_per_request=8"])))
    model, tok, eos = load_model(str(serve_source))
    yield bg, model, tok, eos
    bg.stop()


class SlowReplica(Replica):
    """A replica whose engine steps take at least 25 ms each, so that a request is still running
    when the test disconnects or its timeout passes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        step = self.engine.step

        def slow():
            time.sleep(0.025)
            return step()

        self.engine.step = slow


@pytest.fixture(scope="module")
def slow(serve_source):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replica class travels by value
    bg = Background(build(compose([f"checkpoint={serve_source}", "inference.name=slow", "inference.port=0",
                                   "inference.max_tokens_limit=100", "inference.block_size=8",
                                   "inference.kv_cache_tokens=512"]), replica_cls=SlowReplica))
    yield bg
    bg.stop()


def chat_text(model, tok, eos, messages: list[dict], n: int) -> str:
    rendered = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    return tok.decode(sample(model, tok.encode(rendered).ids, n, model.args.max_seq_len, temperature=0, stop_id=eos))


def test_the_openai_client(served):
    from openai import BadRequestError, NotFoundError, OpenAI

    bg, model, tok, eos = served
    c = OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in c.models.list().data] == [MODEL]
    want = reference(model, tok, eos, PROMPTS[0], 16)
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(tok.encode(PROMPTS[0]).ids)
    streamed = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == want
    # logprobs with echo: the prompt's positions too, the first without one.
    r = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    ids = tok.encode(PROMPTS[1]).ids
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 4
    direct = logprobs_of(model, ids)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([float(direct[j - 1, ids[j]]) for j in range(1, len(ids))],
                                                          abs=1e-4)
    assert r.choices[0].text.startswith(PROMPTS[1])
    # Chat: the SFT chat template, streamed or whole, with logprobs.
    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]
    want = chat_text(model, tok, eos, messages, 16)
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, logprobs=True,
                                  top_logprobs=2)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in r.choices[0].logprobs.content)
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # n samples, reproducible with a seed.
    a = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=3, seed=11)
    b = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=3, seed=11)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 3
    with pytest.raises(NotFoundError):
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(BadRequestError, match="temperature"):
        c.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=3)


def test_lm_evaluation_harness(served, tmp_path):
    """lm-eval's local-completions model with the server's own tokenizer (/tokenize), on a
    multiple-choice task (loglikelihoods through echo and logprobs) and a generate_until task
    shipped in tests/lm_eval_tasks: every row's answer and the accuracy equal what the model's
    logits give directly."""
    bg, model, tok, eos = served
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = f"base_url={bg.url}/v1/completions,model={MODEL},tokenizer_backend=remote," \
           f"max_length={model.args.max_seq_len},num_concurrent=2,max_retries=1"
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
                           "--tasks", "forgeline_mc,forgeline_gen", "--include_path", str(TASKS),
                           "--output_path", str(tmp_path), "--log_samples"],
                          cwd=TASKS, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]
    samples = {task: [json.loads(line) for line in next(tmp_path.rglob(f"samples_{task}_*.jsonl")).open()]
               for task in ("forgeline_mc", "forgeline_gen")}
    assert len(samples["forgeline_mc"]) == 12 and len(samples["forgeline_gen"]) == 10

    def loglikelihood(context: str, continuation: str) -> float:
        whole = tok.encode(context + continuation).ids  # lm-eval's split: the context's tokens, then the rest
        n_ctx = len(tok.encode(context).ids)
        lp = logprobs_of(model, whole)
        return sum(float(lp[j - 1, whole[j]]) for j in range(n_ctx, len(whole)))

    correct = []
    for s in sorted(samples["forgeline_mc"], key=lambda s: s["doc_id"]):
        doc = s["doc"]
        direct = [loglikelihood(doc["context"], " " + c) for c in doc["choices"]]
        served_ll = [float(r[0][0]) for r in s["resps"]]
        assert served_ll == pytest.approx(direct, abs=1e-3), doc
        correct.append(float(max(range(len(direct)), key=direct.__getitem__) == doc["label"]))
        assert s["acc"] == correct[-1]
    assert results["forgeline_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    matches = []
    for s in sorted(samples["forgeline_gen"], key=lambda s: s["doc_id"]):
        text = reference(model, tok, eos, s["doc"]["prompt"], 12).split("\n")[0]
        assert s["filtered_resps"][0] == text, s["doc"]
        matches.append(float(text == s["doc"]["target"]))
    assert results["forgeline_gen"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
    assert len({r[0] for s in samples["forgeline_gen"] for r in [s["filtered_resps"]]}) > 1  # answers differ


def test_openapi_document_and_tokenizer_endpoints(served):
    bg, model, tok, eos = served
    c = Client(bg.url)
    doc = c.get("/openapi.json")
    assert doc["openapi"].startswith("3.") and {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                                                 "/detokenize"} <= set(doc["paths"])
    ids = c.post("/tokenize", {"prompt": PROMPTS[1]})["tokens"]
    assert ids == tok.encode(PROMPTS[1]).ids
    assert c.post("/detokenize", {"tokens": ids})["prompt"] == PROMPTS[1]


# -- fuzz ---------------------------------------------------------------------------------------
def request_strategies(vocab: int):
    from hypothesis import strategies as st

    anything = st.recursive(
        st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats(allow_nan=False, allow_infinity=False)
        | st.sampled_from([5e-324, 2.2250738585072014e-308, 1e308, -0.0, 1e-320]) | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8)
    ids = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12)
    text = st.text(min_size=1, max_size=40)
    valid = {
        "prompt": st.one_of(text, st.lists(text, min_size=1, max_size=3), ids, st.lists(ids, min_size=1, max_size=2)),
        "max_tokens": st.integers(1, 6), "temperature": st.one_of(st.just(0), st.floats(0, 2)),
        "top_p": st.one_of(st.just(1.0), st.floats(1e-300, 1.0)), "n": st.integers(1, 2),
        "stop": st.one_of(st.none(), text, st.lists(st.text(min_size=1, max_size=5), max_size=4)),
        "seed": st.integers(0, 2**63 - 1), "logprobs": st.one_of(st.none(), st.integers(0, 5)),
        "echo": st.booleans(), "stream": st.booleans(), "model": st.just(MODEL), "user": st.text(max_size=8),
    }

    def body(fields: dict, extra_keys: list[str]):
        def field(name):
            return st.one_of(valid[name], valid[name], valid[name], anything) if name in valid else anything
        keys = st.lists(st.sampled_from(sorted(fields) + extra_keys), unique=True, max_size=len(fields) + 1)
        return keys.flatmap(lambda ks: st.fixed_dictionaries({k: field(k) for k in ks}))

    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                     "content": st.one_of(st.text(max_size=30), anything)})
    chat_valid = dict(valid, messages=st.lists(message, min_size=1, max_size=3), logprobs=st.booleans(),
                      top_logprobs=st.integers(0, 5))
    valid_chat = {k: chat_valid[k] for k in ("messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                                              "stream", "model", "logprobs", "top_logprobs")}

    def chat_body():
        def field(name):
            return st.one_of(valid_chat[name], valid_chat[name], anything) if name in valid_chat else anything
        keys = st.lists(st.sampled_from(sorted(valid_chat) + ["bogus"]), unique=True, max_size=6)
        return keys.flatmap(lambda ks: st.fixed_dictionaries({"messages": valid_chat["messages"],
                                                               **{k: field(k) for k in ks if k != "messages"}}))

    completion = st.fixed_dictionaries({"prompt": valid["prompt"]}).flatmap(
        lambda base: body({k: v for k, v in valid.items()}, ["bogus", "suffix", "best_of", "logit_bias",
                                                             "presence_penalty"]).map(lambda b: {**base, **b}))
    raw = st.sampled_from([b"", b"{", b"[]", b'"x"', b"null", b'{"prompt": NaN}', b'{"prompt": "a", "temperature": NaN}',
                           b'{"prompt": "a", "temperature": Infinity}', b'{"prompt": "a", "top_p": -Infinity}',
                           b'{"prompt": "a", "max_tokens": 1e999}', b'{"prompt": "a", "seed": 1' + b"0" * 4400 + b"}",
                           b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}", b"\xff\xfe{}",
                           b'{"prompt": "\\ud800"}', b'{"prompt": [[]]}', b'{"prompt": [1.5]}', b'{"prompt": [true]}'])
    return st.one_of(
        completion.map(lambda b: ("/v1/completions", json.dumps(b).encode())),
        completion.map(lambda b: ("/v1/completions", json.dumps(b).encode())),
        chat_body().map(lambda b: ("/v1/chat/completions", json.dumps(b).encode())),
        anything.map(lambda b: ("/v1/completions", json.dumps(b).encode())),
        body({"prompt": st.text()}, ["add_special_tokens"]).map(lambda b: ("/tokenize", json.dumps(b).encode())),
        st.fixed_dictionaries({"tokens": st.one_of(ids, anything)}).map(
            lambda b: ("/detokenize", json.dumps(b).encode())),
        raw.flatmap(lambda r: st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]).map(
            lambda p: (p, r))),
    )


def send(url: str, path: str, body: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_fuzz_the_api(served):
    """500+ requests, valid and invalid, over every POST endpoint: no 500 answer, every stream
    ends with [DONE], no replica restarts, and a normal request is served correctly after."""
    from hypothesis import HealthCheck, given, settings

    bg, model, tok, eos = served
    pool = bg.server.pool
    pids, replaced = replica_pids(bg), pool.replaced
    seen: dict[int, int] = {}

    @settings(max_examples=520, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(request_strategies(model.args.vocab_size))
    def one(case):
        path, body = case
        status, answer = send(bg.url, path, body)
        seen[status] = seen.get(status, 0) + 1
        assert status in (200, 400, 404, 429), (status, path, body[:300], answer[:300])
        if status != 200:
            err = json.loads(answer)["error"]
            assert err["param"] and err["message"], answer
        elif answer.startswith(b"data: "):
            assert answer.rstrip().endswith(b"data: [DONE]"), answer[-300:]
        else:
            json.loads(answer)

    one()
    total = sum(seen.values())
    print(f"fuzz: {total} requests, answers by status {dict(sorted(seen.items()))}")
    assert total >= 500 and seen.get(200, 0) >= 100 and seen.get(400, 0) >= 100, seen
    assert replica_pids(bg) == pids and pool.replaced == replaced
    stats = replica_stats(bg)
    assert all(s.failed_requests == 0 and s.engine_faults == 0 for s in stats), stats
    assert all(s.free_blocks == s.total_blocks for s in stats) and pool.inflight == 0
    assert Client(bg.url).complete(PROMPTS[3], max_tokens=12, temperature=0)["choices"][0]["text"] == reference(
        model, tok, eos, PROMPTS[3], 12)


def test_large_bodies_do_not_stall_other_clients(served):
    """A body over the 1 MiB limit is a 413; a 1 MiB prompt is refused (400) before it is
    tokenized; meanwhile a small request is answered as fast as alone."""
    bg, model, tok, eos = served
    assert send(bg.url, "/v1/completions", b'{"prompt": "' + b"a" * (1 << 20) + b'"}')[0] == 413
    huge = json.dumps({"prompt": "word " * 200_000, "max_tokens": 1}).encode()
    assert len(huge) < 1 << 20
    client = Client(bg.url)
    start = time.perf_counter()
    client.complete(PROMPTS[0], max_tokens=1)
    alone = time.perf_counter() - start
    with ThreadPoolExecutor(4) as ex:
        bigs = [ex.submit(send, bg.url, "/v1/completions", huge) for _ in range(3)]
        start = time.perf_counter()
        client.complete(PROMPTS[0], max_tokens=1)
        beside = time.perf_counter() - start
        statuses = [f.result()[0] for f in bigs]
    assert statuses == [400] * 3
    print(f"a 1-token request: {alone * 1e3:.1f} ms alone, {beside * 1e3:.1f} ms beside three 1 MB bodies")
    assert beside < alone + 0.5


# -- ending early ---------------------------------------------------------------------------------
def wait_all_free(bg, timeout_s: float = 10.0) -> float:
    """Seconds until every replica holds no sequence and all its blocks are free, and the pool
    counts nothing in flight."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        stats = replica_stats(bg)
        if bg.server.pool.inflight == 0 and all(s.running == 0 and s.waiting == 0 and s.free_blocks == s.total_blocks
                                                for s in stats):
            return time.perf_counter() - start
        time.sleep(0.01)
    raise AssertionError(f"still held after {timeout_s} s: {replica_stats(bg)}, inflight {bg.server.pool.inflight}")


def open_request(url: str, payload: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    body = json.dumps(payload).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_a_client_that_disconnects_frees_its_blocks(slow):
    pool = slow.server.pool
    for stream in (True, False):
        before = sum(s.cancelled_requests for s in replica_stats(slow))
        sock = open_request(slow.url, {"prompt": PROMPTS[1], "max_tokens": 100, "temperature": 0, "stream": stream})
        if stream:
            got = b""
            while b"data: " not in got:  # it is generating
                got += sock.recv(65536)
        else:
            deadline = time.monotonic() + 10
            while not any(s.running for s in replica_stats(slow)) and time.monotonic() < deadline:
                time.sleep(0.01)
        assert pool.inflight == 1 and any(s.running for s in replica_stats(slow))
        sock.close()
        freed = wait_all_free(slow)
        assert sum(s.cancelled_requests for s in replica_stats(slow)) == before + 1
        print(f"stream={stream}: blocks free and the queue place given back {freed * 1e3:.0f} ms after the "
              "client closed (one engine step here takes 25 ms or more)")
        assert freed < 1.0


def test_timeouts_end_streams_and_requests(slow):
    cfg = slow.server.cfg.inference
    saved, cfg.request_timeout_s = cfg.request_timeout_s, 0.4
    try:
        start = time.perf_counter()
        status, answer = send(slow.url, "/v1/completions", json.dumps(
            {"prompt": PROMPTS[1], "max_tokens": 100, "stream": True}).encode())
        took = time.perf_counter() - start
        lines = [line for line in answer.decode().split("\n\n") if line]
        assert status == 200 and lines[-1] == "data: [DONE]" and "request_timeout_s" in lines[-2], lines[-2:]
        assert took < 2.0
        wait_all_free(slow)
        with pytest.raises(ServerError) as err:
            Client(slow.url).complete(PROMPTS[1], max_tokens=100)
        assert err.value.status == 504 and err.value.param == "request"
        wait_all_free(slow)
    finally:
        cfg.request_timeout_s = saved
    assert Client(slow.url).complete(PROMPTS[0], max_tokens=3)["choices"][0]["finish_reason"] == "length"


def test_serve_refuses_a_cache_that_cannot_hold_the_context(serve_source):
    proc = subprocess.run([sys.executable, "-m", "launch.serve", f"checkpoint={serve_source}", "inference.block_size=40",
                           "inference.kv_cache_tokens=130"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "inference.kv_cache_tokens" in proc.stderr and "inference.block_size=40" in proc.stderr, proc.stderr


def test_serve_command_listens_on_loopback_only_and_stops_cleanly(serve_source):
    """`launch.serve` with its embedded Ray: every TCP port its process tree listens on (the HTTP
    server, Ray's GCS, raylet, object manager, workers) is on 127.0.0.1; SIGTERM stops it all."""
    import psutil

    from orchestrator.worker import free_port

    from orchestrator.inference.types import kv_bytes_per_token

    a = load_model(str(serve_source))[0].args
    cache_bytes = 512 * kv_bytes_per_token(a.n_layers, a.n_kv_heads, a.head_dim, 4)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "launch.serve", f"checkpoint={serve_source}",
                             f"inference.port={port}", "inference.block_size=8",
                             f"inference.kv_cache_bytes={cache_bytes}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [proc.stdout.readline()]  # the KV cache of each replica, then "serving ..." once it listens
        while lines[-1] and "serving" not in lines[-1]:
            lines.append(proc.stdout.readline())
        assert "serving" in lines[-1], lines
        assert f"KV cache of 512 tokens ({cache_bytes / 2**20:.1f} MiB)" in lines[0], lines
        assert lines[0].rstrip().endswith("decode attention: native kernel"), lines
        client = Client(f"http://127.0.0.1:{port}")
        assert client.complete(PROMPTS[0], max_tokens=2)["choices"][0]["finish_reason"] == "length"
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        listening = {(c.laddr.ip, c.laddr.port) for p in tree for c in p.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert (("127.0.0.1", port) in listening) and len(listening) > 3, listening
        assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _ in listening), listening
        proc.terminate()
        assert proc.wait(60) == 0
        time.sleep(1)
        assert not [p for p in tree[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
