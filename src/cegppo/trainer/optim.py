"""The policy's optimiser: AdamW (fused), optionally on float32 master weights kept on the CPU.

``actor.param_dtype=bfloat16`` holds the policy in bfloat16 and lets AdamW update float32 master copies of its
parameters (the mixed precision of verl's FSDP actor, DeepSpeed and Megatron): plain bfloat16 AdamW would round
away every step smaller than half a bfloat16 ulp, and at the paper's lr = 1e-6 that is nearly every step of every
weight. ``actor.optimizer_offload`` keeps the master weights and AdamW's moments on the CPU and takes the step
there (DeepSpeed's ZeRO-Offload): the GPU then holds only the weights, their gradients and the activations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cegppo.config import ActorConfig


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on float32 master copies of ``params`` held on ``master_device``.

    Each backward's gradient of a model parameter is added, in float32, to its master's gradient as soon as it
    is complete (a post-accumulate-grad hook) and the parameter's own ``.grad`` is released, so micro-batch
    gradients accumulate in float32 on the master device. The optimiser's ``param_groups`` hold the masters:
    clip their gradients (:func:`trained_parameters`), not the model's. After each step the masters are copied
    (rounded) into the model's parameters. ``state_dict`` carries the masters, so a checkpoint or a probe's copy
    restores them exactly.

    With float32 parameters on the master device the update equals ``torch.optim.AdamW``'s bit for bit.
    """

    def __init__(self, params: Iterable[nn.Parameter], *, master_device: torch.device, **adamw: Any) -> None:
        self.model_params = list(params)
        pin = master_device.type == "cpu" and any(p.is_cuda for p in self.model_params)
        masters = []
        for param in self.model_params:
            master = param.detach().to(device=master_device, dtype=torch.float32, copy=True)
            masters.append(master.pin_memory() if pin else master)  # faster copies back to the GPU
        super().__init__(masters, **adamw)
        self.masters = masters
        self._master_of = {param: master for param, master in zip(self.model_params, masters, strict=True)}
        self._hooks = [
            param.register_post_accumulate_grad_hook(self._take_grad) for param in self.model_params
        ]

    def _take_grad(self, param: torch.Tensor) -> None:
        master = self._master_of[param]
        grad = param.grad.to(master.device)  # in the parameter's dtype: half the bytes over PCIe for bfloat16
        if master.grad is None:  # may be param.grad itself (float32 on the same device): released below
            master.grad = grad.float()
        else:
            master.grad.add_(grad)  # exact upcast, float32 sum
        param.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for param, master in zip(self.model_params, self.masters, strict=True):
            param.copy_(master, non_blocking=True)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for param in self.model_params:
            param.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "master_params": list(self.masters)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_params", None)
        if saved is None or len(saved) != len(self.masters):
            raise ValueError(
                "the optimizer state has no float32 master weights for this model: it was saved with "
                "actor.param_dtype=float32 and actor.optimizer_offload=false; resume with those settings"
            )
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for master, value in zip(self.masters, saved, strict=True):
                master.copy_(value)


def build_optimizer(params: Iterable[nn.Parameter], actor: ActorConfig) -> torch.optim.Optimizer:
    """AdamW as ``actor`` configures it: on float32 masters (:class:`MasterWeightAdamW`) when the parameters
    are not float32 or ``actor.optimizer_offload`` is set, else torch's AdamW; fused (:func:`adamw_implementation`)."""
    params = [param for param in params if param.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    settings = {"lr": actor.lr, "betas": tuple(actor.adam_betas), "weight_decay": actor.weight_decay}
    device = params[0].device
    masters_needed = actor.optimizer_offload or any(p.dtype != torch.float32 for p in params)
    if not masters_needed:
        return torch.optim.AdamW(params, **settings, **adamw_implementation(device))
    master_device = torch.device("cpu") if actor.optimizer_offload else device
    return MasterWeightAdamW(
        params, master_device=master_device, **settings, **adamw_implementation(master_device)
    )


def adamw_implementation(device: torch.device) -> dict[str, bool]:
    """torch's fused AdamW kernel on CUDA and the CPU (one pass over each parameter's tensors, as HF's default
    ``adamw_torch_fused``; on the CPU torch's default is a loop of elementwise ops per tensor, one memory pass
    each: 135M parameters took 0.44-0.89 s a step there against 0.09 s fused); torch's default elsewhere."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {}


def trained_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors the optimiser updates and whose gradients are clipped: the model's parameters, or their
    float32 masters (:class:`MasterWeightAdamW`)."""
    return [param for group in optimizer.param_groups for param in group["params"]]


@torch.no_grad()
def allocate_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state (step count and both moments) now rather than inside the first update.

    Run before the rollout engine starts, so that the memory vLLM sizes itself against already holds the
    optimiser's state, and the state's blocks are not carved out of what vLLM frees when it sleeps. Uses
    AdamW's own step (so the tensors have the dtype and device it would give them) on zero gradients at
    lr = 0, which leaves every parameter and moment exactly as it was, then resets the step count: the updates
    that follow equal those of an optimiser whose state was created lazily.
    """
    params = [param for param in trained_parameters(optimizer) if not optimizer.state.get(param)]
    if not params:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for param in params:
        param.grad = torch.zeros_like(param)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        torch.optim.AdamW.step(optimizer)  # AdamW's own: no copy to a model, no LR-scheduler bookkeeping
    finally:
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        for param in params:
            param.grad = None
    for param in params:
        optimizer.state[param]["step"].zero_()
