"""The report's figures: one panel per group of metrics, every curve (a run, or a variant's seeds) overlaid in
its own color."""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from cegppo.report.probe import paired
from cegppo.report.runs import Curve, Run, curves, val_keys
from cegppo.report.seeds import StepWindow, default_window, seed_paired
from cegppo.runfiles import QUADRANTS

CLIP_KEYS = ("actor/pg_clipfrac", "actor/pg_clipfrac_low", "actor/pg_clipfrac_high", "actor/pg_clipfrac_dual")
QUADRANT_STATS = ("frac", "clipped_frac", "grad_share")
# What the seed-paired panel compares: late entropy and accuracy, and every held-out average (val/…/avg@n).
SEED_PAIRED_KEYS = ("entropy/mean", "acc/mean")
# Series longer than this get a moving average drawn over the faint raw curve.
_SMOOTH_FROM = 40
_DPI = 110
_FIGURE_WIDTH = 12.0  # inches: 1320 px at _DPI, the page's content width
_LEGEND_HEIGHT = 0.45  # inches kept free above the axes for the runs' legend


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
        # a sparse series (validation) may have fewer points than the window
        return max(1, min(smooth, points))
    return max(1, points // 20) if points >= _SMOOTH_FROM else 1


def _plot_series(
    ax: Axes, curve: Curve, key: str, smooth: int | None, *, transform: float = 1.0, style: str = "-"
) -> bool:
    """Draw ``key`` of ``curve``: a run's values, or the seeds' mean over a band from the lowest to the highest
    seed (each seed smoothed as the mean is, so the band shows the spread of the curves drawn)."""
    steps, seeds = curve.seed_values(key)
    if not len(steps):
        return False
    seeds = seeds * transform
    values = seeds.mean(axis=0)
    window = _window(len(values), smooth)
    if window > 1:
        seeds = np.array([_moving_average(seed, window) for seed in seeds])
        ax.plot(steps, values, style, color=curve.color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, seeds.mean(axis=0), style, color=curve.color, linewidth=1.8)
    else:
        marker = "o" if len(steps) <= 30 else None
        ax.plot(steps, values, style, color=curve.color, linewidth=1.6, marker=marker, markersize=3.5)
    if len(seeds) > 1:
        ax.fill_between(
            steps, seeds.min(axis=0), seeds.max(axis=0), color=curve.color, alpha=0.18, linewidth=0
        )
    return True


def _style(ax: Axes, title: str, ylabel: str, *, by_variant: bool = False) -> None:
    ax.set_title(title, fontsize=11)
    if by_variant:  # the ticks are the variants' names, set by the caller
        ax.set_xlabel("variant")
    else:
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


def _run_legend(fig: Figure, lines: Sequence[Curve]) -> None:
    """The curves' colors above the axes (room for it is kept free by ``_figure``)."""
    handles = [Line2D([], [], color=line.color, linewidth=2.5, label=line.name) for line in lines]
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


def _codes(keys: Sequence[str]) -> str:
    return ", ".join(f"<code>{html.escape(key)}</code>" for key in keys)


def _missing_notes(lines: Sequence[Curve], drawn: dict[str, list[bool]]) -> list[str]:
    """One note per curve that lacks some of the metrics another curve logged in this figure, and one per mean
    over seeds that leaves out steps some of its seeds logged."""
    shown = [key for key, flags in drawn.items() if any(flags)]
    notes = []
    for i, line in enumerate(lines):
        name = html.escape(line.name)
        absent = [key for key in shown if not drawn[key][i]]
        if absent and len(line.runs) > 1:
            notes.append(f"{name}: no step at which all seeds logged {_codes(absent)}.")
        elif absent and len(absent) == len(shown):
            notes.append(f"{name} logged none of these metrics.")
        elif absent:
            notes.append(f"{name} did not log {_codes(absent)}.")
        partial = [key for key in shown if drawn[key][i] and line.partial(key)]
        if partial:
            which = "these metrics" if partial == shown else _codes(partial)
            notes.append(
                f"{name}: its seeds logged {which} at different steps; the mean is drawn at the steps all of "
                "them logged (<code>--per-seed</code> draws each run)."
            )
    return notes


def _metric_grid(
    lines: Sequence[Curve],
    cells: Sequence[tuple[str, str, str]],
    *,
    columns: int,
    smooth: int | None,
    row_height: float = 3.4,
    share_row_y: bool = False,
    bands: dict[str, list[tuple[float, float, str]]] | None = None,
) -> tuple[bytes | None, list[str]]:
    """One axes per ``(key, title, ylabel)``, curves overlaid; None when no curve has any of the keys.
    ``bands``: per key, horizontal ``(low, high, color)`` spans shaded behind the curves."""
    if not any(line.has(key) for line in lines for key, _, _ in cells):
        return None, []
    rows = math.ceil(len(cells) / columns)
    fig, axes = _figure(rows, columns, row_height, sharey="row" if share_row_y else False)
    drawn: dict[str, list[bool]] = {}
    for ax, (key, title, ylabel) in zip(axes, cells, strict=False):  # the last row may have spare axes
        drawn[key] = [_plot_series(ax, line, key, smooth) for line in lines]
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
    _run_legend(fig, lines)
    return _png(fig), _missing_notes(lines, drawn)


def _predicted_observed(run: Run, cov: str, delta: str) -> list[tuple[float, float]]:
    """``(−Cov at step t, ΔH at step t+1)``: the update of step t shows up as the change measured at t+1."""
    cov_steps, cov_values = run.series(cov)
    observed_at = dict(zip(*(a.tolist() for a in run.series(delta)), strict=True))
    return [
        (-c, observed_at[s + 1])
        for s, c in zip(cov_steps.tolist(), cov_values.tolist(), strict=True)
        if s + 1 in observed_at
    ]


def _entropy_dynamics(lines: Sequence[Curve], smooth: int | None) -> tuple[bytes | None, list[str]]:
    """Observed entropy change against the covariance prediction, over steps and as a scatter (a variant's
    seeds pooled into one cloud)."""
    cov, delta = "entropy/cov_logp_pA", "entropy/delta"
    if not any(line.has(cov) or line.has(delta) for line in lines):
        return None, []
    fig, (observed_ax, predicted_ax, scatter_ax) = _figure(1, 3, 3.6)
    drawn = {
        delta: [_plot_series(observed_ax, line, delta, smooth) for line in lines],
        cov: [_plot_series(predicted_ax, line, cov, smooth, transform=-1.0) for line in lines],
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
    for line in lines:
        pairs = [pair for run in line.runs for pair in _predicted_observed(run, cov, delta)]
        if not pairs:
            continue
        x, y = np.array(pairs).T
        label = line.name
        if len(pairs) >= 3 and x.std() > 0 and y.std() > 0:
            agree = np.mean(np.sign(x) == np.sign(y))
            label += f": r = {np.corrcoef(x, y)[0, 1]:+.2f}, sign agrees {agree:.0%}"
        scatter_ax.scatter(x, y, s=12, color=line.color, alpha=0.6, label=label)
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
    _run_legend(fig, lines)
    return _png(fig), _missing_notes(lines, drawn)


def _probe_panel(rows: Sequence[dict[str, Any]], reference: str) -> tuple[bytes | None, list[str]]:
    """Each variant's paired Δlog H and KL against ``reference``: one dot per probe point, the mean with its
    95% paired bootstrap interval, one column per epoch; the variants in probe order (a dose-response in β reads
    left to right when they are listed by β)."""
    if not rows:
        return None, []
    try:
        by_outcome = {
            outcome: paired(rows, reference, outcome) for outcome in ("delta_log_entropy", "kl_from_before")
        }
    except ValueError as error:
        return None, [html.escape(str(error))]
    pairs = by_outcome["delta_log_entropy"]
    if not pairs:
        return None, [f"No variant shares a probe point with the reference {html.escape(reference)!s}."]
    names = list(dict.fromkeys(pair.variant for pair in pairs))
    epochs = sorted({pair.epoch for pair in pairs})
    fig, axes = _figure(1, 2, 3.8)
    colors = {epoch: f"C{i}" for i, epoch in enumerate(epochs)}
    width = 0.6 / max(len(epochs), 1)
    for ax, (outcome, label) in zip(
        axes, (("delta_log_entropy", "Δlog H"), ("kl_from_before", "KL from before")), strict=True
    ):
        for pair in by_outcome[outcome]:
            x = names.index(pair.variant) + (epochs.index(pair.epoch) - (len(epochs) - 1) / 2) * width
            ax.scatter(
                np.full(len(pair.differences), x), pair.differences, s=8, alpha=0.3, color=colors[pair.epoch]
            )
            ax.errorbar(
                x,
                pair.mean,
                yerr=[[pair.mean - pair.ci[0]], [pair.ci[1] - pair.mean]],
                fmt="o",
                color=colors[pair.epoch],
                capsize=3,
                label=f"epoch {pair.epoch}" if pair.variant == names[0] else None,
            )
        ax.axhline(0.0, color="#444444", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
        _style(ax, f"{label}: variant − {reference}", f"paired difference in {label}", by_variant=True)
        ax.legend(fontsize=8, loc="best")
    points = max(len(pair.differences) for pair in pairs)
    notes = [
        f"{html.escape(pair.variant)}, epoch {pair.epoch}: Δlog H − {html.escape(reference)} = {pair.mean:+.4f} "
        f"[{pair.ci[0]:+.4f}, {pair.ci[1]:+.4f}], sign-flip p = {pair.p_two_sided:.3g} over "
        f"{len(pair.differences)} probe points"
        for pair in pairs
    ]
    return _png(fig), [f"Up to {points} probe points per variant.", *notes]


def _seed_paired_panel(
    runs: Sequence[Run], reference: str, window: StepWindow | None
) -> tuple[bytes | None, list[str]]:
    """Each variant minus ``reference`` of the same seed, one column per metric (its mean over ``window``): one
    dot per seed, the mean with its 95% paired bootstrap interval. Raises ValueError for a reference that names no
    seeded run."""
    window = window or default_window(runs)
    keys = [*SEED_PAIRED_KEYS, *(key for key in val_keys(runs) if "/avg@" in key)]
    by_key = {key: seed_paired(runs, reference, key, window) for key in keys}
    by_key = {key: pairs for key, pairs in by_key.items() if pairs}
    if not by_key:
        return None, [
            f"No variant shares a finished seed with {html.escape(reference)} over steps {window} (runs named "
            "&lt;variant&gt;-s&lt;seed&gt; that reached the window's last step)."
        ]
    columns = min(3, len(by_key))
    rows = math.ceil(len(by_key) / columns)
    fig, axes = _figure(rows, columns, 3.8)
    for ax, (key, pairs) in zip(axes, by_key.items(), strict=False):
        names = [pair.variant for pair in pairs]
        for x, pair in enumerate(pairs):
            ax.scatter(np.full(len(pair.differences), x), pair.differences, s=12, alpha=0.4, color=f"C{x}")
            ax.errorbar(
                x,
                pair.mean,
                yerr=[[pair.mean - pair.ci[0]], [pair.ci[1] - pair.mean]],
                fmt="o",
                color=f"C{x}",
                capsize=3,
            )
        ax.axhline(0.0, color="#444444", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
        _style(ax, f"{key}: variant − {reference}", f"paired difference, steps {window}", by_variant=True)
    for ax in axes[len(by_key) :]:
        ax.set_visible(False)
    notes = [
        f"<code>{html.escape(pair.key)}</code>, {html.escape(pair.variant)} − {html.escape(reference)} = "
        f"{pair.mean:+.4f} [{pair.ci[0]:+.4f}, {pair.ci[1]:+.4f}], sign-flip p = {pair.p_two_sided:.3g} over "
        f"{len(pair.seeds)} seed{'s' if len(pair.seeds) != 1 else ''}"
        for pairs in by_key.values()
        for pair in pairs
    ]
    return _png(fig), [f"Each run's mean over steps {window}; one dot per seed.", *notes]


def build_panels(
    runs: Sequence[Run],
    *,
    smooth: int | None = None,
    per_seed: bool = False,
    probe_reference: str = "trajectory",
    paired_reference: str | None = None,
    paired_steps: StepWindow | None = None,
) -> list[Panel]:
    """The report's figures, in order; a panel no run logged has ``png`` None and says so in ``notes``.

    Runs named ``<variant>-s<seed>`` (``cegppo sweep``'s) are drawn per variant, as the mean over its seeds with
    a min–max band, where a variant has two or more; ``per_seed`` draws every run on its own. Each run's
    ``color`` is set to its curve's. ``paired_reference`` adds a panel of every variant minus that variant of
    the same seed, each run's metrics averaged over ``paired_steps`` (default: the second half of the steps);
    raises ValueError when it names no seeded run, or when ``paired_steps`` is given without it."""
    if paired_steps is not None and paired_reference is None:
        raise ValueError(
            "paired_steps (--paired-steps) is the seed-paired panel's window: give paired_reference"
        )
    lines = curves(runs, per_seed=per_seed)
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
            "color (a horizontal band, behind the curves).",
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
        Panel(
            "roofline",
            "Fraction of peak",
            "Each phase's useful FLOPs (from the model config: dense and causal attention terms, the tokens "
            "actually run, a shared prompt once) over its seconds and the machine's peak matmul rate "
            "(<code>perf/mfu/&lt;phase&gt;</code>, verl's MFU; the peak is measured by a matmul probe or "
            "given as <code>trainer.peak_tflops</code>).",
        ),
    ]
    val_cells = [(key, key.removeprefix("val/"), "accuracy") for key in val_keys(runs)]
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
        "roofline": (
            [
                ("perf/mfu/gen", "Generation", "fraction of peak"),
                ("perf/mfu/old_logprob", "Old log-probs / reference", "fraction of peak"),
                ("perf/mfu/update", "Update (forward + backward)", "fraction of peak"),
            ],
            3,
        ),
    }
    probe_rows = [row for run in runs for row in run.probe]
    if probe_rows:
        panels.append(
            Panel(
                "probe",
                "Paired probe",
                "At each probe point every variant's update was applied to the same batch from the same state "
                "(docs/entropy.md); shown is each variant minus the reference at the same point: the change in "
                "log entropy of the probe set, and the KL from the pre-update policy.",
            )
        )
    if paired_reference is not None:
        panels.append(
            Panel(
                "seed_paired",
                "Paired by seed",
                "Each variant minus the reference run of the same seed (same initial model, prompts and first "
                "samples), each run's metric averaged over a window of steps: the seed-to-seed spread cancels.",
            )
        )
    for panel in panels:
        if panel.slug == "probe":
            panel.png, panel.notes = _probe_panel(probe_rows, probe_reference)
            continue
        if panel.slug == "seed_paired" and paired_reference is not None:
            panel.png, panel.notes = _seed_paired_panel(runs, paired_reference, paired_steps)
            continue
        if panel.slug == "entropy_dynamics":
            panel.png, panel.notes = _entropy_dynamics(lines, smooth)
        else:
            cells, columns = grids[panel.slug]
            panel.png, panel.notes = (
                _metric_grid(
                    lines,
                    cells,
                    columns=columns,
                    smooth=smooth,
                    row_height={"quadrants": 2.8, "clipping": 3.0}.get(panel.slug, 3.4),
                    share_row_y=panel.slug == "quadrants",  # quadrants are compared within a row
                    bands={
                        "entropy/mean": [(*band, line.color) for line in lines for band in line.entropy_bands]
                    },
                )
                if cells
                else (None, [])
            )
        if panel.png is None:
            panel.notes = ["Not logged by any of these runs."]
    return panels


# -- tables -------------------------------------------------------------------------------------------------
