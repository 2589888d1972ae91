"""What CE-GPPO's β1 and β2 do to entropy, on a policy small enough that every quantity is exact.

The policy is a tabular softmax over token sequences: V = 4 tokens, L = 3 tokens per response, one logit
vector per prefix (the 21 prefixes of length 0-2, a complete 4-ary tree), so it is an autoregressive model
whose every conditional is a free parameter. The reward is verifiable: 1 when the tokens sum to 0 mod 4. Its
mean token entropy H = (1/L)·Σ_t E_{y~π}[H(π(·|y_<t))] (the quantity `entropy/mean` estimates on an LLM) is
computed exactly, by summing over the prefix tree.

Each seed draws an initial policy and one rollout of G = 32 responses (one group, GRPO advantages from
cegppo's ``grpo`` estimator). From that same state and batch, each corner (β1, β2) ∈ {0, 1}² takes the update
a trainer would take: cegppo's registered ``ce_gppo`` loss (ε = 0.2 both sides, dual-clip c = 10,
token-mean), 4 mini-batches of 8 responses, 2 epochs, so 8 optimiser steps, a fresh optimiser. Later
steps see ratios away from 1, so tokens get clipped, and only there does β act. The corners of a seed are
paired: same initial policy, same rollout, same mini-batches.

Per (regime, corner) it prints one JSON line: the exact entropy change ΔH (mean and 95% bootstrap interval
over seeds), the clipped tokens per quadrant (cegppo's quadrants: PA/NA by the advantage's sign, HP when
π_old ≥ 0.5; clipped = past the clip bound for its sign, counted at every optimiser step as the trainer does),
how many of them sat below e^-H of their state, and two predictions summed over the 8 steps:

- ``predicted_cov``: CE-GPPO Eq. 7 (Cui et al. 2025, Theorem 1), ΔH ≈ -η·Cov_{a~π(·|s)}(log π, π·Â) per
  state s, weighted by how often s is visited. The loss's gradient gives π·Â exactly: -∂loss/∂z_{s,a} =
  π(a|s)·Â_s(a) up to a per-state constant that the covariance ignores, Â_s(a) being the batch's F·A
  estimate. For SGD, η·π·Â is the logit step and this is the first-order change of each state's entropy.
  For AdamW the step is not η·π·Â (Adam divides each logit's gradient by its running scale, so on a fresh
  optimiser a rare token's logit moves as far as a common one's): the line shows how far Eq. 7 with η = lr
  is off.
- ``predicted_first_order``: ∇H·Δz for the step actually taken, any optimiser. It adds the term Eq. 7 leaves
  out (mass moving between prefixes of different entropy); the observed change minus it is the curvature.
- ``within_states``: the part of the observed ΔH at the start's visitation weights, Σ_s w_s·ΔH_s / L, the
  quantity Eq. 7 speaks about; ΔH minus it is the visitation shift (mass moving between prefixes). Added after
  the first full run, as a descriptive split: it changes no other number.

Then one line per (regime, effect): β1's effect ½[(1,0) − (0,0) + (1,1) − (0,1)] and β2's likewise, per seed,
with the one-sided sign-flip test in §5.1's direction (β1 lowers entropy, β2 raises it) and against it, the
paired bootstrap interval and the Wilcoxon signed-rank test (``cegppo.report.stats``), and, per boundary, the
first-order entropy push of the clipped tokens' kept gradient at β = 1 (``push_*``: Σ η·w_s/L·F·A·D/N over
the clipped tokens, D the change of the state's entropy along ∇log π(token) = ∂H/∂z_a − Σ_b π_b ∂H/∂z_b,
with ∂H/∂z_a = -π_a(log π_a + H)). Its sign is the first-order sign of β's effect (for SGD). The verdict
(issue 20's rule): "supported" when the sign-flip p ≤ 0.025 in §5.1's direction, "not supported" when p ≤ 0.025
against it or when the interval lies within ±2% of the (0, 0) corner's mean |ΔH| (negligible), else
"inconclusive".

The regimes were fixed before any result was seen (``REGIMES``; the step sizes by a pilot that printed only
clip counts). Run it single-threaded:

    OMP_NUM_THREADS=1 python examples/entropy_mechanism.py --seeds 256 > mechanism.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cegppo.advantages import get_advantage_fn
from cegppo.dynamics import quadrant_totals
from cegppo.losses import PolicyLossConfig, get_policy_loss_fn
from cegppo.report.stats import decide_paired, paired_bootstrap_ci, wilcoxon_signed_rank
from cegppo.runfiles import QUADRANTS

VOCAB = 4
LENGTH = 3
NUM_STATES = (VOCAB**LENGTH - 1) // (VOCAB - 1)  # prefixes of length 0 .. LENGTH-1
GROUP = 32
MINI_BATCHES = 4
EPOCHS = 2
CLIP = 0.2
PROB_THRESHOLD = 0.5  # HP vs LP, the trainer's default analysis.prob_threshold
CORNERS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
DTYPE = torch.float64
ALPHA = 0.025  # each one-sided test (issue 20's protocol)
NEGLIGIBLE = (
    0.02  # an effect is negligible when its 95% interval lies within ±2% of the (0, 0) corner's mean |ΔH|
)


@dataclass(frozen=True)
class Regime:
    name: str
    optimizer: str  # "sgd" or "adamw"
    lr: float
    init: str  # "flat" (logits ~ N(0, 0.3²)) or "peaked" (plus 3 on one random token per prefix)


# Fixed before any entropy change was looked at. The step sizes come from a pilot (20 seeds, corner (0, 0))
# that printed only clip counts: "small" clips about 1% of the update's 192 token-steps (the entropy study's
# LLM runs clip 0.3-1%), "large" 10-25%. AdamW: betas (0.9, 0.999), eps 1e-8, no weight decay (the trainer's
# default), a fresh state for each update.
REGIMES = tuple(
    Regime(f"{optimizer}-{size}-{init}", optimizer, lr, init)
    for optimizer, sizes in (
        ("sgd", (("small", 0.5), ("large", 5.0))),
        ("adamw", (("small", 0.03), ("large", 0.1))),
    )
    for size, lr in sizes
    for init in ("flat", "peaked")
)


# -- the policy -----------------------------------------------------------------------------------------------


def child(state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The prefix reached from ``state`` by ``token`` (breadth-first numbering of the complete V-ary tree)."""
    return VOCAB * state + 1 + token


def initial_logits(init: str, generator: torch.Generator) -> torch.Tensor:
    logits = 0.3 * torch.randn(NUM_STATES, VOCAB, generator=generator, dtype=DTYPE)
    if init == "peaked":
        top = torch.randint(VOCAB, (NUM_STATES,), generator=generator)
        logits[torch.arange(NUM_STATES), top] += 3.0
    elif init != "flat":
        raise ValueError(f"init must be 'flat' or 'peaked', got {init!r}")
    return logits


def visitation(log_probs: torch.Tensor) -> torch.Tensor:
    """[NUM_STATES] probability that a response passes through each prefix (1 for the empty one)."""
    weights = [torch.ones(1, dtype=log_probs.dtype)]
    start = 0
    for _ in range(LENGTH - 1):
        level = weights[-1]
        weights.append((level[:, None] * log_probs[start : start + len(level)].exp()).reshape(-1))
        start += len(level)
    return torch.cat(weights)


def state_entropies(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1)


def mean_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Exact H = (1/L)·Σ_t E_{y~π}[H(π(·|y_<t))] (differentiable)."""
    log_probs = logits.log_softmax(-1)
    return (visitation(log_probs) * state_entropies(log_probs)).sum() / LENGTH


def all_sequences() -> tuple[torch.Tensor, torch.Tensor]:
    """Every response [V^L, L] and the prefix each of its tokens is drawn from [V^L, L]."""
    tokens = torch.cartesian_prod(*[torch.arange(VOCAB)] * LENGTH).reshape(-1, LENGTH)
    return tokens, prefix_states(tokens)


def prefix_states(tokens: torch.Tensor) -> torch.Tensor:
    states = torch.zeros_like(tokens)
    for t in range(1, LENGTH):
        states[:, t] = child(states[:, t - 1], tokens[:, t - 1])
    return states


def reward(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens.sum(-1) % VOCAB == 0).to(DTYPE)


def sample(logits: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` responses [n, L] and their prefixes [n, L]."""
    probs = logits.softmax(-1)
    states = torch.zeros(n, LENGTH, dtype=torch.long)
    tokens = torch.zeros(n, LENGTH, dtype=torch.long)
    for t in range(LENGTH):
        tokens[:, t] = torch.multinomial(probs[states[:, t]], 1, generator=generator).squeeze(-1)
        if t + 1 < LENGTH:
            states[:, t + 1] = child(states[:, t], tokens[:, t])
    return tokens, states


def entropy_direction(log_probs: torch.Tensor) -> torch.Tensor:
    """[NUM_STATES, V]: D_{s,a}, the change of H(π(·|s)) per unit step along ∇_z log π(a|s) = e_a − π.

    With ∂H/∂z_a = −π_a(log π_a + H): D_a = ∂H/∂z_a − Σ_b π_b ∂H/∂z_b. D > 0 for a token well below e^-H
    (raising it spreads the mass), D < 0 for one well above; the sign changes where π_a(log π_a + H) equals
    Cov_π(π, log π) ≥ 0, at or a little above e^-H.
    """
    probs = log_probs.exp()
    entropy = state_entropies(log_probs)[:, None]
    grad = -probs * (log_probs + entropy)
    return grad - (probs * grad).sum(-1, keepdim=True)


# -- one update ------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    tokens: torch.Tensor  # [G, L]
    states: torch.Tensor  # [G, L]
    advantages: torch.Tensor  # [G, L], the response's advantage on each of its tokens


@dataclass
class Update:
    """What one corner's update did, summed over its optimiser steps."""

    delta_entropy: float
    within_states: float  # the part of ΔH at the start's visitation weights: Σ_s w_s·ΔH_s / L
    predicted_cov: float
    predicted_first_order: float
    clipped: np.ndarray  # [4] per quadrant (QUADRANTS order)
    clipped_below: np.ndarray  # [4] ... of which π(token) < e^-H(state) at that step
    push: dict[str, float] = field(
        default_factory=dict
    )  # "low" (NA, β1) / "high" (PA, β2): see the module doc


def rollout(logits: torch.Tensor, generator: torch.Generator) -> Batch:
    tokens, states = sample(logits, GROUP, generator)
    advantages = get_advantage_fn("grpo")(reward(tokens), torch.zeros(GROUP, dtype=torch.long)).to(DTYPE)
    return Batch(tokens, states, advantages[:, None].expand(GROUP, LENGTH).contiguous())


def make_optimizer(regime: Regime, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if regime.optimizer == "sgd":
        return torch.optim.SGD(params, lr=regime.lr)
    if regime.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=regime.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {regime.optimizer!r}")


def update(
    start: torch.Tensor, batch: Batch, regime: Regime, config: PolicyLossConfig, loss_name: str = "ce_gppo"
) -> tuple[torch.Tensor, Update]:
    """Apply ``loss_name`` with ``config`` to ``batch`` from the logits ``start``: MINI_BATCHES mini-batches in
    the rollout's order, EPOCHS passes. Returns the final logits and what happened."""
    loss_fn = get_policy_loss_fn(loss_name)
    logits = start.clone().requires_grad_(True)
    optimizer = make_optimizer(regime, [logits])
    with torch.no_grad():
        old_log_prob = start.log_softmax(-1)[batch.states, batch.tokens]
    size = GROUP // MINI_BATCHES
    predicted_cov = predicted_first_order = 0.0
    clipped, clipped_below = np.zeros(4), np.zeros(4)
    push = {"low": 0.0, "high": 0.0}
    for _ in range(EPOCHS):
        for first in range(0, GROUP, size):
            rows = slice(first, first + size)
            states, tokens, advantages = batch.states[rows], batch.tokens[rows], batch.advantages[rows]
            mask = torch.ones_like(advantages)
            before = logits.detach().clone().requires_grad_(True)
            entropy_before = mean_token_entropy(before)
            (entropy_grad,) = torch.autograd.grad(entropy_before, before)
            log_probs = logits.log_softmax(-1)
            log_prob = log_probs[states, tokens]
            loss, _ = loss_fn(
                old_log_prob=old_log_prob[rows],
                log_prob=log_prob,
                advantages=advantages,
                response_mask=mask,
                loss_agg_mode="token-mean",
                config=config,
                rollout_is_weights=None,
            )
            optimizer.zero_grad()
            (loss_grad,) = torch.autograd.grad(loss, log_prob, retain_graph=True)
            log_prob.backward(loss_grad)
            step_logits = -regime.lr * logits.grad.detach()  # η·π·Â (+ a per-state constant)
            optimizer.step()
            with torch.no_grad():
                current = before.detach().log_softmax(-1)
                weights = visitation(current)
                entropy = state_entropies(current)
                centred_log = current - (current.exp() * current).sum(-1, keepdim=True)
                covariance = (current.exp() * centred_log * step_logits).sum(-1)
                predicted_cov += float(-(weights * covariance).sum() / LENGTH)
                predicted_first_order += float((entropy_grad * (logits - before)).sum())
                totals = quadrant_totals(
                    old_log_prob[rows],
                    log_prob.detach(),
                    loss_grad,
                    advantages,
                    mask,
                    prob_threshold=PROB_THRESHOLD,
                    clip_ratio_low=config.clip_ratio_low,
                    clip_ratio_high=config.clip_ratio_high,
                )
                clipped += totals.clipped.numpy()
                ratio = (log_prob.detach() - old_log_prob[rows]).exp()
                low = (advantages < 0) & (ratio < 1 - config.clip_ratio_low)
                high = (advantages > 0) & (ratio > 1 + config.clip_ratio_high)
                below = log_prob.detach() < -entropy[states]
                high_prob = old_log_prob[rows].exp() >= PROB_THRESHOLD
                members = [high & high_prob, high & ~high_prob, low & high_prob, low & ~high_prob]
                clipped_below += np.array([float((m & below).sum()) for m in members])
                direction = entropy_direction(current)[states, tokens]
                per_token = regime.lr * weights[states] / LENGTH * advantages * direction / mask.sum()
                push["low"] += float(((1 - config.clip_ratio_low) * per_token)[low].sum())
                push["high"] += float(((1 + config.clip_ratio_high) * per_token)[high].sum())
    final = logits.detach()
    delta = float(mean_token_entropy(final) - mean_token_entropy(start))
    start_log_probs = start.log_softmax(-1)
    entropy_change = state_entropies(final.log_softmax(-1)) - state_entropies(start_log_probs)
    within_states = float((visitation(start_log_probs) * entropy_change).sum() / LENGTH)
    return final, Update(
        delta, within_states, predicted_cov, predicted_first_order, clipped, clipped_below, push
    )


def run_seed(regime: Regime, seed: int) -> dict[tuple[float, float], Update]:
    """The four corners' updates from one seed's initial policy and rollout."""
    generator = torch.Generator().manual_seed(seed)
    start = initial_logits(regime.init, generator)
    batch = rollout(start, generator)
    return {
        (beta1, beta2): update(start, batch, regime, PolicyLossConfig(beta1=beta1, beta2=beta2))[1]
        for beta1, beta2 in CORNERS
    }


# -- the report ------------------------------------------------------------------------------------------------


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def corner_line(regime: Regime, corner: tuple[float, float], updates: list[Update]) -> dict:
    deltas = np.array([u.delta_entropy for u in updates])
    predicted_cov = np.array([u.predicted_cov for u in updates])
    first_order = np.array([u.predicted_first_order for u in updates])
    clipped = np.mean([u.clipped for u in updates], axis=0)
    below = np.mean([u.clipped_below for u in updates], axis=0)
    moved = deltas != 0
    return {
        "regime": regime.name,
        "optimizer": regime.optimizer,
        "lr": regime.lr,
        "init": regime.init,
        "beta1": corner[0],
        "beta2": corner[1],
        "seeds": len(updates),
        "delta_entropy_mean": _round(deltas.mean()),
        "delta_entropy_ci": [_round(v) for v in paired_bootstrap_ci(deltas)],
        "within_states_mean": _round(np.mean([u.within_states for u in updates])),
        "predicted_cov_mean": _round(predicted_cov.mean()),
        "predicted_first_order_mean": _round(first_order.mean()),
        # share of the seeds whose entropy moved where Eq. 7 has the observed sign (None: none moved)
        "cov_sign_agreement": _round(float(np.mean(np.sign(predicted_cov[moved]) == np.sign(deltas[moved]))))
        if moved.any()
        else None,
        "clipped": {q: _round(c) for q, c in zip(QUADRANTS, clipped, strict=True)},
        "clipped_below_e^-H": {q: _round(c) for q, c in zip(QUADRANTS, below, strict=True)},
    }


def effect_line(regime: Regime, name: str, per_seed: list[dict[tuple[float, float], Update]]) -> dict:
    """β1's (or β2's) main effect on ΔH per seed: the mean of its two same-seed contrasts."""
    if name == "beta1":
        pairs, predicted, boundary = (((1.0, 0.0), (0.0, 0.0)), ((1.0, 1.0), (0.0, 1.0))), "less", "low"
    else:
        pairs, predicted, boundary = (((0.0, 1.0), (0.0, 0.0)), ((1.0, 1.0), (1.0, 0.0))), "greater", "high"

    def effect(part: str) -> np.ndarray:
        return np.array(
            [
                np.mean([getattr(seed[a], part) - getattr(seed[b], part) for a, b in pairs])
                for seed in per_seed
            ]
        )

    effects = effect("delta_entropy")
    # negligible: inside ±2% of the mean |ΔH| of plain PPO's update in this regime (fixed before the runs)
    negligible = NEGLIGIBLE * float(np.mean([abs(seed[(0.0, 0.0)].delta_entropy) for seed in per_seed]))
    decision = decide_paired(effects, predicted=predicted, alpha=ALPHA, negligible=negligible or None)
    wilcoxon = wilcoxon_signed_rank(effects, alternative=predicted)
    # the kept gradient's push, in the corner where β = 1 and the other β = 0
    push = np.array([seed[pairs[0][0]].push[boundary] for seed in per_seed])
    moved = effects != 0
    return {
        "regime": regime.name,
        "effect": name,
        "predicted_by_paper": "lower entropy" if predicted == "less" else "higher entropy",
        "seeds": len(per_seed),
        "seeds_with_effect": int(moved.sum()),
        "mean": _round(decision.difference),
        "ci": [_round(v) for v in decision.interval],
        "p_paper_direction": _round(decision.p),
        "p_opposite": _round(decision.p_opposite),
        "test": f"sign-flip, {decision.method}",
        "wilcoxon_p_paper_direction": _round(wilcoxon.p),
        "wilcoxon": wilcoxon.method,
        "negligible": _round(negligible),
        "verdict": decision.verdict,
        "within_states_mean": _round(effect("within_states").mean()),
        f"push_{boundary}_mean": _round(push.mean()),
        # share of the seeds with an effect where it has the sign of the kept gradient's push (None: no effect)
        "push_sign_agreement": _round(float(np.mean(np.sign(push[moved]) == np.sign(effects[moved]))))
        if moved.any()
        else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=256, help="seeds per regime (default 256)")
    parser.add_argument("--regimes", default="all", help="comma-separated regime names (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = [r.name for r in REGIMES]
    chosen = names if args.regimes == "all" else args.regimes.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown regimes {unknown}; known: {names}")
    started = time.perf_counter()
    for regime in (r for r in REGIMES if r.name in chosen):
        per_seed = [run_seed(regime, seed) for seed in range(args.seeds)]
        for corner in CORNERS:
            print(json.dumps(corner_line(regime, corner, [seed[corner] for seed in per_seed])), flush=True)
        for name in ("beta1", "beta2"):
            print(json.dumps(effect_line(regime, name, per_seed)), flush=True)
    print(
        f"{args.seeds} seeds x {len(chosen)} regimes in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
