"""Group advantage estimators and DAPO's uniform-group filter."""

from __future__ import annotations

import pytest
import torch

from cegppo.advantages import get_advantage_fn, uniform_groups

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])


def test_grpo_normalises_by_the_unbiased_group_std():
    adv = get_advantage_fn("grpo")(REWARDS, GROUPS)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    assert adv[0].item() == pytest.approx(0.5 / (std + 1e-6), rel=1e-6)
    assert adv[1].item() == pytest.approx(-0.5 / (std + 1e-6), rel=1e-6)
    assert torch.all(adv[4:8] == 0)
    assert adv[8].item() == 0.5  # a group of one keeps its reward, as verl


def test_dr_grpo_and_rloo():
    dr = get_advantage_fn("dr_grpo")(REWARDS, GROUPS)
    assert dr[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    rloo = get_advantage_fn("rloo")(REWARDS, GROUPS)
    # r_0 minus the mean of the other three: 1 - 1/3
    assert rloo[0].item() == pytest.approx(2 / 3)
    assert rloo[1].item() == pytest.approx(0 - 2 / 3)


def test_groups_need_not_be_contiguous():
    perm = torch.randperm(len(REWARDS), generator=torch.Generator().manual_seed(0))
    adv = get_advantage_fn("grpo")(REWARDS, GROUPS)
    torch.testing.assert_close(get_advantage_fn("grpo")(REWARDS[perm], GROUPS[perm]), adv[perm])


def test_uniform_groups_marks_groups_without_signal():
    assert uniform_groups(REWARDS, GROUPS).tolist() == [False] * 4 + [True] * 5


def test_errors():
    with pytest.raises(ValueError, match="grpo"):
        get_advantage_fn("ppo")
    with pytest.raises(ValueError, match="equal length"):
        get_advantage_fn("grpo")(REWARDS, GROUPS[:3])
