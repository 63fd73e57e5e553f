"""The generation engine alone (no Ray, no HTTP): greedy output equals the plain model's token by
token under preemption, with groups of samples sharing their prompt's blocks (copy-on-write),
and with prefix-cache hits; a sample in a group is the same sample as alone with its seed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.inference.engine import GenerationEngine
from orchestrator.inference.replica import load_model
from orchestrator.inference.types import Request
from tests.serving import PROMPTS, reference

LONG = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak."


@pytest.fixture(scope="module")
def plain(serve_source):
    return load_model(str(serve_source))


def run(engine: GenerationEngine, requests: list[Request]) -> dict[str, str]:
    for r in requests:
        engine.add(r)
    text: dict[str, str] = {}
    while engine.busy:
        for event in engine.step():
            assert event.error is None, event
            text[event.id] = text.get(event.id, "") + event.text
    assert engine.pool.n_free == engine.pool.total and not engine.running
    return text


def ids(tok, prompt: str) -> tuple[int, ...]:
    return tuple(tok.encode(prompt).ids)


def test_greedy_equals_the_plain_model_under_preemption(plain):
    model, tok, eos = plain
    engine = GenerationEngine(model, tok, eos, block_size=4, num_blocks=40, max_batch=8)  # 160 slots for 8
    requests = [Request(str(i), ids(tok, PROMPTS[i % len(PROMPTS)]), 40) for i in range(8)]
    got = run(engine, requests)
    assert engine.preemptions > 0
    for i in range(8):
        assert got[str(i)] == reference(model, tok, eos, PROMPTS[i % len(PROMPTS)], 40), i


def test_a_group_shares_one_prefill_and_each_sample_is_its_own(plain):
    """8 samples of one prompt: one prefill, the others share its blocks (7 shared prefills); greedy
    samples all give the plain model's text; a sampled one with a seed gives exactly what the same
    request gives alone, so copy-on-write kept the samples apart."""
    model, tok, eos = plain
    prompt = ids(tok, LONG)
    engine = GenerationEngine(model, tok, eos, block_size=8, num_blocks=256, max_batch=16, prefix_cache=False)
    got = run(engine, [Request(f"g{j}", prompt, 24) for j in range(8)])
    want = reference(model, tok, eos, LONG, 24)
    assert [got[f"g{j}"] for j in range(8)] == [want] * 8 and engine.shared_prefills == 7
    sampled = [Request(f"s{j}", prompt, 24, temperature=1.0, seed=100 + j) for j in range(8)]
    together = run(engine, sampled)
    alone = {r.id: run(GenerationEngine(model, tok, eos, block_size=8, num_blocks=256), [r])[r.id] for r in sampled}
    assert together == alone and len(set(together.values())) > 1


def test_prefix_cache_hits_keep_greedy_output(plain):
    """A prompt that starts with another's full blocks shares them (hit tokens counted) and
    gives the plain model's text; so does the same prompt again, and after the cache was evicted
    by other work."""
    model, tok, eos = plain
    engine = GenerationEngine(model, tok, eos, block_size=4, num_blocks=64, max_batch=4)
    first = run(engine, [Request("a", ids(tok, LONG), 16)])
    assert first["a"] == reference(model, tok, eos, LONG, 16) and engine.prefix.hit == 0
    other = LONG[:40] + " What say you?"
    got = run(engine, [Request("b", ids(tok, other), 16), Request("c", ids(tok, LONG), 16)])
    assert engine.prefix.hit > 0
    assert got["b"] == reference(model, tok, eos, other, 16) and got["c"] == first["a"]
    hits = engine.prefix.hit
    run(engine, [Request(f"x{i}", ids(tok, PROMPTS[i]), 40) for i in range(4)])  # fills every block
    assert run(engine, [Request("d", ids(tok, LONG), 16)])["d"] == first["a"]
    assert engine.prefix.hit >= hits


def test_new_weights_empty_the_prefix_cache(serve_source):
    from tests.serving import perturbed

    model, tok, eos = load_model(str(serve_source))
    engine = GenerationEngine(model, tok, eos, block_size=4, num_blocks=64)
    run(engine, [Request("a", ids(tok, LONG), 16)])
    model.load_state_dict(perturbed(model, 9))
    engine.weights_changed()
    hits = engine.prefix.hit
    assert run(engine, [Request("b", ids(tok, LONG), 16)])["b"] == reference(model, tok, eos, LONG, 16)
    assert engine.prefix.hit == hits  # nothing reused from before


def test_reset_mid_flight_starts_clean(plain):
    """What a replica does after a fault outside any request: requests in flight are dropped, all
    blocks are free, and the prefix cache forgets blocks it no longer owns (a hit on one of them
    after the reset would share a block another sequence now writes)."""
    model, tok, eos = plain
    engine = GenerationEngine(model, tok, eos, block_size=4, num_blocks=64, max_batch=4)
    want = run(engine, [Request("a", ids(tok, LONG), 16)])["a"]
    engine.add(Request("b", ids(tok, PROMPTS[0]), 30))
    engine.step()
    engine.reset()
    assert not engine.busy and engine.pool.n_free == engine.pool.total and engine.prefix.lookup(ids(tok, LONG)) == []
    assert run(engine, [Request("c", ids(tok, LONG), 16)])["c"] == want


def test_joined_projections_compute_what_the_blocks_compute(serve_source):
    """Where it can, the engine runs the blocks from their weights with (wq, wk, wv) and (w_gate,
    w_up) joined into one matrix each (views of the parameters, which it puts in one buffer). The
    modules' own forward gives the same greedy text and the same log-probabilities to rounding;
    new weights are used from the next step, whether copied in place or the parameters pointed
    at new memory, and where the joined weights had to be copies; so are the matrices oneDNN
    packs on the CPU."""
    from orchestrator.inference.engine import point_parameters
    from tests.serving import perturbed

    model, tok, eos = load_model(str(serve_source))

    def logprobs(engine) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in [Request(str(i), ids(tok, p), 24, logprobs=0) for i, p in enumerate(PROMPTS)]:
            engine.add(r)
        while engine.busy:
            for event in engine.step():
                out.setdefault(event.id, []).extend(lp.logprob for lp in event.logprobs)
        return out

    fast = GenerationEngine(model, tok, eos, block_size=4, num_blocks=128, max_batch=8)
    modules = GenerationEngine(model, tok, eos, block_size=4, num_blocks=128, max_batch=8)
    modules.fused = False
    assert fast.fused and fast.pack == (fast.linear is not F.linear)
    a, b = logprobs(fast), logprobs(modules)
    assert a.keys() == b.keys() and all(len(a[k]) == len(b[k]) for k in a)
    assert max(abs(x - y) for k in a for x, y in zip(a[k], b[k])) < 1e-4
    assert run(fast, [Request("r", ids(tok, LONG), 16)])["r"] == run(modules, [Request("r", ids(tok, LONG), 16)])["r"]

    def check() -> None:
        fast.weights_changed()
        assert run(fast, [Request("x", ids(tok, LONG), 16)])["x"] == reference(model, tok, eos, LONG, 16)

    model.load_state_dict(perturbed(model, 1))  # in place
    check()
    values = perturbed(model, 2)
    point_parameters(model, torch.cat([values[n].reshape(-1) for n, _ in model.named_parameters()]))
    check()
    wk = model.layers["0"].attn.wk.weight
    wk.data = wk.data.clone()  # no longer next to wq: the joined matrix is a copy
    check()
    with torch.no_grad():
        wk.mul_(1.5)  # in place: the copy is made again
    check()
    for w in (model.layers["1"].attn.wo.weight, model.layers["0"].mlp.w_down.weight, model.output.weight):
        with torch.no_grad():
            w.mul_(1.5)  # one matrix in place: its packed copy is made again
        check()


@pytest.mark.parametrize("sizing", ["bytes", "fraction"])
def test_kv_cache_is_sized_from_bytes_or_a_fraction_of_free_memory(serve_source, monkeypatch, sizing):
    """inference.kv_cache_bytes, or kv_cache_memory_fraction of what is free at start, sets the
    cache: whole blocks of keys and values in every layer, fp32 here."""
    from orchestrator.inference import replica
    from orchestrator.inference.types import EngineOptions, kv_bytes_per_token

    a = load_model(str(serve_source))[0].args
    per_token = kv_bytes_per_token(a.n_layers, a.n_kv_heads, a.head_dim, 4)
    budget = 700 * per_token + per_token // 2  # 700.5 tokens: 87 whole blocks of 8
    monkeypatch.setattr(replica, "free_memory", lambda device: 4 * budget)
    sized = {"kv_cache_bytes": budget} if sizing == "bytes" else {"kv_cache_memory_fraction": 0.25}
    options = EngineOptions(block_size=8, threads=torch.get_num_threads(), **sized)
    engine, _ = replica.build_engine(str(serve_source), options)
    assert engine.k.shape == engine.v.shape == (a.n_layers, 87 * 8, a.n_kv_heads, a.head_dim)
    assert engine.k.numel() * 4 * 2 == 87 * 8 * per_token <= budget


@pytest.mark.parametrize("heads,kv_heads,block_size", [(6, 6, 16), (4, 2, 4), (8, 1, 8)])
def test_native_decode_attention_matches_sdpa_over_the_gathered_blocks(heads, kv_heads, block_size):
    """The C kernel against scaled_dot_product_attention over each sequence's blocks gathered in
    order: lengths from 1 to several blocks, scattered and shared blocks, grouped KV heads, a
    query that is a strided view (as the engine passes it)."""
    from orchestrator.inference import kernels

    kernel = kernels.paged_decode_attention()
    assert kernel is not None, kernels.unavailable_reason  # this project's machines have a C compiler
    g = torch.Generator().manual_seed(0)
    dim, n_blocks = 64, 40
    k = torch.randn(n_blocks * block_size, kv_heads, dim, generator=g)
    v = torch.randn(n_blocks * block_size, kv_heads, dim, generator=g)
    lengths = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 2, 5 * block_size, 2])
    width = int(max((lengths + block_size - 1) // block_size))
    table = torch.randperm(n_blocks, generator=g)[: len(lengths) * width].view(len(lengths), width).contiguous()
    table[5, 0] = table[4, 0]  # a block two sequences share
    qk = torch.randn(len(lengths), heads + kv_heads, dim, generator=g) * 3
    q = qk[:, :heads]
    out = torch.full((len(lengths), heads, dim), float("nan"))
    kernel(q, k, v, table, lengths, block_size, out)
    for b, length in enumerate(lengths.tolist()):
        slots = [int(table[b, p // block_size]) * block_size + p % block_size for p in range(length)]
        keys, values = (x[slots].transpose(0, 1) for x in (k, v))  # (kv_heads, length, dim)
        want = F.scaled_dot_product_attention(q[b][:, None], keys, values, enable_gqa=heads != kv_heads)[:, 0]
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)


def test_native_decode_attention_gives_the_plain_models_text_and_falls_back_without_a_compiler(
        plain, monkeypatch, tmp_path):
    """The engine with the kernel (the default here) and without it: the plain model's greedy
    text both ways. Where no compiler can build it the engine says why and gathers instead."""
    from orchestrator.inference import kernels

    model, tok, eos = plain
    prompts = PROMPTS[:4]
    want = {str(i): reference(model, tok, eos, p, 30) for i, p in enumerate(prompts)}

    def texts(**kw) -> tuple[dict[str, str], str]:
        engine = GenerationEngine(model, tok, eos, block_size=8, num_blocks=64, max_batch=4, **kw)
        return run(engine, [Request(str(i), ids(tok, p), 30) for i, p in enumerate(prompts)]), engine.attention

    assert texts() == (want, "native kernel")
    assert texts(native_attention=False) == (want, "gather + SDPA")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("FORGELINE_KERNEL_CACHE", str(tmp_path / "kernels"))
    kernels.paged_decode_attention.cache_clear()
    try:
        got, how = texts()
    finally:
        kernels.paged_decode_attention.cache_clear()
    assert got == want and how.startswith("gather + SDPA (the C compiler") and "no-such-cc" in how
