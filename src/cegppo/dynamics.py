"""Entropy dynamics: the paper's four token quadrants and the covariance that predicts entropy change.

Pure tensor functions, computed from tensors the update already has (no extra forward pass).

- Quadrants (CE-GPPO §1, Fig. 1): advantage sign × probability under the old policy. PA&HP and NA&LP
  tokens reinforce the dominant choice and lower entropy; PA&LP and NA&HP raise it. Tokens with
  A = 0 belong to none.
- Covariance (CE-GPPO Eq. 7, from Cui et al. 2025, arXiv 2505.22617, Theorem 1): for a softmax policy
  under policy-gradient updates with step size η, H(π^{k+1}) − H(π^k) ≈ −η·Cov(log π(y), π(y)·A(y)),
  so a positive covariance predicts falling entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cegppo.losses.ratio import clip_boundaries
from cegppo.runfiles import QUADRANTS


@dataclass
class QuadrantTotals:
    """Per-quadrant sums that add up over micro-batches (order of :data:`QUADRANTS`)."""

    tokens: torch.Tensor  # [4] token counts
    clipped: torch.Tensor  # [4] tokens past the boundary that PPO would clip for their sign
    grad_weight: torch.Tensor  # [4] Σ |∂loss/∂log π|, i.e. Σ |F·A| up to the aggregation's normaliser
    total_tokens: float
    # [4] clipped tokens rarer than e^(−H) of their position under π_old (None: π_old's entropy unknown)
    clipped_rare: torch.Tensor | None = None

    def __add__(self, other: QuadrantTotals) -> QuadrantTotals:
        rare = None
        if self.clipped_rare is not None and other.clipped_rare is not None:
            rare = self.clipped_rare + other.clipped_rare
        return QuadrantTotals(
            self.tokens + other.tokens,
            self.clipped + other.clipped,
            self.grad_weight + other.grad_weight,
            self.total_tokens + other.total_tokens,
            rare,
        )

    def metrics(self) -> dict[str, float]:
        """``quadrant/<Q>/frac`` (share of all tokens), ``clipped`` (count of the quadrant's tokens beyond its
        clip boundary: β acts on a handful per update, which a share hides), ``clipped_frac`` (that count as
        a share of the quadrant's tokens), ``grad_share`` (share of the total gradient weight) and, where π_old's
        entropy is known, ``clipped_rare``: the clipped tokens with π_old(token) < e^(−H) of their position.
        Since ∂H/∂z_a = −π_a(log π_a + H), raising such a token's logit raises the entropy and lowering it lowers
        the entropy, and the other way round above e^(−H): whether β2 (PA) raises entropy and β1 (NA) lowers it,
        as CE-GPPO §5.1 says, depends on these counts (docs/entropy.md, the exact example)."""
        grad_total = self.grad_weight.sum().item()
        out = {}
        for i, name in enumerate(QUADRANTS):
            tokens = self.tokens[i].item()
            out[f"quadrant/{name}/frac"] = tokens / self.total_tokens if self.total_tokens else 0.0
            out[f"quadrant/{name}/clipped"] = self.clipped[i].item()
            out[f"quadrant/{name}/clipped_frac"] = self.clipped[i].item() / tokens if tokens else 0.0
            if self.clipped_rare is not None:
                out[f"quadrant/{name}/clipped_rare"] = self.clipped_rare[i].item()
            out[f"quadrant/{name}/grad_share"] = (
                self.grad_weight[i].item() / grad_total if grad_total else 0.0
            )
        return out


def quadrant_totals(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    loss_grad: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    prob_threshold: float,
    clip_ratio_low: float,
    clip_ratio_high: float,
    old_entropy: torch.Tensor | None = None,
) -> QuadrantTotals:
    """Sort the valid tokens into quadrants and sum what each contributes.

    ``loss_grad`` is ∂loss/∂log π per token (= −F·A/N for ``token-mean``), so its magnitude is the
    token's gradient weight under whatever loss produced it: CE-GPPO's β1/β2 show up here.
    HP means π_old(token) ≥ ``prob_threshold``. Clipped means δ > 1+ε_high for PA, δ < 1−ε_low for NA.
    ``old_entropy``: π_old's entropy at each position, for the clipped tokens rarer than e^(−H) there.
    """
    with torch.no_grad():
        valid = response_mask > 0
        high_prob = old_log_prob.exp() >= prob_threshold
        positive, negative = advantages > 0, advantages < 0
        ratio = (log_prob.float() - old_log_prob.float()).exp()
        beyond = torch.logical_or(*clip_boundaries(ratio, advantages, clip_ratio_low, clip_ratio_high))
        members = [positive & high_prob, positive & ~high_prob, negative & high_prob, negative & ~high_prob]
        weight = loss_grad.float().abs()
        rare = None if old_entropy is None else old_log_prob.float() < -old_entropy.float()
        tokens, clipped, grad_weight, clipped_rare = [], [], [], []
        for member in members:
            member = member & valid
            tokens.append(member.sum())
            clipped.append((member & beyond).sum())
            grad_weight.append(weight[member].sum())
            if rare is not None:
                clipped_rare.append((member & beyond & rare).sum())
        return QuadrantTotals(
            torch.stack(tokens).double(),
            torch.stack(clipped).double(),
            torch.stack(grad_weight).double(),
            float(valid.sum().item()),
            None if rare is None else torch.stack(clipped_rare).double(),
        )


def entropy_covariance(
    log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor
) -> float:
    """Cov(log π, π·A) over the valid tokens; positive predicts an entropy decrease (Eq. 7)."""
    valid = response_mask > 0
    if not valid.any():
        return 0.0
    log_p = log_prob[valid].double()
    weighted_adv = log_p.exp() * advantages[valid].double()
    return ((log_p - log_p.mean()) * (weighted_adv - weighted_adv.mean())).mean().item()
