"""The update's entropy inputs: ERC's entropies, the 80/20 selection, the adaptive entropy coefficient."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from _tiny import tiny_model, tiny_tokenizer
from cegppo.config import ConfigError, load_config
from cegppo.losses import high_entropy_threshold, select_high_entropy
from cegppo.runfiles import read_metrics
from cegppo.trainer import Trainer
from cegppo.trainer.actor import Actor, ActorSettings
from cegppo.trainer.steering import AdaptiveEntropyCoefficient
from test_trainer import _experience, one_step, run_dir_of, short_reward  # noqa: F401  (short_reward: a fixture)


def make_actor(*overrides: str, seed: int = 1) -> tuple[Actor, object]:
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=seed)
    config = load_config(None, ["actor.bf16_autocast=false", "actor.lr=0.05", *overrides])
    return Actor(model, ActorSettings.from_config(config)), _experience(model, tokenizer)


def test_adaptive_coefficient_follows_the_skywork_rule_as_trl_applies_it():
    config = load_config(
        None,
        [
            "actor.use_adaptive_entropy=true",
            "actor.entropy_coeff=0.01",
            "actor.entropy_target=1.0",
            "actor.entropy_coeff_delta=0.02",
            "actor.entropy_coeff_max=0.04",
        ],
    )
    coefficient = AdaptiveEntropyCoefficient(config.actor)
    assert coefficient.enabled
    assert coefficient.applied() == 0.0  # nothing measured yet
    coefficient.observe_entropy(0.8)  # below the target: up, and applied
    assert coefficient.applied() == pytest.approx(0.03)
    coefficient.observe_entropy(1.0)  # at the target counts as below; clamped at the max
    assert coefficient.applied() == pytest.approx(0.04)
    coefficient.observe_entropy(1.5)  # above: down, and not applied while above
    assert coefficient.coeff == pytest.approx(0.02) and coefficient.applied() == 0.0
    for _ in range(3):
        coefficient.observe_entropy(2.0)
    assert coefficient.coeff == 0.0  # clamped at the min
    restored = AdaptiveEntropyCoefficient(config.actor)
    restored.load_state_dict(coefficient.state_dict())
    assert restored.state_dict() == {"coeff": 0.0, "last_entropy": 2.0}

    static = AdaptiveEntropyCoefficient(load_config(None, ["actor.entropy_coeff=0.01"]).actor)
    static.observe_entropy(0.1)
    assert static.applied() == 0.01 and static.enabled
    assert not AdaptiveEntropyCoefficient(load_config(None, []).actor).enabled


@pytest.mark.parametrize(
    "overrides",
    [
        ["actor.policy_loss=grpo_erc", "actor.clip_ratio_high=0.28"],
        ["actor.policy_loss=ce_gppo_erc", "actor.policy_loss.entropy_clip_ratio_low=0.01"],
        ["actor.top_entropy_quantile=0.2", "actor.entropy_coeff=0.01"],
        ["actor.use_adaptive_entropy=true", "actor.entropy_coeff=0.01", "actor.entropy_target=100"],
        [
            "actor.policy_loss=gppo_erc",
            "actor.top_entropy_quantile=0.5",
            "actor.loss_agg_mode=seq-mean-token-mean",
        ],
    ],
    ids=["dapo-erc", "ce-gppo-erc", "80/20", "adaptive", "gppo-erc+80/20"],
)
def test_micro_batch_splitting_never_changes_the_gradient(overrides):
    actor, batch = make_actor("actor.clip_ratio_low=0.01", "actor.clip_ratio_high=0.01", *overrides)
    batch = actor.old_policy(batch, group_size=1, recompute=True)
    first = actor.accumulate_gradients(batch).metrics  # on-policy: the entropy ratio is 1 everywhere
    assert first.get("actor/erc_clipfrac", 0.0) == 0.0
    actor._update_mini_batch(batch)  # move the weights, so ratios and entropies leave their old values

    grads, metrics = [], []
    for micro in (8, 3, 1):
        actor.settings.actor.micro_batch_size = micro
        actor.optimizer.zero_grad()
        result = actor.accumulate_gradients(batch)
        micro_metrics, finite = result.metrics, result.finite
        assert finite
        grads.append(torch.cat([p.grad.flatten() for p in actor.model.parameters() if p.grad is not None]))
        metrics.append(micro_metrics)
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], rtol=1e-4, atol=1e-7)
    for key in ("actor/erc_clipfrac", "actor/top_entropy_kept_frac", "actor/entropy", "actor/entropy_coeff"):
        if key in metrics[0]:
            assert metrics[1][key] == pytest.approx(metrics[0][key]) == pytest.approx(metrics[2][key])
    if "erc" in actor.settings.actor.policy_loss.loss_mode:
        assert 0 < metrics[0]["actor/erc_clipfrac"] < 1


def test_top_entropy_selection_weights_only_the_high_entropy_tokens():
    actor, batch = make_actor("actor.top_entropy_quantile=0.2", "actor.micro_batch_size=3")
    batch = actor.old_policy(batch, group_size=1, recompute=True)
    received = []
    loss_fn = actor.policy_gradient.loss_fn

    def recording(**kwargs):
        received.append(kwargs["rollout_is_weights"])
        return loss_fn(**kwargs)

    actor.policy_gradient.loss_fn = recording
    result = actor.accumulate_gradients(batch)
    metrics, _ = result.metrics, result.finite
    threshold = high_entropy_threshold(batch.pi_old.entropy, batch.experience.response_mask, 0.2)
    expected = select_high_entropy(batch.pi_old.entropy, batch.experience.response_mask, threshold).float()
    torch.testing.assert_close(torch.cat(received), expected)
    kept = expected.sum().item() / batch.experience.response_mask.sum().item()
    assert metrics["actor/top_entropy_kept_frac"] == pytest.approx(kept)
    assert 0.15 < kept < 0.3
    assert metrics["actor/top_entropy_threshold"] == pytest.approx(threshold.item())


def test_losses_that_need_entropy_get_both_entropies_and_others_get_neither():
    for loss, expect in (("grpo_erc", True), ("vanilla", False)):
        actor, batch = make_actor(f"actor.policy_loss={loss}")
        batch = actor.old_policy(batch, group_size=1, recompute=True)
        seen = []
        loss_fn = actor.policy_gradient.loss_fn

        def recording(loss_fn=loss_fn, seen=seen, **kwargs):
            seen.append(kwargs)
            return loss_fn(**kwargs)

        actor.policy_gradient.loss_fn = recording
        actor.accumulate_gradients(batch)
        assert all(("entropy" in kwargs) == expect and ("old_entropy" in kwargs) == expect for kwargs in seen)
        if expect:
            torch.testing.assert_close(
                torch.cat([kwargs["old_entropy"] for kwargs in seen]), batch.pi_old.entropy
            )
            # on-policy, the update's forward gives back π_old's entropy
            torch.testing.assert_close(
                torch.cat([kwargs["entropy"].detach() for kwargs in seen]),
                batch.pi_old.entropy,
                rtol=1e-5,
                atol=1e-5,
            )


def test_bad_entropy_settings_name_the_key():
    for override, key in [
        ("actor.top_entropy_quantile=1.5", "actor.top_entropy_quantile"),
        ("actor.entropy_coeff_delta=0", "actor.entropy_coeff_delta"),
        ("actor.entropy_coeff_min=1.5", "actor.entropy_coeff_min/entropy_coeff_max"),
        ("actor.entropy_target=-1", "actor.entropy_target"),
        ("actor.policy_loss.entropy_clip_ratio_high=-0.1", "actor.policy_loss.entropy_clip_ratio_high"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_adaptive_coefficient_is_logged_checkpointed_and_resumed(tiny_model_dir, tmp_path, short_reward):  # noqa: F811
    config = one_step(
        tiny_model_dir,
        tmp_path,
        short_reward,
        **{
            "actor.use_adaptive_entropy": True,
            "actor.entropy_coeff": 0.01,
            "actor.entropy_target": 100.0,
            "actor.top_entropy_quantile": 0.5,
        },
    )
    trainer = Trainer(config, run_dir_of(config))
    trainer.fit()
    state = trainer.actor.entropy_coefficient.state_dict()
    (record,) = read_metrics(run_dir_of(config))
    # two updates, both below the target: +0.005 each; the first applied nothing (no measurement yet)
    assert state["coeff"] == pytest.approx(0.02)
    assert record["actor/adaptive_entropy_coeff"] == pytest.approx(0.02)
    assert record["actor/entropy_coeff"] == pytest.approx((0.0 + 0.015) / 2)  # mean over the step's updates
    assert math.isfinite(state["last_entropy"]) and 0 < record["actor/top_entropy_kept_frac"] <= 0.6
    resumed = Trainer(config, run_dir_of(config), resume=True)
    assert resumed.actor.entropy_coefficient.state_dict() == state
    resumed.close()


def test_missing_old_entropy_is_reported():
    actor, batch = make_actor("actor.policy_loss=gppo_erc")
    batch = actor.old_policy(batch, group_size=1, recompute=True)
    batch = dataclasses.replace(batch, pi_old=dataclasses.replace(batch.pi_old, entropy=None))
    with pytest.raises(ValueError, match="old_entropy is missing"):
        actor.accumulate_gradients(batch)


def test_trainer_option_works_with_every_registered_token_loss(tmp_path: Path):
    # top_entropy_quantile is a trainer option: any loss that honours per-token weights takes it
    for loss in ("vanilla", "cispo", "gspo", "gpg", "gppo_erc"):
        actor, batch = make_actor(f"actor.policy_loss={loss}", "actor.top_entropy_quantile=0.3")
        batch = actor.old_policy(batch, group_size=1, recompute=True)
        result = actor.accumulate_gradients(batch)
        metrics, finite = result.metrics, result.finite
        assert finite and 0 < metrics["actor/top_entropy_kept_frac"] < 0.5
