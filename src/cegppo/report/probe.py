"""Reading the paired probe's rows (``probe.jsonl``): each variant against a reference variant, paired by probe
point (a step of a seed's run, or a seed of ``cegppo probe``), so that the batch-to-batch noise cancels.

A paired difference is ``outcome(variant) − outcome(reference)`` at the same probe point and epoch; its mean over
the probe points is tested with the exact sign-flip test and given a paired bootstrap interval
(:mod:`cegppo.report.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cegppo.report.stats import describe_paired

DEFAULT_OUTCOME = "delta_log_entropy"
DEFAULT_REFERENCE = "trajectory"


@dataclass(frozen=True)
class PairedRow:
    """One variant at one epoch against the reference: the paired differences and their statistics."""

    variant: str
    epoch: int
    differences: np.ndarray  # one per probe point, in (seed, step) order
    mean: float
    ci: tuple[float, float]  # 95% paired bootstrap
    p_two_sided: float  # exact sign-flip test (Monte Carlo beyond 20 points)


def variants(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The variants in the order they were probed."""
    return list(dict.fromkeys(row["variant"] for row in rows))


def paired(
    rows: Sequence[dict[str, Any]], reference: str = DEFAULT_REFERENCE, outcome: str = DEFAULT_OUTCOME
) -> list[PairedRow]:
    """Every other variant at every epoch against ``reference``, over the probe points where both have a
    finite ``outcome``."""
    names = variants(rows)
    if reference not in names:
        raise ValueError(f"reference variant {reference!r} was not probed; probed: {names}")
    values: dict[tuple[str, int], dict[tuple[int, int], float]] = {}
    for row in rows:
        value = row.get(outcome)
        if isinstance(value, (int, float)) and math.isfinite(value):
            point = (int(row.get("seed", 0)), int(row["step"]))
            values.setdefault((row["variant"], int(row["epoch"])), {})[point] = float(value)
    result = []
    for (variant, epoch), by_point in values.items():
        base = values.get((reference, epoch), {})
        points = sorted(set(by_point) & set(base))
        if variant == reference or not points:
            continue
        differences = np.array([by_point[p] - base[p] for p in points])
        result.append(
            PairedRow(
                variant,
                epoch,
                differences,
                *describe_paired(differences),
            )
        )
    order = {name: i for i, name in enumerate(names)}
    return sorted(result, key=lambda r: (order[r.variant], r.epoch))


def probe_table(rows: Sequence[dict[str, Any]], reference: str = DEFAULT_REFERENCE) -> str:
    """A markdown table: per variant and epoch, the means over probe points of Δlog H, the KL from the
    pre-update policy and the clipped PA&LP / NA&LP tokens per update, and Δlog H against ``reference``."""
    against = {(r.variant, r.epoch): r for r in paired(rows, reference)}
    lines = [
        f"| variant | epoch | points | Δlog H | KL from before | clipped PA&LP | clipped NA&LP "
        f"| Δlog H − {reference} [95% CI] | p (sign-flip) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["variant"], int(row["epoch"])), []).append(row)
    for (variant, epoch), group in groups.items():
        pair = against.get((variant, epoch))
        contrast = (
            f"{pair.mean:+.4f} [{pair.ci[0]:+.4f}, {pair.ci[1]:+.4f}] | {pair.p_two_sided:.3g}"
            if pair is not None
            else "– | –"
        )
        lines.append(
            f"| {variant} | {epoch} | {len(group)} | {_mean(group, 'delta_log_entropy'):+.4f} "
            f"| {_mean(group, 'kl_from_before'):.2e} | {_mean(group, 'clipped/PA&LP'):.1f} "
            f"| {_mean(group, 'clipped/NA&LP'):.1f} | {contrast} |"
        )
    return "\n".join(lines) + "\n"


def _mean(group: Sequence[dict[str, Any]], key: str) -> float:
    values = [row[key] for row in group if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    return float(np.mean(values)) if values else math.nan
