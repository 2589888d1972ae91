"""Reading run directories for a report: each run's per-step records, summary and entropy-controller band, and
the curves the panels draw (one per run, or one per variant over its seeds)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cegppo.runfiles import CONFIG_FILE, METRICS_FILE, PROBE_FILE, SUMMARY_FILE, read_metrics, read_probe

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


@dataclass
class Run:
    """One run directory's per-step records and summary."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    color: str = COLORS[0]
    # [target_low, target_high] of the run's entropy controller, if it had one on
    entropy_band: tuple[float, float] | None = None
    probe: list[dict[str, Any]] = field(default_factory=list)  # the paired probe's rows (probe.jsonl)
    # config.yaml as dotted keys (``actor.lr``: value); empty for a run without one
    config: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of ``key`` at the steps that logged a finite value."""
        points = [
            (record["step"], float(record[key]))
            for record in self.records
            if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])
        ]
        steps = np.array([p[0] for p in points], dtype=float)
        return steps, np.array([p[1] for p in points], dtype=float)

    def has(self, key: str) -> bool:
        return len(self.series(key)[0]) > 0

    @property
    def keys(self) -> set[str]:
        return {key for record in self.records for key in record}


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory. Raises ValueError when it is not one (neither metrics.jsonl nor summary.json) or
    when a file in it is not valid JSON (naming the file and line)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run directory {path} does not exist")
    summary_path = path / SUMMARY_FILE
    if not _is_run(path):
        raise ValueError(f"{path} is not a run directory: it has none of {', '.join(_RUN_FILES)}")
    records = read_metrics(path)
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path / METRICS_FILE}:{number}: expected an object with an integer 'step'")
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{summary_path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path}: expected a JSON object, got {type(summary).__name__}")
    config = _read_config(path / CONFIG_FILE)
    return Run(
        name=path.resolve().name,
        path=path,
        records=records,
        summary=summary,
        entropy_band=_entropy_band(path / CONFIG_FILE, config),
        config=flatten(config),
        probe=read_probe(path),
    )


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Each path that is a run directory as is; a folder of runs (``runs/``, a sweep's output directory) as the run
    directories under it, in name order. A path that is neither is passed on for ``load_run`` to name."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir() or _is_run(path):
            found.append(path)
            continue
        inside = sorted(
            {marker.parent for name in _RUN_FILES for marker in path.rglob(name) if _is_run(marker.parent)}
        )
        if not inside:
            raise ValueError(
                f"{path} is not a run directory and holds none: no {', '.join(_RUN_FILES)} in it or below"
            )
        found += inside
    return found


# What makes a folder a run for the report: its metrics, its summary, or the rows of `cegppo probe`.
_RUN_FILES = (METRICS_FILE, SUMMARY_FILE, PROBE_FILE)


def _is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in _RUN_FILES)


def config_differences(runs: Sequence[Run]) -> dict[str, list[Any]]:
    """The settings whose values differ between the runs (``MISSING`` where a run's config lacks the key), in key
    order; the run directory's own name and place (``trainer.name``, ``trainer.output_dir``) are left out."""
    keys = sorted({key for run in runs for key in run.config} - {"trainer.name", "trainer.output_dir"})
    differences = {}
    for key in keys:
        values = [run.config.get(key, MISSING) for run in runs]
        if any(value != values[0] for value in values[1:]):
            differences[key] = values
    return differences


# A setting a run's config.yaml does not have (an older schema), in config_differences
MISSING = "—"


def _read_config(config_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        return {}
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{config_path}: not valid YAML ({error})") from None
    return config if isinstance(config, dict) else {}


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys (``actor.policy_loss.beta1``), as overrides name them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _entropy_band(config_path: Path, config: dict[str, Any]) -> tuple[float, float] | None:
    """The controller's target band from a run's config.yaml; None without one (or with the controller off)."""
    control = (config.get("actor") or {}).get("entropy_control") or {}
    if not control.get("enabled"):
        return None
    try:
        return float(control["target_low"]), float(control["target_high"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{config_path}: actor.entropy_control is enabled but target_low/target_high are not numbers"
        ) from None


def name_runs(runs: list[Run]) -> None:
    """Names are the directory names, with the parent added where two would clash."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.path.resolve().name}"
    seen: dict[str, int] = {}
    for run in runs:  # the same directory given twice
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"


# ``cegppo sweep`` names its runs ``<variant>-s<seed>``.
_SEED_RUN = re.compile(r"(?P<variant>.+)-s(?P<seed>\d+)")


def variant_and_seed(name: str) -> tuple[str, int] | None:
    """``("grpo", 2)`` for a run named ``grpo-s2``; None for a name that is not ``<variant>-s<int>``."""
    match = _SEED_RUN.fullmatch(name)
    return (match["variant"], int(match["seed"])) if match else None


@dataclass
class Curve:
    """What one color of the panels draws: one run, or the seeds of one variant as their mean and min–max band."""

    name: str
    color: str
    runs: list[Run]

    def _by_step(self, key: str) -> tuple[list[float], list[dict[float, float]]]:
        # A step logged twice (a resumed run) counts once, with its last value.
        logged = [dict(zip(*(a.tolist() for a in run.series(key)), strict=True)) for run in self.runs]
        return sorted(set.intersection(*(set(values) for values in logged))), logged

    def seed_values(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The steps at which every run logged ``key``, and their values, one row per run."""
        steps, logged = self._by_step(key)
        rows = [[values[step] for step in steps] for values in logged]
        return np.array(steps, dtype=float), np.array(rows, dtype=float)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and the mean over runs of ``key`` (the run's own values for a single run)."""
        steps, values = self.seed_values(key)
        return steps, values.mean(axis=0)

    def has(self, key: str) -> bool:
        return len(self._by_step(key)[0]) > 0

    def partial(self, key: str) -> bool:
        """Whether some run logged ``key`` at a step another did not (the mean leaves those steps out)."""
        steps, logged = self._by_step(key)
        return any(len(values) > len(steps) for values in logged)

    @property
    def entropy_bands(self) -> list[tuple[float, float]]:
        return sorted({run.entropy_band for run in self.runs if run.entropy_band})


def by_variant(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """Runs named ``<variant>-s<int>`` grouped under their variant, every other run alone under its own name, in
    the order of first appearance."""
    # keyed apart, so that a run named "grpo" is no seed of "grpo-s0"
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        parsed = variant_and_seed(run.name)
        groups.setdefault(("run", run.name) if parsed is None else ("variant", parsed[0]), []).append(run)
    return [(name, members) for (_, name), members in groups.items()]


def curves(runs: Sequence[Run], *, per_seed: bool = False) -> list[Curve]:
    """One curve per variant with two or more seeds (runs named ``<variant>-s<int>``, legend ``variant (n
    seeds)``), one per other run, in the order of the runs' first appearance; ``per_seed`` gives every run its
    own. Colors go by curve, and each run takes its curve's color, so the page's tables match the figures."""
    groups = [(run.name, [run]) for run in runs] if per_seed else by_variant(runs)
    result = [
        Curve(f"{variant} ({len(members)} seeds)" if len(members) > 1 else members[0].name, "", members)
        for variant, members in groups
    ]
    for i, curve in enumerate(result):
        curve.color = COLORS[i % len(COLORS)]
        for run in curve.runs:
            run.color = curve.color
    return result


def val_keys(runs: Sequence[Run]) -> list[str]:
    return sorted({key for run in runs for key in run.keys if key.startswith("val/")})
