"""Truncated importance sampling (``rollout.tis_cap``) end to end: sampler log-probs, weights and metrics.

With top-p filtering the sampler's distribution is the renormalised nucleus, so per token
π_old/π_sampler is the nucleus's kept mass (< 1): the IS weight the trainer applies and logs must be
min(kept mass, cap), recomputed here by hand from the policy before the update.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _tiny import save_tiny, tiny_overrides
from cegppo.config import load_config
from cegppo.ops import sampler_position_ids
from cegppo.trainer import Trainer
from test_rollout import filtered_log_softmax

TEMPERATURE, TOP_P = 0.9, 0.8


def kept_mass(model, experience, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response token: log-prob under the nucleus the sampler drew from, and the nucleus's mass."""
    with torch.no_grad():
        logits = model(
            input_ids=experience.input_ids,
            attention_mask=experience.attention_mask,
            position_ids=sampler_position_ids(experience.attention_mask),
        ).logits.float()[:, prompt_len - 1 : -1]
    tokens = experience.input_ids[:, prompt_len:].unsqueeze(-1)
    filtered = filtered_log_softmax(logits / TEMPERATURE, top_p=TOP_P).gather(-1, tokens).squeeze(-1)
    unfiltered = torch.log_softmax(logits / TEMPERATURE, dim=-1).gather(-1, tokens).squeeze(-1)
    return filtered, (unfiltered - filtered).exp()


def run_one_step(tmp_path, tis_cap: float | None):
    model_dir = save_tiny(tmp_path / "model")
    overrides = tiny_overrides(
        model_dir,
        tmp_path,
        **{
            "rollout.temperature": TEMPERATURE,
            "rollout.top_p": TOP_P,
            "rollout.tis_cap": "null" if tis_cap is None else tis_cap,
            "actor.entropy_coeff": 0.1,  # a gradient even where every advantage is 0
            "trainer.total_steps": 1,
            "data.heldout": "null",
        },
    )
    trainer = Trainer(load_config(None, overrides), tmp_path / "run")
    before = copy.deepcopy(trainer.model).eval()
    captured, loss_weights = [], []
    old_policy = trainer.actor.old_policy
    loss_fn = trainer.actor.policy_gradient.loss_fn

    def capture_experience(experience, **kwargs):
        captured.append(experience)
        return old_policy(experience, **kwargs)

    def record_weights(**kwargs):
        weights = kwargs["rollout_is_weights"]
        loss_weights.append(None if weights is None else weights[kwargs["response_mask"].bool()])
        return loss_fn(**kwargs)

    trainer.actor.old_policy = capture_experience
    trainer.actor.policy_gradient.loss_fn = record_weights
    metrics = trainer.step()
    trainer.close()
    return metrics, captured[0], before, loss_weights


def test_is_weights_and_metrics_are_the_kept_mass_capped(tmp_path):
    cap = 0.801  # the nucleus keeps 0.800-0.802 of this near-uniform model's mass
    metrics, experience, before, loss_weights = run_one_step(tmp_path, cap)
    mask = experience.response_mask.bool()
    prompt_len = experience.input_ids.shape[1] - experience.response_len
    filtered, kept = kept_mass(before, experience, prompt_len)

    # The hf engine recorded the nucleus log-probs, so the trainer's recomputation (unfiltered) differs.
    torch.testing.assert_close(experience.sampler_log_prob[mask], filtered[mask], atol=1e-4, rtol=0)
    expected = kept[mask].clamp(max=cap)
    capped = kept[mask] > cap
    assert capped.any() and (~capped).any(), kept[mask]  # both sides of the cap, or the test is vacuous
    assert (kept[mask] >= TOP_P - 1e-5).all() and (kept[mask] < 1).any()
    assert metrics["rollout/is_weight_mean"] == pytest.approx(expected.mean().item(), abs=1e-4)
    assert metrics["rollout/is_capped_frac"] == pytest.approx(capped.float().mean().item(), abs=1e-6)
    assert metrics["rollout/logprob_diff"] == pytest.approx(kept[mask].log().abs().mean().item(), abs=1e-4)
    # The loss got these weights for every token of every mini-batch (one epoch: each token once).
    applied = torch.cat(loss_weights).sort().values
    torch.testing.assert_close(applied, expected.sort().values, atol=1e-4, rtol=0)


def test_without_a_cap_no_weights_reach_the_loss(tmp_path):
    metrics, _, _, loss_weights = run_one_step(tmp_path, None)
    assert loss_weights and all(weights is None for weights in loss_weights)
    assert "rollout/is_weight_mean" not in metrics and "rollout/is_capped_frac" not in metrics
    assert metrics["rollout/logprob_diff"] > 1e-3  # the nucleus renormalisation, measured without a cap
