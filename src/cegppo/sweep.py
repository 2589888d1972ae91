"""The entropy experiment: the same budget for GRPO, DAPO clip-higher, GPPO and CE-GPPO at several (β1, β2).

Each variant × seed is an ordinary run under ``output_dir``; a finished run (``summary.json``) is skipped, an
interrupted one resumed from its last checkpoint (started again when it was killed before its first), so
re-running the same command completes a sweep. Besides ``VARIANTS`` (the default set), a variant may be one of
the ``METHODS`` presets or the name of any registered loss (``cegppo.presets``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cegppo.config import Config, load_config
from cegppo.presets import VARIANTS, variant_overrides
from cegppo.report.runs import Run, by_variant, flatten, load_run, variant_and_seed
from cegppo.report.stats import heldout_accuracy, late_mean, seed_summary
from cegppo.runfiles import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PROBE_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    read_metrics,
)
from cegppo.trainer import Trainer, load_run_config
from cegppo.trainer.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

# What a run writes in its directory before it finishes; an unsaved start holding anything else is not the sweep's
# to delete.
RUN_FILES = frozenset({CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, PROBE_FILE, CHECKPOINTS_DIR, "tensorboard"})


def run_sweep(
    output_dir: Path,
    *,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    variants: Sequence[str] = tuple(VARIANTS),
    on_run: Callable[[str, Path], None] | None = None,
) -> list[Path]:
    """Run (or finish) every variant × seed; returns the run directories in order."""
    settings = {name: variant_overrides(name) for name in variants}
    run_dirs = []
    for variant in variants:
        for seed in seeds:
            name = f"{variant}-s{seed}"
            run_dir = output_dir / name
            run_dirs.append(run_dir)
            if (run_dir / SUMMARY_FILE).is_file():
                continue
            if on_run is not None:
                on_run(name, run_dir)
            if latest_checkpoint(run_dir / "checkpoints") is not None:
                trainer = Trainer(load_run_config(run_dir), run_dir, resume=True)
            else:
                config = load_config(
                    config_path,
                    [
                        *overrides,
                        *settings[variant],
                        f"trainer.seed={seed}",
                        f"data.seed={seed}",
                        f"trainer.output_dir={output_dir}",
                        f"trainer.name={name}",
                    ],
                )
                _discard_unsaved_start(run_dir, config)
                trainer = Trainer(config, run_dir, heldout_acc_before=_heldout_before(output_dir, config))
            trainer.fit()
    return run_dirs


def _discard_unsaved_start(run_dir: Path, config: Config) -> None:
    """A run of the sweep that was killed before its first checkpoint has nothing to resume: delete it, so that it
    starts again from scratch, which with the same config and seeds redraws the steps it had logged. Refused (the
    directory kept) when the directory holds files no run writes, or the run was started with other settings."""
    if not run_dir.exists():
        return
    if not (run_dir / CONFIG_FILE).is_file():
        raise ValueError(
            f"{run_dir} exists but holds no run ({CONFIG_FILE} is missing): move it away, or choose another "
            "output directory"
        )
    foreign = sorted(path.name for path in run_dir.iterdir() if path.name not in RUN_FILES)
    if foreign:
        raise ValueError(
            f"{run_dir} stopped before its first checkpoint and holds files a run does not write "
            f"({', '.join(foreign)}): move them away and run the sweep again to restart it"
        )
    was, now = flatten(asdict(load_run_config(run_dir))), flatten(asdict(config))
    changed = [
        f"{key} {was.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(was | now)
        if was.get(key) != now.get(key)
    ]
    if changed:
        raise ValueError(
            f"{run_dir} stopped before its first checkpoint and was started with other settings "
            f"({'; '.join(changed)}): run the sweep with its settings to restart it, or delete it"
        )
    steps = len(read_metrics(run_dir))
    shutil.rmtree(run_dir)
    log.warning(
        "%s stopped before its first checkpoint (%d step%s logged): starting it again from step 1",
        run_dir,
        steps,
        "" if steps == 1 else "s",
    )


def _heldout_setting(config: Config) -> tuple[Any, ...]:
    """What the starting model's greedy held-out accuracy depends on: never the loss, the seeds or the steps."""
    data, rollout = config.data, config.rollout
    return (
        asdict(config.model),
        (
            data.heldout,
            data.heldout_size,
            data.digits,
            data.few_shot,
            data.system_prompt,
            data.question_template,
        ),
        (rollout.engine, rollout.max_new_tokens, asdict(rollout.vllm)),
        (config.reward.name, config.reward.strict_boxed, config.trainer.device, config.trainer.num_threads),
    )


def _heldout_before(output_dir: Path, config: Config) -> float | None:
    """The held-out accuracy before training of a finished run in ``output_dir`` that evaluated the same model on
    the same held-out set the same way: greedy decoding makes it the same number, so a sweep measures it once."""
    wanted = _heldout_setting(config)
    for summary_path in sorted(output_dir.glob(f"*/{SUMMARY_FILE}")):
        before = json.loads(summary_path.read_text()).get("heldout_acc_before")
        try:
            if before is not None and _heldout_setting(load_run_config(summary_path.parent)) == wanted:
                return before
        except ValueError:  # a run of an older config schema: measure again rather than guess
            continue
    return None


def sweep_table(run_dirs: Sequence[Path]) -> str:
    """Markdown: per run, held-out accuracy before/after, final entropy and clip fractions (mean over the last 3
    steps); then per variant, the same over its seeds (see ``variant_table``)."""
    header = (
        "| run | held-out before | held-out after | Δ | entropy first → last | clip low | clip high | "
        "clip dual | NA&LP grad share | PA&LP grad share |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for run_dir in run_dirs:
        summary: dict[str, Any] = json.loads((run_dir / SUMMARY_FILE).read_text())
        records = read_metrics(run_dir)
        tail = records[-3:]

        def mean(key: str, tail: list[dict] = tail) -> float:
            values = [r[key] for r in tail if r.get(key) is not None]
            return sum(values) / len(values) if values else float("nan")

        before, after = summary.get("heldout_acc_before"), summary.get("heldout_acc_after")
        delta = f"{100 * (after - before):+.1f}" if before is not None and after is not None else "-"
        rows.append(
            f"| {run_dir.name} | {_pct(before)} | {_pct(after)} | {delta} | "
            f"{records[0]['entropy/mean']:.3f} → {records[-1]['entropy/mean']:.3f} | "
            f"{mean('actor/pg_clipfrac_low'):.4f} | {mean('actor/pg_clipfrac_high'):.4f} | "
            f"{mean('actor/pg_clipfrac_dual'):.4f} | {mean('quadrant/NA&LP/grad_share'):.3f} | "
            f"{mean('quadrant/PA&LP/grad_share'):.3f} |"
        )
    return header + "\n".join(rows) + "\n\n" + variant_table(run_dirs)


# Each seed's late-run value: the mean of its last steps (entropy over 10, as the hypotheses compare it).
_LATE_ENTROPY_STEPS = 10
_TAIL_STEPS = 3


def variant_table(run_dirs: Sequence[Path]) -> str:
    """Markdown: one row per variant (runs named ``<variant>-s<seed>``; another run is a variant of one) over its
    seeds: held-out accuracy before and after training and its change, in points (mean ± sd, ddof=1), late-run
    entropy (mean ± sd of each seed's mean over its last 10 steps), and the means over seeds of each seed's last 3
    steps' clip fractions and low-probability gradient shares. A value some seeds lack is over the others, with
    "(k of n)"."""
    rows = []
    for variant, runs in by_variant([load_run(run_dir) for run_dir in run_dirs]):
        seeds = [variant_and_seed(run.name) for run in runs]
        seed_list = f" ({', '.join(str(parsed[1]) for parsed in seeds if parsed)})" if all(seeds) else ""
        cells = [
            _over_seeds(runs, lambda run: 100 * heldout_accuracy(run)[0], ".1f"),
            _over_seeds(runs, lambda run: 100 * heldout_accuracy(run)[1], ".1f"),
            _over_seeds(
                runs, lambda run: 100 * (heldout_accuracy(run)[1] - heldout_accuracy(run)[0]), "+.1f"
            ),
            _over_seeds(runs, lambda run: late_mean(run, "entropy/mean", _LATE_ENTROPY_STEPS), ".3f"),
            *(
                _over_seeds(runs, lambda run, key=key: late_mean(run, key, _TAIL_STEPS), digits, spread=False)
                for key, digits in (
                    ("actor/pg_clipfrac_low", ".4f"),
                    ("actor/pg_clipfrac_high", ".4f"),
                    ("quadrant/NA&LP/grad_share", ".3f"),
                    ("quadrant/PA&LP/grad_share", ".3f"),
                )
            ),
        ]
        rows.append(f"| {variant} | {len(runs)}{seed_list} | {' | '.join(cells)} |")
    return (
        "Per variant over seeds: mean ± sd; held-out accuracy and Δ in points; late entropy: each seed's mean over "
        f"its last {_LATE_ENTROPY_STEPS} steps; clip fractions and grad shares: mean over seeds of each seed's last "
        f"{_TAIL_STEPS} steps.\n\n"
        "| variant | seeds | held-out before | held-out after | Δ | late entropy | clip low | clip high | "
        "NA&LP grad share | PA&LP grad share |\n|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )


def _over_seeds(
    runs: Sequence[Run], value: Callable[[Run], float], digits: str, *, spread: bool = True
) -> str:
    """``mean ± sd`` of ``value`` over the runs that have it (``stats`` raises ValueError for one that does not)."""
    values = []
    for run in runs:
        try:
            values.append(value(run))
        except ValueError:
            continue
    if not values:
        return "-"
    summary = seed_summary(values)
    text = f"{summary.mean:{digits}}"
    if spread and summary.n > 1:
        text += f" ± {summary.sd:{digits.lstrip('+')}}"
    return text + (f" ({summary.n} of {len(runs)})" if summary.n < len(runs) else "")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
