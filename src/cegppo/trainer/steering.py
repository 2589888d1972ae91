"""Steering during a run: CE-GPPO's β1/β2 (schedules, an entropy-band controller) and the entropy bonus's
coefficient (Skywork-OR1's adaptive controller)."""

from __future__ import annotations

import itertools
import math
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
        self.controlled = {"beta1": actor.policy_loss.beta1, "beta2": actor.policy_loss.beta2}
        self.previous_entropy: float | None = None

    def betas(self, step: int) -> tuple[float, float]:
        """β1, β2 for the step about to run (1-based)."""
        if self.control.enabled:
            return self.controlled["beta1"], self.controlled["beta2"]
        return (
            schedule_value(self.actor.beta1_schedule, step, self.actor.policy_loss.beta1),
            schedule_value(self.actor.beta2_schedule, step, self.actor.policy_loss.beta2),
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


class AdaptiveEntropyCoefficient:
    """The entropy bonus's coefficient: ``actor.entropy_coeff``, or Skywork-OR1's adaptive controller.

    Skywork-OR1 (He et al. 2025, arXiv 2505.22312), with TRL's rule (``use_adaptive_entropy``): the bonus
    coefficient c starts at ``entropy_coeff``; after each optimiser update, with H the mean entropy of the
    tokens that update trained on, c += Δ if H <= target, else c -= Δ, kept within [min, max]. An update applies
    c only while the last measured H is <= target (none has been measured before the first update: 0).
    """

    def __init__(self, actor: ActorConfig) -> None:
        self.actor = actor
        self.coeff = actor.entropy_coeff
        self.last_entropy = math.inf

    @property
    def enabled(self) -> bool:
        """Whether the update computes the entropy term at all (a controller may raise a zero coefficient)."""
        return self.actor.use_adaptive_entropy or self.actor.entropy_coeff > 0

    def applied(self) -> float:
        """The coefficient the next update applies."""
        if not self.actor.use_adaptive_entropy:
            return self.actor.entropy_coeff
        return self.coeff if self.last_entropy <= self.actor.entropy_target else 0.0

    def observe_entropy(self, entropy: float) -> None:
        """After an update: move the coefficient one step towards keeping entropy above the target."""
        actor = self.actor
        if not actor.use_adaptive_entropy:
            return
        if entropy <= actor.entropy_target:
            self.coeff = min(self.coeff + actor.entropy_coeff_delta, actor.entropy_coeff_max)
        else:
            self.coeff = max(self.coeff - actor.entropy_coeff_delta, actor.entropy_coeff_min)
        self.last_entropy = entropy

    def state_dict(self) -> dict[str, Any]:
        return {"coeff": self.coeff, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coeff = state["coeff"]
        self.last_entropy = state["last_entropy"]
