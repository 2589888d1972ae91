"""The policy update: π_old, then PPO epochs over mini-batches of micro-batches, each micro-batch's loss a sum of
terms (:mod:`cegppo.trainer.terms`).

With ``actor.share_prompt`` every forward pass runs each distinct prompt of a micro-batch once and its
responses against the prompt's KV cache (:func:`cegppo.ops.causal_lm_logprobs_and_entropy`), with the same
values and gradients as one row per sample. Micro-batches are ``micro_batch_size`` rows, as without sharing:
a group split between two micro-batches has its prompt run in each (still exact), so a ``micro_batch_size``
that is a multiple of ``rollout.n`` runs every prompt once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, get_constant_schedule_with_warmup

from cegppo.config import ActorConfig, Config
from cegppo.dynamics import QuadrantTotals
from cegppo.losses import (
    PolicyLossConfig,
    get_policy_loss,
    high_entropy_threshold,
    loss_setting,
    select_high_entropy,
)
from cegppo.losses.rollout_correction import correction_enabled, rollout_correction
from cegppo.ops import causal_lm_logprobs_and_entropy
from cegppo.trainer.batch import Experience, PiOld, PiOldSource, UpdateBatch
from cegppo.trainer.optim import build_optimizer, trained_parameters
from cegppo.trainer.steering import AdaptiveEntropyCoefficient
from cegppo.trainer.terms import (
    LOSS_TERMS,
    LossTerm,
    MicroBatch,
    MiniBatchCounts,
    PolicyGradientTerm,
    QuadrantObserver,
)

__all__ = [
    "Actor",
    "ActorSettings",
    "Experience",
    "MiniBatchResult",
    "PiOld",
    "UpdateBatch",
    "UpdateResult",
    "update_once",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorSettings:
    """What the update reads from a run's :class:`~cegppo.config.Config`: the ``actor`` section, its loss settings,
    and the few values of other sections that the log-probs and metrics depend on."""

    actor: ActorConfig
    loss: PolicyLossConfig  # the actor's loss settings, validated (Config.policy_loss_config)
    temperature: float  # rollout.temperature: log-probs are the sampler's, at its temperature
    responses_per_prompt: int  # rollout.n: a prompt is shared only by a group of more than one response
    fused_logprobs: bool  # model.fused_logprobs
    logprob_chunk_size: int  # model.logprob_chunk_size
    prob_threshold: float  # analysis.prob_threshold: HP vs LP tokens in the quadrant metrics

    @classmethod
    def from_config(cls, config: Config) -> ActorSettings:
        return cls(
            actor=config.actor,
            loss=config.policy_loss_config(),
            temperature=config.rollout.temperature,
            responses_per_prompt=config.rollout.n,
            fused_logprobs=config.model.fused_logprobs,
            logprob_chunk_size=config.model.logprob_chunk_size,
            prob_threshold=config.analysis.prob_threshold,
        )


@dataclass(frozen=True)
class TokenSelections:
    """The tokens a mini-batch trains on specially, chosen over the whole mini-batch so that they do not depend
    on ``micro_batch_size``: the 80/20 high-entropy tokens (None: every token) and the loss's own (Clip-Cov,
    KL-Cov; None: it selects none)."""

    high_entropy: torch.Tensor | None  # [N, R] float
    loss_tokens: torch.Tensor | None  # [N, R] bool

    def select(self, rows: slice | torch.Tensor) -> TokenSelections:
        return TokenSelections(
            None if self.high_entropy is None else self.high_entropy[rows],
            None if self.loss_tokens is None else self.loss_tokens[rows],
        )


@dataclass(frozen=True)
class MiniBatchResult:
    """One mini-batch's gradient: its metrics and quadrants, whether everything was finite (if not, the gradients
    are incomplete: skip the step), and π_old from its first forward passes when the update takes it there."""

    metrics: dict[str, float]
    quadrants: QuadrantTotals | None
    finite: bool
    measured: PiOld | None = None


@dataclass
class _Tally:
    """Mini-batch metrics summed for their means, quadrants summed, optimiser updates counted."""

    totals: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    quadrants: QuadrantTotals | None = None
    updates: int = 0

    def add(self, result: MiniBatchResult) -> None:
        if result.quadrants is not None:
            self.quadrants = result.quadrants if self.quadrants is None else self.quadrants + result.quadrants
        self.updates += 1
        for key, value in result.metrics.items():
            self.totals[key] += value
            self.counts[key] += 1

    def metrics(self) -> dict[str, float]:
        means = {key: self.totals[key] / self.counts[key] for key in self.totals}
        return means | (self.quadrants.metrics() if self.quadrants is not None else {})


@dataclass(frozen=True)
class UpdateResult:
    """An update's metrics, and the policy's log-probs and entropies at its start (``policy.source``: recomputed
    before it, or from its own first forward passes), which the step's entropy and mismatch metrics read."""

    metrics: dict[str, float]
    policy: PiOld


class Actor:
    """Owns the policy's optimiser and scheduler and performs the clipped policy-gradient update."""

    def __init__(
        self, model: PreTrainedModel, settings: ActorSettings, ref_model: PreTrainedModel | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        self.device = next(model.parameters()).device
        actor = settings.actor
        self.optimizer = build_optimizer(model.parameters(), actor)
        self.scheduler = get_constant_schedule_with_warmup(
            self.optimizer, num_warmup_steps=actor.warmup_steps
        )
        self.entropy_coefficient = AdaptiveEntropyCoefficient(actor)
        # The KL reference: the given frozen model, else the policy as training starts.
        self.ref_model: PreTrainedModel | None = None
        if actor.use_kl_loss:
            self.ref_model = (ref_model or copy.deepcopy(model)).eval().requires_grad_(False)
        self.skipped_updates = 0
        self.share_prompt = actor.share_prompt and settings.responses_per_prompt > 1
        self.quadrants = QuadrantObserver(settings.prob_threshold)
        self.set_loss(actor.policy_loss.loss_mode, settings.loss)

    def set_loss(self, name: str, config: PolicyLossConfig) -> None:
        """Train with the registered policy loss ``name`` and its settings ``config`` from now on (the trainer
        replaces β1/β2 in ``loss_config`` each step: schedules, entropy control), and rebuild the loss terms."""
        self.loss = get_policy_loss(name)
        self.loss.check(config)
        self.loss_config = config
        self.terms: list[LossTerm] = [
            term for make in LOSS_TERMS.values() if (term := make(self)) is not None
        ]
        self.policy_gradient = next(term for term in self.terms if isinstance(term, PolicyGradientTerm))
        self.policy_gradient.observers.append(self.quadrants)
        # Measured over the tokens trained on whenever a term reads it: the adaptive coefficient's input.
        self.measures_entropy = any(term.needs_entropy for term in self.terms)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.settings.actor.bf16_autocast
        )

    def token_log_probs(
        self, model: PreTrainedModel, batch: Experience, *, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of the response tokens at the sampling temperature, [N, R]."""
        with self.autocast():
            return causal_lm_logprobs_and_entropy(
                model,
                batch.input_ids,
                batch.attention_mask,
                batch.response_len,
                temperature=self.settings.temperature,
                fused=self.settings.fused_logprobs,
                chunk_size=self.settings.logprob_chunk_size,
                with_entropy=with_entropy,
                share_prompt=self.share_prompt,
            )

    # -- π_old ----------------------------------------------------------------------------------------

    def pi_old_source(self, num_rows: int, group_size: int) -> PiOldSource:
        """Where the update of ``num_rows`` rows takes π_old from.

        - ``sampler``: the loss takes the sampler's log-probs (``bypass_mode``; verl runs no recomputation pass
          in this mode either). The step's metrics then read each mini-batch's first forward pass, at the weights
          the update reaches it with (π_old's for the first mini-batch, a step or more on after it).
        - ``update``: on-policy, one optimiser step (one epoch, one mini-batch): π_old is the policy itself under a
          stop-gradient (as in verl's actor), so a separate pass would compute nothing new.
        - ``recomputed`` otherwise, and whenever π_old of the whole (mini-)batch is needed before its forward
          pass: rollout correction, Clip-Cov/KL-Cov's or the 80/20 token selection, a loss that reads π_old's
          entropy.
        """
        if self.loss.pi_old_from_sampler:
            return "sampler"
        actor = self.settings.actor
        needs_old_first = (
            self.loss.token_selector is not None
            or correction_enabled(self.loss_config)
            or actor.top_entropy_quantile < 1
            or self.loss.needs_entropy
        )
        one_step = actor.ppo_epochs == 1 and num_rows <= self.mini_batch_rows(group_size)
        return "update" if one_step and not needs_old_first else "recomputed"

    def mini_batch_rows(self, group_size: int) -> int:
        """Responses per optimiser update: ``ppo_mini_batch_responses``, else ``ppo_mini_batch_size`` groups."""
        actor = self.settings.actor
        return actor.ppo_mini_batch_responses or actor.ppo_mini_batch_size * group_size

    def old_policy(self, batch: Experience, group_size: int, *, recompute: bool = False) -> UpdateBatch:
        """The update's inputs: π_old from its source (:meth:`pi_old_source`; None when the update takes it from
        its own forward passes) and the reference's log-probs. ``recompute``: the separate pass even where the
        update could take π_old from its own forward (for a caller that moves the weights before the update);
        a loss whose π_old is the sampler's keeps the sampler's."""
        source = self.pi_old_source(len(batch), group_size)
        if recompute and source == "update":
            source = "recomputed"
        pi_old = None
        if source == "recomputed":
            pi_old = self.recompute_pi_old(batch)
        elif source == "sampler":
            pi_old = PiOld(batch.sampler_log_prob, None, "sampler")
        return UpdateBatch(batch, pi_old, self.reference_log_probs(batch))

    @torch.no_grad()
    def recompute_pi_old(self, batch: Experience) -> PiOld:
        """π_old's log-probs and entropies with the current weights, one pass without gradients.

        The sampler's own log-probs differ numerically from a training forward pass (other kernels,
        KV cache, autocast), so the ratio is taken against this recomputation: on-policy it is exactly 1.
        """
        self.model.eval()
        log_prob, entropy = self._micro_batched_log_probs(self.model, batch, with_entropy=True)
        self.model.train()
        return PiOld(log_prob, entropy, "recomputed")

    @torch.no_grad()
    def reference_log_probs(self, batch: Experience) -> torch.Tensor | None:
        """The KL reference's log-probs of the batch (None without ``actor.use_kl_loss``)."""
        if self.ref_model is None:
            return None
        return self._micro_batched_log_probs(self.ref_model, batch, with_entropy=False)[0]

    def correct_for_sampler(self, batch: UpdateBatch) -> tuple[UpdateBatch, dict[str, float]]:
        """verl's decoupled rollout correction (``algorithm.rollout_correction``) over the whole batch: IS
        weights π_old/π_sampler and the rejection mask, for any loss (``bypass_mode`` corrects inside its loss)."""
        experience = batch.experience
        if (
            self.loss.pi_old_from_sampler
            or not correction_enabled(self.loss_config)
            or experience.sampler_log_prob is None
        ):
            return batch, {}
        correction = rollout_correction(
            batch.pi_old.log_prob, experience.sampler_log_prob, experience.response_mask, self.loss_config
        )
        corrected = dataclasses.replace(experience, response_mask=correction.mask)
        return dataclasses.replace(
            batch, experience=corrected, is_weights=correction.weights
        ), correction.metrics

    # -- the update -----------------------------------------------------------------------------------

    def update(
        self,
        batch: UpdateBatch,
        group_size: int,
        *,
        after_epoch: Callable[[int, dict[str, float]], None] | None = None,
    ) -> UpdateResult:
        """``ppo_epochs`` passes over mini-batches of :meth:`mini_batch_rows` responses; one optimiser step each.

        Without ``batch.pi_old`` the update takes π_old from its own forward passes (:meth:`pi_old_source`).
        ``after_epoch(epoch, metrics)``, if given, is called after each pass (1, 2, ...) with that pass's own
        metrics (the paired probe measures there).
        """
        if batch.pi_old is None and self.pi_old_source(len(batch), group_size) != "update":
            raise ValueError(
                "π_old must be computed before this update (Actor.old_policy): it reads π_old before its forward "
                "passes or takes more than one optimiser step (actor.ppo_epochs > 1 or more than one mini-batch)"
            )
        batch, correction_metrics = self.correct_for_sampler(batch)
        self.model.train()
        tally = _Tally()
        measured: list[PiOld] = []
        mini_rows = self.mini_batch_rows(group_size)
        record = batch.pi_old is None or batch.pi_old.source == "sampler"  # the step's metrics read π_old
        for epoch in range(self.settings.actor.ppo_epochs):
            epoch_tally = _Tally()
            for start in range(0, len(batch), mini_rows):
                mini = batch.select(slice(start, start + mini_rows))
                result = self._update_mini_batch(mini, record=record and epoch == 0)
                if (
                    record and epoch == 0
                ):  # a step stopped by a non-finite value: a pass at the weights it met
                    measured.append(result.measured or self.recompute_pi_old(mini.experience))
                tally.add(result)
                epoch_tally.add(result)
            if after_epoch is not None:
                after_epoch(epoch + 1, epoch_tally.metrics())
        metrics = tally.metrics() | correction_metrics
        if self.settings.actor.use_adaptive_entropy:
            metrics["actor/adaptive_entropy_coeff"] = self.entropy_coefficient.coeff  # for the next step
        metrics["actor/lr"] = self.optimizer.param_groups[0]["lr"]  # the lr of this step's updates
        self.scheduler.step()  # once per RL step, as verl: warm-up counts RL steps
        metrics["actor/num_updates"] = float(tally.updates)
        metrics["actor/skipped_updates"] = float(self.skipped_updates)
        return UpdateResult(metrics, PiOld.concat(measured) if measured else batch.pi_old)

    def _update_mini_batch(self, mini: UpdateBatch, *, record: bool | None = None) -> MiniBatchResult:
        """Accumulate the mini-batch gradient, clip it, and take one optimiser step (skipped if non-finite)."""
        self.optimizer.zero_grad(set_to_none=True)
        result = self.accumulate_gradients(mini, record=record)
        grad_norm = float("nan")
        if result.finite:
            # The optimiser's tensors: with float32 masters the model's own gradients are already released.
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trained_parameters(self.optimizer), self.settings.actor.grad_clip
            ).item()
        else:  # sums over the micro-batches before the non-finite one would skew the step's means
            result = MiniBatchResult({}, None, False)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self.skipped_updates += 1
            log.warning("skipping an update: non-finite loss or gradient norm (%s)", grad_norm)
        # the adaptive entropy coefficient follows every measured update
        if result.finite and "actor/entropy" in result.metrics:
            self.entropy_coefficient.observe_entropy(result.metrics["actor/entropy"])
        self.optimizer.zero_grad(set_to_none=True)
        return dataclasses.replace(result, metrics={**result.metrics, "actor/grad_norm": grad_norm})

    def accumulate_gradients(self, mini: UpdateBatch, *, record: bool | None = None) -> MiniBatchResult:
        """Backward the mini-batch loss, the sum of the terms (:mod:`cegppo.trainer.terms`), one micro-batch at a
        time. Every term is normalised by the *mini-batch's* counts, so the accumulated gradient is the
        mini-batch gradient whatever ``micro_batch_size`` is. ``record``: return π_old from the forward passes
        (default: when ``mini.pi_old`` does not give the policy's own, i.e. is None or the sampler's)."""
        if record is None:
            record = mini.pi_old is None or mini.pi_old.source == "sampler"
        selections, metrics = self._select_tokens(mini)
        if selections is None:
            return MiniBatchResult({}, None, False)
        counts = self._counts(mini, selections)
        totals: dict[str, float] = defaultdict(float)
        entropy_sum, measured = 0.0, []
        self.quadrants.totals = None
        micro_rows = self._micro_rows(mini.experience)
        for rows in micro_rows:
            micro = self._forward(mini.select(rows), counts, selections.select(rows), record)
            if micro is None:
                return MiniBatchResult({}, None, False)
            if record:
                measured.append((micro.log_prob.detach().float(), micro.entropy.detach().float()))
            contributions = [term(micro) for term in self.terms]
            loss = contributions[0][0]
            for term_loss, _ in contributions[1:]:
                loss = loss + term_loss
            if not torch.isfinite(loss):
                return MiniBatchResult({}, None, False)
            loss.backward()
            for _, term_metrics in contributions:
                for key, value in term_metrics.items():
                    totals[key] += value
            if self.measures_entropy:
                entropy_sum += (micro.entropy.detach().float() * micro.trained_mask).sum().item()
        if self.measures_entropy:  # the current policy's mean entropy over the tokens trained on
            metrics["actor/entropy"] = entropy_sum / max(counts.trained_agg["batch_num_tokens"], 1)
        if self.entropy_coefficient.enabled:
            metrics["actor/entropy_coeff"] = self.entropy_coefficient.applied()
        measured_pi_old = None
        if record:
            measured_pi_old = PiOld(
                in_batch_order(micro_rows, [log_prob for log_prob, _ in measured]),
                in_batch_order(micro_rows, [entropy for _, entropy in measured]),
                "update",
            )
        return MiniBatchResult(dict(totals) | metrics, self.quadrants.totals, True, measured_pi_old)

    def _forward(
        self, rows: UpdateBatch, counts: MiniBatchCounts, selections: TokenSelections, record: bool
    ) -> MicroBatch | None:
        """The micro-batch's forward pass with gradients, as the terms read it; None if a log-prob is not finite."""
        with_entropy = record or self.measures_entropy
        log_prob, entropy = self.token_log_probs(self.model, rows.experience, with_entropy=with_entropy)
        if not torch.isfinite(log_prob).all():
            return None
        if rows.pi_old is None:  # on-policy: π_old is this forward pass under a stop-gradient
            pi_old = PiOld(log_prob.detach().float(), entropy.detach().float(), "update")
        else:
            pi_old = rows.pi_old
        high_entropy = selections.high_entropy
        return MicroBatch(
            rows=rows,
            log_prob=log_prob,
            entropy=entropy,
            pi_old=pi_old.log_prob,
            pi_old_entropy=pi_old.entropy,
            trained_mask=rows.experience.response_mask if high_entropy is None else high_entropy,
            high_entropy=high_entropy,
            token_selection=selections.loss_tokens,
            counts=counts,
        )

    def _counts(self, mini: UpdateBatch, selections: TokenSelections) -> MiniBatchCounts:
        mask = mini.experience.response_mask
        loss_config = self._with_counts(mask)
        trained_agg = loss_config.global_batch_info
        if selections.high_entropy is not None:
            trained_agg = self._with_counts(selections.high_entropy).global_batch_info
        positive = int((mask * mini.experience.correct.unsqueeze(1)).sum().item())
        return MiniBatchCounts(loss_config, int(mask.sum().item()), trained_agg, positive)

    def _with_counts(self, mask: torch.Tensor) -> PolicyLossConfig:
        """The loss settings in force, normalising by the tokens and sequences of ``mask``."""
        return self.loss_config.with_batch_info(
            batch_num_tokens=int(mask.sum().item()), global_batch_size=int((mask.sum(-1) > 0).sum().item())
        )

    def _select_tokens(self, mini: UpdateBatch) -> tuple[TokenSelections | None, dict[str, float]]:
        """The 80/20 rule's high-entropy tokens (π_old's entropy over the whole mini-batch sets the threshold) and
        the loss's own tokens, with the selection's metrics; None if the loss's selection met a non-finite value."""
        quantile = self.settings.actor.top_entropy_quantile
        if (quantile < 1 or self.loss.needs_entropy) and (mini.pi_old is None or mini.pi_old.entropy is None):
            raise ValueError("π_old must be recomputed before this update: old_entropy is missing")
        metrics, high_entropy, loss_tokens = {}, None, None
        mask = mini.experience.response_mask
        if quantile < 1:
            threshold = high_entropy_threshold(mini.pi_old.entropy, mask, quantile)
            trained = select_high_entropy(mini.pi_old.entropy, mask, threshold)
            metrics["actor/top_entropy_kept_frac"] = trained.sum().item() / max(mask.sum().item(), 1)
            if threshold is not None:
                metrics["actor/top_entropy_threshold"] = threshold.item()
            high_entropy = trained.float()
        if self.loss.token_selector is not None:
            loss_tokens = self._loss_tokens(mini)
            if loss_tokens is None:
                return None, {}
        return TokenSelections(high_entropy, loss_tokens), metrics

    @torch.no_grad()
    def _loss_tokens(self, mini: UpdateBatch) -> torch.Tensor | None:
        """The loss's special tokens (Clip-Cov, KL-Cov) chosen over the whole mini-batch, not per micro-batch:
        a micro-batch of one sequence has a constant advantage, so its covariance is 0 everywhere. Costs one
        forward pass without gradients; None if a log-prob is not finite."""
        experience = mini.experience
        log_prob = self._micro_batched_log_probs(self.model, experience, with_entropy=False)[0]
        if not torch.isfinite(log_prob).all():
            return None
        return self.loss.token_selector(
            old_log_prob=mini.pi_old.log_prob,
            log_prob=log_prob,
            advantages=experience.advantages.unsqueeze(1).expand_as(log_prob),
            response_mask=experience.response_mask,
            config=self._with_counts(experience.response_mask),
        )

    def _micro_rows(self, batch: Experience) -> list[slice | torch.Tensor]:
        """Each micro-batch's rows: ``micro_batch_size`` rows in order, or, with ``micro_batch_tokens``, rows
        sorted by length and packed while the micro-batch's positions (its rows × their longest prompt plus
        longest response, what a forward pass runs once padding is trimmed) stay within the budget; a row longer
        than the budget goes alone."""
        budget = self.settings.actor.micro_batch_tokens
        if budget is None:
            size = self.settings.actor.micro_batch_size
            return [slice(start, start + size) for start in range(0, len(batch), size)]
        responses = batch.attention_mask[:, -batch.response_len :].sum(-1)
        prompts = batch.attention_mask.sum(-1) - responses
        order = torch.argsort(prompts + responses, stable=True).tolist()
        micro_rows: list[slice | torch.Tensor] = []
        rows: list[int] = []
        prompt = response = 0
        for row in order:
            wider = (max(prompt, int(prompts[row])), max(response, int(responses[row])))
            if rows and (len(rows) + 1) * sum(wider) > budget:
                micro_rows.append(torch.tensor(rows))
                rows, wider = [], (int(prompts[row]), int(responses[row]))
            rows.append(row)
            prompt, response = wider
        micro_rows.append(torch.tensor(rows))
        return micro_rows

    def _micro_batched_log_probs(
        self, model: PreTrainedModel, batch: Experience, *, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`token_log_probs` of the whole batch, a micro-batch at a time, in float32 and the batch's row order."""
        micro_rows = self._micro_rows(batch)
        outputs = [
            self.token_log_probs(model, batch.select(rows), with_entropy=with_entropy) for rows in micro_rows
        ]
        log_prob = in_batch_order(micro_rows, [log_prob.float() for log_prob, _ in outputs])
        if not with_entropy:
            return log_prob, None
        return log_prob, in_batch_order(micro_rows, [entropy.float() for _, entropy in outputs])


def in_batch_order(micro_rows: list[slice | torch.Tensor], parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-micro-batch results, one part per entry of ``micro_rows``, as one tensor in the batch's row order."""
    joined = torch.cat(parts)
    if all(isinstance(rows, slice) for rows in micro_rows):
        return joined
    order = torch.cat([rows for rows in micro_rows])
    return joined[torch.argsort(order).to(joined.device)]


def update_once(
    actor: Actor,
    experience: Experience,
    group_size: int,
    loss: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> UpdateResult:
    """One update of ``experience`` (π_old, then the epochs over its mini-batches) with the registered loss
    ``loss`` (default: the actor's) and ``overrides`` of its settings on top of the actor's
    (:func:`cegppo.losses.loss_setting`); the actor keeps that loss afterwards. A caller comparing losses on the
    same batch gives each its own copy of the model, optimiser and RNG state."""
    name = loss or actor.loss.name
    actor.set_loss(name, loss_setting(name, overrides, base=actor.loss_config))
    return actor.update(actor.old_policy(experience, group_size), group_size)
