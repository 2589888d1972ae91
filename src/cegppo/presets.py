"""Named settings: GRPO, DAPO, GPPO, CE-GPPO at any (β1, β2) and the methods that compete with it, as overrides.

One definition for ``cegppo train --preset NAME``, ``cegppo sweep --variants NAME`` and the message that answers
``actor.policy_loss=grpo`` (GRPO and DAPO are configurations of the ``vanilla`` loss, not losses of their own).
"""

from __future__ import annotations

import re

from cegppo.losses import list_policy_losses

# CE-GPPO §5.1's comparison on the demo task; 2+ updates per rollout batch come from the base config.
VARIANTS: dict[str, list[str]] = {
    "grpo": ["actor.policy_loss=vanilla", "actor.clip_ratio_low=0.2", "actor.clip_ratio_high=0.2"],
    "dapo": ["actor.policy_loss=vanilla", "actor.clip_ratio_low=0.2", "actor.clip_ratio_high=0.28"],
    "gppo": ["actor.policy_loss=gppo"],
    "ce_gppo_b0_1": [
        "actor.policy_loss=ce_gppo",
        "actor.policy_loss.beta1=0.0",
        "actor.policy_loss.beta2=1.0",
    ],
    "ce_gppo_b0.5_1": [
        "actor.policy_loss=ce_gppo",
        "actor.policy_loss.beta1=0.5",
        "actor.policy_loss.beta2=1.0",
    ],
    "ce_gppo_b0.75_1": [
        "actor.policy_loss=ce_gppo",
        "actor.policy_loss.beta1=0.75",
        "actor.policy_loss.beta2=1.0",
    ],
    "ce_gppo_b1_0.5": [
        "actor.policy_loss=ce_gppo",
        "actor.policy_loss.beta1=1.0",
        "actor.policy_loss.beta2=0.5",
    ],
}
# CE-GPPO at any (β1, β2) by name, e.g. ce_gppo_b0_1.5 (the entropy-raising end of docs/results.md's study)
_CE_GPPO_AT = re.compile(r"ce_gppo_b(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)")
# The entropy-target controller from the paper's (0.5, 1), moving β1 and β2 between the study's two ends,
# (1, 0.5) and (0, 1.5); its band is the base config's actor.entropy_control.target_low/high (the study's is in
# configs/entropy_study_cpu.yaml).
CONTROLLER = [
    "actor.policy_loss=ce_gppo",
    "actor.policy_loss.beta1=0.5",
    "actor.policy_loss.beta2=1.0",
    "actor.entropy_control.enabled=true",
    "actor.entropy_control.step_size=0.25",
    "actor.entropy_control.adjust_beta2=true",
    "actor.entropy_control.beta2_min=0.5",
    "actor.entropy_control.beta2_max=1.5",
]

# Methods that compete with CE-GPPO in their papers' settings, beyond a loss's own name (--variants NAME,...).
_DAPO = ["actor.clip_ratio_low=0.2", "actor.clip_ratio_high=0.28"]
METHODS: dict[str, list[str]] = {
    "dapo_erc": ["actor.policy_loss=grpo_erc", *_DAPO],  # ERC on DAPO, arXiv 2512.05591
    "dapo_80_20": ["actor.policy_loss=vanilla", *_DAPO, "actor.top_entropy_quantile=0.2"],  # arXiv 2506.01939
    # Skywork-OR1's controller, with a target at the demo task's entropy (~0.1 nats; its paper's 0.2 never binds)
    "grpo_adaptive_entropy": [
        "actor.policy_loss=vanilla",
        "actor.use_adaptive_entropy=true",
        "actor.entropy_target=0.1",
    ],
    "ce_gppo_control": CONTROLLER,
}

# Any registered loss is a variant by its name, with its paper's band where that differs from the base config's.
PAPER_SETTINGS: dict[str, list[str]] = {
    "gspo": ["actor.clip_ratio_low=0.0003", "actor.clip_ratio_high=0.0004"],
    "geo_mean": ["actor.clip_ratio_low=0.4", "actor.clip_ratio_high=0.4"],
}


def variant_overrides(name: str) -> list[str]:
    """The overrides of a named preset: one of ``VARIANTS`` or ``METHODS``, ``ce_gppo_b<β1>_<β2>``, or a registered
    loss with its paper's settings."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name in METHODS:
        return METHODS[name]
    if match := _CE_GPPO_AT.fullmatch(name):
        return [
            "actor.policy_loss=ce_gppo",
            f"actor.policy_loss.beta1={match[1]}",
            f"actor.policy_loss.beta2={match[2]}",
        ]
    if name in list_policy_losses():
        return [f"actor.policy_loss={name}", *PAPER_SETTINGS.get(name, [])]
    raise ValueError(
        f"unknown preset {name!r}: known are {[*VARIANTS, *METHODS]}, ce_gppo_b<β1>_<β2> and the losses "
        f"{list_policy_losses()}"
    )


# What a preset leaves to other settings, said where its name is mistaken for a loss.
NOTES: dict[str, str] = {
    "grpo": "GRPO's advantage is algorithm.adv_estimator=grpo, the default",
    "dapo": "DAPO's dynamic sampling and overlong reward shaping are algorithm.filter_groups=true and "
    "reward.overlong_buffer_len",
}


def is_preset(name: str) -> bool:
    """Whether ``name`` names a configuration (not a registered loss of its own)."""
    return name in VARIANTS or name in METHODS or _CE_GPPO_AT.fullmatch(name) is not None
