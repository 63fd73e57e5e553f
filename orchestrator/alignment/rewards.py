"""Reward functions for GRPO: ``fn(prompts, completions, references) -> one number per completion``.

``alignment.reward`` names one: a built-in (``exact_match``, ``format``) or ``module:function``
importable on the driver and on every rank (the project's code travels with a job).
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

from orchestrator.errors import ConfigError

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], Sequence[float]]


def exact_match(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, is the reference answer."""
    return [float(c.strip() == r.strip()) for c, r in zip(completions, references)]


def _shape(text: str) -> str:
    return "".join("a" if ch.isalnum() else ch for ch in text.strip())


def format_check(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the completion has the reference's form: the same length, with the same
    punctuation and spaces at the same places (letters and digits may differ). For the reversal
    task, "t-a-c" against "c-a-t" passes and "tac" fails."""
    return [float(_shape(c) == _shape(r)) for c, r in zip(completions, references)]


BUILT_IN: dict[str, RewardFn] = {"exact_match": exact_match, "format": format_check}


def load(spec: str) -> RewardFn:
    """The reward function ``spec`` names; ConfigError("alignment.reward") when it cannot be had."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError("alignment.reward", f"{spec!r} is neither a built-in ({', '.join(BUILT_IN)}) nor "
                                              f"module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module raising as it loads
        raise ConfigError("alignment.reward", f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError("alignment.reward", f"{module_name!r} has no function {attr!r}")
    return fn


def score(fn: RewardFn, spec: str, prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """Calls the reward function and checks what it returned: one finite number per completion
    (ConfigError naming alignment.reward otherwise)."""
    try:
        got = fn(prompts, completions, references)
    except Exception as exc:
        raise ConfigError("alignment.reward", f"{spec} raised {type(exc).__name__}: {exc}") from None
    try:
        got = list(got)
        if any(isinstance(v, (str, bytes)) for v in got):
            raise TypeError
        values = [float(v) for v in got]
    except (TypeError, ValueError):
        raise ConfigError("alignment.reward", f"{spec} must return one number per completion; got "
                                              f"{type(got).__name__} {str(got)[:80]}") from None
    if len(values) != len(completions):
        raise ConfigError("alignment.reward", f"{spec} returned {len(values)} values for {len(completions)} "
                                              f"completions; one number per completion is needed")
    if not all(math.isfinite(v) for v in values):
        raise ConfigError("alignment.reward", f"{spec} returned a value that is not finite: {values[:8]}")
    return values
