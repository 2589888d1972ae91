"""Reward functions: one score per response.

Built in: ``math`` (math-verify against the gold answer, optionally only inside the last ``\\boxed{}``). Custom
rewards are named by import path (``pkg.module:function``) or file path (``path/to/file.py:function``) and have
verl's signature ``compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict``.
"""

from cegppo.rewards.config import RewardConfig
from cegppo.rewards.functions import resolve_custom_function
from cegppo.rewards.guard import RewardErrorGuard, RewardFailure
from cegppo.rewards.scorer import RewardResult, RewardScorer
from cegppo.rewards.shaping import overlong_penalty
from cegppo.rewards.verifier import last_boxed_content, math_reward

__all__ = [
    "RewardConfig",
    "RewardErrorGuard",
    "RewardFailure",
    "RewardResult",
    "RewardScorer",
    "last_boxed_content",
    "math_reward",
    "overlong_penalty",
    "resolve_custom_function",
]
