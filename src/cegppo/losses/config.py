"""The settings every loss shares, the rollout correction's, and :class:`PolicyLossConfig`, the ``config`` a loss is
called with: the settings every loss declares (:mod:`cegppo.losses.settings`), plus the mini-batch's counts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cegppo.losses.settings import (
    ACTOR,
    ROLLOUT_CORRECTION,
    LossSettings,
    Rule,
    SettingError,
    above,
    declare,
    declared_settings,
    find_setting,
    is_real,
    setting,
    settings_classes,
)

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ROLLOUT_IS_LEVELS = ("token", "sequence")
# verl's rejection criteria: level (token, or per-sequence sum/mean/max) × divergence estimator.
ROLLOUT_RS_OPTIONS = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)  # fmt: skip


@declare
@dataclass(frozen=True)
class SharedSettings(LossSettings):
    """Read by every loss (field names and places are verl's actor config's).

    ``clip_ratio_low``/``clip_ratio_high`` are ε_low/ε_high of the trust interval [1-ε_low, 1+ε_high];
    ``clip_ratio_c`` is the dual-clip bound c for A < 0 tokens (None disables dual-clip); ``loss_scale_factor``
    divides ``seq-mean-token-sum-norm`` (None: the padded response length).
    """

    # 1 - ε_low = 0 puts no lower bound on δ (CISPO's paper); below 0 the interval means nothing
    clip_ratio_low: float = setting(
        0.2, Rule(lambda v: is_real(v) and 0 <= v <= 1, "must be in [0, 1] so that 1 - ε_low >= 0"), at=ACTOR
    )
    clip_ratio_high: float = setting(0.2, above(0), at=ACTOR)
    clip_ratio_c: float | None = setting(
        10.0, above(1, "must be a number > 1 (the dual-clip bound), or None to disable dual-clip"), at=ACTOR
    )
    loss_scale_factor: float | None = setting(
        None, above(0, "must be > 0, or None for the response length"), at=ACTOR
    )


@declare
@dataclass(frozen=True)
class RolloutCorrectionSettings(LossSettings):
    """verl's rollout correction against the sampler (``algorithm.rollout_correction``), applied around any loss:
    :mod:`cegppo.losses.rollout_correction`. Off by default (verl's default is ``rollout_is="sequence"``)."""

    rollout_is: str | None = setting(
        None,
        Rule(lambda v: v in ROLLOUT_IS_LEVELS, f"allowed values are {list(ROLLOUT_IS_LEVELS)} or None"),
        at=ROLLOUT_CORRECTION,
    )
    rollout_is_threshold: float | str = setting(2.0, at=ROLLOUT_CORRECTION)  # checked by is_bounds
    rollout_is_batch_normalize: bool = setting(False, at=ROLLOUT_CORRECTION)
    rollout_rs: str | None = setting(None, at=ROLLOUT_CORRECTION)  # checked by rs_bounds
    rollout_rs_threshold: float | str | None = setting(None, at=ROLLOUT_CORRECTION)

    def check(self) -> None:
        self.is_bounds  # noqa: B018  (parse to validate)
        self.rs_bounds  # noqa: B018

    @property
    def is_bounds(self) -> tuple[float | None, float]:
        """``rollout_is_threshold`` as (lower, upper): a number caps the weights (TIS); ``"lower_upper"`` zeroes
        the weights outside [lower, upper] (IcePop / masked IS), lower is then not None."""
        return _parse_bounds(self.rollout_is_threshold, "rollout_is_threshold")

    @property
    def rs_bounds(self) -> dict[str, tuple[float | None, float]]:
        """Each ``rollout_rs`` option's (lower, upper) from ``rollout_rs_threshold`` (one value shared by all
        options, or one per option, comma-separated). K1 options bound the ratio: ``"lower_upper"``, or an
        upper u alone meaning [1/u, u]; K2/K3 options take an upper bound on the divergence only."""
        if self.rollout_rs is None:
            return {}
        options = list(dict.fromkeys(o.strip() for o in self.rollout_rs.split(",") if o.strip()))
        if not options or any(o not in ROLLOUT_RS_OPTIONS for o in options):
            raise SettingError(
                "rollout_rs", self.rollout_rs, f"comma-separated options from {list(ROLLOUT_RS_OPTIONS)}"
            )
        spec = self.rollout_rs_threshold
        if spec is None:
            raise SettingError("rollout_rs_threshold", spec, "rollout_rs needs a threshold")
        specs = [part.strip() for part in str(spec).split(",") if part.strip()]
        if len(specs) not in (1, len(options)):
            raise SettingError(
                "rollout_rs_threshold",
                spec,
                f"give one threshold for all options or one per option ({len(options)})",
            )
        bounds = {}
        for option, part in zip(options, specs * len(options) if len(specs) == 1 else specs, strict=False):
            lower, upper = _parse_bounds(part, "rollout_rs_threshold")
            if option.endswith("k1"):
                bounds[option] = (1 / upper if lower is None else lower, upper)
            elif lower is not None:
                raise SettingError("rollout_rs_threshold", spec, f"{option} takes an upper bound only")
            else:
                bounds[option] = (None, upper)
        return bounds


# The settings every loss reads (the trust interval, dual-clip, the aggregation's divisor), or the trainer applies
# around any loss (the rollout correction against the sampler).
SHARED_SETTINGS = tuple(
    name for name, d in declared_settings().items() if d.owner in (SharedSettings, RolloutCorrectionSettings)
)
# verl's global_batch_info: the counts a loss normalises by, set per mini-batch (never a run's setting).
_COUNTS = ("dp_size", "batch_num_tokens", "global_batch_size")


class PolicyLossConfig:
    """What a policy loss is called with, verl's ``config`` argument: every declared setting as an attribute
    (``config.clip_ratio_low``, ``config.beta1``: the shared ones above and each registered loss's own, see
    :func:`cegppo.losses.register_policy_loss`), and verl's ``global_batch_info``.

    ``PolicyLossConfig(beta1=0.75, clip_ratio_c=3.0)``: the settings not given keep their declared defaults, each
    dataclass of settings validates its own (:class:`~cegppo.losses.settings.SettingError` names the field), and an
    unknown name is a ``TypeError``. ``dp_size``, ``batch_num_tokens`` and ``global_batch_size`` are the counts a
    trainer that splits a batch into micro-batches (or data-parallel ranks) sets per mini-batch
    (:meth:`with_batch_info`), so that every micro-batch loss is normalised by the *global* token or sequence
    count and accumulated gradients equal the full-batch gradient. Immutable: :meth:`replace` makes a changed copy.
    """

    def __init__(
        self,
        *,
        dp_size: int = 1,
        batch_num_tokens: int | None = None,
        global_batch_size: int | None = None,
        **settings: Any,
    ) -> None:
        declared = declared_settings()
        unknown = sorted(set(settings) - set(declared))
        if unknown:
            raise TypeError(f"PolicyLossConfig has no settings {unknown}; declared are {sorted(declared)}")
        given: dict[type, dict[str, Any]] = {}
        for name, value in settings.items():
            given.setdefault(declared[name].owner, {})[name] = value
        groups = {cls: cls(**given.get(cls, {})) for cls in settings_classes()}
        if not (isinstance(dp_size, int) and dp_size >= 1):
            raise SettingError("dp_size", dp_size, "must be >= 1")
        for name, value in (("batch_num_tokens", batch_num_tokens), ("global_batch_size", global_batch_size)):
            if not (value is None or (isinstance(value, int) and value >= 0)):
                raise SettingError(name, value, "must be an integer >= 0, or None to use the local batch")
        # Plain attributes, so that a loss reads its settings at attribute speed.
        self.__dict__.update(
            {f.name: getattr(group, f.name) for group in groups.values() for f in dataclasses.fields(group)}
        )
        self.__dict__.update(
            _groups=groups,
            dp_size=dp_size,
            batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
        )

    def __getattr__(self, name: str) -> Any:
        # Called only for names that are not plain attributes: a setting declared after this config was made.
        declared = None if name.startswith("_") else find_setting(name)
        if declared is None:
            raise AttributeError(f"PolicyLossConfig has no setting {name!r}")
        return getattr(self.group(declared.owner), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PolicyLossConfig is immutable: use config.replace({name}=...)")

    def group(self, cls: type[LossSettings]) -> Any:
        """The validated dataclass of the settings ``cls`` declares (its defaults if declared after this config)."""
        groups = self.__dict__["_groups"]
        return groups[cls] if cls in groups else cls()

    def settings(self) -> dict[str, Any]:
        """Every declared setting's value, by name."""
        return {name: getattr(self, name) for name in declared_settings()}

    def replace(self, **changes: Any) -> PolicyLossConfig:
        """A copy with ``changes`` (settings or counts), validated."""
        counts = {name: getattr(self, name) for name in _COUNTS}
        return PolicyLossConfig(**{**self.settings(), **counts, **changes})

    def with_batch_info(
        self, *, batch_num_tokens: int | None, global_batch_size: int | None
    ) -> PolicyLossConfig:
        """A copy normalising by the given global token and sequence counts."""
        return self.replace(batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)

    @property
    def global_batch_info(self) -> dict[str, Any]:
        """Keyword arguments for :func:`cegppo.losses.agg_loss`, as verl's ``ActorConfig.global_batch_info``."""
        return {
            "dp_size": self.dp_size,
            "batch_num_tokens": self.batch_num_tokens,
            "global_batch_size": self.global_batch_size,
            "loss_scale_factor": self.loss_scale_factor,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PolicyLossConfig):
            return NotImplemented
        counts = [(getattr(self, n), getattr(other, n)) for n in _COUNTS]
        return self.settings() == other.settings() and all(a == b for a, b in counts)

    def __repr__(self) -> str:
        values = {**self.settings(), **{name: getattr(self, name) for name in _COUNTS}}
        return f"PolicyLossConfig({', '.join(f'{k}={v!r}' for k, v in values.items())})"


def _parse_bounds(spec: object, name: str) -> tuple[float | None, float]:
    """``2.0`` or ``"2.0"`` -> (None, 2.0); ``"0.5_2.0"`` -> (0.5, 2.0) (verl's threshold syntax)."""
    parts = spec.split("_") if isinstance(spec, str) else [spec]
    try:
        values = [float(part) for part in parts]
    except (TypeError, ValueError):
        values = []
    ok = (
        len(values) in (1, 2) and all(math.isfinite(v) and v > 0 for v in values) and values == sorted(values)
    )
    if not ok or isinstance(spec, bool):
        raise SettingError(name, spec, 'a number > 0 or "lower_upper" with 0 < lower <= upper')
    return (values[0], values[1]) if len(values) == 2 else (None, values[0])


def validate_loss_agg_mode(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"loss_agg_mode={loss_agg_mode!r} is invalid: allowed values are {list(LOSS_AGG_MODES)}"
        )
