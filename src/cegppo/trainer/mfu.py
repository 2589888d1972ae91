"""Each step's phases against the machine's limit: ``perf/mfu/<phase>``, the useful FLOPs (:mod:`cegppo.roofline`)
over the phase's seconds and the peak FLOP/s of the dtype it runs in (measured once per process, or
``trainer.peak_tflops``)."""

from __future__ import annotations

import logging

import torch

from cegppo.config import Config
from cegppo.rollout import RolloutBatch
from cegppo.roofline import (
    TRAINING_FLOPS_PER_FORWARD,
    ModelShape,
    generation_flops,
    measure_peak_flops,
    scoring_flops,
    shared_heads,
)

log = logging.getLogger(__name__)


class StepRoofline:
    """Turns a step's batches and phase timings into ``perf/mfu/<phase>`` and ``perf/tflop/<phase>``."""

    def __init__(self, config: Config, model_config: object, device: torch.device) -> None:
        self.config = config
        self.device = device
        try:
            self.shape: ModelShape | None = ModelShape.from_config(model_config)
        except ValueError as error:
            log.warning("perf/mfu/* is not logged: %s", error)
            self.shape = None
        bf16 = config.actor.bf16_autocast
        self.train_dtype = torch.bfloat16 if bf16 else torch.float32
        if config.rollout.engine == "vllm":
            self.gen_dtype = getattr(torch, config.rollout.vllm.dtype, self.train_dtype)
        else:
            self.gen_dtype = self.train_dtype

    def peak_flops(self, dtype: torch.dtype) -> float:
        if self.config.trainer.peak_tflops is not None:
            return self.config.trainer.peak_tflops * 1e12
        return measure_peak_flops(dtype, str(self.device), torch.get_num_threads())

    def metrics(
        self,
        rollouts: list[RolloutBatch],
        trained: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        timings: dict[str, float],
        old_logprob_passes: int,
    ) -> dict[str, float]:
        """``rollouts``: the step's generation rounds; ``trained``: the trained rows' prompt ids, prompt mask and
        response mask; ``timings``: the trainer's phase seconds; ``old_logprob_passes``: forward passes the
        old-log-prob phase ran over the trained rows (π_old and/or the reference)."""
        if self.shape is None:
            return {}
        config, n = self.config, self.config.rollout.n
        # the hf engine shares prompts with actor.share_prompt (any n); vLLM's prefix cache always
        share_in_engine = config.rollout.engine != "hf" or config.actor.share_prompt
        gen = sum(
            sum(
                generation_flops(
                    self.shape,
                    *_lengths(rollout.prompt_mask, rollout.response_mask),
                    group_size=n,
                    share_prompt=share_in_engine,
                    rows_per_pass=config.rollout.batch_size,
                    shared_heads=shared_heads(
                        rollout.prompt_ids, rollout.prompt_mask, config.rollout.batch_size, held_back=1
                    ),
                )
            )
            for rollout in rollouts
        )
        prompt_ids, prompt_mask, response_mask = trained
        # the actor shares prompts within groups only (actor.share_prompt, n > 1)
        share_in_actor = config.actor.share_prompt and n > 1
        forward = (
            scoring_flops(
                self.shape,
                *_lengths(prompt_mask, response_mask),
                group_size=n,
                share_prompt=share_in_actor,
                rows_per_pass=config.actor.micro_batch_size,
                shared_heads=shared_heads(prompt_ids, prompt_mask, config.actor.micro_batch_size, held_back=0)
                if share_in_actor
                else None,
            )
            if len(prompt_mask)
            else 0
        )
        work = {
            "gen": (gen, self.gen_dtype),
            "old_logprob": (old_logprob_passes * forward, self.train_dtype),
            "update": (config.actor.ppo_epochs * TRAINING_FLOPS_PER_FORWARD * forward, self.train_dtype),
        }
        metrics = {"perf/peak_tflops": self.peak_flops(self.train_dtype) / 1e12}
        for phase, (flops, dtype) in work.items():
            seconds = timings.get(phase, 0.0)
            if flops and seconds > 0:
                metrics[f"perf/tflop/{phase}"] = flops / 1e12
                metrics[f"perf/mfu/{phase}"] = flops / seconds / self.peak_flops(dtype)
        return metrics


def _lengths(prompt_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    return prompt_mask.sum(dim=1).tolist(), response_mask.sum(dim=1).long().tolist()
