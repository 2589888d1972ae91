"""docs/losses.md, "Adding a loss or a loss term": the example there, run through the update."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from _tiny import tiny_model, tiny_tokenizer
from cegppo.config import ConfigError, load_config
from cegppo.losses import (
    POLICY_LOSS_REGISTRY,
    LossSettings,
    above,
    agg_loss,
    declared_settings,
    kl_penalty,
    register_policy_loss,
    setting,
)
from cegppo.trainer.actor import Actor, ActorSettings, update_once
from cegppo.trainer.terms import LOSS_TERMS, MicroBatch, register_loss_term
from test_trainer import _experience


@dataclass(frozen=True)
class TruncatedReinforceSettings(LossSettings):
    truncation: float = setting(2.0, above(0))  # c, the key actor.policy_loss.truncation


def truncated_reinforce(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """−sg(min(δ, c))·A·log π: REINFORCE with a truncated importance weight (c = ``truncation``)."""
    weight = (log_prob - old_log_prob).detach().exp().clamp(max=config.truncation)
    pg_losses = -weight * advantages * log_prob
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **config.global_batch_info)
    return loss, {
        "actor/truncated_frac": ((weight >= config.truncation).float() * response_mask).mean().item()
    }


def kl_to_pi_old(actor: Actor):
    """0.05·KL(π || π_old), k3 per token, over the mini-batch's tokens."""

    def term(micro: MicroBatch):
        kl = kl_penalty(micro.log_prob.float(), micro.pi_old, "low_var_kl")
        value = agg_loss(kl, micro.response_mask, "token-mean", **micro.counts.loss_config.global_batch_info)
        return 0.05 * value, {"actor/kl_to_pi_old": value.item()}

    term.needs_entropy = False
    return term


@pytest.fixture
def registered():
    register_policy_loss("truncated_reinforce", settings=TruncatedReinforceSettings)(truncated_reinforce)
    register_loss_term("kl_to_pi_old")(kl_to_pi_old)
    yield
    del POLICY_LOSS_REGISTRY["truncated_reinforce"]
    del LOSS_TERMS["kl_to_pi_old"]
    assert "truncation" not in declared_settings()  # its setting left with it


def test_a_registered_losss_setting_is_a_run_config_key_validated_as_declared(registered):
    config = load_config(None, ["actor.policy_loss=truncated_reinforce", "actor.policy_loss.truncation=3"])
    assert config.policy_loss_config().truncation == 3.0
    assert (
        load_config(
            None, ["actor.policy_loss=truncated_reinforce(truncation=1.5)"]
        ).actor.policy_loss.truncation
        == 1.5
    )
    with pytest.raises(
        ConfigError, match=r"actor.policy_loss.truncation=-1.0 is invalid: must be a finite number > 0"
    ):
        load_config(None, ["actor.policy_loss=truncated_reinforce", "actor.policy_loss.truncation=-1"])


def gradient(actor: Actor, batch) -> tuple[torch.Tensor, dict[str, float]]:
    actor.optimizer.zero_grad()
    result = actor.accumulate_gradients(batch)
    assert result.finite
    return torch.cat(
        [p.grad.flatten() for p in actor.model.parameters() if p.grad is not None]
    ), result.metrics


def test_a_registered_loss_and_term_train_like_the_built_in_ones(registered):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=1)
    overrides = ["actor.policy_loss=truncated_reinforce", "actor.bf16_autocast=false", "actor.lr=0.05"]
    actor = Actor(copy.deepcopy(model), ActorSettings.from_config(load_config(None, overrides)))
    batch = actor.old_policy(_experience(model, tokenizer), group_size=1, recompute=True)
    actor._update_mini_batch(batch)  # move the weights, so π differs from π_old
    grads = []
    for micro in (8, 3):
        actor.settings.actor.micro_batch_size = micro
        grad, metrics = gradient(actor, batch)
        grads.append(grad)
        assert metrics["actor/kl_to_pi_old"] > 0 and "actor/truncated_frac" in metrics
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)  # normalised by the mini-batch

    # without the term, the gradient is the loss's alone
    del LOSS_TERMS["kl_to_pi_old"]
    actor.set_loss("truncated_reinforce", actor.loss_config)
    without, metrics = gradient(actor, batch)
    assert "actor/kl_to_pi_old" not in metrics and not torch.allclose(without, grads[0])
    register_loss_term("kl_to_pi_old")(kl_to_pi_old)

    # one update of a batch with a loss setting given by name and overrides (what a paired probe runs per variant)
    probe = Actor(
        copy.deepcopy(model), ActorSettings.from_config(load_config(None, ["actor.bf16_autocast=false"]))
    )
    result = update_once(
        probe,
        _experience(model, tokenizer),
        1,
        "truncated_reinforce",
        {"truncation": 3.0, "clip_ratio_c": 3.0},
    )
    assert probe.loss.name == "truncated_reinforce" and probe.loss_config.truncation == 3.0
    assert probe.loss_config.clip_ratio_c == 3.0
    assert result.metrics["actor/num_updates"] == 2 and "actor/kl_to_pi_old" in result.metrics
    assert result.policy.source == "recomputed"
    with pytest.raises(ValueError, match="unknown settings \\['clip_ratio'\\]"):
        update_once(probe, _experience(model, tokenizer), 1, "vanilla", {"clip_ratio": 0.1})
