"""Per-token KL estimators between the policy and a frozen reference (Schulman, "Approximating KL
divergence", 2020), as verl's ``kl_penalty``."""

from __future__ import annotations

import torch

from cegppo.losses.ratio import clamp_log_ratio

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")

# verl's clamp of the k3 value (after the log-ratio's, before exp), so one token cannot blow up the penalty.
_K3_CLAMP = 10.0


def kl_penalty(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str = "low_var_kl"
) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from sampled tokens.

    ``k1``: log π - log π_ref; ``k2``: ½(log π - log π_ref)²; ``k3`` = ``low_var_kl``:
    π_ref/π - log(π_ref/π) - 1, non-negative and low-variance (GRPO's choice), clamped to [-10, 10].
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}: allowed are {list(KL_ESTIMATORS)}")
    log_ratio = log_prob - ref_log_prob
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    ref_over_policy = clamp_log_ratio(-log_ratio)
    return (ref_over_policy.exp() - ref_over_policy - 1).clamp(-_K3_CLAMP, _K3_CLAMP)
