"""A property-based fuzz of job validation (hypothesis): overrides drawn from the config schema,
valid and invalid values for every scalar key, group options that exist and ones that do not,
several at once. Each draw must either validate or raise ConfigError naming a key of the schema,
and a NaN for any key must be refused; no other exception. Validation only: no worker starts."""
from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import CHOICES, JobConfig, compose
from orchestrator.errors import ConfigError

# Keys that name places on this machine or another (paths, URLs, a pretrained model): the fuzz
# draws values, not files. Each has its own tests.
SKIPPED = {"run.dir", "data.paths", "data.path", "model.init_from", "alignment.rollout.replay", "data.storage",
           "run.storage", "run.storage_options", "strategy", "data.cache_dir"}


def schema_keys(cls=JobConfig, prefix: str = "") -> dict[str, type]:
    """Every scalar and list key of the schema with its type."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if key in SKIPPED:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if dataclasses.is_dataclass(kind):
            keys.update(schema_keys(kind, f"{key}."))
        else:
            keys[key] = kind
    return keys


KEYS = schema_keys()
INTS = ["-1", "0", "1", "2", "3", "7", "64", "1000000000", "abc", "nan", "1.5", "null"]
FLOATS = ["-1.0", "0", "1e-8", "0.5", "1", "2.5", "nan", "inf", "-inf", "abc", "1e30", "null"]
BOOLS = ["true", "false", "maybe", "1"]
STRS = ["''", "abc", "auto", "none", "default", "x/y", "ddp", "' '"]
LISTS = ["[0.9,0.95]", "[0.9]", "[]", "[wq]", "[wq,foo]", "[nan,0.9]", "abc"]
GROUPS = {"model": ["tiny", "small", "nonexistent"], "strategy": ["single", "ddp", "zero2", "tp", "pp", "nope"],
          "data": ["shakespeare", "sft", "preference", "prepared", "nope"]}


def values_for(key: str, kind) -> list[str]:
    if key in CHOICES:
        return list(CHOICES[key]) + ["bogus", "''"]
    if kind is bool:
        return BOOLS
    if kind is int:
        return INTS
    if kind is float:
        return FLOATS
    if kind is str:
        return STRS
    return LISTS


override = st.one_of(
    st.sampled_from(sorted(KEYS)).flatmap(lambda k: st.sampled_from(values_for(k, KEYS[k])).map(lambda v: f"{k}={v}")),
    st.sampled_from(sorted(GROUPS)).flatmap(lambda g: st.sampled_from(GROUPS[g]).map(lambda v: f"{g}={v}")),
)
found: list[str] = []


@pytest.fixture(scope="module")
def report():
    yield
    print(f"\nconfig fuzz: {len(found)} draws refused with a key; first few: {found[:5]}")


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(override, min_size=1, max_size=4))
def test_every_draw_validates_or_names_a_key(report, tmp_path_factory, overrides):
    run_dir = tmp_path_factory.getbasetemp() / "fuzz-run"
    base = ["model=tiny", f"run.dir={run_dir}", "logging.wandb.mode=disabled"]
    # Groups first: Hydra applies a group option before the keys under it.
    ordered = sorted(overrides, key=lambda o: o.split("=", 1)[0] not in GROUPS)
    try:
        compose(base + ordered)
    except ConfigError as exc:
        top = exc.key.split(".")[0].split("[")[0]
        assert top in {f.name for f in dataclasses.fields(JobConfig)} or exc.key in ("config", "strategy"), \
            (ordered, exc.key, str(exc))
        found.append(f"{ordered} -> {exc.key}")
        return
    nan = [o for o in ordered if o.split("=", 1)[1] == "nan" or "nan," in o]
    assert not nan, f"NaN accepted: {ordered}"
