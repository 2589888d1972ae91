"""TRL 1.16's entropy options against ours (skipped without TRL): ``top_entropy_quantile`` and
``use_adaptive_entropy``.

The token selection is checked against ``GRPOTrainer.get_high_entropy_mask`` itself, called on one process;
the controller against the coefficients a ``GRPOTrainer`` run with ``use_adaptive_entropy=True`` goes through,
fed the entropies that run measured.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from _tiny import tiny_model
from cegppo.config import load_config
from cegppo.losses import high_entropy_threshold, select_high_entropy
from cegppo.trainer.steering import AdaptiveEntropyCoefficient

# What accelerate's pad_across_processes and gather do on a single process.
ONE_PROCESS = SimpleNamespace(
    accelerator=SimpleNamespace(pad_across_processes=lambda t, dim, pad_index: t, gather=lambda t: t)
)


def trl_high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    return GRPOTrainer.get_high_entropy_mask(ONE_PROCESS, entropy, mask, 1 - top_quantile)


@pytest.mark.parametrize("top_quantile", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_equals_trls_high_entropy_mask(top_quantile: float, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(int(top_quantile * 10))
    entropy = (torch.rand(9, 13, generator=generator) * 4).to(dtype)
    entropy[2, :4] = entropy[2, 4]  # ties
    mask = torch.rand(9, 13, generator=generator) > 0.3
    mask[5] = False  # an all-padding row
    ours = select_high_entropy(entropy, mask, high_entropy_threshold(entropy, mask, top_quantile))
    theirs = trl_high_entropy_mask(entropy, mask.int(), top_quantile)
    assert torch.equal(ours, theirs)
    assert ours.any()


def test_selection_of_an_empty_batch_is_empty_as_in_trl() -> None:
    entropy, mask = torch.rand(3, 4), torch.zeros(3, 4, dtype=torch.int64)
    theirs = trl_high_entropy_mask(entropy, mask, 0.2)
    assert torch.equal(select_high_entropy(entropy, mask, high_entropy_threshold(entropy, mask, 0.2)), theirs)
    assert not theirs.any()


def trl_controller_run(tmp_path: Path, tiny_tokenizer, entropy_target: float) -> list[dict[str, float]]:
    """Three optimizer steps of TRL's GRPO with adaptive entropy; per step, the coefficient TRL applied, the
    entropy it measured and the coefficient it moved to."""
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        seed=0,
        learning_rate=0.05,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        use_adaptive_entropy=True,
        entropy_coef=0.5,
        entropy_coef_delta=0.3,
        entropy_coef_min=0.0,
        entropy_coef_max=1.0,
        entropy_target=entropy_target,
    )
    trainer = GRPOTrainer(
        model=tiny_model("llama", tiny_tokenizer),
        reward_funcs=lambda completions, **kwargs: [len(c) / 10 for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [f"{a} + {a} =" for a in range(4)]}),
        processing_class=tiny_tokenizer,
    )
    steps = []
    compute_loss = trainer._compute_loss

    def recording(model, inputs):
        last, coef = trainer._last_world_entropy, trainer.entropy_coef
        applied = coef if last <= args.entropy_target else 0.0  # TRL's apply_coef, from its state
        loss = compute_loss(model, inputs)
        steps.append(
            {"applied": applied, "entropy": trainer._last_world_entropy, "next": trainer.entropy_coef}
        )
        return loss

    trainer._compute_loss = recording
    trainer.train()
    return steps


@pytest.mark.parametrize("entropy_target", [1e9, 0.0], ids=["below-target", "above-target"])
def test_adaptive_coefficient_moves_as_trls(tmp_path: Path, tiny_tokenizer, entropy_target: float) -> None:
    steps = trl_controller_run(tmp_path, tiny_tokenizer, entropy_target)
    assert len(steps) == 3
    config = load_config(
        None,
        [
            "actor.use_adaptive_entropy=true",
            "actor.entropy_coeff=0.5",
            "actor.entropy_coeff_delta=0.3",
            "actor.entropy_coeff_min=0.0",
            "actor.entropy_coeff_max=1.0",
            f"actor.entropy_target={entropy_target}",
        ],
    )
    ours = AdaptiveEntropyCoefficient(config.actor)
    for step in steps:
        assert ours.applied() == pytest.approx(step["applied"])
        ours.observe_entropy(step["entropy"])
        assert ours.coeff == pytest.approx(step["next"])
    expected = [0.8, 1.0, 1.0] if entropy_target > 1 else [0.2, 0.0, 0.0]  # both clamps reached
    assert [step["next"] for step in steps] == pytest.approx(expected)
