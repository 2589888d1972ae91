"""Run reports on synthetic run directories; a screenshot check in headless Chromium where it is installed.

Run as a script (``python tests/test_report.py DIR``) to write the two synthetic runs into DIR (``make
report-check`` does, to render and screenshot them).
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

from cegppo.config import load_config, to_yaml
from cegppo.dynamics import QUADRANTS
from cegppo.report import Report, final_and_best, load_run, write_report
from cegppo.report.panels import _plot_series
from cegppo.report.runs import curves, name_runs, variant_and_seed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_synthetic_run(
    run_dir: Path, *, steps: int, seed: int, quadrants: bool, entropy_floor: float, val_every: int = 10
) -> Path:
    """A plausible run: rising reward, decaying entropy; quadrant and covariance metrics only if asked."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True)
    entropies = [
        entropy_floor + (0.9 - entropy_floor) * math.exp(-2.5 * step / steps) + rng.gauss(0, 0.01)
        for step in range(steps + 2)
    ]
    records = []
    for step in range(1, steps + 1):
        progress = step / steps
        acc = min(1.0, 0.3 + 0.4 * (1 - math.exp(-3 * progress)) + rng.gauss(0, 0.05))
        previous, entropy, following = entropies[step - 1 : step + 2]
        clip_low, clip_high = abs(rng.gauss(0.004, 0.001)), abs(rng.gauss(0.006, 0.0015))
        record = {
            "step": step,
            "reward/mean": 2 * acc - 1,
            "acc/mean": acc,
            "entropy/mean": entropy,
            "response_length/mean": 120 + 60 * progress + rng.gauss(0, 5),
            "response_length/clip_ratio": max(0.0, 0.05 + 0.1 * progress + rng.gauss(0, 0.02)),
            "actor/pg_clipfrac": clip_low + clip_high,
            "actor/pg_clipfrac_low": clip_low,
            "actor/pg_clipfrac_high": clip_high,
            "actor/pg_clipfrac_dual": abs(rng.gauss(0.0002, 0.0001)),
            "actor/grad_norm": None if step == 3 else 0.5,  # a skipped update logs null
            "perf/mfu/gen": 0.3 + rng.gauss(0, 0.02),
            "perf/mfu/old_logprob": 0.5 + rng.gauss(0, 0.02),
            "perf/mfu/update": 0.4 + rng.gauss(0, 0.02),
        }
        if quadrants:
            shares = [0.45, 0.1, 0.35, 0.1]
            for name, share in zip(QUADRANTS, shares, strict=True):
                record[f"quadrant/{name}/frac"] = share + rng.gauss(0, 0.01)
                record[f"quadrant/{name}/clipped_frac"] = abs(
                    rng.gauss(0.02 if "LP" in name else 0.001, 0.005)
                )
                record[f"quadrant/{name}/grad_share"] = share + rng.gauss(0, 0.02)
            # Positive covariance predicts the entropy drop that the next step observes.
            record["entropy/cov_logp_pA"] = (entropy - following) * 5 + rng.gauss(0, 0.02)
            if step > 1:
                record["entropy/delta"] = entropy - previous
            record["actor/beta1"] = 0.5
            record["actor/beta2"] = 1.0
        if step % val_every == 0:
            record["val/aime24/avg@4"] = 0.1 + 0.1 * progress + rng.gauss(0, 0.01)
            record["val/aime24/pass@4"] = 0.2 + 0.1 * progress + rng.gauss(0, 0.01)
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "run_dir": str(run_dir),
        "steps": steps,
        "wall_s": 123.4,
        "heldout_acc_before": 0.35,
        "heldout_acc_after": round(records[-1]["acc/mean"], 3),
        "heldout_size": 200,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def write_run(
    run_dir: Path, metrics: dict[str, Sequence[float | None]], summary: dict[str, Any] | None = None
) -> Path:
    """A run written by hand: ``metrics[key][i]`` is logged at step ``i + 1`` (None logs null; a shorter list
    stops earlier), and ``summary.json`` when given."""
    run_dir.mkdir(parents=True)
    steps = max(len(values) for values in metrics.values())
    records = [
        {"step": step, **{key: values[step - 1] for key, values in metrics.items() if step <= len(values)}}
        for step in range(1, steps + 1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def write_two_runs(root: Path) -> list[Path]:
    """``ce_gppo`` with every metric, and an older ``grpo`` run without quadrant/covariance metrics."""
    return [
        write_synthetic_run(root / "ce_gppo", steps=120, seed=1, quadrants=True, entropy_floor=0.45),
        write_synthetic_run(root / "grpo", steps=100, seed=2, quadrants=False, entropy_floor=0.1),
    ]


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


@pytest.fixture(scope="module")
def two_run_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Report]:
    """The report of the two synthetic runs (read-only: rendering it takes a few seconds)."""
    root = tmp_path_factory.mktemp("report")
    runs = write_two_runs(root / "runs")
    return runs, write_report(runs, root / "out" / "report.html")


def test_report_embeds_every_figure_and_writes_the_pngs_beside_it(two_run_report):
    _, report = two_run_report
    out = report.html.parent

    page = report.html.read_text()
    images = embedded_pngs(page)
    slugs = [panel.slug for panel in report.panels]
    assert slugs == [
        "reward",
        "validation",
        "entropy",
        "clipping",
        "quadrants",
        "entropy_dynamics",
        "length",
        "roofline",
    ]
    assert len(images) == len(report.figures) == len(slugs)  # the quadrant panel shows the run that has them
    assert all(image.startswith(PNG_MAGIC) for image in images)
    assert [p.name for p in report.figures] == [f"{slug}.png" for slug in slugs]
    assert report.figures_dir == out / "report_figures"
    assert all(p.parent == report.figures_dir for p in report.figures)
    assert images == [p.read_bytes() for p in report.figures]
    assert 'src="http' not in page and "src='http" not in page  # self-contained
    # The older run is named where quadrant metrics are missing, and both runs are in the legend tables.
    quadrants = next(panel for panel in report.panels if panel.slug == "quadrants")
    assert any("grpo" in note for note in quadrants.notes)
    assert "ce_gppo" in page and "grpo" in page


def test_report_table_has_final_and_best_values_and_the_summary(two_run_report):
    runs, report = two_run_report
    page = report.html.read_text()

    run = load_run(runs[0])
    accuracies = [r["acc/mean"] for r in run.records]
    final, best, step = final_and_best(run, "acc/mean")
    assert final == accuracies[-1] and best == max(accuracies) and step == accuracies.index(best) + 1
    assert final_and_best(run, "entropy/mean")[1:] == (None, None)  # no "best" entropy
    assert final_and_best(load_run(runs[1]), "quadrant/PA&HP/frac") is None
    for key in (
        "acc/mean",
        "val/aime24/avg@4",
        "val/aime24/pass@4",
        "entropy/mean",
        "heldout_acc_before",
        "heldout_acc_after",
    ):
        assert key in page
    assert f"{best:.4g}" in page and f"({step})" in page
    assert "0.35" in page  # summary.json's heldout_acc_before


def test_a_run_without_any_optional_metric_gets_notes_not_errors(tmp_path):
    run = tmp_path / "minimal"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward/mean": 0.1 * s, "entropy/mean": None}) + "\n" for s in (1, 2))
    )
    report = write_report([run], tmp_path / "r.html")

    by_slug = {panel.slug: panel for panel in report.panels}
    assert by_slug["reward"].png is not None
    for slug in ("validation", "entropy", "clipping", "quadrants", "entropy_dynamics", "length", "roofline"):
        assert by_slug[slug].png is None and by_slug[slug].notes == ["Not logged by any of these runs."]
    page = report.html.read_text()
    assert len(embedded_pngs(page)) == 1 and page.count("Not logged by any of these runs.") == 7
    assert "No run has a summary.json" in page


def test_runs_with_the_same_directory_name_are_told_apart(tmp_path):
    a = write_synthetic_run(tmp_path / "a" / "run", steps=5, seed=0, quadrants=False, entropy_floor=0.2)
    b = write_synthetic_run(tmp_path / "b" / "run", steps=5, seed=1, quadrants=False, entropy_floor=0.2)
    page = write_report([a, b], tmp_path / "r.html").html.read_text()
    assert "a/run" in page and "b/run" in page


def test_a_controlled_run_has_its_target_band_shaded_on_the_entropy_axes(tmp_path):
    control = ["actor.entropy_control.target_low=0.4", "actor.entropy_control.target_high=0.6"]
    runs = {}
    for name, overrides in (
        ("fixed", control),
        ("controlled", [*control, "actor.entropy_control.enabled=true"]),
    ):
        # the same directory name, so that the legends match too
        runs[name] = write_synthetic_run(
            tmp_path / name / "run", steps=20, seed=0, quadrants=True, entropy_floor=0.3
        )
        (runs[name] / "config.yaml").write_text(to_yaml(load_config(None, overrides)))
    assert load_run(runs["controlled"]).entropy_band == (0.4, 0.6)
    assert load_run(runs["fixed"]).entropy_band is None  # the controller is off

    def entropy_png(run: Path) -> bytes:
        report = write_report([run], tmp_path / f"{run.parent.name}.html")
        return (report.figures_dir / "entropy.png").read_bytes()

    # the two runs differ only in whether the band is drawn
    assert entropy_png(runs["controlled"]) != entropy_png(runs["fixed"])


def test_the_seeds_of_a_variant_are_one_curve_at_the_steps_all_of_them_logged(tmp_path):
    paths = [
        write_run(tmp_path / "grpo-s0", {"entropy/mean": [1.0, 0.8, 0.6]}),
        write_run(
            tmp_path / "grpo-s1", {"entropy/mean": [0.8, 0.6, None, 0.2]}
        ),  # step 3 null, one step more
        write_run(tmp_path / "grpo", {"entropy/mean": [0.5]}),  # not a seed of grpo
        write_run(tmp_path / "ce-s3", {"entropy/mean": [0.7, 0.7]}),  # a single seed draws as a run
    ]
    runs = [load_run(path) for path in paths]
    name_runs(runs)
    grouped = curves(runs)
    assert [line.name for line in grouped] == ["grpo (2 seeds)", "grpo", "ce-s3"]
    steps, seeds = grouped[0].seed_values("entropy/mean")
    assert steps.tolist() == [1, 2] and seeds.tolist() == [[1.0, 0.8], [0.8, 0.6]]
    assert grouped[0].series("entropy/mean")[1].tolist() == pytest.approx([0.9, 0.7])
    assert grouped[0].partial("entropy/mean") and not grouped[2].partial("entropy/mean")
    assert not grouped[0].has("acc/mean")
    # one color per curve, and the runs take it (the page's tables use the runs' colors)
    assert runs[0].color == runs[1].color == grouped[0].color != grouped[1].color == runs[2].color
    assert [line.name for line in curves(runs, per_seed=True)] == ["grpo-s0", "grpo-s1", "grpo", "ce-s3"]
    assert len({run.color for run in runs}) == 4
    assert variant_and_seed("ce_gppo_b0.5_1-s12") == ("ce_gppo_b0.5_1", 12)
    assert variant_and_seed("grpo-s1 (2)") is None and variant_and_seed("grpo-seed1") is None


@pytest.mark.parametrize("smooth", [1, 2])
def test_a_variant_draws_its_mean_over_a_band_from_the_lowest_to_the_highest_seed(tmp_path, smooth):
    values = {"grpo-s0": [1.0, 0.6, 0.5], "grpo-s1": [0.8, 0.8, 0.1], "grpo-s2": [0.6, 0.4, 0.3]}
    runs = [load_run(write_run(tmp_path / name, {"entropy/mean": v})) for name, v in values.items()]
    (line,) = curves(runs)
    ax = Figure().subplots()
    assert _plot_series(ax, line, "entropy/mean", smooth)
    seeds = np.array(list(values.values()))
    if (
        smooth > 1
    ):  # each seed is smoothed (the first point averages itself only), then mean and band are taken
        seeds = np.concatenate([seeds[:, :1], (seeds[:, 1:] + seeds[:, :-1]) / 2], axis=1)
    assert ax.lines[-1].get_ydata() == pytest.approx(seeds.mean(axis=0))
    (band,) = ax.collections
    edge = band.get_paths()[0].vertices
    for step, low, high in zip([1, 2, 3], seeds.min(axis=0), seeds.max(axis=0), strict=True):
        at_step = edge[edge[:, 0] == step, 1]
        assert at_step.min() == pytest.approx(low) and at_step.max() == pytest.approx(high)
    single = Figure().subplots()
    _plot_series(single, curves(runs[:1])[0], "entropy/mean", smooth)
    assert not single.collections  # a single run has no band


def test_a_report_of_seeded_runs_shows_bands_unless_per_seed(tmp_path):
    paths = [
        write_synthetic_run(
            tmp_path / f"grpo-s{seed}", steps=12 + seed, seed=seed, quadrants=True, entropy_floor=0.2
        )
        for seed in range(3)
    ]
    grouped = write_report(paths, tmp_path / "grouped.html", smooth=3)
    per_seed = write_report(paths, tmp_path / "per_seed.html", smooth=3, per_seed=True)
    assert len(grouped.figures) == len(per_seed.figures) == 8
    for a, b in zip(grouped.figures, per_seed.figures, strict=True):
        assert a.read_bytes() != b.read_bytes(), a.name
    page = grouped.html.read_text()
    assert "mean over its seeds" in page and "mean over its seeds" not in per_seed.html.read_text()
    entropy = next(panel for panel in grouped.panels if panel.slug == "entropy")
    assert entropy.notes == [
        "grpo (3 seeds): its seeds logged these metrics at different steps; the mean is drawn at the steps all of "
        "them logged (<code>--per-seed</code> draws each run)."
    ]
    assert not any(panel.notes for panel in per_seed.panels)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "is not a run directory"),
        (
            lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')),
            "metrics.jsonl:2",
        ),
        (lambda d: (d.mkdir(), (d / "summary.json").write_text("{")), "summary.json"),
        (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"loss": 1}\n')), "metrics.jsonl:1"),
        (
            lambda d: (
                d.mkdir(),
                (d / "metrics.jsonl").write_text('{"step": 1}\n'),
                (d / "config.yaml").write_text("actor: [\n"),
            ),
            "config.yaml: not valid YAML",
        ),
    ],
)
def test_bad_run_directories_are_named(tmp_path, setup, message):
    run = tmp_path / "bad"
    setup(run)
    with pytest.raises(ValueError, match=re.escape(message)):
        write_report([run], tmp_path / "r.html")


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs the chromium browser (Debian: apt install chromium)"
)
@pytest.mark.timeout(120)
def test_report_renders_in_headless_chromium(two_run_report, tmp_path):
    _, report = two_run_report
    screenshot = tmp_path / "screenshot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={screenshot}",
            "--window-size=1400,3000",
            report.html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=110,
    )
    from matplotlib.image import imread

    pixels = imread(screenshot)
    assert pixels.shape[:2] == (3000, 1400)
    # A blank or broken page is (nearly) one color; a rendered report has text, tables and plots.
    assert pixels[..., :3].std() > 0.05


if __name__ == "__main__":
    for path in write_two_runs(Path(sys.argv[1])):
        print(path)


def test_the_report_reads_runs_without_importing_the_trainer_torch_or_transformers():
    code = (
        "import sys, cegppo.report, cegppo.report.stats; "
        "print(sorted(m for m in sys.modules if m in ('torch', 'transformers') or m.startswith('cegppo.trainer')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- paired by seed -------------------------------------------------------------------------------------------


def write_seeded_runs(root: Path) -> list[Path]:
    """Variants ``a`` (the reference), ``b`` = a − 0.1 + 0.01·seed in entropy over steps 3-4, ``c`` without
    seed 2; ``b-s3`` stops at step 3 (unfinished: no seed 3 in the pairs)."""
    paths = []
    for seed in range(4):
        base = [1.0, 0.9, 0.5 + 0.05 * seed, 0.4 + 0.05 * seed]
        paths.append(write_run(root / f"a-s{seed}", {"entropy/mean": base, "acc/mean": [0.1, 0.2, 0.3, 0.4]}))
        shifted = [value - 0.1 + 0.01 * seed for value in base]
        paths.append(write_run(root / f"b-s{seed}", {"entropy/mean": shifted[: 3 if seed == 3 else 4]}))
        if seed != 2:
            paths.append(write_run(root / f"c-s{seed}", {"entropy/mean": [v + 0.2 for v in base]}))
    return paths


def test_variants_are_paired_with_the_reference_of_the_same_seed_over_a_window(tmp_path):
    from cegppo.report.seeds import StepWindow, default_window, seed_paired

    runs = [load_run(path) for path in write_seeded_runs(tmp_path)]
    name_runs(runs)
    assert default_window(runs) == StepWindow(2, 3)  # b-s3 reached step 3 only
    b, c = seed_paired(runs, "a", "entropy/mean", StepWindow(3, 4))
    assert (b.variant, b.seeds, c.variant, c.seeds) == ("b", (0, 1, 2), "c", (0, 1, 3))
    assert b.differences == pytest.approx([-0.1, -0.09, -0.08]) and b.mean == pytest.approx(-0.09)
    assert c.differences == pytest.approx([0.2, 0.2, 0.2]) and c.ci == pytest.approx((0.2, 0.2))
    assert b.p_two_sided == pytest.approx(0.25)  # 3 seeds, all one sign: 2 of 8 sign patterns as extreme
    # a metric only the reference logged pairs with nothing
    assert seed_paired(runs, "a", "acc/mean", StepWindow(3, 4)) == []
    with pytest.raises(ValueError, match=r"paired reference 'grpo' names no run.*the variants here: a, b, c"):
        seed_paired(runs, "grpo", "entropy/mean", StepWindow(3, 4))


@pytest.mark.parametrize("text", ["6", "6-15", "a:b", "0:3", "5:4", ":4"])
def test_a_bad_step_window_is_named(text):
    from cegppo.report.seeds import StepWindow

    with pytest.raises(ValueError, match=re.escape(repr(text)) + "|1 <= FIRST <= LAST"):
        StepWindow.parse(text)
    assert StepWindow.parse("6:15") == StepWindow(6, 15) and str(StepWindow(6, 15)) == "6-15"


def test_a_report_paired_by_seed_has_its_panel_and_a_bad_reference_writes_nothing(tmp_path):
    from cegppo.report.seeds import StepWindow

    paths = write_seeded_runs(tmp_path / "runs")
    report = write_report(
        paths, tmp_path / "paired.html", smooth=1, paired_reference="a", paired_steps=StepWindow(3, 4)
    )
    panel = next(panel for panel in report.panels if panel.slug == "seed_paired")
    assert panel.png is not None and panel.png.startswith(PNG_MAGIC)
    assert panel.notes[0] == "Each run's mean over steps 3-4; one dot per seed."
    assert (
        "<code>entropy/mean</code>, b − a = -0.0900 [" in panel.notes[1] and "over 3 seeds" in panel.notes[1]
    )
    assert (tmp_path / "paired_figures" / "seed_paired.png").read_bytes() == panel.png
    plain = write_report(paths, tmp_path / "plain.html", smooth=1)
    assert "seed_paired" not in {panel.slug for panel in plain.panels}
    for kwargs, message in (
        ({"paired_reference": "grpo"}, "paired reference 'grpo'"),
        ({"paired_steps": StepWindow(3, 4)}, "give paired_reference"),
    ):
        with pytest.raises(ValueError, match=message):
            write_report(paths, tmp_path / "bad" / "r.html", **kwargs)
    assert not (tmp_path / "bad").exists()
    # no variant finished the window: a note, not an error
    late = write_report(paths, tmp_path / "late.html", paired_reference="a", paired_steps=StepWindow(5, 6))
    (empty,) = [panel for panel in late.panels if panel.slug == "seed_paired"]
    assert empty.png is None and "No variant shares a finished seed with a over steps 5-6" in empty.notes[0]
