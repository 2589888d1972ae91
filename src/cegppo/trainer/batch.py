"""What an update reads, as values: the sampled experience, π_old and the update's inputs per row."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, TypeVar

import torch

# Where π_old's log-probs come from: a separate pass with the weights the update starts from, the update's own
# first forward pass (on-policy, one optimiser step), or the rollout engine (bypass_mode).
PiOldSource = Literal["recomputed", "update", "sampler"]


T = TypeVar("T")


def _map_tensors(value: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> T:
    """A copy of the dataclass ``value`` with ``fn`` applied to each tensor field (None stays None)."""
    changes = {}
    for f in fields(value):
        item = getattr(value, f.name)
        if isinstance(item, torch.Tensor):
            changes[f.name] = fn(item)
        elif dataclasses.is_dataclass(item):
            changes[f.name] = _map_tensors(item, fn)
    return dataclasses.replace(value, **changes)


@dataclass
class Experience:
    """The sampled responses, one row per response: what the rollout and the reward produced."""

    input_ids: torch.Tensor  # [N, P+R], prompt left-padded, response right-padded
    attention_mask: torch.Tensor  # [N, P+R]
    response_mask: torch.Tensor  # [N, R], float
    advantages: torch.Tensor  # [N]
    correct: torch.Tensor  # [N], bool
    sampler_log_prob: torch.Tensor | None = None  # [N, R], from the rollout engine

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> Experience:
        return _map_tensors(self, lambda tensor: tensor[rows])

    def to(self, device: torch.device) -> Experience:
        return _map_tensors(self, lambda tensor: tensor.to(device))


@dataclass(frozen=True)
class PiOld:
    """π_old of each row: the log-probs the update's ratios are taken against, its entropies (None for the
    sampler's), and where they come from."""

    log_prob: torch.Tensor  # [N, R]
    entropy: torch.Tensor | None  # [N, R]
    source: PiOldSource

    def select(self, rows: slice | torch.Tensor) -> PiOld:
        return _map_tensors(self, lambda tensor: tensor[rows])

    @staticmethod
    def concat(parts: list[PiOld]) -> PiOld:
        entropy = None if parts[0].entropy is None else torch.cat([part.entropy for part in parts])
        return PiOld(torch.cat([part.log_prob for part in parts]), entropy, parts[0].source)


@dataclass(frozen=True)
class UpdateBatch:
    """The rows an update trains on: the experience, π_old (None: the update takes it from its own first forward
    passes), the reference's log-probs for the KL term, and the rollout correction's importance weights (the
    rejected tokens are already out of ``experience.response_mask``)."""

    experience: Experience
    pi_old: PiOld | None
    ref_log_prob: torch.Tensor | None = None  # [N, R]
    is_weights: torch.Tensor | None = None  # [N, R]

    def __len__(self) -> int:
        return len(self.experience)

    def select(self, rows: slice | torch.Tensor) -> UpdateBatch:
        return _map_tensors(self, lambda tensor: tensor[rows])
