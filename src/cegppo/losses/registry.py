"""Name -> policy loss registry: each loss with verl's ``PolicyLossFn`` signature and the properties a trainer
reads from it (the dataclass declaring its settings, whether it needs the entropy, selects tokens, or takes π_old
from the sampler), registered once with the loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from cegppo.losses.config import SHARED_SETTINGS, PolicyLossConfig, RolloutCorrectionSettings, SharedSettings
from cegppo.losses.settings import LossSettings, SettingError, declare, declared_settings, withdraw


class PolicyLossFn(Protocol):
    """``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)``.

    Tensors are [batch, response_len]; returns the scalar loss to minimise (= -objective) and a
    ``dict[str, float]`` of metrics with verl's ``actor/`` prefix. A loss registered with
    ``needs_entropy=True`` also takes the keyword arguments ``entropy`` (the current policy's per-token
    entropy) and ``old_entropy`` (π_old's), both [batch, response_len]; a loss registered with a token selector
    takes ``token_selection`` (its tokens of the whole mini-batch, these rows of it). The others receive none of
    them, so every loss written to verl's signature keeps working.
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
    mini-batch and pass each micro-batch its rows as the loss's ``token_selection=`` argument: the gradient
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


@dataclass(frozen=True)
class PolicyLoss:
    """A registered loss and what a trainer needs to know to call it.

    ``settings``: the dataclasses (:class:`~cegppo.losses.settings.LossSettings`) that declare the settings it reads
    besides the ones every loss shares (``SHARED_SETTINGS``). ``needs_entropy``: it takes ``entropy=`` and
    ``old_entropy=``. ``token_selector``: it selects tokens over the whole mini-batch and takes
    ``token_selection=``. ``pi_old_from_sampler``: its π_old is the sampler's log-probs, and it corrects for the
    sampler itself (verl's ``bypass_mode``).
    """

    name: str
    fn: PolicyLossFn
    settings: tuple[type[LossSettings], ...] = ()
    needs_entropy: bool = False
    token_selector: TokenSelector | None = None
    pi_old_from_sampler: bool = False

    @property
    def own(self) -> tuple[str, ...]:
        """The names of the settings of its own."""
        return tuple(f.name for cls in self.settings for f in dataclasses.fields(cls))

    @property
    def required(self) -> tuple[str, ...]:
        """Its settings that default to None (unset) and must be set for it (``dro_beta``)."""
        declared = declared_settings()
        return tuple(name for name in self.own if declared[name].required)

    @property
    def reads(self) -> tuple[str, ...]:
        """Every setting the loss reads: the shared ones and its own."""
        return (*SHARED_SETTINGS, *self.own)

    def check(self, config: PolicyLossConfig) -> None:
        """``ValueError`` naming a required setting left unset."""
        for name in self.required:
            if getattr(config, name) is None:
                raise SettingError(name, None, f"policy loss {self.name!r} needs it")


POLICY_LOSSES: dict[str, PolicyLoss] = {}


class _LossFunctions(MutableMapping[str, PolicyLossFn]):
    """``POLICY_LOSSES`` as name -> loss function, verl's registry shape (deleting a name unregisters it;
    setting one registers a loss without properties)."""

    def __getitem__(self, name: str) -> PolicyLossFn:
        return POLICY_LOSSES[name].fn

    def __setitem__(self, name: str, fn: PolicyLossFn) -> None:
        register_policy_loss(name)(fn)

    def __delitem__(self, name: str) -> None:
        _withdraw_unused(POLICY_LOSSES.pop(name).settings)

    def __iter__(self) -> Iterator[str]:
        return iter(POLICY_LOSSES)

    def __len__(self) -> int:
        return len(POLICY_LOSSES)


POLICY_LOSS_REGISTRY: MutableMapping[str, PolicyLossFn] = _LossFunctions()


def register_policy_loss(
    name: str,
    *,
    settings: type[LossSettings] | tuple[type[LossSettings], ...] = (),
    needs_entropy: bool = False,
    pi_old_from_sampler: bool = False,
) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering a policy loss under ``name`` with its properties (re-registering a name replaces
    it; a token selector registered for the name before stays). See :class:`PolicyLoss` for the properties.

    ``settings``: the dataclass (or dataclasses) declaring the settings of its own; their fields become
    attributes of :class:`PolicyLossConfig` and keys of the run config (``actor.policy_loss.<name>`` unless
    declared at another of verl's places).
    """
    classes = settings if isinstance(settings, tuple) else (settings,)
    for cls in classes:
        declare(cls)

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        previous = POLICY_LOSSES.get(name)
        POLICY_LOSSES[name] = PolicyLoss(
            name,
            fn,
            settings=classes,
            needs_entropy=needs_entropy,
            token_selector=previous.token_selector if previous else None,
            pi_old_from_sampler=pi_old_from_sampler,
        )
        if previous is not None:
            _withdraw_unused(previous.settings)
        return fn

    return decorator


def _withdraw_unused(classes: tuple[type[LossSettings], ...]) -> None:
    """Withdraw the settings no registered loss reads any more (the shared ones stay)."""
    in_use = {cls for loss in POLICY_LOSSES.values() for cls in loss.settings}
    for cls in set(classes) - in_use - {SharedSettings, RolloutCorrectionSettings}:
        withdraw(cls)


def register_token_selector(name: str) -> Callable[[TokenSelector], TokenSelector]:
    """Decorator registering the token selection of the (already registered) policy loss ``name``."""

    def decorator(fn: TokenSelector) -> TokenSelector:
        POLICY_LOSSES[name] = dataclasses.replace(get_policy_loss(name), token_selector=fn)
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    """The loss registered under ``name`` with its properties; ``ValueError`` listing the known names otherwise."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy loss {name!r}: registered losses are {list_policy_losses()}"
        ) from None


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    """The loss function registered under ``name``; ``ValueError`` listing the known names otherwise."""
    return get_policy_loss(name).fn


def get_token_selector(name: str) -> TokenSelector | None:
    """The token selector of the policy loss ``name``, or None if it selects no tokens."""
    return get_policy_loss(name).token_selector


def policy_loss_needs_entropy(name: str) -> bool:
    """Whether the loss ``name`` takes the per-token ``entropy`` and ``old_entropy`` of the policy."""
    return get_policy_loss(name).needs_entropy


def list_policy_losses() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(POLICY_LOSSES)


def loss_setting(
    name: str, overrides: Mapping[str, Any] | None = None, base: PolicyLossConfig | None = None
) -> PolicyLossConfig:
    """The settings of the loss ``name``: ``base`` (default: the defaults) with ``overrides`` of its settings,
    validated; ``ValueError`` naming an unknown setting or a required setting left unset."""
    loss = get_policy_loss(name)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(declared_settings()))
    if unknown:
        raise ValueError(f"unknown settings {unknown} for policy loss {name!r}: it reads {list(loss.reads)}")
    config = (base or PolicyLossConfig()).replace(**overrides)
    loss.check(config)
    return config
