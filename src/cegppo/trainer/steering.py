"""Steering CE-GPPO's β1/β2 during a run: schedules and an entropy-target controller."""

from __future__ import annotations

import itertools
from typing import Any

from cegppo.config import ActorConfig, ScheduleConfig


def schedule_value(schedule: ScheduleConfig, step: int, constant: float) -> float:
    """The scheduled value at ``step`` (``constant`` for a constant schedule, and before a step schedule's
    first point)."""
    points = schedule.points
    if schedule.kind == "constant":
        return constant
    if schedule.kind == "step":
        value = constant
        for at, point_value in points:
            if step >= at:
                value = point_value
        return value
    if step <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if step <= x1:
            return y0 + (y1 - y0) * (step - x0) / (x1 - x0)
    return points[-1][1]


class BetaSteering:
    """β1/β2 for each step: the configured constants, their schedules, or the entropy controller."""

    def __init__(self, actor: ActorConfig) -> None:
        self.actor = actor
        self.control = actor.entropy_control
        self.controlled = {"beta1": actor.beta1, "beta2": actor.beta2}
        self.previous_entropy: float | None = None

    def betas(self, step: int) -> tuple[float, float]:
        """β1, β2 for the step about to run (1-based)."""
        if self.control.enabled:
            return self.controlled["beta1"], self.controlled["beta2"]
        return (
            schedule_value(self.actor.beta1_schedule, step, self.actor.beta1),
            schedule_value(self.actor.beta2_schedule, step, self.actor.beta2),
        )

    def observe_entropy(self, entropy: float) -> None:
        """Controller rule: entropy expected above the band raises β1 (and lowers β2 if adjusting it), which
        speeds up the entropy decrease (CE-GPPO §5.1); below the band, the opposite. The expectation
        extrapolates the last change by ``trend_weight``."""
        control = self.control
        if not control.enabled:
            return
        expected = entropy
        if self.previous_entropy is not None:
            expected += control.trend_weight * (entropy - self.previous_entropy)
        self.previous_entropy = entropy
        if expected > control.target_high:
            direction = 1.0
        elif expected < control.target_low:
            direction = -1.0
        else:
            return
        beta1 = self.controlled["beta1"] + direction * control.step_size
        self.controlled["beta1"] = min(max(beta1, control.beta1_min), control.beta1_max)
        if control.adjust_beta2:
            beta2 = self.controlled["beta2"] - direction * control.step_size
            self.controlled["beta2"] = min(max(beta2, control.beta2_min), control.beta2_max)

    def state_dict(self) -> dict[str, Any]:
        return {**self.controlled, "previous_entropy": self.previous_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controlled = {"beta1": state["beta1"], "beta2": state["beta2"]}
        self.previous_entropy = state.get("previous_entropy")  # absent in checkpoints before trend_weight
