"""The micro-batch loss as a sum of terms: the policy gradient, the entropy bonus, the KL to the reference, the
NLL on correct responses, and any term a user registers.

Each term is a small callable of one :class:`MicroBatch` (its rows, the current log-probs and entropies, π_old,
and the mini-batch's counts) returning its contribution to the loss and additive metrics. Every contribution is
normalised by the *mini-batch's* token or sequence counts, so summing the micro-batches' gradients gives the
mini-batch gradient whatever ``actor.micro_batch_size`` is. A term factory registered with
:func:`register_loss_term` is called for every :class:`~cegppo.trainer.actor.Actor` and returns its term, or None
when the run's settings turn it off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cegppo.dynamics import QuadrantTotals, quadrant_totals
from cegppo.losses import PolicyLossConfig, agg_loss, kl_penalty
from cegppo.trainer.batch import UpdateBatch

if TYPE_CHECKING:
    from cegppo.trainer.actor import Actor


@dataclass(frozen=True)
class MiniBatchCounts:
    """The normalisers of one mini-batch, shared by its micro-batches (verl's ``global_batch_info``)."""

    loss_config: (
        PolicyLossConfig  # the loss settings in force, with the mini-batch's token and sequence counts
    )
    num_tokens: int  # valid response tokens
    trained_agg: dict[str, Any]  # agg_loss counts of the tokens trained on (all, or the 80/20 selection's)
    num_positive_tokens: int  # tokens of the correct responses


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as the terms see it."""

    rows: UpdateBatch
    log_prob: torch.Tensor  # [n, R], the current policy's, with gradient
    entropy: torch.Tensor | None  # [n, R], when a term or the loss needs it
    pi_old: torch.Tensor  # [n, R], what the ratio is taken against (the sampler's under bypass_mode)
    pi_old_entropy: torch.Tensor | None  # [n, R]
    trained_mask: torch.Tensor  # [n, R], the tokens trained on: the response mask or the 80/20 selection
    high_entropy: torch.Tensor | None  # [n, R] float, the 80/20 selection (None: every token)
    token_selection: torch.Tensor | None  # [n, R] bool, the loss's own tokens (Clip-Cov, KL-Cov)
    counts: MiniBatchCounts

    @property
    def response_mask(self) -> torch.Tensor:
        return self.rows.experience.response_mask

    @property
    def advantages(self) -> torch.Tensor:
        """Per token, [n, R]."""
        return self.rows.experience.advantages.unsqueeze(1).expand_as(self.log_prob)

    @property
    def token_share(self) -> float:
        """This micro-batch's share of the mini-batch's tokens (weights the loss's mean metrics)."""
        return self.response_mask.sum().item() / max(self.counts.num_tokens, 1)


class LossTerm(Protocol):
    """``term(micro) -> (loss contribution, metrics summed over the micro-batches)``; ``needs_entropy``: the
    term reads ``micro.entropy``."""

    needs_entropy: bool

    def __call__(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]: ...


TermFactory = Callable[["Actor"], LossTerm | None]
LOSS_TERMS: dict[str, TermFactory] = {}


def register_loss_term(name: str) -> Callable[[TermFactory], TermFactory]:
    """Decorator registering a term factory: ``factory(actor) -> LossTerm | None`` (None: off for this run).
    Terms are summed in registration order; re-registering a name replaces it in place."""

    def decorator(factory: TermFactory) -> TermFactory:
        LOSS_TERMS[name] = factory
        return factory

    return decorator


class QuadrantObserver:
    """The entropy quadrants (CE-GPPO §3) of the policy-gradient term: ∂pg_loss/∂log π per token is the loss's own
    gradient weight (−F·A/N), which places each token's share of the update, through the loss ops only."""

    def __init__(self, prob_threshold: float) -> None:
        self.prob_threshold = prob_threshold
        self.totals: QuadrantTotals | None = None

    def __call__(self, micro: MicroBatch, pg_loss: torch.Tensor) -> None:
        (loss_grad,) = torch.autograd.grad(pg_loss, micro.log_prob, retain_graph=True)
        config = micro.counts.loss_config
        totals = quadrant_totals(
            micro.pi_old,
            micro.log_prob,
            loss_grad,
            micro.advantages,
            micro.response_mask,
            prob_threshold=self.prob_threshold,
            clip_ratio_low=config.clip_ratio_low,
            clip_ratio_high=config.clip_ratio_high,
            old_entropy=micro.pi_old_entropy,
        )
        self.totals = totals if self.totals is None else self.totals + totals


class PolicyGradientTerm:
    """The registered policy loss (``actor.policy_loss.loss_mode``), with the importance weights of the rollout correction
    and the 80/20 selection as token weights, and its observers (the quadrant analysis)."""

    def __init__(self, actor: Actor) -> None:
        self.loss = actor.loss
        self.loss_fn = self.loss.fn
        self.needs_entropy = self.loss.needs_entropy
        self.loss_agg_mode = actor.settings.actor.loss_agg_mode
        self.observers: list[Callable[[MicroBatch, torch.Tensor], None]] = []

    def __call__(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        extra: dict[str, torch.Tensor | None] = {}
        if self.loss.needs_entropy:
            extra = {"entropy": micro.entropy, "old_entropy": micro.pi_old_entropy}
        if self.loss.token_selector is not None:
            extra["token_selection"] = micro.token_selection
        weights = micro.rows.is_weights
        if micro.high_entropy is not None:
            # TRL multiplies the per-token loss by the selection and normalises as without it: a token weight.
            weights = micro.high_entropy if weights is None else weights * micro.high_entropy
        loss, loss_metrics = self.loss_fn(
            old_log_prob=micro.pi_old,
            log_prob=micro.log_prob,
            advantages=micro.advantages,
            response_mask=micro.response_mask,
            loss_agg_mode=self.loss_agg_mode,
            config=micro.counts.loss_config,
            rollout_is_weights=weights,
            **extra,
        )
        for observe in self.observers:
            observe(micro, loss)
        share = micro.token_share
        metrics = {key: value * share for key, value in loss_metrics.items()}
        return loss, {"actor/pg_loss": loss.item(), **metrics}


class EntropyBonus:
    """−c·H over the tokens trained on (verl's and TRL's ``entropy_coeff``; c from the adaptive controller when
    ``actor.use_adaptive_entropy``), taken once per mini-batch."""

    needs_entropy = True

    def __init__(self, actor: Actor) -> None:
        self.coefficient = actor.entropy_coefficient
        self.loss_agg_mode = actor.settings.actor.loss_agg_mode

    def __call__(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        entropy = agg_loss(micro.entropy, micro.trained_mask, self.loss_agg_mode, **micro.counts.trained_agg)
        return -self.coefficient.applied() * entropy, {"actor/entropy_loss": entropy.item()}


class KLToReference:
    """β_KL·KL(π || π_ref) per token with verl's estimators (``actor.use_kl_loss``)."""

    needs_entropy = False

    def __init__(self, actor: Actor) -> None:
        self.actor = actor.settings.actor

    def __call__(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        kl = kl_penalty(micro.log_prob.float(), micro.rows.ref_log_prob, self.actor.kl_loss_type)
        kl = agg_loss(
            kl, micro.response_mask, self.actor.loss_agg_mode, **micro.counts.loss_config.global_batch_info
        )
        return self.actor.kl_loss_coef * kl, {"actor/kl_loss": kl.item()}


class PositiveNLL:
    """λ·NLL of the correct responses' tokens, a token mean over the mini-batch's correct tokens (the CE-GPPO
    release's ``positive_loss_coeff``)."""

    needs_entropy = False

    def __init__(self, actor: Actor) -> None:
        self.coeff = actor.settings.actor.positive_loss_coeff

    def __call__(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        positive = micro.response_mask * micro.rows.experience.correct.unsqueeze(1)
        count = micro.counts.num_positive_tokens
        nll = agg_loss(-micro.log_prob.float(), positive, "token-mean", batch_num_tokens=count)
        return self.coeff * nll, {"actor/positive_nll": nll.item()}


register_loss_term("policy_gradient")(PolicyGradientTerm)
register_loss_term("entropy_bonus")(
    lambda actor: EntropyBonus(actor) if actor.entropy_coefficient.enabled else None
)
register_loss_term("kl_to_reference")(
    lambda actor: KLToReference(actor) if actor.ref_model is not None else None
)
register_loss_term("positive_nll")(
    lambda actor: PositiveNLL(actor) if actor.settings.actor.positive_loss_coeff > 0 else None
)
