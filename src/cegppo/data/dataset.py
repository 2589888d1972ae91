"""PromptDataset: an endless, seeded stream of prompt batches that a resumed run replays exactly."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

from cegppo.data.examples import PromptExample


def fingerprint(examples: Sequence[PromptExample]) -> str:
    """A hash of the prompts, gold answers and data sources (not ``extra_info``), to detect a changed dataset."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.messages, ex.ground_truth, ex.data_source], sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


class PromptDataset:
    """Serves ``next_batch(k)`` forever, epoch after epoch.

    Each epoch visits every example once, in an order drawn from ``(seed, epoch)`` (file order if ``shuffle`` is
    False). A batch that runs past the end of an epoch continues into the next one, so no example is skipped.
    ``state_dict()`` / ``load_state_dict()`` carry ``seed``, ``epoch`` and ``position``; a dataset restored from
    a state serves exactly the batches the original would have served next.
    """

    def __init__(self, examples: Sequence[PromptExample], *, seed: int = 0, shuffle: bool = True) -> None:
        if not examples:
            raise ValueError("PromptDataset needs at least one example")
        self.examples = list(examples)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._fingerprint = fingerprint(self.examples)
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.examples)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"cegppo-prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, k: int) -> list[PromptExample]:
        """The next ``k`` examples (``k`` may exceed the dataset size; examples then repeat across epochs)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"batch size must be an integer >= 1, got {k!r}")
        batch = []
        while len(batch) < k:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(k - len(batch), len(self._order) - self.position)
            batch += [self.examples[i] for i in self._order[self.position : self.position + take]]
            self.position += take
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Plain values (JSON-safe): ``seed``, ``epoch``, ``position``, ``shuffle``, ``num_examples``,
        ``fingerprint``."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "shuffle": self.shuffle,
            "num_examples": len(self.examples),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Continue from ``state``. Raises ValueError if the dataset size differs, or (``strict``) if the
        examples changed since the state was saved."""
        for key in ("seed", "epoch", "position", "shuffle", "num_examples"):
            if key not in state:
                raise ValueError(f"PromptDataset state: missing key {key!r}")
        if state["num_examples"] != len(self.examples):
            raise ValueError(
                f"PromptDataset state is for {state['num_examples']} examples, this dataset has {len(self.examples)}"
            )
        if strict and state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "PromptDataset state was saved for different prompts (fingerprint "
                f"{state.get('fingerprint')} != {self._fingerprint}); pass strict=False to resume anyway"
            )
        if not 0 <= state["position"] <= len(self.examples) or state["epoch"] < 0:
            raise ValueError(f"PromptDataset state: bad epoch/position {state['epoch']}/{state['position']}")
        self.seed = state["seed"]
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
