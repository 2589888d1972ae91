"""Run reports: one self-contained HTML page comparing runs' training curves, with the PNGs beside it.

Each run is a run directory (``metrics.jsonl``, ``summary.json``). Every panel overlays the runs, one color per
run throughout. A metric that a run did not log (an older run without quadrant metrics) is left out of that run's
curves, and a panel no run logged becomes a note; a report never fails for missing metrics.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from cegppo.dynamics import QUADRANTS
from cegppo.trainer.tracking import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics

CLIP_KEYS = ("actor/pg_clipfrac", "actor/pg_clipfrac_low", "actor/pg_clipfrac_high", "actor/pg_clipfrac_dual")
QUADRANT_STATS = ("frac", "clipped_frac", "grad_share")
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
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
# Series longer than this get a moving average drawn over the faint raw curve.
_SMOOTH_FROM = 40
_DPI = 110
_FIGURE_WIDTH = 12.0  # inches: 1320 px at _DPI, the page's content width
_LEGEND_HEIGHT = 0.45  # inches kept free above the axes for the runs' legend


@dataclass
class Run:
    """One run directory's per-step records and summary."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    color: str = _COLORS[0]
    # [target_low, target_high] of the run's entropy controller, if it had one on
    entropy_band: tuple[float, float] | None = None

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
    if not (path / METRICS_FILE).is_file() and not summary_path.is_file():
        raise ValueError(f"{path} is not a run directory: it has neither {METRICS_FILE} nor {SUMMARY_FILE}")
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
    return Run(
        name=path.resolve().name,
        path=path,
        records=records,
        summary=summary,
        entropy_band=_entropy_band(path / CONFIG_FILE),
    )


def _entropy_band(config_path: Path) -> tuple[float, float] | None:
    """The controller's target band from a run's config.yaml; None without one (or with the controller off)."""
    if not config_path.is_file():
        return None
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{config_path}: not valid YAML ({error})") from None
    control = ((config or {}).get("actor") or {}).get("entropy_control") or {}
    if not control.get("enabled"):
        return None
    try:
        return float(control["target_low"]), float(control["target_high"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{config_path}: actor.entropy_control is enabled but target_low/target_high are not numbers"
        ) from None


def _name_runs(runs: list[Run]) -> None:
    """Colors by position; names are the directory names, with the parent added where two would clash."""
    names = [run.name for run in runs]
    for i, run in enumerate(runs):
        run.color = _COLORS[i % len(_COLORS)]
        if names.count(run.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.path.resolve().name}"
    seen: dict[str, int] = {}
    for run in runs:  # the same directory given twice
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"


# -- panels -------------------------------------------------------------------------------------------------


@dataclass
class Panel:
    """One figure of the report: its PNG, or the reason it has none."""

    slug: str
    title: str
    caption: str
    png: bytes | None = None
    notes: list[str] = field(default_factory=list)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    smoothed = np.convolve(values, kernel, mode="valid")
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)  # a shorter window over the first points
    return np.concatenate([head, smoothed])


def _window(points: int, smooth: int | None) -> int:
    if smooth is not None:
        return max(1, smooth)
    return max(1, points // 20) if points >= _SMOOTH_FROM else 1


def _plot_series(
    ax: Axes, run: Run, key: str, smooth: int | None, *, transform: float = 1.0, style: str = "-"
) -> bool:
    steps, values = run.series(key)
    if not len(steps):
        return False
    values = values * transform
    window = _window(len(values), smooth)
    if window > 1:
        ax.plot(steps, values, style, color=run.color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _moving_average(values, window), style, color=run.color, linewidth=1.8)
    else:
        marker = "o" if len(steps) <= 30 else None
        ax.plot(steps, values, style, color=run.color, linewidth=1.6, marker=marker, markersize=3.5)
    return True


def _style(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _empty(ax: Axes, title: str, message: str = "not logged by these runs") -> None:
    ax.set_title(title, fontsize=11)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#777777", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#dddddd")


def _run_legend(fig: Figure, runs: Sequence[Run]) -> None:
    """The runs' colors above the axes (room for it is kept free by ``_figure``)."""
    handles = [Line2D([], [], color=run.color, linewidth=2.5, label=run.name) for run in runs]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=min(len(handles), 6),
        frameon=False,
        fontsize=10,
        bbox_to_anchor=(0.5, 1.0),
    )


def _figure(rows: int, columns: int, row_height: float, **subplots: Any) -> tuple[Figure, np.ndarray]:
    # Every figure is drawn at the page's width (_FIGURE_WIDTH inches at _DPI), so that no figure is scaled
    # down in the browser and text is the same size in all of them; a single panel takes half the width.
    width = _FIGURE_WIDTH if columns > 1 else _FIGURE_WIDTH / 2
    fig = Figure(figsize=(width, row_height * rows + _LEGEND_HEIGHT), layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0, 1, 1 - _LEGEND_HEIGHT / fig.get_figheight()))
    return fig, fig.subplots(rows, columns, squeeze=False, **subplots).ravel()


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _missing_notes(runs: Sequence[Run], drawn: dict[str, list[bool]]) -> list[str]:
    """One note per run that lacks some of the metrics another run logged in this figure."""
    shown = [key for key, flags in drawn.items() if any(flags)]
    notes = []
    for i, run in enumerate(runs):
        absent = [key for key in shown if not drawn[key][i]]
        if not absent:
            continue
        if len(absent) == len(shown):
            notes.append(f"{html.escape(run.name)} logged none of these metrics.")
        else:
            keys = ", ".join(f"<code>{html.escape(key)}</code>" for key in absent)
            notes.append(f"{html.escape(run.name)} did not log {keys}.")
    return notes


def _metric_grid(
    runs: Sequence[Run],
    cells: Sequence[tuple[str, str, str]],
    *,
    columns: int,
    smooth: int | None,
    row_height: float = 3.4,
    share_row_y: bool = False,
    bands: dict[str, list[tuple[float, float, str]]] | None = None,
) -> tuple[bytes | None, list[str]]:
    """One axes per ``(key, title, ylabel)``, runs overlaid; None when no run logged any of the keys.
    ``bands``: per key, horizontal ``(low, high, color)`` spans shaded behind the curves."""
    if not any(run.has(key) for run in runs for key, _, _ in cells):
        return None, []
    rows = math.ceil(len(cells) / columns)
    fig, axes = _figure(rows, columns, row_height, sharey="row" if share_row_y else False)
    drawn: dict[str, list[bool]] = {}
    for ax, (key, title, ylabel) in zip(axes, cells, strict=False):  # the last row may have spare axes
        drawn[key] = [_plot_series(ax, run, key, smooth) for run in runs]
        if any(drawn[key]):
            for low, high, color in (bands or {}).get(key, []):
                ax.axhspan(low, high, color=color, alpha=0.12, linewidth=0, zorder=0)
            _style(ax, title, ylabel)
        else:
            _empty(ax, title)
    for ax in axes[len(cells) :]:
        ax.set_visible(False)
    if share_row_y:  # the row's first axes carries the shared label
        for i, ax in enumerate(axes):
            if i % columns:
                ax.set_ylabel("")
    _run_legend(fig, runs)
    return _png(fig), _missing_notes(runs, drawn)


def _entropy_dynamics(runs: Sequence[Run], smooth: int | None) -> tuple[bytes | None, list[str]]:
    """Observed entropy change against the covariance prediction, over steps and as a scatter."""
    cov, delta = "entropy/cov_logp_pA", "entropy/delta"
    if not any(run.has(cov) or run.has(delta) for run in runs):
        return None, []
    fig, (observed_ax, predicted_ax, scatter_ax) = _figure(1, 3, 3.6)
    drawn = {
        delta: [_plot_series(observed_ax, run, delta, smooth) for run in runs],
        cov: [_plot_series(predicted_ax, run, cov, smooth, transform=-1.0) for run in runs],
    }
    for ax, key, title, ylabel in (
        (observed_ax, delta, "Observed entropy change", "ΔH (entropy/delta)"),
        (predicted_ax, cov, "Predicted direction: −Cov(log π, π·Â)", "−entropy/cov_logp_pA"),
    ):
        if any(drawn[key]):
            _style(ax, title, ylabel)
            ax.axhline(0.0, color="#444444", linewidth=0.8)
        else:
            _empty(ax, title)
    scatter_drawn = False
    for run in runs:
        cov_steps, cov_values = run.series(cov)
        delta_steps, delta_values = run.series(delta)
        # The update of step t shows up as the change measured at step t+1.
        observed_at = dict(zip(delta_steps.tolist(), delta_values.tolist(), strict=True))
        pairs = [
            (-c, observed_at[s + 1])
            for s, c in zip(cov_steps.tolist(), cov_values.tolist(), strict=True)
            if s + 1 in observed_at
        ]
        if not pairs:
            continue
        x, y = np.array(pairs).T
        label = run.name
        if len(pairs) >= 3 and x.std() > 0 and y.std() > 0:
            agree = np.mean(np.sign(x) == np.sign(y))
            label += f": r = {np.corrcoef(x, y)[0, 1]:+.2f}, sign agrees {agree:.0%}"
        scatter_ax.scatter(x, y, s=12, color=run.color, alpha=0.6, label=label)
        scatter_drawn = True
    if scatter_drawn:
        _style(scatter_ax, "Observed vs predicted", "observed ΔH at step t+1")
        scatter_ax.set_xlabel("predicted direction −Cov at step t")
        # Covariances are small numbers: few ticks in scientific notation stay legible.
        scatter_ax.xaxis.set_major_locator(MaxNLocator(4))
        scatter_ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        scatter_ax.axhline(0.0, color="#444444", linewidth=0.8)
        scatter_ax.axvline(0.0, color="#444444", linewidth=0.8)
        scatter_ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    else:
        _empty(scatter_ax, "Observed vs predicted", "needs both metrics")
    _run_legend(fig, runs)
    return _png(fig), _missing_notes(runs, drawn)


def _val_keys(runs: Sequence[Run]) -> list[str]:
    return sorted({key for run in runs for key in run.keys if key.startswith("val/")})


def build_panels(runs: Sequence[Run], *, smooth: int | None = None) -> list[Panel]:
    """The report's figures, in order; a panel no run logged has ``png`` None and says so in ``notes``."""
    panels = [
        Panel(
            "reward",
            "Reward and accuracy",
            "Mean reward and fraction of correct responses over each step's rollouts (training prompts).",
        ),
        Panel(
            "validation",
            "Validation",
            "Benchmark accuracy during training: every <code>val/…</code> metric, e.g. "
            "<code>val/&lt;benchmark&gt;/avg@&lt;n&gt;</code> and <code>pass@&lt;n&gt;</code>, logged every "
            "<code>trainer.eval_every</code> steps.",
        ),
        Panel(
            "entropy",
            "Policy entropy",
            "Mean token entropy of the sampled responses, and CE-GPPO's gradient scales β1 (NA&amp;LP) "
            "and β2 (PA&amp;LP). A run steered by the entropy controller has its target band shaded in its "
            "color.",
        ),
        Panel(
            "clipping",
            "Clip fractions",
            "Share of response tokens outside the trust region: all clipped tokens, below 1−ε_low (negative "
            "advantage), above 1+ε_high (positive advantage) and beyond the dual-clip bound.",
        ),
        Panel(
            "quadrants",
            "Token quadrants",
            "Advantage sign (PA/NA) × old-policy probability (HP/LP). Rows: share of tokens, share of the "
            "quadrant's tokens beyond its clip bound, share of the gradient weight. PA&amp;HP and NA&amp;LP "
            "lower entropy; PA&amp;LP and NA&amp;HP raise it.",
        ),
        Panel(
            "entropy_dynamics",
            "Entropy change: predicted vs observed",
            "The covariance formula (CE-GPPO Eq. 7) predicts ΔH ≈ −η·Cov(log π, π·Â): a positive covariance "
            "predicts falling entropy. The update at step t is observed as <code>entropy/delta</code> at t+1.",
        ),
        Panel(
            "length",
            "Response length",
            "Mean response length in tokens, and the fraction of responses cut off at max_new_tokens.",
        ),
    ]
    val_cells = [(key, key.removeprefix("val/"), "accuracy") for key in _val_keys(runs)]
    grids: dict[str, tuple[list[tuple[str, str, str]], int]] = {
        "reward": (
            [("reward/mean", "Reward (mean)", "reward"), ("acc/mean", "Accuracy (mean)", "accuracy")],
            2,
        ),
        "validation": (val_cells, min(3, max(1, len(val_cells)))),
        "entropy": (
            [
                ("entropy/mean", "Entropy (mean)", "nats per token"),
                ("actor/beta1", "β1 (NA&LP scale)", "β1"),
                ("actor/beta2", "β2 (PA&LP scale)", "β2"),
            ],
            3,
        ),
        "clipping": (
            [
                (CLIP_KEYS[0], "All clipped (pg_clipfrac)", "fraction of tokens"),
                (CLIP_KEYS[1], "Low side, A < 0 (pg_clipfrac_low)", "fraction of tokens"),
                (CLIP_KEYS[2], "High side, A > 0 (pg_clipfrac_high)", "fraction of tokens"),
                (CLIP_KEYS[3], "Dual clip (pg_clipfrac_dual)", "fraction of tokens"),
            ],
            2,
        ),
        "quadrants": (
            [
                (f"quadrant/{q}/{stat}", f"{q}: {label}", label)
                for stat, label in zip(
                    QUADRANT_STATS, ("token share", "clipped share", "gradient share"), strict=True
                )
                for q in QUADRANTS
            ],
            4,
        ),
        "length": (
            [
                ("response_length/mean", "Response length (mean)", "tokens"),
                ("response_length/clip_ratio", "Truncated responses", "fraction"),
            ],
            2,
        ),
    }
    for panel in panels:
        if panel.slug == "entropy_dynamics":
            panel.png, panel.notes = _entropy_dynamics(runs, smooth)
        else:
            cells, columns = grids[panel.slug]
            panel.png, panel.notes = (
                _metric_grid(
                    runs,
                    cells,
                    columns=columns,
                    smooth=smooth,
                    row_height={"quadrants": 2.8, "clipping": 3.0}.get(panel.slug, 3.4),
                    share_row_y=panel.slug == "quadrants",  # quadrants are compared within a row
                    bands={
                        "entropy/mean": [(*run.entropy_band, run.color) for run in runs if run.entropy_band]
                    },
                )
                if cells
                else (None, [])
            )
        if panel.png is None:
            panel.notes = ["Not logged by any of these runs."]
    return panels


# -- tables -------------------------------------------------------------------------------------------------


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
        key for key in (*_TABLE_KEYS[:2], *_val_keys(runs), *_TABLE_KEYS[2:]) if any(r.has(key) for r in runs)
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


# -- the page -----------------------------------------------------------------------------------------------

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


def write_report(run_dirs: Sequence[str | Path], output: str | Path, *, smooth: int | None = None) -> Report:
    """Compare ``run_dirs`` in one self-contained HTML file ``output`` (PNGs embedded as base64) and write each
    figure as ``<output stem>_figures/<panel>.png`` beside it.

    ``smooth``: moving-average window in steps; None draws an average of ``len/20`` steps over the raw curve for
    runs of 40 steps or more, 1 draws raw curves only. Raises ValueError for a path that is not a run directory.
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    runs = [load_run(path) for path in run_dirs]
    _name_runs(runs)
    panels = build_panels(runs, smooth=smooth)
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
<h2>Final and best values</h2>
<p class="caption">Final: the last logged step. Best: the highest value and its step (reward, accuracy and
validation only).</p>
{_values_table(runs)}
{_summary_table(runs)}
{"".join(sections)}
</body></html>
"""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page)
    return Report(html=output, figures_dir=figures_dir, figures=figures, panels=panels)
