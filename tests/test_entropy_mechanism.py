"""The arithmetic of examples/entropy_mechanism.py: exact entropy, the first-order predictions, the corners."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from _scripts import load_script
from cegppo.losses import PolicyLossConfig

em = load_script("examples/entropy_mechanism.py")

REGIME = {r.name: r for r in em.REGIMES}


def _random_logits(seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(em.NUM_STATES, em.VOCAB, generator=generator, dtype=em.DTYPE)


def _batch(seed: int, init: str = "flat") -> tuple[torch.Tensor, em.Batch]:
    generator = torch.Generator().manual_seed(seed)
    start = em.initial_logits(init, generator)
    return start, em.rollout(start, generator)


def test_exact_entropy_equals_brute_force_enumeration_of_every_response():
    tokens, states = em.all_sequences()
    assert tokens.shape == (em.VOCAB**em.LENGTH, em.LENGTH)
    for seed in range(3):
        logits = _random_logits(seed, scale=2.0)
        log_probs = logits.log_softmax(-1)
        sequence_log_prob = log_probs[states, tokens].sum(-1)
        assert sequence_log_prob.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
        # chain rule: the sequence entropy is the sum over positions of the expected conditional entropy
        brute_force = -(sequence_log_prob.exp() * sequence_log_prob).sum() / em.LENGTH
        assert em.mean_token_entropy(logits).item() == pytest.approx(brute_force.item(), abs=1e-12)
    flat = torch.zeros(em.NUM_STATES, em.VOCAB, dtype=em.DTYPE)
    assert em.mean_token_entropy(flat).item() == pytest.approx(np.log(em.VOCAB))


def test_sampled_prefixes_and_rewards_are_those_of_the_tree():
    _, batch = _batch(0)
    tokens, states = em.all_sequences()
    row = {tuple(t.tolist()): s.tolist() for t, s in zip(tokens, states, strict=True)}
    for t, s in zip(batch.tokens, batch.states, strict=True):
        assert s.tolist() == row[tuple(t.tolist())]
    assert em.reward(torch.tensor([[0, 0, 0], [1, 2, 1], [1, 1, 1]])).tolist() == [1.0, 1.0, 0.0]
    assert batch.advantages.shape == (em.GROUP, em.LENGTH)
    assert batch.advantages[:, 0].mean().item() == pytest.approx(0.0, abs=1e-6)  # GRPO: centred per group


def test_entropy_direction_is_the_derivative_along_the_log_prob_gradient():
    logits = _random_logits(1, scale=1.5)
    direction = em.entropy_direction(logits.log_softmax(-1))
    h = 1e-6
    for state, token in ((0, 2), (5, 0), (17, 3)):
        probs = logits[state].softmax(-1)
        step = -probs.clone()
        step[token] += 1.0  # ∇_z log π(token) = e_token − π
        moved = logits.clone()
        moved[state] += h * step

        def entropy(z, state=state):
            p = z[state].softmax(-1)
            return -(p * p.log()).sum().item()

        finite = (entropy(moved) - entropy(logits)) / h
        assert finite == pytest.approx(direction[state, token].item(), rel=1e-4, abs=1e-9)


def test_first_order_predictions_match_a_tiny_sgd_step():
    start, batch = _batch(2, "peaked")  # away from the flat policy, where H is near its maximum
    tiny = dataclasses.replace(REGIME["sgd-small-peaked"], lr=1e-4)
    final, result = em.update(start, batch, tiny, PolicyLossConfig(beta1=1.0, beta2=1.0))
    assert result.delta_entropy != 0
    assert result.predicted_first_order == pytest.approx(result.delta_entropy, rel=1e-3)
    # Eq. 7 is each state's entropy change, with the visitation weights held at the start's
    start_log, final_log = start.log_softmax(-1), final.log_softmax(-1)
    weights = em.visitation(start_log)
    fixed_weights = (
        weights * (em.state_entropies(final_log) - em.state_entropies(start_log))
    ).sum() / em.LENGTH
    assert result.within_states == pytest.approx(fixed_weights.item(), rel=1e-12)
    assert result.predicted_cov == pytest.approx(result.within_states, rel=1e-3)
    assert result.predicted_cov != pytest.approx(result.delta_entropy, rel=1e-3)  # the visitation term
    assert result.clipped.sum() == 0  # so the push of clipped tokens is 0
    assert result.push == {"low": 0.0, "high": 0.0}


def test_beta_zero_is_vanilla_ppo_and_beta_one_is_gppo_where_tokens_are_clipped():
    start, batch = _batch(3)
    regime = REGIME["sgd-large-flat"]
    ppo, ppo_result = em.update(start, batch, regime, PolicyLossConfig(beta1=0.0, beta2=0.0))
    assert ppo_result.clipped.sum() > 0
    vanilla, vanilla_result = em.update(start, batch, regime, PolicyLossConfig(), loss_name="vanilla")
    torch.testing.assert_close(ppo, vanilla, rtol=0, atol=1e-12)
    assert ppo_result.delta_entropy == pytest.approx(vanilla_result.delta_entropy, abs=1e-12)
    gppo, _ = em.update(start, batch, regime, PolicyLossConfig(), loss_name="gppo")
    both_one, _ = em.update(start, batch, regime, PolicyLossConfig(beta1=1.0, beta2=1.0))
    torch.testing.assert_close(both_one, gppo, rtol=0, atol=1e-12)
    assert not torch.allclose(both_one, ppo)  # the clipped tokens' gradient moved it


def test_corners_share_the_seed_and_differ_only_where_tokens_are_clipped():
    corners = em.run_seed(REGIME["adamw-large-peaked"], 4)
    assert set(corners) == set(em.CORNERS)
    assert all(u.clipped.sum() > 0 for u in corners.values())
    assert len({u.delta_entropy for u in corners.values()}) == 4
    nothing_clipped = em.run_seed(dataclasses.replace(REGIME["sgd-small-flat"], lr=1e-3), 4)
    assert len({u.delta_entropy for u in nothing_clipped.values()}) == 1  # β has nothing to act on


def test_the_script_prints_a_line_per_corner_and_per_effect(capsys):
    em.main(["--seeds", "3", "--regimes", "sgd-large-peaked"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    corners, effects = lines[:4], lines[4:]
    assert [(c["beta1"], c["beta2"]) for c in corners] == list(em.CORNERS)
    for line in corners:
        assert line["regime"] == "sgd-large-peaked" and line["seeds"] == 3
        low, high = line["delta_entropy_ci"]
        assert low <= line["delta_entropy_mean"] <= high
        assert set(line["clipped"]) == {"PA&HP", "PA&LP", "NA&HP", "NA&LP"}
        assert "predicted_cov_mean" in line and "predicted_first_order_mean" in line
    assert [e["effect"] for e in effects] == ["beta1", "beta2"]
    assert effects[0]["test"] == "sign-flip, exact" and effects[0]["seeds"] == 3
    with pytest.raises(SystemExit):
        em.main(["--regimes", "nope"])
