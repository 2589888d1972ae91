"""Where a run's numbers go: ``metrics.jsonl``, ``samples.jsonl``, ``probe.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cegppo.runfiles import METRICS_FILE, PROBE_FILE, SAMPLES_FILE


class RunTracker:
    """Appends one JSON line per step (and a few samples) and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int = 0) -> None:
        self.run_dir = run_dir
        # A run interrupted after logging steps it had not checkpointed will redo them: drop those lines.
        for name in (METRICS_FILE, SAMPLES_FILE, PROBE_FILE):
            _truncate_after(run_dir / name, resume_step)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # JSON has no NaN/inf: a skipped update's grad norm is written as null.
        record = {key: _json_number(value) for key, value in metrics.items()}
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps({"step": step, **record}) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        append_jsonl(self.run_dir / SAMPLES_FILE, [{"step": step, **sample} for sample in samples])

    def log_probe(self, rows: list[dict[str, Any]]) -> None:
        """The paired probe's rows of one step (:mod:`cegppo.trainer.probe`)."""
        append_jsonl(self.run_dir / PROBE_FILE, rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """One JSON line per record; NaN and infinities (which JSON lacks) as null."""
    with open(path, "a") as handle:
        for record in records:
            handle.write(json.dumps({key: _json_number(value) for key, value in record.items()}) + "\n")


def _json_number(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))
