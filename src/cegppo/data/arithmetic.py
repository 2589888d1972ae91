"""The default task: seeded 2-digit additions asked with a 2-shot chat prompt.

The (a, b) pairs are split once and for all into a held-out ("test") pool and a training pool by a hash of the
unordered pair, so the held-out benchmark and any training set are disjoint whatever their seeds (and ``12 + 35``
never trains while ``35 + 12`` is evaluated). The two worked examples are in neither pool.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterable
from typing import Any, Literal

from cegppo.data.examples import PromptExample, few_shot_messages

SPLITS = ("train", "test")
# One unordered pair in 8 is held out: about 1,020 ordered 2-digit pairs, of which the benchmark uses 200.
_TEST_BUCKETS = 8
HELD_OUT_SIZE = 200
HELD_OUT_SEED = 0


def arithmetic_question(a: int, b: int) -> str:
    """The question asked for ``a + b`` (the phrasing measured at 56 % greedy on SmolLM2-135M with 2 shots)."""
    return f"What is {a} + {b}? Put the final answer in \\boxed{{}}."


def _worked(a: int, b: int) -> dict[str, str]:
    return {
        "question": arithmetic_question(a, b),
        "answer": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
    }


_FEW_SHOT_PAIRS = ((12, 35), (58, 27))  # the second one carries
ARITHMETIC_FEW_SHOT: list[dict[str, str]] = [_worked(a, b) for a, b in _FEW_SHOT_PAIRS]


def _unordered(pair: tuple[int, int]) -> tuple[int, int]:
    return (pair[0], pair[1]) if pair[0] <= pair[1] else (pair[1], pair[0])


def _is_held_out(a: int, b: int) -> bool:
    lo, hi = _unordered((a, b))
    digest = hashlib.blake2b(f"{lo}+{hi}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _TEST_BUCKETS == 0


@functools.lru_cache(maxsize=8)
def _pool(digits: int, split: str) -> tuple[tuple[int, int], ...]:
    low, high = 10 ** (digits - 1), 10**digits - 1
    shots = {_unordered(p) for p in _FEW_SHOT_PAIRS}
    return tuple(
        (a, b)
        for a in range(low, high + 1)
        for b in range(low, high + 1)
        if _is_held_out(a, b) == (split == "test") and _unordered((a, b)) not in shots
    )


def arithmetic_problems(
    n: int,
    seed: int,
    *,
    digits: int = 2,
    exclude: Iterable[tuple[int, int]] | None = None,
    few_shot: bool | list[Any] = True,
    split: Literal["train", "test"] = "train",
) -> list[PromptExample]:
    """``n`` distinct additions of two ``digits``-digit numbers, drawn with ``seed`` from the ``split`` pool.

    Deterministic in all arguments, and ``n`` only truncates: the first 100 of ``n=200`` are ``n=100``. ``exclude`` holds (a, b) pairs to leave out (in either order).
    ``few_shot``: True for the built-in two worked examples (``ARITHMETIC_FEW_SHOT``), False for none, or a
    few-shot spec as accepted by ``few_shot_messages``. The reward is meant to be ``math`` with
    ``strict_boxed=True``. ``extra_info`` holds ``a``, ``b`` and ``split``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 4:
        raise ValueError(f"digits must be an integer in [1, 4], got {digits!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = _pool(digits, split)
    if exclude is not None:
        excluded = {_unordered((int(a), int(b))) for a, b in exclude}
        pool = tuple(p for p in pool if _unordered(p) not in excluded)
    if n > len(pool):
        raise ValueError(
            f"asked for {n} {digits}-digit '{split}' additions, but only {len(pool)} are available"
        )
    if few_shot is True:
        turns = few_shot_messages(ARITHMETIC_FEW_SHOT)
    elif few_shot is False:
        turns = []
    else:
        turns = few_shot_messages(few_shot)
    order = list(pool)
    # A full shuffle, so that a larger n extends a smaller one with the same seed.
    random.Random(seed).shuffle(order)
    return [
        PromptExample(
            messages=[*turns, {"role": "user", "content": arithmetic_question(a, b)}],
            ground_truth=str(a + b),
            data_source="arithmetic",
            extra_info={"a": a, "b": b, "split": split},
        )
        for a, b in order[:n]
    ]


def held_out_arithmetic(
    n: int = HELD_OUT_SIZE, *, digits: int = 2, few_shot: bool | list[Any] = True
) -> list[PromptExample]:
    """The held-out set: by default the fixed 200 2-digit problems of the ``arithmetic`` benchmark. A larger ``n``
    extends it and never overlaps any training set of the same ``digits``."""
    return arithmetic_problems(n, HELD_OUT_SEED, digits=digits, split="test", few_shot=few_shot)
