"""The built-in ``math`` reward: math-verify against a gold answer, optionally only inside the last ``\\boxed{}``."""

from __future__ import annotations

import functools
import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_BOXED = "\\boxed"
# An unescaped $, \( or \[, or a \boxed: gold written with its own LaTeX delimiters ("\$32" is a dollar sign).
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")


def last_boxed_content(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or None.

    A ``\\boxed`` that is not followed by ``{`` or whose braces never close does not count.
    """
    start = text.rfind(_BOXED)
    while start >= 0:
        i = start + len(_BOXED)
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
        start = text.rfind(_BOXED, 0, start)
    return None


def parse_gold(ground_truth: str) -> list:
    """Parse a gold answer the way verl does: bare LaTeX is wrapped in ``\\boxed{}`` so that it is extracted.

    Gold already in ``$...$`` or ``\\boxed{}`` is parsed as written. Raises ValueError if nothing parses, because
    an unparseable gold would silently score every response as wrong.
    """
    return list(_parse_gold(ground_truth))


@functools.lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str) -> tuple:
    # Cached because a group of n responses to one prompt shares its gold answer.
    text = ground_truth.strip()
    if not _DELIMITED.search(text):
        text = f"{_BOXED}{{{text}}}"
    gold = parse(text, extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    if not gold:
        gold = parse(
            text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None
        )
    if not gold:
        raise ValueError(f"gold answer {ground_truth!r} could not be parsed by math-verify")
    return tuple(gold)


def math_reward(
    response: str,
    ground_truth: str,
    *,
    correct_score: float = 1.0,
    incorrect_score: float = 0.0,
    strict_boxed: bool = False,
) -> float:
    """Score one response against its gold answer with math-verify; no timeout (call it where time is bounded).

    Non-strict: math-verify extracts the answer from the whole response (it prefers ``\\boxed{}`` and falls back
    to the last number or expression). Strict: only the content of the last ``\\boxed{...}`` is verified, and a
    response without one is incorrect.

    Raises ValueError if the gold answer cannot be parsed.
    """
    gold = parse_gold(ground_truth)
    if strict_boxed:
        content = last_boxed_content(response)
        if content is None or not content.strip():
            return incorrect_score
        response = f"{_BOXED}{{{content}}}"
    pred = parse(response, parsing_timeout=None)
    if pred and verify(gold, pred, timeout_seconds=None):
        return correct_score
    return incorrect_score
