"""Activation checkpointing and torch.compile of the transformer blocks, in every strategy.

Checkpointing recomputes exactly what the forward computed, so a run with it must give the same
losses as the same layout without it (1e-6), while the activation bytes a micro-batch leaves for
the backward pass (measured on every rank, in summary.json) shrink. A compiled run must stay within
1e-4 of the eager single-process reference over 10 steps.
"""
from __future__ import annotations

import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError
from tests.conftest import assert_losses_close, parity_overrides
from tests.test_model_parallel import LAYOUTS, layout_run

EXACT = 1e-6
LAYOUT = {
    "single": ("strategy=single", "cluster.num_workers=1"),
    "ddp": ("strategy=ddp", "cluster.num_workers=2"),
    "zero3": ("strategy=zero3", "cluster.num_workers=2"),
    "tp": LAYOUTS["tp2"],
    "pp": LAYOUTS["pp2-1f1b"],
}


def succeeded(summary: dict) -> dict:
    assert summary["status"] == "succeeded", summary["error"]
    return summary


@pytest.mark.parametrize("name", list(LAYOUT))
def test_full_checkpointing_is_exact_and_keeps_less(tmp_path_factory, data_cache, ray_cluster, name):
    plain = succeeded(layout_run(tmp_path_factory, data_cache, *LAYOUT[name]))
    ckpt = succeeded(layout_run(tmp_path_factory, data_cache, *LAYOUT[name], "trainer.activation_checkpointing=full"))
    assert_losses_close(ckpt["losses"], plain["losses"], EXACT)
    before, after = plain["memory"], ckpt["memory"]
    assert before["activation_checkpointing"] == "none" and after["activation_checkpointing"] == "full"
    for kept, full in zip(after["activation_bytes_per_rank"], before["activation_bytes_per_rank"]):
        # Each checkpointed block keeps only its input; what remains is the embedding, the final
        # norm and the output layer's (under a pipeline, the stage's share of them).
        assert 0 < kept < full / 2, (kept, full)


def test_selective_checkpointing_keeps_the_blocks_in_between(tmp_path_factory, data_cache, ray_cluster):
    """Every 2nd of 4 blocks (0 and 2): fewer bytes than none, more than full; losses exact."""
    deep = ("strategy=single", "cluster.num_workers=1", "model.n_layers=4")
    runs = {mode: succeeded(layout_run(tmp_path_factory, data_cache, *deep, f"trainer.activation_checkpointing={mode}"))
            for mode in ("none", "selective", "full")}
    kept = {mode: s["memory"]["activation_bytes_per_rank"][0] for mode, s in runs.items()}
    assert kept["full"] < kept["selective"] < kept["none"], kept
    assert runs["selective"]["memory"]["activation_checkpointing"] == "selective (every 2 blocks)"
    assert_losses_close(runs["selective"]["losses"], runs["none"]["losses"], EXACT)


COMPILED = {
    "single": LAYOUT["single"],
    "ddp": LAYOUT["ddp"],
    "zero3": LAYOUT["zero3"],
    "pp": LAYOUT["pp"],
    "fsdp": ("strategy=hybrid", "strategy.tp=1", "strategy.data_parallel=shard", "cluster.num_workers=2"),
}


@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_blocks_match_eager(reference, tmp_path_factory, data_cache, ray_cluster, name):
    summary = succeeded(layout_run(tmp_path_factory, data_cache, *COMPILED[name], "trainer.compile=true"))
    assert len(summary["losses"]) == len(reference["losses"]) == 10
    assert_losses_close(summary["losses"], reference["losses"], 1e-4)


@pytest.mark.parametrize("overrides, key, words", [
    (("strategy=tp", "cluster.num_workers=2", "trainer.compile=true"), "trainer.compile", "tensor parallel"),
    (("strategy=hybrid", "strategy.tp=2", "cluster.num_workers=2", "trainer.compile=true"), "trainer.compile",
     "strategy.tp=1"),
    (("trainer.activation_checkpointing=some",), "trainer.activation_checkpointing", "none, full, selective"),
    (("trainer.activation_checkpointing=selective", "trainer.activation_checkpointing_every=0"),
     "trainer.activation_checkpointing_every", ">= 1"),
])
def test_bad_options_name_the_key(tmp_path, data_cache, overrides, key, words):
    with pytest.raises(ConfigError) as err:
        compose(parity_overrides(tmp_path, data_cache, *overrides))
    assert err.value.key == key and words in str(err.value), str(err.value)
