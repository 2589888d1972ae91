"""The verl plug-in, against verl 0.9.1 itself (run by ``make test-verl`` in ``.venv-verl``; skipped without verl).

Our wrapped losses are called the way verl calls them (``get_policy_loss_fn(name)(..., config=ActorConfig)``,
and through verl's own ``ppo_loss``) and compared with verl's built-in losses and with direct calls of ours.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed: run `make test-verl`")

from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from verl.trainer.config.algorithm import RolloutCorrectionConfig
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask
from verl.utils import tensordict_utils
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import ActorConfig
from verl.workers.config import PolicyLossConfig as VerlPolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from cegppo.integrations.verl import (
    REGISTERED,
    CEGPPOPolicyLossConfig,
    policy_loss_config_from_verl,
)
from cegppo.losses import PolicyLossConfig, get_policy_loss_fn, list_policy_losses, policy_loss_needs_entropy
from cegppo.losses.rollout_correction import rollout_correction

REPO = Path(__file__).resolve().parents[2]
VERL_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]
BATCH, LENGTH = 6, 9
# Our losses that verl 0.9.1 also registers, under the same name.
VERL_NAMED = (
    "vanilla",
    "cispo",
    "gspo",
    "sapo",
    "geo_mean",
    "dppo_tv",
    "dppo_kl",
    "dro",
    "clip_cov",
    "kl_cov",
    "gpg",
)


def random_batch(seed: int, rows: int = BATCH) -> dict[str, torch.Tensor]:
    """Off-policy float64 tensors: log δ ~ N(0, 0.7²) puts tokens in every clip region, plus a dual-clip one;
    ragged lengths, one empty response, one advantage per response (as GRPO)."""
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(rows, LENGTH, generator=g, dtype=torch.float64)
    new = old + 0.7 * torch.randn(rows, LENGTH, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, LENGTH + 1, (rows,), generator=g)
    lengths[1] = 0
    mask = torch.arange(LENGTH) < lengths.unsqueeze(1)
    advantages = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, LENGTH).clone()
    advantages[0], new[0, 0] = -1.0, old[0, 0] + 1.6  # at least one dual-clip token (A < 0, δ = 5 > 3)
    return {
        "old_log_prob": old,
        "log_prob": new.requires_grad_(True),
        "advantages": advantages,
        "response_mask": mask,
    }


def edge_batch(seed: int, rows: int = BATCH) -> dict[str, torch.Tensor]:
    """``random_batch`` plus the edge regions: ratios e^±8 far outside any band, a row with A = 0."""
    batch = random_batch(seed, rows)
    old, new = batch["old_log_prob"], batch["log_prob"].detach().clone()
    new[2, 0], new[3, 1], new[4, 2] = old[2, 0] + 8.0, old[3, 1] - 8.0, old[4, 2] + 6.0
    batch["advantages"][5] = 0.0
    batch["log_prob"] = new.requires_grad_(True)
    return batch


def without_empty_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    live = batch["response_mask"].sum(-1) > 0
    return {k: v.detach()[live].clone().requires_grad_(k == "log_prob") for k, v in batch.items()}


def actor_config(global_batch_info: dict | None = None, **overrides) -> ActorConfig:
    settings = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0, **overrides}
    return ActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_micro_batch_size_per_gpu=4,
        global_batch_info=dict(global_batch_info or {}),
        **settings,
    )


# verl's engine stores dp_size, the global valid-token count (.item() of a float sum) and global sequence count.
DP2 = {"dp_size": 2, "batch_num_tokens": 61.0, "global_batch_size": 13, "loss_scale_factor": None}
DP2_NORM = {**DP2, "loss_scale_factor": 32}


def run(fn, batch: dict, mode: str, config, rollout_is_weights=None):
    """Loss, d loss / d log_prob and metrics of one call."""
    batch = {k: v.detach().clone().requires_grad_(k == "log_prob") for k, v in batch.items()}
    loss, metrics = fn(**batch, loss_agg_mode=mode, config=config, rollout_is_weights=rollout_is_weights)
    (grad,) = torch.autograd.grad(loss, batch["log_prob"])
    return loss.detach(), grad, metrics


def test_registers_every_loss_without_touching_verls() -> None:
    needs_entropy = {name for name in list_policy_losses() if policy_loss_needs_entropy(name)}
    assert {"grpo_erc", "gppo_erc", "ce_gppo_erc"} <= needs_entropy
    assert set(REGISTERED) == set(list_policy_losses()) - needs_entropy
    for name in ("ce_gppo", "gppo", "luspo", "vespo", "dgpo"):
        assert REGISTERED[name] == name
    for name in VERL_NAMED:
        assert REGISTERED[name] == f"cegppo_{name}"
        assert core_algos.get_policy_loss_fn(name).__module__ == "verl.trainer.ppo.core_algos"
    for name, verl_name in REGISTERED.items():
        assert core_algos.get_policy_loss_fn(verl_name).__wrapped__ is get_policy_loss_fn(name)


@pytest.mark.parametrize("name", ["vanilla", "cispo"])
@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("batch_info", [None, DP2_NORM], ids=["local", "dp2"])
def test_matches_verls_own_loss(name: str, mode: str, batch_info: dict | None) -> None:
    batch = random_batch(seed=10 * len(name) + VERL_MODES.index(mode))
    config = actor_config(batch_info)
    verl_loss, verl_grad, verl_metrics = run(core_algos.get_policy_loss_fn(name), batch, mode, config)
    our_loss, our_grad, our_metrics = run(
        core_algos.get_policy_loss_fn(f"cegppo_{name}"), batch, mode, config
    )
    torch.testing.assert_close(our_loss, verl_loss)
    torch.testing.assert_close(our_grad, verl_grad)
    assert our_grad.abs().sum() > 0
    assert our_metrics["actor/ppo_kl"] == pytest.approx(verl_metrics["actor/ppo_kl"])
    if name == "vanilla":
        # verl: pg_clipfrac = either PPO side, pg_clipfrac_lower = dual-clip.
        low_high = our_metrics["actor/pg_clipfrac_low"] + our_metrics["actor/pg_clipfrac_high"]
        assert low_high == pytest.approx(verl_metrics["actor/pg_clipfrac"])
        assert our_metrics["actor/pg_clipfrac_lower"] == pytest.approx(
            verl_metrics["actor/pg_clipfrac_lower"]
        )
        assert verl_metrics["actor/pg_clipfrac_lower"] > 0
    else:
        assert our_metrics["actor/pg_clipfrac"] == pytest.approx(verl_metrics["actor/pg_clipfrac"])
    assert 0 < our_metrics["actor/pg_clipfrac"] < 1


@pytest.mark.parametrize("batch_info", [None, DP2], ids=["local", "dp2"])
def test_gspo_matches_verls_gspo(batch_info: dict | None) -> None:
    # Our GSPO always aggregates seq-mean-token-mean (the paper's); verl 0.9.1 also accepts other modes.
    batch = random_batch(seed=3)
    config = actor_config(batch_info, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    mode = "seq-mean-token-mean"
    verl_loss, verl_grad, verl_metrics = run(core_algos.get_policy_loss_fn("gspo"), batch, mode, config)
    our_loss, our_grad, our_metrics = run(core_algos.get_policy_loss_fn("cegppo_gspo"), batch, mode, config)
    torch.testing.assert_close(our_loss, verl_loss)
    torch.testing.assert_close(our_grad, verl_grad)
    assert our_metrics["actor/ppo_kl"] == pytest.approx(verl_metrics["actor/ppo_kl"])


def assert_same(ours, verl, *, metric_keys=("actor/ppo_kl",)) -> None:
    torch.testing.assert_close(ours[0], verl[0])
    torch.testing.assert_close(ours[1], verl[1])
    assert ours[1].abs().sum() > 0
    for key in metric_keys:
        assert ours[2][key] == pytest.approx(verl[2][key])


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl", "dro"])
@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("batch_info", [None, DP2_NORM], ids=["local", "dp2"])
def test_token_level_losses_match_verls(name: str, mode: str, batch_info: dict | None) -> None:
    batch = edge_batch(seed=7 * len(name) + VERL_MODES.index(mode))
    # A TV/KL band of 0.1 and a truncation cap of 3 so that masking and truncation both act.
    config = actor_config(
        batch_info, clip_ratio_low=0.1, clip_ratio_high=0.1, policy_loss=VerlPolicyLossConfig(dro_beta=0.3)
    )
    verl = run(core_algos.get_policy_loss_fn(name), batch, mode, config)
    ours = run(core_algos.get_policy_loss_fn(f"cegppo_{name}"), batch, mode, config)
    if name == "dro":
        assert_same(ours, verl)
        assert ours[2]["actor/dro_penalty"] > 0
        return
    assert_same(ours, verl, metric_keys=("actor/ppo_kl", "actor/pg_clipfrac_lower"))
    assert ours[2]["actor/dppo_masked_frac"] == pytest.approx(verl[2]["actor/pg_clipfrac"])
    assert 0 < ours[2]["actor/dppo_masked_frac"] < 1
    assert ours[2]["actor/pg_clipfrac_dual"] > 0


@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("batch_info", [None, DP2], ids=["local", "dp2"])
def test_sapo_matches_verls_sapo(mode: str, batch_info: dict | None) -> None:
    # Both force seq-mean-token-mean whatever loss_agg_mode says.
    batch = edge_batch(seed=31 + VERL_MODES.index(mode))
    config = actor_config(batch_info, tau_pos=1.0, tau_neg=1.05)
    verl = run(core_algos.get_policy_loss_fn("sapo"), batch, mode, config)
    ours = run(core_algos.get_policy_loss_fn("cegppo_sapo"), batch, mode, config)
    assert_same(ours, verl)
    other = run(
        core_algos.get_policy_loss_fn("cegppo_sapo"), batch, mode, actor_config(batch_info, tau_neg=3.0)
    )
    assert not torch.allclose(other[1], ours[1])
    assert 0 < ours[2]["actor/sapo_gate_mean"] < 1


@pytest.mark.parametrize("eps", [0.2, 0.4])
def test_geo_mean_matches_verls_geo_mean(eps: float) -> None:
    """verl averages over the micro-batch rows (empty ones included) and ignores global counts; ours averages
    over live sequences with the global count: equal on a batch without empty rows, off by B / B_live with."""
    batch = edge_batch(seed=41)
    config = actor_config(clip_ratio_low=eps, clip_ratio_high=eps)
    live = without_empty_rows(batch)
    verl = run(core_algos.get_policy_loss_fn("geo_mean"), live, "token-mean", config)
    ours = run(core_algos.get_policy_loss_fn("cegppo_geo_mean"), live, "token-mean", config)
    assert_same(ours, verl)
    verl_all = run(core_algos.get_policy_loss_fn("geo_mean"), batch, "token-mean", config)
    ours_all = run(core_algos.get_policy_loss_fn("cegppo_geo_mean"), batch, "token-mean", config)
    scale = BATCH / (BATCH - 1)
    torch.testing.assert_close(ours_all[0], verl_all[0] * scale)
    torch.testing.assert_close(ours_all[1], verl_all[1] * scale)
    weights = (
        torch.rand(BATCH - 1, LENGTH, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    )
    verl_w = run(core_algos.get_policy_loss_fn("geo_mean"), live, "token-mean", config, weights)
    ours_w = run(core_algos.get_policy_loss_fn("cegppo_geo_mean"), live, "token-mean", config, weights)
    assert_same(ours_w, verl_w)


def mismatch_batch(seed: int) -> dict[str, torch.Tensor]:
    """``edge_batch``'s masks and advantages with a sampler mismatch: log r ~ N(0, 0.15²), and one outlier
    token (log r = ±3) in rows 2 and 3, so that some sequences pass each criterion and others do not."""
    batch = edge_batch(seed)
    g = torch.Generator().manual_seed(seed)
    old = batch["old_log_prob"]
    new = old + 0.15 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    new[2, 0], new[3, 1] = old[2, 0] + 3.0, old[3, 1] - 3.0
    batch["log_prob"] = new.requires_grad_(True)
    return batch


# verl's presets (RolloutCorrectionConfig's class methods) and each rejection criterion on its own.
CORRECTIONS = {
    "token_tis": {"rollout_is": "token", "rollout_is_threshold": 2.0},
    "seq_tis": {"rollout_is": "sequence", "rollout_is_threshold": 2.0},
    "token_icepop": {"rollout_is": "token", "rollout_is_threshold": "0.5_5.0"},
    "seq_mis": {"rollout_is": "sequence", "rollout_is_threshold": 2.0, "rollout_rs": "seq_sum_k1",
                "rollout_rs_threshold": "0.5_2.0"},
    "token_tis_normalized": {"rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_is_batch_normalize": True},
    "seq_tis_normalized": {"rollout_is": "sequence", "rollout_is_threshold": 5.0, "rollout_is_batch_normalize": True},
    "geo_rs": {"rollout_rs": "seq_mean_k1", "rollout_rs_threshold": "0.8_1.25"},
    "geo_rs_upper_only": {"rollout_rs": "seq_mean_k1", "rollout_rs_threshold": 1.3},
    "k3_rs_token_tis": {"rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_rs": "seq_mean_k3",
                        "rollout_rs_threshold": 0.05},
    "token_k1": {"rollout_rs": "token_k1", "rollout_rs_threshold": "0.7_1.4"},
    "token_k2": {"rollout_rs": "token_k2", "rollout_rs_threshold": 0.1},
    "token_k3": {"rollout_rs": "token_k3", "rollout_rs_threshold": 0.1},
    "seq_sum_k2": {"rollout_rs": "seq_sum_k2", "rollout_rs_threshold": 1.0},
    "seq_sum_k3": {"rollout_rs": "seq_sum_k3", "rollout_rs_threshold": 1.0},
    "seq_mean_k2": {"rollout_rs": "seq_mean_k2", "rollout_rs_threshold": 0.05},
    "seq_max_k2": {"rollout_rs": "seq_max_k2", "rollout_rs_threshold": 0.5},
    "seq_max_k3": {"rollout_rs": "seq_max_k3", "rollout_rs_threshold": 0.5},
    "chained": {"rollout_rs": "token_k1,seq_mean_k3", "rollout_rs_threshold": "0.5_2.0,0.05"},
}  # fmt: skip
CORRECTION_METRICS = (
    "rollout_is_mean",
    "rollout_is_ratio_fraction_high",
    "rollout_is_ratio_fraction_low",
    "rollout_rs_masked_fraction",
    "rollout_rs_seq_masked_fraction",
)


@pytest.mark.parametrize("name", list(CORRECTIONS))
def test_rollout_correction_matches_verls(name: str) -> None:
    """Weights and rejection mask equal verl's on every token; the metrics too, on a batch without empty rows
    (verl counts empty rows in its per-sequence fractions, we leave them out)."""
    settings = CORRECTIONS[name]
    for batch in (mismatch_batch(seed=43), without_empty_rows(mismatch_batch(seed=43))):
        train, sampler, mask = batch["log_prob"].detach(), batch["old_log_prob"], batch["response_mask"]
        theirs = compute_rollout_correction_and_rejection_mask(
            train, sampler, mask, **{"rollout_is": None, **settings}
        )
        ours = rollout_correction(train, sampler, mask, PolicyLossConfig(**settings))
        if settings.get("rollout_is") is None:
            assert theirs[0] is None and ours.weights is None
        else:
            torch.testing.assert_close(ours.weights, theirs[0].batch["rollout_is_weights"])
        assert torch.equal(ours.mask, theirs[1])
    for key in CORRECTION_METRICS:
        if f"rollout_corr/{key}" in theirs[2]:
            assert ours.metrics[f"actor/{key}"] == pytest.approx(theirs[2][f"rollout_corr/{key}"]), key
    if "rollout_rs" in settings:
        assert 0 < ours.metrics["actor/rollout_rs_masked_fraction"] < 1
    if settings.get("rollout_is_threshold") == 2.0 and not settings.get("rollout_is_batch_normalize"):
        assert ours.weights.max() == 2.0


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
@pytest.mark.parametrize("correction", ["seq_tis", "token_icepop", "geo_rs", "k3_rs_token_tis", "chained"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_bypass_mode_matches_verls(loss_type: str, correction: str, mode: str) -> None:
    batch = mismatch_batch(seed=47)
    rollout = RolloutCorrectionConfig(**{"rollout_is": None, **CORRECTIONS[correction]}, loss_type=loss_type)
    config = actor_config(
        DP2, policy_loss=VerlPolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rollout)
    )
    verl = run(core_algos.get_policy_loss_fn("bypass_mode"), batch, mode, config)
    ours = run(core_algos.get_policy_loss_fn("cegppo_bypass_mode"), batch, mode, config)
    assert_same(ours, verl)
    for key in ("rollout_rs_masked_fraction", "rollout_is_mean"):
        if f"rollout_corr/{key}" in verl[2]:
            assert ours[2][f"actor/{key}"] == pytest.approx(verl[2][f"rollout_corr/{key}"])


def test_rollout_is_weights_reach_the_loss() -> None:
    batch = random_batch(seed=5)
    weights = torch.rand(BATCH, LENGTH, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    config = actor_config(DP2)
    verl = run(core_algos.get_policy_loss_fn("vanilla"), batch, "token-mean", config, weights)
    ours = run(core_algos.get_policy_loss_fn("cegppo_vanilla"), batch, "token-mean", config, weights)
    unweighted = run(core_algos.get_policy_loss_fn("cegppo_vanilla"), batch, "token-mean", config)
    torch.testing.assert_close(ours[0], verl[0])
    torch.testing.assert_close(ours[1], verl[1])
    assert not torch.allclose(ours[0], unweighted[0])


@pytest.mark.parametrize("mode", VERL_MODES)
def test_ce_gppo_through_verl_equals_direct_call(mode: str) -> None:
    batch = random_batch(seed=11)
    verl_config = actor_config(
        DP2_NORM,
        clip_ratio_low=0.2,
        clip_ratio_high=0.2,
        clip_ratio_c=10.0,
        policy_loss=CEGPPOPolicyLossConfig(loss_mode="ce_gppo", beta1=0.75, beta2=1.0),
    )
    ours_config = PolicyLossConfig(
        beta1=0.75, beta2=1.0, clip_ratio_c=10.0, dp_size=2, batch_num_tokens=61, global_batch_size=13,
        loss_scale_factor=32,
    )  # fmt: skip
    direct_mode = mode
    if mode == "token-sum":
        ours_config, direct_mode = (
            PolicyLossConfig(beta1=0.75, clip_ratio_c=10.0, dp_size=2, batch_num_tokens=1),
            "token-mean",
        )
    via_verl = run(core_algos.get_policy_loss_fn("ce_gppo"), batch, mode, verl_config)
    direct = run(get_policy_loss_fn("ce_gppo"), batch, direct_mode, ours_config)
    torch.testing.assert_close(via_verl[0], direct[0])
    torch.testing.assert_close(via_verl[1], direct[1])
    assert via_verl[2] == {**direct[2], "actor/pg_clipfrac_lower": direct[2]["actor/pg_clipfrac_dual"]}
    assert direct[2]["actor/pg_clipfrac_low"] > 0 and direct[2]["actor/pg_clipfrac_high"] > 0


def test_token_sum_is_the_masked_sum_times_dp_size() -> None:
    batch = random_batch(seed=13)
    loss, _, _ = run(core_algos.get_policy_loss_fn("gpg"), batch, "token-sum", actor_config(DP2))
    ours, _, _ = run(core_algos.get_policy_loss_fn("cegppo_gpg"), batch, "token-sum", actor_config(DP2))
    expected = -(batch["advantages"] * batch["log_prob"].detach() * batch["response_mask"]).sum() * 2
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours, loss)


def test_plain_verl_config_uses_the_paper_betas() -> None:
    batch = random_batch(seed=17)
    config = actor_config(policy_loss=VerlPolicyLossConfig(loss_mode="ce_gppo"), clip_ratio_high=0.2)
    via_verl = run(core_algos.get_policy_loss_fn("ce_gppo"), batch, "token-mean", config)
    paper = run(get_policy_loss_fn("ce_gppo"), batch, "token-mean", PolicyLossConfig(clip_ratio_c=3.0))
    other = run(
        get_policy_loss_fn("ce_gppo"), batch, "token-mean", PolicyLossConfig(beta1=0.75, clip_ratio_c=3.0)
    )
    torch.testing.assert_close(via_verl[1], paper[1])
    assert not torch.allclose(via_verl[1], other[1])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_global_batch_info_makes_two_ranks_equal_the_whole_batch(mode: str) -> None:
    """Two data-parallel ranks normalising by the global counts: the mean of their gradients (what all-reduce
    takes) equals the gradient of the whole batch computed on one rank."""
    batch = random_batch(seed=19, rows=8)
    mask = batch["response_mask"]
    info = {
        "dp_size": 2,
        "batch_num_tokens": int(mask.sum()),
        "global_batch_size": int((mask.sum(-1) > 0).sum()),
        "loss_scale_factor": None,
    }
    fn = core_algos.get_policy_loss_fn("ce_gppo")
    whole_loss, whole_grad, _ = run(fn, batch, mode, actor_config(clip_ratio_c=10.0))
    ranks = [
        run(fn, {k: v[i::2] for k, v in batch.items()}, mode, actor_config(info, clip_ratio_c=10.0))
        for i in (0, 1)
    ]
    torch.testing.assert_close((ranks[0][0] + ranks[1][0]) / 2, whole_loss)
    merged = torch.empty_like(whole_grad)
    merged[0::2], merged[1::2] = ranks[0][1] / 2, ranks[1][1] / 2
    torch.testing.assert_close(merged, whole_grad)


def test_config_translation() -> None:
    config = actor_config(
        {
            "dp_size": 4,
            "batch_num_tokens": torch.tensor(120.0),
            "global_batch_size": 16,
            "loss_scale_factor": 8,
        },
        clip_ratio=0.3,
        clip_ratio_low=None,
        clip_ratio_high=None,
        clip_ratio_c=5.0,
        policy_loss=CEGPPOPolicyLossConfig(
            beta1=0.25, beta2=0.9, clip_cov_ratio=1e-3, ppo_kl_coef=0.1, vespo_k_neg=1.5, dro_beta=0.2
        ),
        tau_neg=2.0,
    )
    ours = policy_loss_config_from_verl(config)
    assert (ours.clip_ratio_low, ours.clip_ratio_high, ours.clip_ratio_c) == (0.3, 0.3, 5.0)
    assert (ours.beta1, ours.beta2, ours.clip_cov_ratio, ours.ppo_kl_coef) == (0.25, 0.9, 1e-3, 0.1)
    assert (ours.dp_size, ours.batch_num_tokens, ours.global_batch_size) == (4, 120, 16)
    assert ours.loss_scale_factor == 8
    assert (ours.vespo_k_neg, ours.dro_beta, ours.tau_pos, ours.tau_neg) == (1.5, 0.2, 1.0, 2.0)
    assert (ours.rollout_is, ours.rollout_is_threshold, ours.bypass_loss_type) == (
        "sequence",
        2.0,
        "ppo_clip",
    )


def test_bad_settings_fail_with_the_key_named() -> None:
    with pytest.raises(ValueError, match="beta1"):
        CEGPPOPolicyLossConfig(beta1=-0.5)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        policy_loss_config_from_verl(actor_config({"batch_num_tokens": 12.5}))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss_config_from_verl(actor_config(clip_ratio_c=0.5))
    with pytest.raises(ValueError, match="no actor config"):
        core_algos.get_policy_loss_fn("ce_gppo")(**random_batch(seed=1), config=None)


def compose_actor(overrides: list[str]):
    """The actor config exactly as verl builds it: Hydra compose + ``omega_conf_to_dataclass``."""
    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    return omega_conf_to_dataclass(config.actor_rollout_ref.actor)


TARGET = "actor_rollout_ref.actor.policy_loss._target_=cegppo.integrations.verl.CEGPPOPolicyLossConfig"


def test_target_override_brings_beta1_to_the_loss() -> None:
    actor = compose_actor(
        [
            "actor_rollout_ref.actor.policy_loss.loss_mode=ce_gppo",
            TARGET,
            "+actor_rollout_ref.actor.policy_loss.beta1=0.75",
            "actor_rollout_ref.actor.clip_ratio_c=10.0",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        ]
    )
    assert isinstance(actor.policy_loss, CEGPPOPolicyLossConfig)
    assert (actor.policy_loss.beta1, actor.policy_loss.beta2) == (0.75, 1.0)
    batch = random_batch(seed=23)
    via_verl = run(
        core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode), batch, actor.loss_agg_mode, actor
    )
    direct = run(get_policy_loss_fn("ce_gppo"), batch, "token-mean", PolicyLossConfig(beta1=0.75))
    torch.testing.assert_close(via_verl[0], direct[0])
    torch.testing.assert_close(via_verl[1], direct[1])


def test_target_override_rejects_a_bad_beta_when_verl_builds_the_config() -> None:
    overrides = [
        TARGET,
        "+actor_rollout_ref.actor.policy_loss.beta2=-1",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    ]
    with pytest.raises(Exception, match="beta2"):
        compose_actor(overrides)


def test_verls_ppo_loss_call_site() -> None:
    """verl's own ``ppo_loss`` (engine workers): unpadded log-probs, bool mask, global batch info in the data."""
    batch = random_batch(seed=29)
    prompt_len = 2
    mask = batch["response_mask"]
    # Per-token log-probs of whole sequences, flattened; verl reads response token t at position prompt_len+t-1.
    flat = torch.zeros(BATCH, prompt_len + LENGTH, dtype=torch.float64)
    flat[:, prompt_len - 1 : prompt_len + LENGTH - 1] = batch["log_prob"].detach()
    flat = flat.reshape(-1).requires_grad_(True)
    data = TensorDict(
        {
            "prompts": torch.ones(BATCH, prompt_len, dtype=torch.long),
            "responses": torch.ones(BATCH, LENGTH, dtype=torch.long),
            "attention_mask": torch.ones(BATCH, prompt_len + LENGTH, dtype=torch.long),
            "response_mask": mask.long(),
            "old_log_probs": batch["old_log_prob"],
            "advantages": batch["advantages"],
        },
        batch_size=[BATCH],
    )
    tensordict_utils.assign_non_tensor(data, dp_size=2, batch_num_tokens=61, global_batch_size=13)
    config = actor_config(
        clip_ratio_c=10.0, policy_loss=CEGPPOPolicyLossConfig(loss_mode="ce_gppo", beta1=0.75)
    )
    loss, metrics = ppo_loss(config, {"log_probs": flat}, data)
    ours = PolicyLossConfig(
        beta1=0.75,
        clip_ratio_high=0.28,
        clip_ratio_c=10.0,
        dp_size=2,
        batch_num_tokens=61,
        global_batch_size=13,
    )
    expected, expected_grad, _ = run(get_policy_loss_fn("ce_gppo"), batch, "token-mean", ours)
    torch.testing.assert_close(loss.detach(), expected)
    (grad,) = torch.autograd.grad(loss, flat)
    torch.testing.assert_close(grad.reshape(BATCH, -1)[:, prompt_len - 1 : -1], expected_grad)
    assert {"actor/pg_clipfrac_low", "actor/pg_clipfrac_high", "actor/pg_clipfrac_dual"} <= set(metrics)


def test_verl_plugins_entry_point_loads_the_plugin_on_import_verl(tmp_path: Path) -> None:
    """The ``[project.entry-points."verl.plugins"]`` line of pyproject.toml: verl imports it on ``import verl``."""
    dist = tmp_path / "cegppo_entry_point_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cegppo-entry-point-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\ncegppo = cegppo.integrations.verl\n")
    code = (
        "import verl\n"
        "import sys\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
        "print('cegppo.integrations.verl' in sys.modules, 'ce_gppo' in POLICY_LOSS_REGISTRY)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src")])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "True True"


def launch(script: str, tmp_path: Path, **env: str) -> dict:
    """Run an examples/verl script with verl's launcher replaced by verl_launch_stub.py."""
    stub = Path(__file__).with_name("verl_launch_stub.py")
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "PYTHON": sys.executable,
        "LAUNCH": f"{sys.executable} {stub}",
        "DATA_DIR": str(tmp_path),
        **env,
    }
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "verl" / script)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("script", "beta1"), [("run_1.5b.sh", 0.5), ("run_7b.sh", 0.75)])
def test_paper_recipe_scripts_compose_and_validate(script: str, beta1: float, tmp_path: Path) -> None:
    settings = launch(script, tmp_path)
    assert settings["loss_mode"] == "ce_gppo"
    assert settings["policy_loss_class"] == "CEGPPOPolicyLossConfig"
    assert settings["external_lib"] == "cegppo.integrations.verl"
    assert settings["reward_file_exists"]
    assert settings["ours"] == {
        "beta1": beta1, "beta2": 1.0, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 10.0
    }  # fmt: skip
    assert settings["loss_agg_mode"] == "token-mean"
    assert (settings["train_batch_size"], settings["rollout_n"], settings["ppo_mini_batch_size"]) == (
        128,
        8,
        16,
    )
    assert settings["world_size"] == 128
    assert settings["val_files"] == [str(tmp_path / "aime24.parquet"), str(tmp_path / "aime25.parquet")]


def test_smoke_script_prepares_data_that_verl_reads(
    tmp_path: Path, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    settings = launch("run_smoke_qwen2.5_0.5b_gsm8k.sh", tmp_path)
    assert settings["loss_mode"] == "ce_gppo" and settings["world_size"] == 1
    assert settings["ours"]["beta1"] == 0.5
    dataset = RLHFDataset(
        [settings["train_files"]],
        tiny_tokenizer,
        OmegaConf.create(
            {"max_prompt_length": 512, "filter_overlong_prompts": False, "cache_dir": str(tmp_path)}
        ),
    )
    assert len(dataset) == 1319
    row = dataset[0]
    assert row["data_source"] == "gsm8k"
    assert row["reward_model"]["ground_truth"] == "18"
    assert row["raw_prompt"][-1]["content"].endswith("put your final answer within \\boxed{}.")


def test_recipe_reward_is_plus_minus_one() -> None:
    """examples/verl/reward.py, called with verl's custom-reward signature (verl's math-verify scorer)."""
    spec = importlib.util.spec_from_file_location("recipe_reward", REPO / "examples" / "verl" / "reward.py")
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    right = reward.compute_score("aime24", "so the answer is \\boxed{\\frac{1}{2}}.", "0.5", extra_info={})
    wrong = reward.compute_score("aime24", "so the answer is \\boxed{3}.", "0.5", extra_info={})
    assert right == {"score": 1.0, "acc": 1.0}
    assert wrong == {"score": -1.0, "acc": 0.0}


def test_dgpo_exponents_reach_the_loss_through_the_target_override() -> None:
    actor = compose_actor(
        [
            "actor_rollout_ref.actor.policy_loss.loss_mode=dgpo",
            TARGET,
            "+actor_rollout_ref.actor.policy_loss.dgpo_n=2",
            "+actor_rollout_ref.actor.policy_loss.dgpo_m=3",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        ]
    )
    batch = random_batch(seed=29)
    via_verl = run(core_algos.get_policy_loss_fn("dgpo"), batch, actor.loss_agg_mode, actor)
    config = PolicyLossConfig(dgpo_n=2, dgpo_m=3, clip_ratio_c=actor.clip_ratio_c)
    direct = run(get_policy_loss_fn("dgpo"), batch, "token-mean", config)
    torch.testing.assert_close(via_verl[0], direct[0])
    torch.testing.assert_close(via_verl[1], direct[1])
    default = run(get_policy_loss_fn("dgpo"), batch, "token-mean", PolicyLossConfig())
    assert not torch.allclose(via_verl[1], default[1])
    with pytest.raises(ValueError, match="dgpo_m"):
        CEGPPOPolicyLossConfig(dgpo_m=0.0)


def test_an_unknown_loss_name_fails_when_verl_builds_the_config() -> None:
    """verl looks the loss up only at the first update, after a rollout; with the _target_ line the name is
    checked when verl builds the actor config (validate_config on the driver, before Ray starts)."""
    overrides = [
        "actor_rollout_ref.actor.policy_loss.loss_mode=ce-gppo",
        TARGET,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    ]
    with pytest.raises(Exception, match="ce-gppo") as error:
        compose_actor(overrides)
    assert "actor_rollout_ref.model.external_lib=cegppo.integrations.verl" in str(error.value)
    assert "'ce_gppo'" in str(error.value)


def test_the_target_line_loads_the_plugin_where_verl_builds_the_config() -> None:
    """With verl's plug-in discovery off and cegppo not imported, composing a config that names
    CEGPPOPolicyLossConfig registers cegppo's losses in that process (as in each Ray worker)."""
    code = (
        "import os, sys\n"
        "sys.path.insert(0, os.environ['TESTS_DIR'])\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
        "before = 'ce_gppo' in POLICY_LOSS_REGISTRY\n"
        "from test_verl import TARGET, compose_actor\n"
        "actor = compose_actor(['actor_rollout_ref.actor.policy_loss.loss_mode=ce_gppo', TARGET,\n"
        "                       'actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2'])\n"
        "print(before, 'ce_gppo' in POLICY_LOSS_REGISTRY, type(actor.policy_loss).__name__)\n"
    )
    env = {
        **os.environ,
        "VERL_USE_EXTERNAL_PLUGINS": "none",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
        "TESTS_DIR": str(Path(__file__).parent),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False True CEGPPOPolicyLossConfig"


def test_the_releases_spellings_are_accepted() -> None:
    """loss_func=gppo_general and gppo_loss_beta1/2 of the authors' release (a verl 0.2 fork), in verl 0.9's
    policy_loss section; its positive_loss_coeff (an SFT term stock verl lacks) is refused, not ignored."""
    actor = compose_actor(
        [
            "actor_rollout_ref.actor.policy_loss.loss_mode=gppo_general",
            TARGET,
            "+actor_rollout_ref.actor.policy_loss.gppo_loss_beta1=0.75",
            "+actor_rollout_ref.actor.policy_loss.gppo_loss_beta2=1.0",
            "actor_rollout_ref.actor.clip_ratio_c=10.0",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        ]
    )
    assert (actor.policy_loss.beta1, actor.policy_loss.beta2) == (0.75, 1.0)
    batch = random_batch(seed=37)
    via_verl = run(core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode), batch, "token-mean", actor)
    config = PolicyLossConfig(beta1=0.75, clip_ratio_high=actor.clip_ratio_high, clip_ratio_c=10.0)
    direct = run(get_policy_loss_fn("ce_gppo"), batch, "token-mean", config)
    torch.testing.assert_close(via_verl[0], direct[0])
    torch.testing.assert_close(via_verl[1], direct[1])
    with pytest.raises(ValueError, match="disagree"):
        CEGPPOPolicyLossConfig(beta1=0.3, gppo_loss_beta1=0.75)
    with pytest.raises(ValueError, match="positive_loss_coeff"):
        CEGPPOPolicyLossConfig(positive_loss_coeff=0.1)


def test_verl_bounds_in_pyproject_are_the_tested_ones() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import verl
    from packaging.requirements import Requirement

    from cegppo.integrations._versions import SUPPORTED

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [Requirement(line).specifier for line in extras["verl"]] == [SUPPORTED["verl"]]
    assert verl.__version__ in SUPPORTED["verl"]
