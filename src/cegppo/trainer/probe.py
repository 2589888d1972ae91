"""The paired probe: what each loss setting's update does to the policy, from one state and one batch.

Whole-run comparisons drown a per-update effect in seed noise. The probe removes that noise by pairing: at a
probe step the trainer has sampled, scored and taken advantages; before its own update, the probe applies the
update of each *variant* (a loss setting, ``ce_gppo(beta1=0,beta2=1)``) to a copy of that batch, every time
from the same weights, optimiser, scheduler and RNG state, and measures what it did. The run's own update is
probed too (variant ``trajectory``). Then the weights and RNG are restored and the run takes its own update as
if no probe had happened: a probed run's metrics and weights equal the unprobed run's, bit for bit on CPU.

Each variant runs in an :class:`~cegppo.trainer.actor.Actor` of its own, with a deep copy of the run's
optimiser and scheduler state, so the run's actor is never touched; only the shared weights are restored.

Measured after each pass over the batch (``analysis.probe_epochs``, one row each):

- on a fixed *probe set* (``probe_prompts`` prompts drawn once from the held-out pool, never trained on, with
  ``probe_samples`` responses sampled afresh at each probe step from the pre-update policy with the probe's own
  seed; the same set for every variant), teacher-forced at the sampling temperature: the mean token entropy
  before and after, ``delta_log_entropy`` = log H_after − log H_before, and ``kl_from_before``, the mean per
  token of the k3 estimator r − 1 − log r with r = π_after/π_before on tokens sampled from π_before (an unbiased,
  non-negative estimate of KL(π_before ‖ π_after) per position);
- on the batch itself: the mean change in log-prob of the tokens of positive- and negative-advantage
  responses (``dlogp_pos``, ``dlogp_neg``) against π_old;
- the update's own metrics (``actor/*``, ``quadrant/*``) and the clipped token counts per quadrant as
  ``clipped/<quadrant>``: β acts on a handful of tokens per update, and the count says how many.

Memory: a copy of the weights and, while a variant runs, a copy of the optimiser state (for AdamW twice the
weights): about 1.6 GB on top of the run at SmolLM2-135M in float32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from cegppo.config import PROBE_TRAJECTORY as TRAJECTORY
from cegppo.config import Config, variant_config
from cegppo.data import PromptExample
from cegppo.losses import kl_penalty, masked_mean
from cegppo.rollout import RolloutEngine, SamplingParams
from cegppo.runfiles import QUADRANTS
from cegppo.trainer.actor import Actor, ActorSettings
from cegppo.trainer.batch import Experience, PiOld, UpdateBatch


@dataclasses.dataclass(frozen=True)
class ProbeVariant:
    name: str  # as the user spelled it
    settings: ActorSettings | None  # None: the run's own (``trajectory``)


class Probe:
    """Runs the paired probe at ``analysis.probe_every`` steps (or on demand, for ``cegppo probe``)."""

    def __init__(
        self,
        config: Config,
        engine: RolloutEngine,
        pool: Sequence[PromptExample],
        render: Callable[[PromptExample], str],
    ) -> None:
        """``pool``: prompts never trained on (the held-out set), of which ``probe_prompts`` are drawn once."""
        analysis = config.analysis
        if len(pool) < analysis.probe_prompts:
            raise ValueError(
                f"analysis.probe_prompts={analysis.probe_prompts} is more than the {len(pool)} held-out "
                "prompts the probe set is drawn from: lower it or enlarge data.heldout"
            )
        self.config = config
        self.engine = engine
        drawn = random.Random(f"cegppo-probe:{config.trainer.seed}").sample(
            range(len(pool)), analysis.probe_prompts
        )
        self.prompts = [render(pool[index]) for index in sorted(drawn)]
        self.variants = [ProbeVariant(TRAJECTORY, None)] + [
            ProbeVariant(spec, ActorSettings.from_config(variant_config(config, spec)))
            for spec in dict.fromkeys(analysis.probe_variants)
            if spec != TRAJECTORY
        ]

    def due(self, step: int) -> bool:
        every = self.config.analysis.probe_every
        return every > 0 and step % every == 0

    def run(
        self, step: int, seed: int, batch: UpdateBatch, actor: Actor, group_size: int
    ) -> list[dict[str, Any]]:
        """Every variant's update of ``batch`` from ``actor``'s state, measured; that state is restored after.

        ``actor`` is only read (each variant has an actor of its own), and the weights, the train/eval mode and
        every RNG are as before the call.
        """
        model = actor.model
        with _rng_preserved(actor.device), _weights_restored(model):
            probe_set = self._probe_set(step, seed, actor.device)
            before = actor.recompute_pi_old(probe_set)
            # π_old of the batch at these weights, once for every variant that recomputes it (the run's own
            # update may have been about to take it from its first forward pass).
            pi_old = batch.pi_old
            if pi_old is None or pi_old.source != "recomputed":
                pi_old = actor.recompute_pi_old(batch.experience)
            rows = []
            for variant in self.variants:
                with _weights_restored(model):
                    rows += self._probe_variant(variant, actor, batch, pi_old, group_size, probe_set, before)
        for row in rows:
            row.update(step=step, seed=seed)
        return rows

    def _probe_variant(
        self,
        variant: ProbeVariant,
        run_actor: Actor,
        batch: UpdateBatch,
        pi_old: PiOld,
        group_size: int,
        probe_set: Experience,
        before: PiOld,
    ) -> list[dict[str, Any]]:
        actor = _actor_like(
            run_actor, variant.settings or run_actor.settings, self.config.analysis.probe_epochs
        )
        if variant.settings is None:  # β as the run's schedule or controller set them for this step
            actor.set_loss(run_actor.loss.name, run_actor.loss_config)
        experience = batch.experience
        if actor.pi_old_source(len(experience), group_size) == "sampler":
            batch = dataclasses.replace(batch, pi_old=PiOld(experience.sampler_log_prob, None, "sampler"))
        else:
            batch = dataclasses.replace(batch, pi_old=pi_old)
        rows: list[dict[str, Any]] = []

        def measure(epoch: int, metrics: dict[str, float]) -> None:
            after = actor.recompute_pi_old(probe_set)
            rows.append(
                {
                    "variant": variant.name,
                    "epoch": epoch,
                    **_probe_set_change(before, after, probe_set.response_mask),
                    **_batch_change(actor.recompute_pi_old(experience), pi_old, experience),
                    **{f"clipped/{q}": metrics.get(f"quadrant/{q}/clipped", 0.0) for q in QUADRANTS},
                    **{k: v for k, v in metrics.items() if k.startswith(("actor/", "quadrant/"))},
                }
            )

        actor.update(batch, group_size, after_epoch=measure)
        return rows

    def _probe_set(self, step: int, seed: int, device: torch.device) -> Experience:
        """The probe set's responses for this step, sampled from the current policy with the probe's seed."""
        rollout = self.config.rollout
        probe_seed = int(np.random.SeedSequence([seed, step, 0x9B0BE]).generate_state(1)[0])
        sampled = self.engine.generate(
            self.prompts,
            SamplingParams(
                n=self.config.analysis.probe_samples,
                temperature=rollout.temperature,
                top_p=rollout.top_p,
                top_k=rollout.top_k,
                max_new_tokens=rollout.max_new_tokens,
                seed=probe_seed,
            ),
        )
        rows = sampled.input_ids.shape[0]
        return Experience(
            input_ids=sampled.input_ids,
            attention_mask=sampled.attention_mask,
            response_mask=sampled.response_mask.float(),
            advantages=torch.zeros(rows),
            correct=torch.zeros(rows, dtype=torch.bool),
        ).to(device)


def _actor_like(run_actor: Actor, settings: ActorSettings, epochs: int | None) -> Actor:
    """An actor with ``settings`` (and ``epochs`` passes, if given) that starts from a deep copy of the run
    actor's optimiser, scheduler and entropy-coefficient state, so the run's own state is never touched."""
    if epochs is not None:
        settings = dataclasses.replace(settings, actor=dataclasses.replace(settings.actor, ppo_epochs=epochs))
    actor = Actor(run_actor.model, settings, ref_model=run_actor.ref_model)
    # load_state_dict keeps tensors of the right dtype and device as they are: without the deep copy the
    # variant's AdamW would update the run's moments in place.
    actor.optimizer.load_state_dict(copy.deepcopy(run_actor.optimizer.state_dict()))
    actor.scheduler.load_state_dict(run_actor.scheduler.state_dict())
    actor.entropy_coefficient.load_state_dict(run_actor.entropy_coefficient.state_dict())
    return actor


def _probe_set_change(before: PiOld, after: PiOld, mask: torch.Tensor) -> dict[str, float]:
    entropy_before = masked_mean(before.entropy, mask).item()
    entropy_after = masked_mean(after.entropy, mask).item()
    return {
        "entropy_before": entropy_before,
        "entropy_after": entropy_after,
        "delta_log_entropy": math.log(entropy_after / entropy_before) if entropy_before > 0 else math.nan,
        # kl_penalty(logp, ref_logp, "low_var_kl") is k3 of KL(π ‖ ref) on tokens drawn from π: here π is π_before.
        # In float64: k3 ≈ d²/2 for a log-ratio d, below float32's rounding of e^d once |d| < ~3e-4 (it came out
        # negative for a small update).
        "kl_from_before": masked_mean(
            kl_penalty(before.log_prob.double(), after.log_prob.double(), "low_var_kl"), mask
        ).item(),
    }


def _batch_change(now: PiOld, pi_old: PiOld, experience: Experience) -> dict[str, float]:
    """Mean change in log-prob of the batch's positive- and negative-advantage responses' tokens since π_old."""
    change = now.log_prob - pi_old.log_prob
    sign = experience.advantages.sign().unsqueeze(1)
    changes = {}
    for name, value in (("pos", 1), ("neg", -1)):
        mask = experience.response_mask * (sign == value)
        changes[f"dlogp_{name}"] = masked_mean(change, mask).item() if bool((mask > 0).any()) else math.nan
    return changes


@contextlib.contextmanager
def _weights_restored(model: torch.nn.Module) -> Iterator[None]:
    """Put the parameters, buffers and train/eval mode back as they were, bit for bit, and drop gradients."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    saved = [tensor.detach().clone() for tensor in tensors]
    training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
        model.zero_grad(set_to_none=True)
        model.train(training)


@contextlib.contextmanager
def _rng_preserved(device: torch.device) -> Iterator[None]:
    """torch's (and the device's), Python's and NumPy's generators as they were before the block."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)
