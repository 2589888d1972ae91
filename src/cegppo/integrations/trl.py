"""TRL integration: a ``GRPOTrainer`` whose policy loss comes from the cegppo registry.

    from cegppo.integrations.trl import CEGPPOConfig, CEGPPOTrainer

    args = CEGPPOConfig(output_dir="out", loss_mode="ce_gppo", beta1=0.5, beta2=1.0, num_iterations=2)
    CEGPPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=reward_fn, args=args,
                  train_dataset=dataset).train()

Everything else is TRL's: generation (``model.generate`` or vLLM), rewards, group advantages, KL to a
reference model (``beta``), logging, ``accelerate``/DeepSpeed/FSDP. Only ``GRPOTrainer._compute_loss`` is
replaced, TRL's supported extension route. TRL's clip knobs keep their meaning: ``epsilon`` is ε_low,
``epsilon_high`` is ε_high and ``delta`` is the dual-clip bound c (TRL's "two-sided clipping" is exactly
dual-clip; here it defaults to 10, the CE-GPPO recipe's value); ``sapo_temperature_{pos,neg}`` and
``vespo_{k,lambda}_{pos,neg}`` reach ``loss_mode="sapo"``/``"vespo"``. TRL's ``loss_type`` is replaced by
``loss_mode`` (the registered loss) and ``loss_agg_mode`` (the aggregation); setting ``loss_type`` to anything but
TRL's default is an error whose message names the replacement (:data:`TRL_LOSS_TYPES`: ``dapo``, ``grpo`` and
``dr_grpo`` are ``loss_mode="vanilla"`` with an aggregation; ``sapo``, ``luspo``, ``vespo``, ``cispo`` are losses of
the same name). ``bnpo`` (a token mean over each micro-batch's own tokens) is not offered because its gradient
depends on how a step is split into micro-batches: ``token-mean`` is the split-free version. The aggregations are
normalised as TRL normalises:

- ``token-mean``: Σ loss / tokens of the optimizer step across processes, as TRL's ``dapo``;
- ``seq-mean-token-mean``: mean of per-sequence token means, as TRL's ``grpo``;
- ``seq-mean-token-sum-norm``: Σ loss / (sequences · ``loss_scale_factor``, default ``max_completion_length``),
  as TRL's ``dr_grpo``;
- ``seq-mean-token-sum``: mean of per-sequence token sums.

TRL's per-token multipliers act as in TRL: the high-entropy mask (``top_entropy_quantile``) and the off-policy
sequence mask (``off_policy_mask_threshold``) multiply the token loss; the vLLM importance-sampling ratio multiplies it
too, except under ``vespo``, whose sequence weight takes it inside (TRL's ``vespo``, which then needs a token-level
``vllm_importance_sampling_mode``).

Clipping only acts when the policy has moved since generation: set ``num_iterations`` > 1 or
``steps_per_generation`` > ``gradient_accumulation_steps`` (with TRL's defaults the ratio is exactly 1).
Logged besides TRL's metrics: ``clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max}`` (TRL's
names and definitions) and the loss's ``actor/{pg_clipfrac, pg_clipfrac_low, pg_clipfrac_high,
pg_clipfrac_dual, ppo_kl}``.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from cegppo.integrations._versions import SUPPORTED, warn_if_untested

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        f"cegppo.integrations.trl needs TRL {SUPPORTED['trl']}: `pip install '.[trl]'` in a cegppo checkout"
    ) from exc

from cegppo.losses import (
    LOSS_AGG_MODES,
    PolicyLossConfig,
    SettingError,
    agg_loss,
    get_policy_loss,
    get_policy_loss_fn,
    list_policy_losses,
)
from cegppo.losses.ratio import clip_boundaries

_DEFAULTS = PolicyLossConfig()
warn_if_untested("trl", trl.__version__)
_DEFAULT_LOSS_TYPE = next(f.default for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type")
# TRL's loss_type values and the (loss_mode, loss_agg_mode) that reproduce them; None: not offered (see above).
TRL_LOSS_TYPES: dict[str, tuple[str, str] | None] = {
    "dapo": ("vanilla", "token-mean"),
    "grpo": ("vanilla", "seq-mean-token-mean"),
    "dr_grpo": ("vanilla", "seq-mean-token-sum-norm"),
    "bnpo": None,
    "cispo": ("cispo", "token-mean"),
    "sapo": ("sapo", "seq-mean-token-mean"),
    "luspo": ("luspo", "seq-mean-token-sum"),
    "vespo": ("vespo", "token-mean"),
}
# vLLM importance-sampling modes that give one ratio per token (VESPO sums their logs into its sequence weight).
_TOKEN_IS_MODES = ("token_truncate", "token_mask")


def _help(text: str) -> dict[str, dict[str, str]]:
    return {"metadata": {"help": text}}


@dataclass
class CEGPPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the cegppo loss settings (TRL's ``loss_type`` is not used)."""

    loss_mode: str = field(
        default="ce_gppo",
        **_help(f"Policy loss from the cegppo registry: {', '.join(list_policy_losses())}."),
    )
    beta1: float = field(
        default=_DEFAULTS.beta1,
        **_help("CE-GPPO gradient weight of the left boundary (ratio < 1-epsilon, advantage < 0)."),
    )
    beta2: float = field(
        default=_DEFAULTS.beta2,
        **_help("CE-GPPO gradient weight of the right boundary (ratio > 1+epsilon_high, advantage > 0)."),
    )
    loss_agg_mode: str = field(
        default="token-mean", **_help(f"Loss aggregation: {', '.join(LOSS_AGG_MODES)}.")
    )
    loss_scale_factor: float | None = field(
        default=None,
        **_help("Divisor of seq-mean-token-sum-norm (Dr. GRPO); default: max_completion_length."),
    )
    delta: float | None = field(
        default=_DEFAULTS.clip_ratio_c,
        **_help("Dual-clip bound c: an advantage < 0 token's loss is capped at -c·A. None disables it."),
    )
    clip_cov_ratio: float = field(default=_DEFAULTS.clip_cov_ratio, **_help("clip_cov: fraction of tokens."))
    clip_cov_lb: float = field(default=_DEFAULTS.clip_cov_lb, **_help("clip_cov: covariance lower bound."))
    clip_cov_ub: float = field(default=_DEFAULTS.clip_cov_ub, **_help("clip_cov: covariance upper bound."))
    kl_cov_ratio: float = field(default=_DEFAULTS.kl_cov_ratio, **_help("kl_cov: fraction of tokens."))
    ppo_kl_coef: float = field(default=_DEFAULTS.ppo_kl_coef, **_help("kl_cov: KL penalty coefficient."))
    dro_beta: float | None = field(
        default=_DEFAULTS.dro_beta, **_help("dro: quadratic log-ratio penalty (required by loss_mode='dro').")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type != _DEFAULT_LOSS_TYPE:
            raise ValueError(_loss_type_message(self.loss_type))
        loss = get_policy_loss(self.loss_mode)
        if loss.pi_old_from_sampler:
            raise ValueError(
                f"CEGPPOConfig.loss_mode={self.loss_mode!r} needs the sampler's log-probs as old_log_prob, which TRL "
                "does not pass to the loss; use TRL's vllm_importance_sampling_correction instead"
            )
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(
                f"CEGPPOConfig.loss_agg_mode={self.loss_agg_mode!r}: allowed values are {LOSS_AGG_MODES}"
            )
        if self.importance_sampling_level != "token":
            raise ValueError(
                "CEGPPOConfig.importance_sampling_level must be 'token': the losses take per-token ratios "
                "(loss_mode='gspo' forms the sequence ratio itself)"
            )
        if (
            self.loss_mode == "vespo"
            and self.use_vllm
            and self.vllm_importance_sampling_correction
            and self.vllm_importance_sampling_mode not in _TOKEN_IS_MODES
        ):
            raise ValueError(
                f"CEGPPOConfig.vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r}: "
                f"loss_mode='vespo' folds the vLLM ratio into its sequence weight token by token, so it needs one "
                f"of {_TOKEN_IS_MODES} (as TRL's loss_type='vespo')"
            )
        if self.loss_mode == "geo_mean" and self.top_entropy_quantile < 1.0:
            raise ValueError(
                "CEGPPOConfig.top_entropy_quantile < 1 with loss_mode='geo_mean': GMPO's token losses share one "
                "sequence ratio, so TRL's per-token entropy mask has no token loss to multiply"
            )
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError(
                "CEGPPOConfig does not support TRL's entropy bonus (entropy_coef, use_adaptive_entropy); "
                "CE-GPPO steers entropy through beta1/beta2"
            )
        settings = self.policy_loss_config()  # ValueError naming a bad setting
        try:
            loss.check(settings)
        except SettingError as error:
            raise ValueError(
                f"CEGPPOConfig.{error.name}={error.value!r}: loss_mode={self.loss_mode!r} needs it set"
            ) from None

    def policy_loss_config(self) -> PolicyLossConfig:
        """The loss settings, validated (``ValueError`` names a bad field); batch sizes are set per step."""
        scale = self.max_completion_length if self.loss_scale_factor is None else self.loss_scale_factor
        return PolicyLossConfig(
            clip_ratio_low=self.epsilon,
            clip_ratio_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
            clip_ratio_c=self.delta,
            beta1=self.beta1,
            beta2=self.beta2,
            loss_scale_factor=scale,
            clip_cov_ratio=self.clip_cov_ratio,
            clip_cov_lb=self.clip_cov_lb,
            clip_cov_ub=self.clip_cov_ub,
            kl_cov_ratio=self.kl_cov_ratio,
            ppo_kl_coef=self.ppo_kl_coef,
            tau_pos=self.sapo_temperature_pos,
            tau_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos,
            vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
            dro_beta=self.dro_beta,
        )


def _loss_type_message(loss_type: str) -> str:
    replacement = TRL_LOSS_TYPES.get(loss_type)
    if replacement is None:
        hint = (
            "it has no replacement: its gradient depends on how a step is split into micro-batches; "
            "loss_agg_mode='token-mean' is the split-free token mean"
            if loss_type in TRL_LOSS_TYPES
            else f"TRL's loss types are {sorted(TRL_LOSS_TYPES)}"
        )
    else:
        mode, aggregation = replacement
        hint = f"for TRL's {loss_type!r} set loss_mode={mode!r}, loss_agg_mode={aggregation!r}"
        if loss_type == "cispo":
            hint += " (our cispo clips δ to [1-epsilon, 1+epsilon_high]; TRL's caps it at epsilon_high)"
    return (
        f"CEGPPOConfig.loss_type={loss_type!r}: CEGPPOTrainer does not read loss_type (loss_mode and "
        f"loss_agg_mode replace it), while TRL's own checks would; leave it at {_DEFAULT_LOSS_TYPE!r}. {hint}"
    )


# Arguments of GRPOTrainer._get_per_token_logps_and_entropies that the loss sets itself; the others are
# optional model inputs (images, token types, ...) taken from the batch when present.
_FORWARD_ARGS = frozenset(
    [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    ]
)


class CEGPPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the policy loss ``args.loss_mode`` from the cegppo registry (see the module doc)."""

    def __init__(self, model: Any, reward_funcs: Any = None, args: CEGPPOConfig | None = None, **kwargs: Any):
        if args is None:
            args = CEGPPOConfig()
        if not isinstance(args, CEGPPOConfig):
            raise TypeError(f"CEGPPOTrainer needs args=CEGPPOConfig(...), got {type(args).__name__}")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self.policy_loss_fn = get_policy_loss_fn(args.loss_mode)
        self.policy_loss_settings = args.policy_loss_config()
        forward_params = inspect.signature(self._get_per_token_logps_and_entropies).parameters
        self._model_input_keys = [name for name in forward_params if name not in _FORWARD_ARGS]

    def _batch_config(self, inputs: dict[str, Any], num_sequences: int, training: bool) -> PolicyLossConfig:
        """The loss settings with this micro-batch's global counts, chosen to reproduce TRL's normalisers.

        A loss is Σ(micro-batch) / global count · ``dp_size`` (verl's convention). TRL's ``num_items_in_batch``
        counts the tokens of the whole generation batch, which is spread over P processes × ``steps_per_generation``
        micro-batches, while one optimizer step accumulates ``gradient_accumulation_steps`` (GA) of them. With
        ``dp_size`` = P · steps_per_generation and counts taken × GA, every optimizer step is a mean over its share
        of tokens (TRL's ``dapo``) or sequences (TRL's ``grpo``/``dr_grpo``). Evaluation has one micro-batch.
        """
        accumulation = self.current_gradient_accumulation_steps if training else 1
        micro_batches = self.accelerator.num_processes * (self.args.steps_per_generation if training else 1)
        return self.policy_loss_settings.replace(
            dp_size=micro_batches,
            batch_num_tokens=int(inputs["num_items_in_batch"].item()) * accumulation,
            global_batch_size=num_sequences * accumulation * micro_batches,
        )

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in self._model_input_keys},
        )
        advantages = inputs["advantages"]
        advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(
            per_token_logps
        )
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:  # TRL skips it when the batch is used once: the ratio is exactly 1
            old_per_token_logps = per_token_logps.detach()

        # TRL's 0/1 masks (high-entropy tokens, off-policy sequences) multiply the token loss.
        keep = None
        if self.top_entropy_quantile < 1.0:
            keep = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        if self.off_policy_mask_threshold is not None:
            off_policy_mask = self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_per_token_logps),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            keep = off_policy_mask if keep is None else keep * off_policy_mask
        sampler_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            sampler_ratio = inputs["importance_sampling_ratio"]
        keep, sampler_ratio = (
            None if w is None else w.to(per_token_logps.dtype).expand_as(per_token_logps)
            for w in (keep, sampler_ratio)
        )
        loss_log_prob, loss_old_log_prob = per_token_logps, old_per_token_logps
        if self.args.loss_mode == "vespo":
            # VESPO takes the sampler ratio inside its sequence weight w (rollout_is_weights enter log w, as in
            # TRL), so the masks cannot travel with it. Its token loss −sg(φ(w))·A·log π is linear in log π and
            # reads the ratio only detached: scaling log π by the mask while keeping log δ's value multiplies that
            # token loss by the mask, value and gradient, as TRL does.
            rollout_is_weights = sampler_ratio
            if keep is not None:
                loss_log_prob = keep * per_token_logps
                loss_old_log_prob = old_per_token_logps - (1 - keep) * per_token_logps.detach()
        elif keep is None or sampler_ratio is None:
            # The other losses multiply their token losses by rollout_is_weights before aggregating.
            rollout_is_weights = sampler_ratio if keep is None else keep
        else:
            rollout_is_weights = keep * sampler_ratio

        training = self.model.training
        config = self._batch_config(inputs, completion_ids.size(0), training)
        loss, metrics = self.policy_loss_fn(
            old_log_prob=loss_old_log_prob,
            log_prob=loss_log_prob,
            advantages=advantages,
            response_mask=mask,
            loss_agg_mode=self.args.loss_agg_mode,
            config=config,
            rollout_is_weights=rollout_is_weights,
        )
        mode = "train" if training else "eval"
        if self.beta != 0.0:
            ref_log_ratio = inputs["ref_per_token_logps"] - per_token_logps
            per_token_kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(per_token_logps - old_per_token_logps)
            kl = agg_loss(per_token_kl, mask, self.args.loss_agg_mode, **config.global_batch_info)
            loss = loss + self.beta * kl
            self._metrics[mode]["kl"].append(self._global_token_mean(per_token_kl, mask))
        if self.aux_loss_enabled:
            accumulation = self.current_gradient_accumulation_steps if training else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item()
            )
        self._log_loss_metrics(
            mode, per_token_logps, old_per_token_logps, advantages, mask, entropies, metrics
        )
        return loss

    def _global_token_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        totals = torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_loss_metrics(
        self,
        mode: str,
        per_token_logps: torch.Tensor,
        old_per_token_logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        entropies: torch.Tensor,
        loss_metrics: dict[str, float],
    ) -> None:
        metrics = self._metrics[mode]
        metrics["entropy"].append(self._global_token_mean(entropies, mask))
        ratio = torch.exp(per_token_logps.detach() - old_per_token_logps)
        settings = self.policy_loss_settings
        low, high = (
            region.float()
            for region in clip_boundaries(
                ratio, advantages, settings.clip_ratio_low, settings.clip_ratio_high
            )
        )
        metrics["clip_ratio/low_mean"].append(self._global_token_mean(low, mask))
        metrics["clip_ratio/high_mean"].append(self._global_token_mean(high, mask))
        metrics["clip_ratio/region_mean"].append(self._global_token_mean(torch.maximum(low, high), mask))
        tokens = mask.sum(-1)  # an empty completion gives NaN, which nanmin/nanmax skip (as TRL)
        metrics["clip_ratio/low_min"].append(
            nanmin(self.accelerator.gather((low * mask).sum(-1) / tokens)).item()
        )
        metrics["clip_ratio/high_max"].append(
            nanmax(self.accelerator.gather((high * mask).sum(-1) / tokens)).item()
        )
        device = per_token_logps.device
        for name, value in loss_metrics.items():
            metrics[name].append(self.accelerator.gather(torch.tensor([value], device=device)).mean().item())
