"""The policy update: recompute old log-probs, then PPO epochs over mini-batches of micro-batches.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import PreTrainedModel, get_constant_schedule_with_warmup

from cegppo.config import ActorConfig, Config
from cegppo.dynamics import QuadrantTotals, quadrant_totals
from cegppo.losses import (
    PolicyLossConfig,
    agg_loss,
    get_policy_loss_fn,
    get_token_selector,
    high_entropy_threshold,
    kl_penalty,
    policy_loss_needs_entropy,
    select_high_entropy,
)
from cegppo.losses.rollout_correction import correction_enabled, rollout_correction
from cegppo.ops import causal_lm_logprobs_and_entropy
from cegppo.trainer.steering import AdaptiveEntropyCoefficient

log = logging.getLogger(__name__)


@dataclass
class Experience:
    """What the update needs about each sampled response, one row per response.

    ``advantages`` is per response ([N]); ``old_log_prob`` and ``old_entropy`` are filled by
    :meth:`Actor.compute_old_log_probs`, or by :meth:`Actor.update` from its own forward passes
    (on-policy and in ``bypass_mode``: :meth:`Actor.old_from_update`).
    """

    input_ids: torch.Tensor  # [N, P+R], prompt left-padded, response right-padded
    attention_mask: torch.Tensor  # [N, P+R]
    response_mask: torch.Tensor  # [N, R], float
    advantages: torch.Tensor  # [N]
    correct: torch.Tensor  # [N], bool
    sampler_log_prob: torch.Tensor | None = None  # [N, R], from the rollout engine
    old_log_prob: torch.Tensor | None = None  # [N, R]
    old_entropy: torch.Tensor | None = None  # [N, R], π_old's entropy at each response position
    ref_log_prob: torch.Tensor | None = None  # [N, R]
    rollout_is_weights: torch.Tensor | None = None  # [N, R], set by Actor.correct_for_sampler
    token_selection: torch.Tensor | None = None  # [N, R] bool, Clip-Cov/KL-Cov's tokens of the mini-batch

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> Experience:
        return self._map(lambda tensor: tensor[rows])

    def to(self, device: torch.device) -> Experience:
        return self._map(lambda tensor: tensor.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Experience:
        return Experience(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )


@dataclass(frozen=True)
class ActorSettings:
    """What the update reads from a run's :class:`~cegppo.config.Config`: the ``actor`` section, its loss settings,
    and the few values of other sections that the log-probs and metrics depend on."""

    actor: ActorConfig
    loss: PolicyLossConfig  # the actor's loss settings, validated (Config.policy_loss_config)
    temperature: float  # rollout.temperature: log-probs are the sampler's, at its temperature
    responses_per_prompt: int  # rollout.n: a prompt is shared only by a group of more than one response
    tis_cap: float | None  # rollout.tis_cap
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
            tis_cap=config.rollout.tis_cap,
            fused_logprobs=config.model.fused_logprobs,
            logprob_chunk_size=config.model.logprob_chunk_size,
            prob_threshold=config.analysis.prob_threshold,
        )


class Actor:
    """Owns the policy's optimiser and scheduler and performs the clipped policy-gradient update."""

    def __init__(
        self, model: PreTrainedModel, settings: ActorSettings, ref_model: PreTrainedModel | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        self.device = next(model.parameters()).device
        actor = settings.actor
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=actor.lr,
            betas=tuple(actor.adam_betas),
            weight_decay=actor.weight_decay,
        )
        self.scheduler = get_constant_schedule_with_warmup(
            self.optimizer, num_warmup_steps=actor.warmup_steps
        )
        self.loss_fn = get_policy_loss_fn(actor.policy_loss)
        self.token_selector = get_token_selector(actor.policy_loss)
        self.loss_needs_entropy = policy_loss_needs_entropy(actor.policy_loss)
        self.entropy_coefficient = AdaptiveEntropyCoefficient(actor)
        # The loss settings in force; the trainer replaces β1/β2 here each step (schedules, entropy control).
        self.loss_config = settings.loss
        # bypass_mode: the sampler's log-probs are π_old (verl's two-policy mode).
        self.bypass = actor.policy_loss == "bypass_mode"
        # The KL reference: the given frozen model, else the policy as training starts.
        self.ref_model: PreTrainedModel | None = None
        if actor.use_kl_loss:
            self.ref_model = (ref_model or copy.deepcopy(model)).eval().requires_grad_(False)
        self.skipped_updates = 0
        self.share_prompt = actor.share_prompt and settings.responses_per_prompt > 1

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

    def old_from_update(self, num_rows: int, group_size: int) -> bool:
        """Whether the update of ``num_rows`` rows takes π_old's log-probs and entropies from its own forward
        passes, so that :meth:`compute_old_log_probs` has only the reference's to compute.

        - On-policy, one optimiser step (one epoch, one mini-batch): π_old is the policy itself under a
          stop-gradient (as in verl's actor), so the separate pass would compute nothing new.
        - ``bypass_mode``, any number of steps: its π_old is the sampler's (verl runs no recomputation pass in
          this mode either). ``old_log_prob``/``old_entropy`` then feed only metrics (the quadrants take the
          sampler's, as the loss does): each mini-batch's come from its first forward pass, at the weights the
          update reaches it with, which are π_old's for the first mini-batch and a step or more on after it.

        Not with rollout correction outside ``bypass_mode``, Clip-Cov/KL-Cov's token selection, the
        high-entropy token selection or a loss that reads π_old's entropy: they need π_old of the whole
        (mini-)batch before its forward pass.
        """
        actor = self.settings.actor
        needs_old_first = (
            self.token_selector is not None
            or (not self.bypass and correction_enabled(self.loss_config))
            or actor.top_entropy_quantile < 1
            or self.loss_needs_entropy
        )
        one_step = actor.ppo_epochs == 1 and num_rows <= self.mini_batch_rows(group_size)
        return not needs_old_first and (self.bypass or one_step)

    def mini_batch_rows(self, group_size: int) -> int:
        """Responses per optimiser update: ``ppo_mini_batch_responses``, else ``ppo_mini_batch_size`` groups."""
        actor = self.settings.actor
        return actor.ppo_mini_batch_responses or actor.ppo_mini_batch_size * group_size

    @torch.no_grad()
    def compute_old_log_probs(
        self, batch: Experience, *, reference_only: bool = False
    ) -> torch.Tensor | None:
        """Fill ``batch.old_log_prob``, ``old_entropy`` (and ``ref_log_prob``) with the current weights; return
        the entropy.

        The sampler's own log-probs differ numerically from a training forward pass (other kernels,
        KV cache, autocast), so the ratio is taken against this recomputation: on-policy it is exactly 1.
        ``reference_only``: only the reference log-probs; :meth:`update` takes π_old from its own forward
        passes (:meth:`old_from_update`).
        """
        if reference_only and self.ref_model is None:
            return
        self.model.eval()
        log_probs, entropies, ref_log_probs = [], [], []
        for micro in self._micro_batches(batch):
            if not reference_only:
                log_prob, entropy = self.token_log_probs(self.model, micro, with_entropy=True)
                log_probs.append(log_prob.float())
                entropies.append(entropy.float())
            if self.ref_model is not None:
                ref_log_probs.append(
                    self.token_log_probs(self.ref_model, micro, with_entropy=False)[0].float()
                )
        self.model.train()
        if not reference_only:
            batch.old_log_prob, batch.old_entropy = torch.cat(log_probs), torch.cat(entropies)
        if self.ref_model is not None:
            batch.ref_log_prob = torch.cat(ref_log_probs)
        return batch.old_entropy

    def rollout_is_weights(self, batch: Experience) -> torch.Tensor | None:
        """Truncated importance weights min(π_old/π_sampler, cap) per token, or None when not configured."""
        if batch.rollout_is_weights is not None:
            return batch.rollout_is_weights
        cap = self.settings.tis_cap
        if cap is None or batch.sampler_log_prob is None or batch.old_log_prob is None:
            return None
        log_ratio = (batch.old_log_prob - batch.sampler_log_prob).clamp(max=math.log(cap))
        return log_ratio.exp() * batch.response_mask

    def correct_for_sampler(self, batch: Experience) -> tuple[Experience, dict[str, float]]:
        """verl's decoupled rollout correction (``actor.rollout_is``/``rollout_rs``) over the whole batch: IS
        weights π_old/π_sampler and the rejection mask, for any loss (``bypass_mode`` corrects inside its loss)."""
        if self.bypass or not correction_enabled(self.loss_config) or batch.sampler_log_prob is None:
            return batch, {}
        correction = rollout_correction(
            batch.old_log_prob, batch.sampler_log_prob, batch.response_mask, self.loss_config
        )
        return dataclasses.replace(
            batch, response_mask=correction.mask, rollout_is_weights=correction.weights
        ), correction.metrics

    def update(self, batch: Experience, group_size: int) -> dict[str, float]:
        """``ppo_epochs`` passes over mini-batches of :meth:`mini_batch_rows` responses; one optimiser step each.

        Without ``batch.old_log_prob`` the update must take π_old from its own forward passes
        (:meth:`old_from_update`); it then fills ``old_log_prob`` and ``old_entropy`` from each mini-batch's
        first forward pass.
        """
        if batch.old_log_prob is None and not self.old_from_update(len(batch), group_size):
            raise ValueError(
                "compute_old_log_probs must run before this update: it reads π_old before its forward passes "
                "or takes more than one optimiser step (actor.ppo_epochs > 1 or more than one mini-batch)"
            )
        batch, correction_metrics = self.correct_for_sampler(batch)
        actor = self.settings.actor
        self.model.train()
        totals: dict[str, float] = defaultdict(float)
        weights: dict[str, float] = defaultdict(float)
        quadrants: QuadrantTotals | None = None
        mini_rows = self.mini_batch_rows(group_size)
        updates = 0
        for _ in range(actor.ppo_epochs):
            minis = []
            for start in range(0, len(batch), mini_rows):
                mini = batch.select(slice(start, start + mini_rows))
                metrics, mini_quadrants = self._update_mini_batch(mini)
                if mini.old_log_prob is None:  # a non-finite value stopped the step: the weights it met
                    self.compute_old_log_probs(mini)
                minis.append(mini)
                if mini_quadrants is not None:
                    quadrants = mini_quadrants if quadrants is None else quadrants + mini_quadrants
                updates += 1
                for key, value in metrics.items():
                    totals[key] += value
                    weights[key] += 1
            if batch.old_log_prob is None:  # from the first epoch's forward passes (old_from_update)
                batch.old_log_prob = torch.cat([mini.old_log_prob for mini in minis])
                batch.old_entropy = torch.cat([mini.old_entropy for mini in minis])
        result = {key: totals[key] / weights[key] for key in totals} | correction_metrics
        if quadrants is not None:
            result.update(quadrants.metrics())
        if self.settings.actor.use_adaptive_entropy:
            result["actor/adaptive_entropy_coeff"] = self.entropy_coefficient.coeff  # for the next step
        result["actor/lr"] = self.scheduler.get_last_lr()[0]
        result["actor/num_updates"] = float(updates)
        result["actor/skipped_updates"] = float(self.skipped_updates)
        return result

    def _update_mini_batch(self, mini: Experience) -> tuple[dict[str, float], QuadrantTotals | None]:
        """Accumulate the mini-batch gradient, clip it, and take one optimiser step (skipped if non-finite)."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics, quadrants, finite = self.accumulate_gradients(mini)
        grad_norm = float("nan")
        if finite:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.settings.actor.grad_clip
            ).item()
        else:  # sums over the micro-batches before the non-finite one would skew the step's means
            metrics, quadrants = {}, None
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.skipped_updates += 1
            log.warning("skipping an update: non-finite loss or gradient norm (%s)", grad_norm)
        if finite and "actor/entropy" in metrics:  # the adaptive coefficient follows every measured update
            self.entropy_coefficient.observe_entropy(metrics["actor/entropy"])
        self.optimizer.zero_grad(set_to_none=True)
        metrics["actor/grad_norm"] = grad_norm
        return metrics, quadrants

    def accumulate_gradients(self, mini: Experience) -> tuple[dict[str, float], QuadrantTotals | None, bool]:
        """Backward the mini-batch loss one micro-batch at a time.

        Every micro-batch loss is normalised by the *mini-batch's* token and sequence counts, so the
        accumulated gradient is the mini-batch gradient whatever ``micro_batch_size`` is. Returns the
        metrics, the token-quadrant totals, and whether everything was finite (if not, the gradients are
        incomplete: skip the step). Without ``mini.old_log_prob`` (:meth:`old_from_update`), π_old is each
        micro-batch's log-prob under a stop-gradient, and ``mini.old_log_prob``/``old_entropy`` are filled once
        complete.
        """
        actor = self.settings.actor
        num_tokens = int(mini.response_mask.sum().item())
        num_seqs = int((mini.response_mask.sum(-1) > 0).sum().item())
        loss_config = self.loss_config.with_batch_info(
            batch_num_tokens=num_tokens, global_batch_size=num_seqs
        )
        agg = loss_config.global_batch_info
        num_positive_tokens = int((mini.response_mask * mini.correct.unsqueeze(1)).sum().item())
        bonus = self.entropy_coefficient
        entropy_coeff = bonus.applied()
        want_entropy = bonus.enabled or self.loss_needs_entropy
        select = actor.top_entropy_quantile < 1
        if (select or self.loss_needs_entropy) and mini.old_entropy is None:
            raise ValueError("compute_old_log_probs must run before update: old_entropy is missing")
        threshold, trained_agg, selection_metrics = self._high_entropy_selection(mini, loss_config)
        entropy_sum = 0.0
        fill_old = mini.old_log_prob is None
        if self.token_selector is not None:
            mini = self._select_tokens(mini, loss_config)
            if mini.token_selection is None:
                return {}, None, False

        metrics: dict[str, float] = defaultdict(float)
        quadrants: QuadrantTotals | None = None
        micros = []
        for micro in self._micro_batches(mini):
            share = micro.response_mask.sum().item() / max(num_tokens, 1)
            log_prob, entropy = self.token_log_probs(self.model, micro, with_entropy=want_entropy or fill_old)
            if not torch.isfinite(log_prob).all():
                return dict(metrics), quadrants, False
            if fill_old:
                micro.old_log_prob, micro.old_entropy = log_prob.detach().float(), entropy.detach().float()
                micros.append(micro)
            # The π_old the loss's ratio is taken against, and so the quadrants' clip boundaries.
            pi_old = micro.sampler_log_prob if self.bypass else micro.old_log_prob
            trained_mask, weights = micro.response_mask, self.rollout_is_weights(micro)
            if select:
                trained_mask = select_high_entropy(micro.old_entropy, micro.response_mask, threshold).float()
                # TRL multiplies the per-token loss by the selection and normalises as without it: a token weight.
                # The entropy bonus below acts on the same tokens, as in TRL.
                weights = trained_mask if weights is None else weights * trained_mask
            entropy_inputs = (
                {"entropy": entropy, "old_entropy": micro.old_entropy} if self.loss_needs_entropy else {}
            )
            pg_loss, pg_metrics = self.loss_fn(
                old_log_prob=pi_old,
                log_prob=log_prob,
                advantages=micro.advantages.unsqueeze(1).expand_as(log_prob),
                response_mask=micro.response_mask,
                loss_agg_mode=actor.loss_agg_mode,
                config=dataclasses.replace(loss_config, token_selection=micro.token_selection),
                rollout_is_weights=weights,
                **entropy_inputs,
            )
            # ∂pg_loss/∂log π per token is the loss's own gradient weight (−F·A/N): it places each token's
            # share of the update in the entropy quadrants, through the loss ops only, not the model.
            (loss_grad,) = torch.autograd.grad(pg_loss, log_prob, retain_graph=True)
            micro_quadrants = quadrant_totals(
                pi_old,
                log_prob,
                loss_grad,
                micro.advantages.unsqueeze(1).expand_as(log_prob),
                micro.response_mask,
                prob_threshold=self.settings.prob_threshold,
                clip_ratio_low=loss_config.clip_ratio_low,
                clip_ratio_high=loss_config.clip_ratio_high,
            )
            quadrants = micro_quadrants if quadrants is None else quadrants + micro_quadrants
            loss = pg_loss
            metrics["actor/pg_loss"] += pg_loss.item()
            if want_entropy:
                entropy_sum += (entropy.detach().float() * trained_mask).sum().item()
            if bonus.enabled:
                entropy_term = agg_loss(entropy, trained_mask, actor.loss_agg_mode, **trained_agg)
                loss = loss - entropy_coeff * entropy_term
                metrics["actor/entropy_loss"] += entropy_term.item()
            if micro.ref_log_prob is not None:
                kl = kl_penalty(log_prob.float(), micro.ref_log_prob, actor.kl_loss_type)
                kl_term = agg_loss(kl, micro.response_mask, actor.loss_agg_mode, **agg)
                loss = loss + actor.kl_loss_coef * kl_term
                metrics["actor/kl_loss"] += kl_term.item()
            if actor.positive_loss_coeff > 0:
                positive_mask = micro.response_mask * micro.correct.unsqueeze(1)
                nll = agg_loss(
                    -log_prob.float(), positive_mask, "token-mean", batch_num_tokens=num_positive_tokens
                )
                loss = loss + actor.positive_loss_coeff * nll
                metrics["actor/positive_nll"] += nll.item()
            if not torch.isfinite(loss):
                return dict(metrics), quadrants, False
            loss.backward()
            for key, value in pg_metrics.items():
                metrics[key] += value * share
        if (
            want_entropy
        ):  # the current policy's mean entropy over the tokens trained on (the controller's input)
            metrics["actor/entropy"] = entropy_sum / max(trained_agg["batch_num_tokens"], 1)
        if bonus.enabled:
            metrics["actor/entropy_coeff"] = entropy_coeff
        metrics.update(selection_metrics)
        if fill_old:
            mini.old_log_prob = torch.cat([micro.old_log_prob for micro in micros])
            mini.old_entropy = torch.cat([micro.old_entropy for micro in micros])
        return dict(metrics), quadrants, True

    @torch.no_grad()
    def _select_tokens(self, mini: Experience, loss_config: PolicyLossConfig) -> Experience:
        """The loss's special tokens (Clip-Cov, KL-Cov) chosen over the whole mini-batch, not per micro-batch:
        a micro-batch of one sequence has a constant advantage, so its covariance is 0 everywhere. Costs one
        forward pass without gradients; ``token_selection`` stays None if a log-prob is not finite."""
        assert self.token_selector is not None
        log_prob = torch.cat(
            [
                self.token_log_probs(self.model, micro, with_entropy=False)[0].float()
                for micro in self._micro_batches(mini)
            ]
        )
        if not torch.isfinite(log_prob).all():
            return mini
        selection = self.token_selector(
            old_log_prob=mini.old_log_prob,
            log_prob=log_prob,
            advantages=mini.advantages.unsqueeze(1).expand_as(log_prob),
            response_mask=mini.response_mask,
            config=loss_config,
        )
        return dataclasses.replace(mini, token_selection=selection)

    def _high_entropy_selection(
        self, mini: Experience, loss_config: PolicyLossConfig
    ) -> tuple[torch.Tensor | None, dict[str, Any], dict[str, float]]:
        """The 80/20 rule's entropy threshold, the aggregation counts of the tokens trained on, and its metrics.

        π_old's entropy over the whole mini-batch sets the threshold, so which tokens are trained does not depend
        on ``micro_batch_size``. Without the selection every token is trained on.
        """
        quantile = self.settings.actor.top_entropy_quantile
        if quantile >= 1:
            return None, loss_config.global_batch_info, {}
        threshold = high_entropy_threshold(mini.old_entropy, mini.response_mask, quantile)
        trained = select_high_entropy(mini.old_entropy, mini.response_mask, threshold)
        counts = loss_config.with_batch_info(
            batch_num_tokens=int(trained.sum().item()),
            global_batch_size=int((trained.sum(-1) > 0).sum().item()),
        ).global_batch_info
        metrics = {
            "actor/top_entropy_kept_frac": trained.sum().item() / max(mini.response_mask.sum().item(), 1)
        }
        if threshold is not None:
            metrics["actor/top_entropy_threshold"] = threshold.item()
        return threshold, counts, metrics

    def _micro_batches(self, batch: Experience) -> Iterator[Experience]:
        size = self.settings.actor.micro_batch_size
        for start in range(0, len(batch), size):
            yield batch.select(slice(start, start + size))
