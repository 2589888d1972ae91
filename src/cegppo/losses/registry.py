"""Name -> policy-loss function registry, with verl's ``PolicyLossFn`` signature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from cegppo.losses.config import PolicyLossConfig


class PolicyLossFn(Protocol):
    """``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)``.

    Tensors are [batch, response_len]; returns the scalar loss to minimise (= -objective) and a
    ``dict[str, float]`` of metrics with verl's ``actor/`` prefix. A loss registered with
    ``needs_entropy=True`` also takes the keyword arguments ``entropy`` (the current policy's per-token
    entropy) and ``old_entropy`` (π_old's), both [batch, response_len]; the others never receive them, so
    every loss written to verl's signature keeps working.
    """

    def __call__(
        self,
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: PolicyLossConfig | None = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


class TokenSelector(Protocol):
    """``fn(old_log_prob, log_prob, advantages, response_mask, config) -> [batch, response_len] bool``.

    A loss that treats a few tokens of the batch specially (Clip-Cov, KL-Cov) exposes its choice as a
    selector, so that a trainer splitting a mini-batch into micro-batches can choose over the whole
    mini-batch and pass each micro-batch its rows as ``PolicyLossConfig.token_selection``: the gradient
    is then the same for every micro-batch size.
    """

    def __call__(
        self,
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        config: PolicyLossConfig | None = None,
    ) -> torch.Tensor: ...


POLICY_LOSS_REGISTRY: dict[str, PolicyLossFn] = {}
TOKEN_SELECTORS: dict[str, TokenSelector] = {}
# Names of the losses that take entropy= and old_entropy= (the trainer computes them only for these).
_NEEDS_ENTROPY: set[str] = set()


def register_policy_loss(name: str, *, needs_entropy: bool = False) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering a policy loss under ``name`` (re-registering a name replaces it).

    ``needs_entropy=True`` declares that the loss takes ``entropy=`` and ``old_entropy=`` keyword arguments.
    """

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSS_REGISTRY[name] = fn
        if needs_entropy:
            _NEEDS_ENTROPY.add(name)
        else:
            _NEEDS_ENTROPY.discard(name)
        return fn

    return decorator


def register_token_selector(name: str) -> Callable[[TokenSelector], TokenSelector]:
    """Decorator registering the token selection of the policy loss ``name``."""

    def decorator(fn: TokenSelector) -> TokenSelector:
        TOKEN_SELECTORS[name] = fn
        return fn

    return decorator


def get_token_selector(name: str) -> TokenSelector | None:
    """The token selector of the policy loss ``name``, or None if it selects no tokens."""
    return TOKEN_SELECTORS.get(name)


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    """The policy loss registered under ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return POLICY_LOSS_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown policy loss {name!r}: registered losses are {list_policy_losses()}"
        ) from None


def policy_loss_needs_entropy(name: str) -> bool:
    """Whether the loss ``name`` takes the per-token ``entropy`` and ``old_entropy`` of the policy."""
    get_policy_loss_fn(name)  # unknown names fail as everywhere else
    return name in _NEEDS_ENTROPY


def list_policy_losses() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(POLICY_LOSS_REGISTRY)
