"""The report page: tables of final and best values, the panels, all in one self-contained HTML file."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cegppo.report.panels import Panel, build_panels
from cegppo.report.runs import Run, config_differences, curves, find_runs, load_run, name_runs, val_keys
from cegppo.report.seeds import StepWindow

# Metrics where higher is better: the table shows their best value and step.
_SCORE_PREFIXES = ("reward/mean", "acc/mean", "val/")
_TABLE_KEYS = (
    "reward/mean",
    "acc/mean",
    "entropy/mean",
    "response_length/mean",
    "actor/pg_clipfrac",
    "actor/beta1",
    "actor/beta2",
)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return html.escape(str(value))


def final_and_best(run: Run, key: str) -> tuple[float, float | None, int | None] | None:
    """``(final value, best value, step of best)`` of ``key``; best only for higher-is-better metrics (reward,
    accuracy, validation). None when the run did not log ``key``."""
    steps, values = run.series(key)
    if not len(steps):
        return None
    if not key.startswith(_SCORE_PREFIXES):
        return float(values[-1]), None, None
    best = int(np.argmax(values))
    return float(values[-1]), float(values[best]), int(steps[best])


def _swatch(run: Run) -> str:
    return f'<span class="swatch" style="background:{run.color}"></span>{html.escape(run.name)}'


def _values_table(runs: Sequence[Run]) -> str:
    keys = [
        key for key in (*_TABLE_KEYS[:2], *val_keys(runs), *_TABLE_KEYS[2:]) if any(r.has(key) for r in runs)
    ]
    if not keys:
        return '<p class="note">No metrics logged.</p>'
    head = "".join(f'<th colspan="2">{_swatch(run)}</th>' for run in runs)
    sub = "".join("<th>final</th><th>best (step)</th>" for _ in runs)
    rows = []
    for key in keys:
        cells = []
        for run in runs:
            values = final_and_best(run, key)
            if values is None:
                cells.append('<td class="na">—</td><td class="na">—</td>')
                continue
            final, best, step = values
            best_text = "" if best is None else f"{_fmt(best)} <span class='step'>({step})</span>"
            cells.append(f"<td>{_fmt(final)}</td><td>{best_text}</td>")
        rows.append(f"<tr><th class='key'>{html.escape(key)}</th>{''.join(cells)}</tr>")
    return (
        f"<table><thead><tr><th rowspan='2'>metric</th>{head}</tr><tr>{sub}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _summary_table(runs: Sequence[Run]) -> str:
    keys: list[str] = []
    for run in runs:
        keys += [key for key in run.summary if key not in keys and key != "run_dir"]
    if not keys:
        return '<p class="note">No run has a summary.json yet (unfinished runs write it at the end).</p>'
    head = "".join(f"<th>{_swatch(run)}</th>" for run in runs)
    rows = [
        f"<tr><th class='key'>{html.escape(key)}</th>"
        + "".join(
            f"<td>{_fmt(run.summary[key])}</td>" if key in run.summary else '<td class="na">—</td>'
            for run in runs
        )
        + "</tr>"
        for key in keys
    ]
    return f"<table><thead><tr><th>summary.json</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _config_table(runs: Sequence[Run]) -> str:
    """The settings (config.yaml) that differ between the runs, one row each."""
    if len(runs) < 2:
        return ""
    differences = config_differences(runs)
    if not differences:
        return "<h2>Settings</h2><p class='caption'>The runs' config.yaml files agree on every setting.</p>"
    head = "".join(f"<th>{_swatch(run)}</th>" for run in runs)
    rows = [
        f"<tr><th class='key'>{html.escape(key)}</th>"
        + "".join(f"<td class='text'>{html.escape(_setting(value))}</td>" for value in values)
        + "</tr>"
        for key, values in differences.items()
    ]
    return (
        "<h2>Settings that differ</h2><p class='caption'>From each run's config.yaml; the settings not listed "
        "(and the run directories' names) are the same for every run.</p>"
        f"<table><thead><tr><th>setting</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _setting(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, bool)) else str(value)


def _runs_table(runs: Sequence[Run]) -> str:
    rows = [
        f"<tr><td>{_swatch(run)}</td><td class='text'><code>{html.escape(str(run.path))}</code></td>"
        f"<td>{len(run.records)}</td><td>{run.records[-1]['step'] if run.records else '—'}</td></tr>"
        for run in runs
    ]
    return (
        "<table><thead><tr><th>run</th><th>directory</th><th>logged steps</th><th>last step</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 24px auto;
       max-width: 1320px; padding: 0 16px; color: #222; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 34px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta, .caption { color: #555; font-size: 14px; } .note { color: #8a6d00; font-size: 13px; margin: 4px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th { background: #f5f5f5; } th.key { text-align: left; font-weight: normal; font-family: monospace; }
td:first-child, td.text { text-align: left; } td.na { color: #aaa; text-align: center; } .step { color: #888; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px;
          vertical-align: -1px; }
img { max-width: 100%; display: block; margin: 6px 0; }
code { font-size: 12px; background: #f3f3f3; padding: 1px 3px; border-radius: 3px; }
"""


@dataclass
class Report:
    """What ``write_report`` wrote: the HTML page, the PNGs beside it, and the panels (with their notes)."""

    html: Path
    figures_dir: Path
    figures: list[Path]
    panels: list[Panel]


def write_report(
    run_dirs: Sequence[str | Path],
    output: str | Path,
    *,
    smooth: int | None = None,
    per_seed: bool = False,
    probe_reference: str = "trajectory",
    paired_reference: str | None = None,
    paired_steps: StepWindow | None = None,
) -> Report:
    """Compare ``run_dirs`` in one self-contained HTML file ``output`` (PNGs embedded as base64) and write each
    figure as ``<output stem>_figures/<panel>.png`` beside it.

    ``smooth``: moving-average window in steps; None draws an average of ``len/20`` steps over the raw curve for
    runs of 40 steps or more, 1 draws raw curves only. Runs named ``<variant>-s<seed>`` are drawn as their
    variant's mean over seeds with a min–max band where it has two or more; ``per_seed`` draws every run on its
    own. A folder of runs stands for the runs under it. The settings that differ between the runs are tabled from
    their config.yaml. Runs with a paired probe (``probe.jsonl``) get a panel of each variant against
    ``probe_reference``. ``paired_reference`` adds a panel of each variant minus that variant of the same seed,
    each run's metrics averaged over ``paired_steps`` (default: the second half of the steps). Raises ValueError
    for a path that is neither a run directory nor a folder of runs, and for a ``paired_reference`` that names no
    run ``<variant>-s<seed>``; nothing is written then.
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    runs = [load_run(path) for path in find_runs(run_dirs)]
    name_runs(runs)
    panels = build_panels(
        runs,
        smooth=smooth,
        per_seed=per_seed,
        probe_reference=probe_reference,
        paired_reference=paired_reference,
        paired_steps=paired_steps,
    )
    seeds_note = (
        "<p class='caption'>A variant run with several seeds (runs named <code>&lt;variant&gt;-s&lt;seed&gt;</code>) "
        "is drawn as the mean over its seeds, at the steps all of them logged, with the band from the lowest to the "
        "highest seed shaded; its seeds share its color in the tables. <code>cegppo report --per-seed</code> draws "
        "each run on its own.</p>"
        if any(len(line.runs) > 1 for line in curves(runs, per_seed=per_seed))
        else ""
    )
    output = Path(output)
    figures_dir = output.parent / f"{output.stem}_figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    sections = []
    for panel in panels:
        parts = [
            f"<h2 id='{panel.slug}'>{html.escape(panel.title)}</h2>",
            f"<p class='caption'>{panel.caption}</p>",
        ]
        parts += [f"<p class='note'>{note}</p>" for note in panel.notes]
        if panel.png is not None:
            path = figures_dir / f"{panel.slug}.png"
            path.write_bytes(panel.png)
            figures.append(path)
            encoded = base64.b64encode(panel.png).decode("ascii")
            parts.append(f"<img alt='{html.escape(panel.title)}' src='data:image/png;base64,{encoded}'>")
        sections.append("\n".join(parts))
    names = ", ".join(html.escape(run.name) for run in runs)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cegppo report: {names}</title><style>{_CSS}</style></head>
<body>
<h1>cegppo run report</h1>
<p class="meta">{len(runs)} run{"s" if len(runs) > 1 else ""}: {names} &middot; generated
{datetime.now().strftime("%Y-%m-%d %H:%M")}</p>
<h2>Runs</h2>
{_runs_table(runs)}
{_config_table(runs)}
<h2>Final and best values</h2>
<p class="caption">Final: the last logged step. Best: the highest value and its step (reward, accuracy and
validation only).</p>
{_values_table(runs)}
{_summary_table(runs)}
{seeds_note}
{"".join(sections)}
</body></html>
"""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page)
    return Report(html=output, figures_dir=figures_dir, figures=figures, panels=panels)
