"""A run directory's files and how to read its metrics: shared by the trainer, which writes them, and by
``cegppo report`` and ``cegppo sweep``, which read them without importing the trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
PROBE_FILE = "probe.jsonl"  # the paired probe's rows: one per (step, seed, variant, epoch)
CHECKPOINTS_DIR = "checkpoints"
# How a new run's directory is named (trainer.output_dir, trainer.name), as the CLI says it.
RUN_DIR_RULE = "trainer.output_dir/trainer.name; the name defaults to the start time"
# The paper's token quadrants (advantage sign × probability), as named in the quadrant/<name>/... metrics
QUADRANTS = ("PA&HP", "PA&LP", "NA&HP", "NA&LP")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run: its config and something the run wrote (metrics, checkpoints, summary, or
    the rows of ``cegppo probe``)."""
    return (path / CONFIG_FILE).is_file() and any(
        (path / name).exists() for name in (METRICS_FILE, CHECKPOINTS_DIR, SUMMARY_FILE, PROBE_FILE)
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step metric records of a run, in order."""
    return read_jsonl(run_dir / METRICS_FILE)


def read_probe(run_dir: Path) -> list[dict[str, Any]]:
    """The paired probe's rows of a run (or of ``cegppo probe``), in order; [] when it was not probed."""
    return read_jsonl(run_dir / PROBE_FILE)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One record per non-blank line; a line that is not JSON is an error naming the file and line."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return records
