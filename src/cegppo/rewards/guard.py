"""Stop a run whose reward function keeps failing, instead of training on all-equal scores."""

from __future__ import annotations

from cegppo.rewards.config import RewardConfig
from cegppo.rewards.scorer import RewardResult


class RewardFailure(RuntimeError):
    """The reward raised on too many responses for training to mean anything."""


class RewardErrorGuard:
    """Watches each training step's reward errors (``RewardConfig.max_error_fraction``/``max_error_steps``).

    A reward that raises scores ``incorrect_score``: a function that raises on every call yields all-zero
    advantages, a run that looks like a hard task. Timeouts are transient (one pathological answer) and are
    only counted.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.failing_steps = 0

    def check(self, result: RewardResult) -> None:
        """Raise :class:`RewardFailure` naming the reward and its first exception when the limit is reached."""
        calls = len(result.scores)
        if not calls:
            return
        fraction = result.num_errors / calls
        self.failing_steps = self.failing_steps + 1 if fraction > self.cfg.max_error_fraction else 0
        if fraction < 1 and self.failing_steps < self.cfg.max_error_steps:
            return
        streak = "" if fraction == 1 else f" for {self.failing_steps} steps running"
        raise RewardFailure(
            f"reward {self.cfg.name!r} raised on {result.num_errors} of {calls} responses{streak} "
            f"(reward.max_error_fraction={self.cfg.max_error_fraction:g}, reward.max_error_steps="
            f"{self.cfg.max_error_steps}); first error: {result.first_error}"
        )
