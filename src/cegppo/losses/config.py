"""Hyperparameters shared by every policy loss, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


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

    The batch-size fields are set per mini-batch by a trainer that splits a batch into micro-batches
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
    dp_size: int = 1
    batch_num_tokens: int | None = None
    global_batch_size: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("clip_ratio_low", "clip_ratio_high", "beta1", "beta2", "ppo_kl_coef"):
            value = getattr(self, name)
            _require(_is_real(value) and value >= 0, name, value, "must be a finite number >= 0")
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

    def with_batch_info(
        self, *, batch_num_tokens: int | None, global_batch_size: int | None
    ) -> PolicyLossConfig:
        """A copy normalising by the given global token and sequence counts."""
        return dataclasses.replace(
            self, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size
        )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_loss_agg_mode(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"loss_agg_mode={loss_agg_mode!r} is invalid: allowed values are {list(LOSS_AGG_MODES)}"
        )
