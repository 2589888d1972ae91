"""Resolving a reward name to a function, and turning one call's return value into a score."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cegppo.rewards.config import RewardConfig
from cegppo.rewards.verifier import math_reward

RewardFn = Callable[..., Any]


@dataclass
class Outcome:
    """One scored response."""

    score: float
    correct: bool
    extras: dict[str, Any] = field(default_factory=dict)


def _load_file_module(path_text: str, name: str) -> Any:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"reward {name!r}: file not found: {path}")
    # A stable, path-derived module name so that loading the same file twice reuses the module.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_cegppo_reward_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward {name!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running so that dataclasses and pickling inside the file can find the module.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        raise ValueError(f"reward {name!r}: executing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _split_name(name: str) -> tuple[str, str, bool]:
    """``(module or file, attribute, is_file)`` of a custom reward name."""
    target, sep, attr = name.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(
            f"unknown reward {name!r}: expected 'math', 'pkg.module:function' or 'path/to/file.py:function'"
        )
    return target, attr, target.endswith(".py") or "/" in target or os.sep in target


def absolute_reward_name(name: str) -> str:
    """``name`` with a relative file path made absolute, so that it means the same in another directory."""
    if name == "math":
        return name
    target, attr, is_file = _split_name(name)
    return f"{Path(target).expanduser().resolve()}:{attr}" if is_file else name


def resolve_custom_function(name: str) -> RewardFn:
    """Import ``"pkg.module:function"`` or ``"path/to/file.py:function"`` (relative to the working directory) and
    check that it can be called like verl's ``compute_score(data_source=, solution_str=, ground_truth=,
    extra_info=)``.

    Raises ValueError saying what is wrong: bad name, file not found, module not importable, attribute missing,
    not callable, incompatible signature.
    """
    target, attr, is_file = _split_name(name)
    if is_file:
        module = _load_file_module(target, name)
    else:
        try:
            module = importlib.import_module(target)
        except BaseException as exc:
            raise ValueError(
                f"reward {name!r}: cannot import module {target!r}: {type(exc).__name__}: {exc}"
            ) from exc
    if not hasattr(module, attr):
        raise ValueError(f"reward {name!r}: module {target!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # builtins and some C callables have no inspectable signature
    try:
        signature.bind(data_source="", solution_str="", ground_truth="", extra_info=None)
    except TypeError as exc:
        raise ValueError(
            f"reward {name!r}: {attr}{signature} cannot be called as "
            f"f(data_source=, solution_str=, ground_truth=, extra_info=) (verl's compute_score): {exc}"
        ) from exc
    return fn


def resolve_reward_function(cfg: RewardConfig) -> RewardFn:
    """The function that scores one response for ``cfg``, called with verl's keyword arguments."""
    if cfg.name != "math":
        return resolve_custom_function(cfg.name)

    def builtin_math(data_source: str, solution_str: str, ground_truth: str, extra_info: Any = None) -> float:
        return math_reward(
            solution_str,
            ground_truth,
            correct_score=cfg.correct_score,
            incorrect_score=cfg.incorrect_score,
            strict_boxed=cfg.strict_boxed is not False,  # None: the trainer's default, on
        )

    return builtin_math


def to_outcome(value: Any, cfg: RewardConfig) -> Outcome:
    """Turn a reward function's return value into an Outcome; raise ValueError if it is not a finite score.

    ``correct`` is the dict's ``"acc"`` entry when present (verl's convention), else ``score >= correct_score``.
    """
    extras: dict[str, Any] = {}
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"reward returned a dict without a 'score' key (keys: {sorted(value)})")
        extras = {k: v for k, v in value.items() if k != "score"}
        value = value["score"]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"reward returned {type(value).__name__} {value!r}, expected a number or a dict")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward returned a non-finite score {score}")
    correct = bool(extras["acc"]) if "acc" in extras else score >= cfg.correct_score
    return Outcome(score=score, correct=correct, extras=extras)


def call_reward(
    fn: RewardFn, cfg: RewardConfig, data_source: str, response: str, ground_truth: str, extra_info: Any
) -> Outcome:
    """Call ``fn`` with verl's keyword arguments and check its return value."""
    value = fn(
        data_source=data_source, solution_str=response, ground_truth=ground_truth, extra_info=extra_info
    )
    return to_outcome(value, cfg)
