"""The optimiser: float32 master weights (bfloat16 policy, CPU offload), state allocated up front, fused."""

from __future__ import annotations

import copy

import pytest
import torch

from _tiny import tiny_model
from cegppo.config import ActorConfig
from cegppo.trainer.optim import (
    MasterWeightAdamW,
    adamw_implementation,
    allocate_state,
    build_optimizer,
    trained_parameters,
)

SETTINGS = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}


def _inputs(seed: int) -> torch.Tensor:
    return torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(seed))


def _train(model, optimizer, steps: int = 3, micro_batches: int = 2, clip: float = 0.5) -> list[float]:
    """``steps`` updates of ``micro_batches`` accumulated backwards each, clipped as the actor clips."""
    norms = []
    for step in range(steps):
        for micro in range(micro_batches):
            input_ids = _inputs(10 * step + micro)
            model(input_ids=input_ids, labels=input_ids).loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(trained_parameters(optimizer), clip).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def test_float32_masters_on_the_master_device_equal_adamw_bit_for_bit():
    reference, offloaded = tiny_model(eos_bias=0), tiny_model(eos_bias=0)
    expected_norms = _train(reference, torch.optim.AdamW(reference.parameters(), **SETTINGS))
    optimizer = MasterWeightAdamW(offloaded.parameters(), master_device=torch.device("cpu"), **SETTINGS)
    assert _train(offloaded, optimizer) == expected_norms
    for (name, expected), actual in zip(reference.named_parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(expected, actual), name
    assert all(param.grad is None for param in offloaded.parameters())


def test_bfloat16_policy_updates_float32_masters_with_float32_accumulated_gradients():
    policy = tiny_model(eos_bias=0).to(torch.bfloat16)
    start = [param.detach().float().clone() for param in policy.parameters()]
    optimizer = MasterWeightAdamW(policy.parameters(), master_device=torch.device("cpu"), **SETTINGS)
    # The reference: torch's AdamW on float32 copies, fed the bfloat16 micro-batch gradients summed in float32.
    copies = [torch.nn.Parameter(value.clone()) for value in start]
    reference = torch.optim.AdamW(copies, **SETTINGS)
    for step in range(2):
        summed = None
        for micro in range(2):
            input_ids = _inputs(10 * step + micro)
            grads = torch.autograd.grad(
                policy(input_ids=input_ids, labels=input_ids).loss, list(policy.parameters())
            )
            grads = [grad.float() for grad in grads]
            summed = grads if summed is None else [a + b for a, b in zip(summed, grads, strict=True)]
            input_ids = _inputs(10 * step + micro)
            policy(input_ids=input_ids, labels=input_ids).loss.backward()
        for copy_, grad in zip(copies, summed, strict=True):
            copy_.grad = grad
        torch.nn.utils.clip_grad_norm_(copies, 0.5)
        torch.nn.utils.clip_grad_norm_(trained_parameters(optimizer), 0.5)
        reference.step()
        optimizer.step()
        optimizer.zero_grad()
    for master, copy_, param in zip(optimizer.masters, copies, policy.parameters(), strict=True):
        assert torch.equal(master, copy_.detach())
        assert param.dtype == torch.bfloat16 and torch.equal(param, master.to(torch.bfloat16))


def test_masters_keep_the_small_steps_that_bfloat16_adamw_rounds_away():
    """At lr = 1e-6 (the paper's) one AdamW step moves almost no bfloat16 weight: each is below half an ulp."""
    plain_model = tiny_model(eos_bias=0).to(torch.bfloat16)
    master_model = copy.deepcopy(plain_model)
    before = [param.detach().clone() for param in plain_model.parameters()]
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-6)
    masters = MasterWeightAdamW(master_model.parameters(), master_device=torch.device("cpu"), lr=1e-6)
    for model, optimizer in ((plain_model, plain), (master_model, masters)):
        input_ids = _inputs(0)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
    moved_plain = sum((p != b).sum().item() for p, b in zip(plain_model.parameters(), before, strict=True))
    moved_masters = sum((m != b.float()).sum().item() for m, b in zip(masters.masters, before, strict=True))
    total = sum(b.numel() for b in before)
    # (embedding rows of tokens not in the batch have no gradient: neither moves them)
    assert moved_plain < 0.05 * total and moved_masters > 20 * moved_plain


@pytest.mark.parametrize("kind", ["adamw", "masters"])
def test_state_allocated_up_front_changes_nothing_that_follows(kind):
    def make(model):
        if kind == "adamw":
            return torch.optim.AdamW(model.parameters(), **SETTINGS)
        return MasterWeightAdamW(model.parameters(), master_device=torch.device("cpu"), **SETTINGS)

    lazy_model, eager_model = tiny_model(eos_bias=0), tiny_model(eos_bias=0)
    lazy, eager = make(lazy_model), make(eager_model)
    allocate_state(eager)
    for param in trained_parameters(eager):
        state = eager.state[param]
        assert state["step"].item() == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        assert param.grad is None
    assert all(
        torch.equal(a, b) for a, b in zip(lazy_model.parameters(), eager_model.parameters(), strict=True)
    )
    assert [group["lr"] for group in eager.param_groups] == [SETTINGS["lr"]]
    assert _train(eager_model, eager) == _train(lazy_model, lazy)
    assert all(
        torch.equal(a, b) for a, b in zip(lazy_model.parameters(), eager_model.parameters(), strict=True)
    )


def test_master_state_round_trips_exactly_and_refuses_a_plain_adamw_state():
    model = tiny_model(eos_bias=0).to(torch.bfloat16)
    optimizer = MasterWeightAdamW(model.parameters(), master_device=torch.device("cpu"), **SETTINGS)
    _train(model, optimizer, steps=1)
    resumed_model = copy.deepcopy(model)
    resumed = MasterWeightAdamW(resumed_model.parameters(), master_device=torch.device("cpu"), **SETTINGS)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    # the bfloat16 weights alone would not restore the masters: the next steps would differ
    assert _train(resumed_model, resumed, steps=2) == _train(model, optimizer, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(resumed.masters, optimizer.masters, strict=True))
    plain = torch.optim.AdamW(tiny_model(eos_bias=0).parameters(), **SETTINGS)
    with pytest.raises(ValueError, match=r"actor\.param_dtype=float32"):
        resumed.load_state_dict(plain.state_dict())


def test_build_optimizer_follows_the_actor_settings():
    model = tiny_model(eos_bias=0)
    plain = build_optimizer(model.parameters(), ActorConfig())
    assert type(plain) is torch.optim.AdamW and plain.defaults["fused"]
    offloaded = build_optimizer(model.parameters(), ActorConfig(optimizer_offload=True))
    assert isinstance(offloaded, MasterWeightAdamW) and offloaded.masters[0].device.type == "cpu"
    policy = tiny_model(eos_bias=0).to(torch.bfloat16)
    mixed = build_optimizer(policy.parameters(), ActorConfig(param_dtype="bfloat16", lr=3e-6))
    assert isinstance(mixed, MasterWeightAdamW) and mixed.masters[0].dtype == torch.float32
    assert mixed.param_groups[0]["lr"] == 3e-6
    assert adamw_implementation(torch.device("cuda", 1)) == {"fused": True}
    assert adamw_implementation(torch.device("cpu")) == {"fused": True}
    assert adamw_implementation(torch.device("mps")) == {}


def test_the_fused_kernel_on_the_cpu_takes_the_default_implementation_s_steps_to_rounding():
    default, fused = tiny_model(eos_bias=0), tiny_model(eos_bias=0)
    expected_norms = _train(default, torch.optim.AdamW(default.parameters(), **SETTINGS))
    norms = _train(fused, torch.optim.AdamW(fused.parameters(), **SETTINGS, fused=True))
    assert norms == pytest.approx(expected_norms, rel=1e-5)
    for (name, expected), actual in zip(default.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)
