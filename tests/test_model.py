"""The single-device model: causal, deterministic, buildable on meta."""
from __future__ import annotations

import torch

from orchestrator.models import Llama, LlamaArgs, causal_lm_loss
from orchestrator.models.generate import sample

ARGS = LlamaArgs(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def build(seed=0):
    with torch.device("meta"):
        m = Llama(ARGS)
    m = m.to_empty(device="cpu")
    m.init_weights(seed)
    return m


def test_meta_build_is_deterministic():
    a, b = build(1), build(1)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(build(2).output.weight, a.output.weight)


def test_causal_masking():
    m = build()
    x = torch.randint(0, 300, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        assert torch.allclose(m(x)[:, :10], m(y)[:, :10], atol=1e-6)
        assert not torch.allclose(m(x)[:, 10:], m(y)[:, 10:], atol=1e-6)


def test_initial_loss_near_uniform_and_trains():
    m = build()
    x = torch.randint(0, 300, (4, 16))
    loss = causal_lm_loss(m(x[:, :-1]), x[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(300.0)).item()) < 0.5
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(30):
        loss = causal_lm_loss(m(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0


def test_greedy_sampling_is_deterministic():
    m = build()
    a = sample(m, [1, 2, 3], 8, ARGS.max_seq_len, temperature=0)
    assert a == sample(m, [1, 2, 3], 8, ARGS.max_seq_len, temperature=0) and len(a) == 8
