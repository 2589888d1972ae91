"""Training on the high-entropy minority: the "80/20" token selection (Wang et al. 2025, arXiv 2506.01939).

"Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RLVR" keeps in the policy loss only the
tokens whose entropy is in the top ρ of the batch (ρ = 0.2 in the paper): the forking tokens where the model
chooses among continuations. The threshold is the (1-ρ) quantile of the valid tokens' entropies, linearly
interpolated, as TRL's ``GRPOTrainer.get_high_entropy_mask`` computes it (``top_entropy_quantile``); a token is
kept when its entropy is at least the threshold, so ties at the threshold are all kept.
"""

from __future__ import annotations

import torch


def high_entropy_threshold(
    entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float
) -> torch.Tensor | None:
    """The entropy at the (1 - ``top_quantile``) quantile of the tokens where ``mask`` is 1; None if there are none.

    Computed like ``torch.quantile(..., interpolation="linear")`` on float32 values (TRL's), by sorting, so
    that it has no limit on the number of tokens.
    """
    if not 0 <= top_quantile <= 1:
        raise ValueError(f"top_quantile={top_quantile!r} is invalid: must be in [0, 1]")
    values = entropy.detach()[mask.bool()].float().sort().values
    if values.numel() == 0:
        return None
    rank = torch.tensor(1 - top_quantile, dtype=values.dtype, device=values.device) * (values.numel() - 1)
    below, above = values[rank.long()], values[rank.ceil().long()]
    return below.lerp(above, rank - rank.floor())


def select_high_entropy(
    entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor | None
) -> torch.Tensor:
    """Boolean [batch, response_len]: valid tokens whose entropy is at least ``threshold`` (none if it is None)."""
    valid = mask.bool()
    if threshold is None:
        return torch.zeros_like(valid)
    return (entropy.detach().float() >= threshold) & valid
