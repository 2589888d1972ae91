"""Outcome-reward advantage estimators over groups of responses to the same prompt.

Pure tensor functions, registered by name like the losses: ``grpo`` (Shao et al. 2024,
arXiv 2402.03300), ``dr_grpo`` (Liu et al. 2025, arXiv 2503.20783) and ``rloo`` (Ahmadian et al.
2024, arXiv 2402.14740). Each maps per-response rewards [N] and group ids [N] to per-response
advantages [N]; the trainer broadcasts them over the response tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AdvantageFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ADVANTAGE_REGISTRY: dict[str, AdvantageFn] = {}

# GRPO's denominator guard, as in verl: (r - mean) / (std + 1e-6).
GRPO_EPSILON = 1e-6


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator registering an advantage estimator ``fn(rewards, group_ids) -> advantages``."""

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_REGISTRY[name] = fn
        return fn

    return decorator


def get_advantage_fn(name: str) -> AdvantageFn:
    """The estimator registered under ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return ADVANTAGE_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}: known are {sorted(ADVANTAGE_REGISTRY)}"
        ) from None


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-response group size, mean and unbiased std (std 0 for a group of one)."""
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must be 1-D of equal length, got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if len(inverse) else 0
    rewards = rewards.to(torch.float64)
    size = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, rewards)
    mean = total / size
    squares = torch.zeros(num_groups, dtype=torch.float64).index_add_(
        0, inverse, (rewards - mean[inverse]) ** 2
    )
    std = (squares / (size - 1).clamp(min=1)).sqrt()
    return size[inverse], mean[inverse], std[inverse]


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """GRPO: (r - mean_g) / (std_g + 1e-6); a group of one gets its raw reward (as verl)."""
    size, mean, std = group_stats(rewards, group_ids)
    advantages = (rewards.to(torch.float64) - mean) / (std + GRPO_EPSILON)
    return torch.where(size > 1, advantages, rewards.to(torch.float64)).to(torch.float32)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: r - mean_g, without the std normalisation that up-weights easy and hard prompts."""
    size, mean, _ = group_stats(rewards, group_ids)
    advantages = rewards.to(torch.float64) - mean
    return torch.where(size > 1, advantages, rewards.to(torch.float64)).to(torch.float32)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO: r_i minus the mean of the *other* responses of its group, = n/(n-1)·(r_i - mean_g)."""
    size, mean, _ = group_stats(rewards, group_ids)
    advantages = (rewards.to(torch.float64) - mean) * size / (size - 1).clamp(min=1)
    return torch.where(size > 1, advantages, rewards.to(torch.float64)).to(torch.float32)


def uniform_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per response: True if every response of its group has the same reward (DAPO's dynamic sampling
    drops these groups, whose advantages are all zero)."""
    _, _, std = group_stats(rewards, group_ids)
    return std == 0
