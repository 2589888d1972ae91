"""Policy losses behind one registry, with verl's ``PolicyLossFn`` signature.

>>> from cegppo.losses import PolicyLossConfig, get_policy_loss_fn
>>> loss, metrics = get_policy_loss_fn("ce_gppo")(
...     old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask,
...     loss_agg_mode="token-mean", config=PolicyLossConfig(), rollout_is_weights=None)  # doctest: +SKIP

Registered: ``ce_gppo``, ``gppo``, ``vanilla`` (PPO-clip; GRPO and DAPO are configurations),
``cispo``, ``gspo``, ``luspo``, ``geo_mean``, ``sapo``, ``dppo_tv``, ``dppo_kl``, ``vespo``, ``dro``,
``clip_cov``, ``kl_cov``, ``gpg``, ``bypass_mode``, ``dgpo``, and the entropy-ratio-clipped ``grpo_erc``,
``gppo_erc``, ``ce_gppo_erc`` (these also take ``entropy=`` and ``old_entropy=``). Each is registered with its
properties (:class:`PolicyLoss`: the dataclass declaring its settings (:func:`setting`), whether it needs the
entropy, selects tokens or takes π_old from the sampler; :func:`get_policy_loss`). ``docs/losses.md`` explains each; the rollout correction (importance weights
and rejection against the sampler) is :mod:`cegppo.losses.rollout_correction`.
"""

from cegppo.losses import (  # noqa: F401  (register the losses)
    bypass,
    cispo,
    covariance,
    dgpo,
    dppo,
    dro,
    erc,
    gmpo,
    gpg,
    gppo,
    gspo,
    ppo,
    sapo,
    vespo,
)
from cegppo.losses.aggregation import agg_loss, masked_mean
from cegppo.losses.config import (
    LOSS_AGG_MODES,
    SHARED_SETTINGS,
    PolicyLossConfig,
    RolloutCorrectionSettings,
    SharedSettings,
)
from cegppo.losses.kl import KL_ESTIMATORS, kl_penalty
from cegppo.losses.registry import (
    POLICY_LOSS_REGISTRY,
    POLICY_LOSSES,
    PolicyLoss,
    PolicyLossFn,
    TokenSelector,
    get_policy_loss,
    get_policy_loss_fn,
    get_token_selector,
    list_policy_losses,
    loss_setting,
    policy_loss_needs_entropy,
    register_policy_loss,
    register_token_selector,
)
from cegppo.losses.selection import high_entropy_threshold, select_high_entropy
from cegppo.losses.settings import (
    LossSettings,
    SettingError,
    above,
    at_least,
    declared_settings,
    fraction,
    one_of,
    setting,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "POLICY_LOSS_REGISTRY",
    "SHARED_SETTINGS",
    "LossSettings",
    "PolicyLoss",
    "PolicyLossConfig",
    "PolicyLossFn",
    "RolloutCorrectionSettings",
    "SettingError",
    "SharedSettings",
    "TokenSelector",
    "above",
    "agg_loss",
    "at_least",
    "declared_settings",
    "fraction",
    "get_policy_loss",
    "get_policy_loss_fn",
    "get_token_selector",
    "high_entropy_threshold",
    "kl_penalty",
    "list_policy_losses",
    "loss_setting",
    "masked_mean",
    "one_of",
    "policy_loss_needs_entropy",
    "register_policy_loss",
    "register_token_selector",
    "select_high_entropy",
    "setting",
]
