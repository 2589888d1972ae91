"""DAPO's dynamic sampling: keep the prompt groups whose rewards differ, sample more until the batch is full.

A group whose n responses all score the same has zero advantage everywhere: it costs a forward and backward
pass and teaches nothing. DAPO (Yu et al. 2025, arXiv 2503.14476, §3.2) drops such groups and keeps sampling
new prompts until ``train_batch_size`` groups have signal; verl caps the generation rounds with
``max_num_gen_batches``. Each round samples ``data.gen_batch_size`` prompts (the CE-GPPO release: 256 for a
training batch of 128, one round). When the cap is reached first, the step trains on the groups it has, cut to a
whole number of mini-batches (as verl; the trainer does the cut).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from cegppo.data import PromptExample
from cegppo.rewards import RewardResult
from cegppo.rollout import RolloutBatch
from cegppo.trainer.batch import Experience


@dataclass
class GenerationRound:
    """One generation batch, sampled, scored and with advantages; ``keep`` marks its groups with signal."""

    examples: list[PromptExample]
    rollout: RolloutBatch
    scored: RewardResult
    rewards: torch.Tensor  # [B*n], after reward shaping
    advantages: torch.Tensor  # [B*n]
    keep: torch.Tensor  # [B], bool

    def experience(self) -> Experience:
        """The kept groups' rows."""
        rows = self.keep.repeat_interleave(self.rollout.n)
        return Experience(
            input_ids=self.rollout.input_ids,
            attention_mask=self.rollout.attention_mask,
            response_mask=self.rollout.response_mask.float(),
            advantages=self.advantages,
            correct=torch.tensor(self.scored.correct, dtype=torch.bool),
            sampler_log_prob=self.rollout.sampler_logprobs,
        ).select(rows)


def needs_another_round(rounds: list[GenerationRound], target_groups: int, max_rounds: int) -> bool:
    """Whether to sample again: fewer than ``target_groups`` kept so far and fewer than ``max_rounds``
    rounds done (0: no cap)."""
    if not rounds:
        return True
    kept = sum(int(r.keep.sum()) for r in rounds)
    return kept < target_groups and (max_rounds == 0 or len(rounds) < max_rounds)


class NoRewardSignal(RuntimeError):
    """Dynamic sampling without a round cap found no group with reward signal in ``NO_SIGNAL_ROUNDS`` rounds."""


# With algorithm.max_num_gen_batches=0 (no cap), this many rounds in a row without a single group with signal end
# the run: every response to 20 batches of prompts scoring the same is a broken reward or an impossible task.
NO_SIGNAL_ROUNDS = 20


def check_signal(rounds: list[GenerationRound]) -> None:
    """Raise :class:`NoRewardSignal` when the last ``NO_SIGNAL_ROUNDS`` rounds kept no group."""
    recent = rounds[-NO_SIGNAL_ROUNDS:]
    if len(recent) == NO_SIGNAL_ROUNDS and not any(r.keep.any() for r in recent):
        prompts = sum(len(r.examples) for r in recent)
        raise NoRewardSignal(
            f"dynamic sampling found no group with reward signal in {NO_SIGNAL_ROUNDS} generation rounds in a row: "
            f"all {recent[0].rollout.n} responses to each of {prompts} prompts got the same reward (mean "
            f"{torch.cat([r.rewards for r in recent]).mean().item():.3f}). Check the reward on the run's "
            "samples.jsonl, or give easier prompts (algorithm.max_num_gen_batches caps the rounds per step)"
        )


def training_batch(rounds: list[GenerationRound], target_groups: int, pad_token_id: int) -> Experience:
    """The kept groups of every round in order, the first ``target_groups`` of them, as one batch."""
    batch = concat_experiences([r.experience() for r in rounds], pad_token_id)
    return batch.select(slice(0, target_groups * rounds[0].rollout.n))


def concat_experiences(parts: list[Experience], pad_token_id: int) -> Experience:
    """Stack batches whose prompt and response widths differ: prompts are left-padded and responses
    right-padded to the widest (padding masked out), per-row fields are concatenated."""
    response_len = max(part.response_len for part in parts)
    prompt_len = max(part.input_ids.shape[1] - part.response_len for part in parts)

    def widen(part: Experience, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 1:
            return tensor
        pad_value = pad_token_id if tensor is part.input_ids else 0
        extra_response = response_len - part.response_len
        if tensor.shape[1] == part.response_len:
            return F.pad(tensor, (0, extra_response), value=pad_value)
        prompt, response = tensor.split([tensor.shape[1] - part.response_len, part.response_len], dim=1)
        return torch.cat(
            [
                F.pad(prompt, (prompt_len - prompt.shape[1], 0), value=pad_value),
                F.pad(response, (0, extra_response), value=pad_value),
            ],
            dim=1,
        )

    values = {}
    for f in fields(Experience):
        tensors = [getattr(part, f.name) for part in parts]
        if any(tensor is None for tensor in tensors):
            values[f.name] = None
            continue
        values[f.name] = torch.cat([widen(part, t) for part, t in zip(parts, tensors, strict=True)])
    return Experience(**values)
