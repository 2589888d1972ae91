"""Hyperparameters shared by every policy loss, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ROLLOUT_IS_LEVELS = ("token", "sequence")
# verl's rejection criteria: level (token, or per-sequence sum/mean/max) × divergence estimator.
ROLLOUT_RS_OPTIONS = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)  # fmt: skip
BYPASS_LOSS_TYPES = ("ppo_clip", "reinforce")


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"PolicyLossConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class PolicyLossConfig:
    """Settings read by the registered policy losses (field names follow verl's ``ActorConfig``).

    ``clip_ratio_low``/``clip_ratio_high`` are ε_low/ε_high of the trust interval [1-ε_low, 1+ε_high];
    ``clip_ratio_c`` is the dual-clip bound c for A < 0 tokens (``None`` disables dual-clip);
    ``beta1``/``beta2`` are CE-GPPO's gradient weights for the left (δ < 1-ε, A < 0) and right
    (δ > 1+ε, A > 0) boundaries. The Clip-Cov/KL-Cov defaults are Cui et al. 2025's (arXiv 2505.22617).
    ``tau_pos``/``tau_neg`` are SAPO's gate temperatures (verl's names and defaults); ``vespo_*`` are VESPO's
    Gamma-weight exponents k and decays λ per advantage sign (TRL's names and defaults); ``dro_beta`` is DRO's
    quadratic log-ratio penalty (verl's name; verl has no default and neither do we: ``dro`` requires it).
    ``rollout_is``, ``rollout_is_threshold``, ``rollout_is_batch_normalize``, ``rollout_rs``,
    ``rollout_rs_threshold`` are verl's rollout-correction settings (see
    :mod:`cegppo.losses.rollout_correction`); ``bypass_loss_type`` is verl's ``rollout_correction.loss_type``.
    ``entropy_clip_ratio_low``/``entropy_clip_ratio_high`` bound ERC's entropy ratio H/H_old to the open band
    (1-low, 1+high); 0.05 is what the ERC authors' released recipes use (arXiv 2512.05591). ``dgpo_n``/``dgpo_m``
    set how fast DGPO's probability-gradient weight decays past the left/right boundary (arXiv 2603.14389).

    Each loss declares which of these it reads (:class:`cegppo.losses.registry.PolicyLoss`); ``SHARED_SETTINGS``
    are read by every loss or by the trainer around it. The batch-size fields are set per mini-batch by a trainer that splits a batch into micro-batches
    (or data-parallel ranks), so that every micro-batch loss is normalised by the *global* token or
    sequence count and accumulated gradients equal the full-batch gradient (verl's ``global_batch_info``).
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float | None = 10.0
    beta1: float = 0.5
    beta2: float = 1.0
    loss_scale_factor: float | None = None
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    ppo_kl_coef: float = 1.0
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    dro_beta: float | None = None
    rollout_is: str | None = None
    rollout_is_threshold: float | str = 2.0
    rollout_is_batch_normalize: bool = False
    rollout_rs: str | None = None
    rollout_rs_threshold: float | str | None = None
    bypass_loss_type: str = "ppo_clip"
    entropy_clip_ratio_low: float = 0.05
    entropy_clip_ratio_high: float = 0.05
    dgpo_n: float = 1.0
    dgpo_m: float = 2.0
    dp_size: int = 1
    batch_num_tokens: int | None = None
    global_batch_size: int | None = None
    # Clip-Cov's random draw (for reproducibility; None: the global generator)
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in (
            "beta1",
            "beta2",
            "ppo_kl_coef",
            "entropy_clip_ratio_low",
            "entropy_clip_ratio_high",
            "dgpo_n",
        ):
            value = getattr(self, name)
            _require(_is_real(value) and value >= 0, name, value, "must be a finite number >= 0")
        low, high = self.clip_ratio_low, self.clip_ratio_high
        # 1 - ε_low = 0 puts no lower bound on δ (CISPO's paper); below 0 the interval means nothing
        _require(
            _is_real(low) and 0 <= low <= 1, "clip_ratio_low", low, "must be in [0, 1] so that 1 - ε_low >= 0"
        )
        _require(_is_real(high) and high > 0, "clip_ratio_high", high, "must be a finite number > 0")
        if self.clip_ratio_c is not None:
            _require(
                _is_real(self.clip_ratio_c) and self.clip_ratio_c > 1,
                "clip_ratio_c",
                self.clip_ratio_c,
                "must be a number > 1 (the dual-clip bound), or None to disable dual-clip",
            )
        if self.loss_scale_factor is not None:
            _require(
                _is_real(self.loss_scale_factor) and self.loss_scale_factor > 0,
                "loss_scale_factor",
                self.loss_scale_factor,
                "must be > 0, or None for the response length",
            )
        for name in ("tau_pos", "tau_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            value = getattr(self, name)
            _require(_is_real(value) and value > 0, name, value, "must be a finite number > 0")
        for name in ("vespo_k_pos", "vespo_k_neg"):
            value = getattr(self, name)
            _require(_is_real(value) and value >= 0, name, value, "must be a finite number >= 0")
        if self.dro_beta is not None:
            _require(
                _is_real(self.dro_beta) and self.dro_beta > 0,
                "dro_beta",
                self.dro_beta,
                "must be a number > 0, or None when the loss is not dro",
            )
        _require(
            self.rollout_is is None or self.rollout_is in ROLLOUT_IS_LEVELS,
            "rollout_is",
            self.rollout_is,
            f"allowed values are {list(ROLLOUT_IS_LEVELS)} or None",
        )
        _require(
            self.bypass_loss_type in BYPASS_LOSS_TYPES,
            "bypass_loss_type",
            self.bypass_loss_type,
            f"allowed values are {list(BYPASS_LOSS_TYPES)}",
        )
        self.is_bounds  # noqa: B018  (parse to validate)
        self.rs_bounds  # noqa: B018
        _require(
            _is_real(self.dgpo_m) and self.dgpo_m > 0, "dgpo_m", self.dgpo_m, "must be a finite number > 0"
        )
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            value = getattr(self, name)
            _require(_is_real(value) and 0 < value <= 1, name, value, "must be a fraction in (0, 1]")
        _require(
            _is_real(self.clip_cov_lb) and _is_real(self.clip_cov_ub) and self.clip_cov_lb < self.clip_cov_ub,
            "clip_cov_lb",
            (self.clip_cov_lb, self.clip_cov_ub),
            "clip_cov_lb must be below clip_cov_ub",
        )
        _require(isinstance(self.dp_size, int) and self.dp_size >= 1, "dp_size", self.dp_size, "must be >= 1")
        for name in ("batch_num_tokens", "global_batch_size"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, int) and value >= 0),
                name,
                value,
                "must be an integer >= 0, or None to use the local batch",
            )

    @property
    def global_batch_info(self) -> dict[str, Any]:
        """Keyword arguments for :func:`cegppo.losses.agg_loss`, as verl's ``ActorConfig.global_batch_info``."""
        return {
            "dp_size": self.dp_size,
            "batch_num_tokens": self.batch_num_tokens,
            "global_batch_size": self.global_batch_size,
            "loss_scale_factor": self.loss_scale_factor,
        }

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
        bad = [o for o in options if o not in ROLLOUT_RS_OPTIONS]
        _require(
            bool(options) and not bad,
            "rollout_rs",
            self.rollout_rs,
            f"comma-separated options from {list(ROLLOUT_RS_OPTIONS)}",
        )
        spec = self.rollout_rs_threshold
        _require(spec is not None, "rollout_rs_threshold", spec, "rollout_rs needs a threshold")
        specs = [part.strip() for part in str(spec).split(",") if part.strip()]
        _require(
            len(specs) in (1, len(options)),
            "rollout_rs_threshold",
            spec,
            f"give one threshold for all options or one per option ({len(options)})",
        )
        bounds = {}
        for option, part in zip(options, specs * len(options) if len(specs) == 1 else specs, strict=False):
            lower, upper = _parse_bounds(part, "rollout_rs_threshold")
            if option.endswith("k1"):
                bounds[option] = (1 / upper if lower is None else lower, upper)
            else:
                _require(lower is None, "rollout_rs_threshold", spec, f"{option} takes an upper bound only")
                bounds[option] = (None, upper)
        return bounds

    def with_batch_info(
        self, *, batch_num_tokens: int | None, global_batch_size: int | None
    ) -> PolicyLossConfig:
        """A copy normalising by the given global token and sequence counts."""
        return dataclasses.replace(
            self, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size
        )


# The fields of PolicyLossConfig a run sets (its hyperparameters); the others are per mini-batch or per run.
LOSS_SETTINGS = tuple(
    f.name
    for f in dataclasses.fields(PolicyLossConfig)
    if f.name not in ("dp_size", "batch_num_tokens", "global_batch_size", "generator")
)
# The settings every loss reads (the trust interval, dual-clip, the aggregation's divisor), or the trainer applies
# around any loss (the rollout correction against the sampler).
SHARED_SETTINGS = (
    "clip_ratio_low",
    "clip_ratio_high",
    "clip_ratio_c",
    "loss_scale_factor",
    "rollout_is",
    "rollout_is_threshold",
    "rollout_is_batch_normalize",
    "rollout_rs",
    "rollout_rs_threshold",
)


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
    _require(
        ok and not isinstance(spec, bool), name, spec, 'a number > 0 or "lower_upper" with 0 < lower <= upper'
    )
    return (values[0], values[1]) if len(values) == 2 else (None, values[0])


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_loss_agg_mode(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"loss_agg_mode={loss_agg_mode!r} is invalid: allowed values are {list(LOSS_AGG_MODES)}"
        )
