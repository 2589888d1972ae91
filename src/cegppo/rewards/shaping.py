"""DAPO's overlong reward shaping: a soft penalty for responses that run into the length limit."""

from __future__ import annotations

import torch


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float
) -> torch.Tensor:
    """Per-response reward term of DAPO (Yu et al. 2025, arXiv 2503.14476, Eq. 13), as in verl's DAPO recipe.

    With L_exp = ``max_len`` - ``buffer_len``: 0 for |y| <= L_exp, then -``penalty_factor`` * (|y| - L_exp) /
    ``buffer_len``, reaching -``penalty_factor`` at |y| = ``max_len``. ``lengths`` counts each response's tokens
    (EOS included); ``buffer_len`` 0 gives zeros.
    """
    if buffer_len == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    exceed = lengths.float() - (max_len - buffer_len)
    return (-exceed / buffer_len * penalty_factor).clamp(max=0.0)
