"""What a person watching a run sees: a rich progress bar with live reward, entropy and ETA."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def _entropy(metrics: dict[str, float], digits: int) -> str:
    # a step with no group to train on (dynamic sampling) has no entropy
    return f"{metrics['entropy/mean']:.{digits}f}" if "entropy/mean" in metrics else "-"


def step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """One line summarising a step, e.g. for logs."""
    return (
        f"step {step}/{total}  reward {metrics['reward/mean']:+.3f}  acc {metrics['acc/mean']:.3f}  "
        f"entropy {_entropy(metrics, 3)}  "
        f"clip low/high {metrics.get('actor/pg_clipfrac_low', 0.0):.4f}/{metrics.get('actor/pg_clipfrac_high', 0.0):.4f}  "
        f"len {metrics['response_length/mean']:.1f}  {metrics['timing/step_s']:.1f}s"
    )


class Progress:
    """A progress bar plus one printed line per step; ``quiet`` prints notes and step lines only."""

    def __init__(
        self, total: int, done: int = 0, *, quiet: bool = False, console: Console | None = None
    ) -> None:
        self.total = total
        self.quiet = quiet
        self.console = console or Console(stderr=True, soft_wrap=True)  # paths in notes stay whole
        self._bar: RichProgress | None = None
        self._task = None
        if not quiet:
            self._bar = RichProgress(
                TextColumn("[bold]RL steps"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[live]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=done, live="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        self.console.print(step_line(step, self.total, metrics), highlight=False)
        if self._bar is not None:
            live = f"reward {metrics['reward/mean']:+.2f}  entropy {_entropy(metrics, 2)}"
            self._bar.update(self._task, completed=step, live=live)
