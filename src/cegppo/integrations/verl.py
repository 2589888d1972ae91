"""verl plug-in: cegppo's policy losses in verl's ``POLICY_LOSS_REGISTRY``, selected with one config line.

Importing this module registers, in ``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``:

- ``ce_gppo``, ``gppo``, ``luspo``, ``vespo`` and ``dgpo`` (verl has none of them);
- ``cegppo_<name>`` for every loss verl also registers (``vanilla``, ``cispo``, ``gspo``, ``sapo``, ``geo_mean``,
  ``dppo_tv``, ``dppo_kl``, ``dro``, ``clip_cov``, ``kl_cov``, ``gpg``): verl's own losses stay untouched.

Losses that need the per-token entropy (``grpo_erc``, ``gppo_erc``, ``ce_gppo_erc``:
:func:`cegppo.losses.policy_loss_needs_entropy`) are not registered: verl's ``PolicyLossFn`` receives neither the
current nor the old policy's entropy (docs/losses.md says how to get them into a verl actor).

Select the loss and its settings with the subclass :class:`CEGPPOPolicyLossConfig` of verl's fixed
``PolicyLossConfig``::

    actor_rollout_ref.actor.policy_loss.loss_mode=ce_gppo
    actor_rollout_ref.actor.policy_loss._target_=cegppo.integrations.verl.CEGPPOPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.beta1=0.75
    +actor_rollout_ref.actor.policy_loss.beta2=1.0

The ``_target_`` line makes verl import this module wherever it builds the actor config: on the driver, in
``validate_config`` before Ray starts, and in every worker as it starts. There :class:`CEGPPOPolicyLossConfig`
checks ``loss_mode`` against verl's registry, so a name verl does not know fails at config time, not at the first
update after a rollout. Without it the module must reach the workers another way (the ``verl.plugins`` entry point
that the installed cegppo package declares, which verl 0.9+ imports on ``import verl``;
``actor_rollout_ref.model.external_lib=cegppo.integrations.verl``; or ``VERL_USE_EXTERNAL_MODULES``), nothing of
cegppo runs on the driver, and ``ce_gppo`` uses the paper's β1 = 0.5, β2 = 1. The authors' release spellings
``loss_mode=gppo_general`` and ``gppo_loss_beta1``/``gppo_loss_beta2`` are accepted (:data:`RELEASE_LOSS_NAMES`);
its ``positive_loss_coeff`` (an SFT term stock verl does not have) is an error. Tested with verl 0.9.1
(:data:`cegppo.integrations._versions.SUPPORTED`; other versions warn on import). VESPO's ``vespo_{k,lambda}_{pos,neg}`` are set the same way; SAPO's ``tau_pos``/``tau_neg`` and DRO's
``policy_loss.dro_beta`` are verl's own keys. Everything else comes from verl's actor config (:func:`policy_loss_config_from_verl`), and verl's
``global_batch_info`` (data-parallel size, global token and sequence counts) reaches the aggregation, so the
loss does not depend on how verl splits a mini-batch into micro-batches and ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cegppo.integrations._versions import SUPPORTED, warn_if_untested

try:
    import verl
    from verl.trainer.ppo import core_algos
    from verl.workers.config import PolicyLossConfig as VerlPolicyLossConfig
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        f"cegppo.integrations.verl needs verl{SUPPORTED['verl']}: `pip install '.[verl]'` in a cegppo checkout, "
        "or see docs/scaling.md"
    ) from exc

from cegppo.losses import (
    POLICY_LOSS_REGISTRY,
    PolicyLossConfig,
    PolicyLossFn,
    SharedSettings,
    declared_settings,
    policy_loss_needs_entropy,
)
from cegppo.losses.settings import ACTOR, POLICY_LOSS, ROLLOUT_CORRECTION

logger = logging.getLogger(__name__)
warn_if_untested("verl", verl.__version__)

# Losses verl has no version of keep their own name; the others get a prefix so verl's stay reachable.
_UNPREFIXED = ("ce_gppo", "gppo", "luspo", "vespo", "dgpo")
_DEFAULTS = PolicyLossConfig()
_VESPO_KEYS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
_DGPO_KEYS = ("dgpo_n", "dgpo_m")
# Each loss setting's key at its place in verl's actor config (cegppo.losses.settings: declared with the loss):
# the policy_loss section (beta1/beta2, vespo_* and dgpo_* via CEGPPOPolicyLossConfig), the top of the actor
# config (SAPO's tau_*; the shared settings are read with verl's fallbacks below), and
# policy_loss.rollout_correction, which verl fills from algorithm.rollout_correction (read by bypass_mode).
_SHARED = {f.name for f in dataclasses.fields(SharedSettings)}
_POLICY_LOSS_KEYS = {d.key: d.name for d in declared_settings().values() if d.place == POLICY_LOSS}
_ROLLOUT_CORRECTION_KEYS = {
    d.key: d.name for d in declared_settings().values() if d.place == ROLLOUT_CORRECTION
}
_ACTOR_KEYS = {
    d.key: d.name for d in declared_settings().values() if d.place == ACTOR and d.name not in _SHARED
}
# The authors' release (a verl 0.2 fork) selects CE-GPPO with actor.loss_func=gppo_general; registered as an alias.
RELEASE_LOSS_NAMES = {"gppo_general": "ce_gppo"}
_LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"


def verl_loss_name(name: str) -> str:
    """The name under which cegppo's loss ``name`` is registered in verl."""
    return name if name in _UNPREFIXED else f"cegppo_{name}"


@dataclass
class CEGPPOPolicyLossConfig(VerlPolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus CE-GPPO's gradient weights, selectable from the command line.

    ``beta1`` weights the left boundary (δ < 1-ε_low, A < 0), ``beta2`` the right one (δ > 1+ε_high, A > 0);
    defaults are the paper's 1.5B recipe (β1 = 0.5, β2 = 1; its 7B recipe uses β1 = 0.75). ``dgpo_n``/``dgpo_m``
    are DGPO's decay exponents (the authors' defaults 1 and 2).
    """

    beta1: float = _DEFAULTS.beta1
    beta2: float = _DEFAULTS.beta2
    vespo_k_pos: float = _DEFAULTS.vespo_k_pos
    vespo_lambda_pos: float = _DEFAULTS.vespo_lambda_pos
    vespo_k_neg: float = _DEFAULTS.vespo_k_neg
    vespo_lambda_neg: float = _DEFAULTS.vespo_lambda_neg
    dgpo_n: float = _DEFAULTS.dgpo_n
    dgpo_m: float = _DEFAULTS.dgpo_m
    # The authors' release spellings of beta1/beta2, and its SFT coefficient (refused: see __post_init__).
    gppo_loss_beta1: float | None = None
    gppo_loss_beta2: float | None = None
    positive_loss_coeff: float = 0.0

    def __post_init__(self) -> None:
        # Fail when verl builds the actor config (on the driver, before any GPU work), not at the first update.
        for name, alias in (("beta1", "gppo_loss_beta1"), ("beta2", "gppo_loss_beta2")):
            value = getattr(self, alias)
            if value is None:
                continue
            if getattr(self, name) not in (getattr(_DEFAULTS, name), value):
                raise ValueError(
                    f"actor_rollout_ref.actor.policy_loss: {name}={getattr(self, name)} and {alias}={value} "
                    f"disagree ({alias} is the authors' release spelling of {name}); set one of them"
                )
            object.__setattr__(self, name, value)  # verl's BaseConfig freezes fields once set
        if self.positive_loss_coeff != 0.0:
            raise ValueError(
                f"actor_rollout_ref.actor.policy_loss.positive_loss_coeff={self.positive_loss_coeff}: the authors' "
                "release adds this SFT term (NLL on correct responses) in its own actor; stock verl has no such "
                "term and a policy loss cannot add it. cegppo's own trainer has it: actor.positive_loss_coeff"
            )
        PolicyLossConfig(
            **{name: getattr(self, name) for name in ("beta1", "beta2", *_VESPO_KEYS, *_DGPO_KEYS)}
        )
        if self.loss_mode not in core_algos.POLICY_LOSS_REGISTRY:
            raise ValueError(_unknown_loss_message(self.loss_mode))


def _unknown_loss_message(name: str) -> str:
    ours = sorted(
        verl_loss_name(loss) for loss in POLICY_LOSS_REGISTRY if not policy_loss_needs_entropy(loss)
    )
    theirs = sorted(set(core_algos.POLICY_LOSS_REGISTRY) - set(ours) - set(RELEASE_LOSS_NAMES))
    return (
        f"{_LOSS_MODE_KEY}={name!r}: verl has no policy loss of that name in this process. cegppo's plug-in is "
        f"loaded here and registers {ours} (and the release's {sorted(RELEASE_LOSS_NAMES)}); verl's own are "
        f"{theirs}. A loss from another plug-in must be imported wherever verl builds this config, the driver "
        "included: through its verl.plugins entry point or VERL_USE_EXTERNAL_MODULES=<module> "
        "(actor_rollout_ref.model.external_lib=<module> imports it in the workers only). Without the _target_ "
        "line, cegppo's losses reach the workers through cegppo's verl.plugins entry point (an installed "
        "cegppo) or actor_rollout_ref.model.external_lib=cegppo.integrations.verl"
    )


def _count(value: Any, key: str) -> int | None:
    """An optional whole count from verl's ``global_batch_info`` (verl stores ``tensor.sum().item()``)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise ValueError(
        f"verl actor config global_batch_info[{key!r}] must be a whole number or None, got {value!r}"
    )


def policy_loss_config_from_verl(config: Any) -> PolicyLossConfig:
    """Translate verl's actor config (``ActorConfig`` or an OmegaConf node of it) into a cegppo config.

    ``clip_ratio_low``/``clip_ratio_high`` fall back to ``clip_ratio`` when unset, as in verl; ``clip_ratio_c``,
    ``loss_scale_factor``, ``tau_pos``, ``tau_neg``, ``policy_loss.{clip_cov_ratio, clip_cov_lb, clip_cov_ub,
    kl_cov_ratio, ppo_kl_coef, dro_beta, beta1, beta2, vespo_*, dgpo_n, dgpo_m, ...}`` (every setting a loss declares
    at that place), ``policy_loss.rollout_correction`` (for ``bypass_mode``; its ``loss_type`` is our
    ``bypass_loss_type``) and ``global_batch_info`` are carried over; keys verl does not have keep cegppo's defaults.
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            f"verl passed a {type(config).__name__} as the actor config; expected verl's ActorConfig"
        )
    clip_ratio = config.get("clip_ratio", _DEFAULTS.clip_ratio_low)
    clip_ratio_low = config.get("clip_ratio_low")
    clip_ratio_high = config.get("clip_ratio_high")
    policy_loss = config.get("policy_loss") or {}
    batch_info = config.get("global_batch_info") or {}
    correction = policy_loss.get("rollout_correction") or {}
    loss_scale_factor = batch_info.get("loss_scale_factor", config.get("loss_scale_factor"))
    return PolicyLossConfig(
        clip_ratio_low=clip_ratio if clip_ratio_low is None else clip_ratio_low,
        clip_ratio_high=clip_ratio if clip_ratio_high is None else clip_ratio_high,
        clip_ratio_c=config.get("clip_ratio_c", _DEFAULTS.clip_ratio_c),
        loss_scale_factor=loss_scale_factor,
        **{
            ours: policy_loss.get(theirs, getattr(_DEFAULTS, ours))
            for theirs, ours in _POLICY_LOSS_KEYS.items()
        },
        **{ours: config.get(theirs, getattr(_DEFAULTS, ours)) for theirs, ours in _ACTOR_KEYS.items()},
        **{
            ours: correction[theirs]
            for theirs, ours in _ROLLOUT_CORRECTION_KEYS.items()
            if theirs in correction
        },
        dp_size=_count(batch_info.get("dp_size", 1), "dp_size"),
        batch_num_tokens=_count(batch_info.get("batch_num_tokens"), "batch_num_tokens"),
        global_batch_size=_count(batch_info.get("global_batch_size"), "global_batch_size"),
    )


def as_verl_policy_loss(fn: PolicyLossFn) -> PolicyLossFn:
    """Wrap a cegppo loss so that verl can call it with its ``ActorConfig``."""

    @functools.wraps(fn)
    def verl_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if config is None:
            raise ValueError(f"{fn.__name__}: verl passed no actor config (config=None)")
        ours = policy_loss_config_from_verl(config)
        if loss_agg_mode == "token-sum":
            # verl's token-sum is Σ loss · dp_size, which is token-mean over a count of 1.
            ours = ours.replace(batch_num_tokens=1)
            loss_agg_mode = "token-mean"
        loss, metrics = fn(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=response_mask,
            loss_agg_mode=loss_agg_mode,
            config=ours,
            rollout_is_weights=rollout_is_weights,
        )
        # verl's dashboards call the dual-clip fraction pg_clipfrac_lower.
        metrics["actor/pg_clipfrac_lower"] = metrics["actor/pg_clipfrac_dual"]
        return loss, metrics

    return verl_policy_loss


def register_with_verl() -> dict[str, str]:
    """Register every cegppo loss verl can call in verl's registry (idempotent); returns {cegppo name: verl name}."""
    names = {}
    for name, fn in sorted(POLICY_LOSS_REGISTRY.items()):
        if policy_loss_needs_entropy(name):
            continue  # verl's call passes no entropy
        verl_name = verl_loss_name(name)
        existing = core_algos.POLICY_LOSS_REGISTRY.get(verl_name)
        if existing is not None and getattr(existing, "__wrapped__", None) is not fn:
            logger.warning("replacing verl's policy loss %r with cegppo's %r", verl_name, name)
        core_algos.register_policy_loss(verl_name)(as_verl_policy_loss(fn))
        names[name] = verl_name
    for alias, name in RELEASE_LOSS_NAMES.items():
        core_algos.register_policy_loss(alias)(core_algos.POLICY_LOSS_REGISTRY[names[name]])
    return names


REGISTERED = register_with_verl()
