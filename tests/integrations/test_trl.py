"""The TRL integration, on CPU with a tiny Llama built from a config (skipped without TRL).

``CEGPPOTrainer`` trains for two steps with ``num_iterations=2`` (the second step reuses the first step's
completions, so the ratio has moved and clipping acts); its loss is then checked against a direct call of the
cegppo registry and, for ``vanilla``, against TRL's own ``GRPOTrainer`` losses on the same inputs.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed")

import trl
from datasets import Dataset
from packaging.requirements import Requirement
from trl import GRPOConfig, GRPOTrainer

from _tiny import tiny_model
from cegppo.integrations._versions import SUPPORTED, warn_if_untested
from cegppo.integrations.trl import CEGPPOConfig, CEGPPOTrainer
from cegppo.losses import PolicyLossConfig, get_policy_loss_fn

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [
    [{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(2, 3), (14, 7), (30, 12), (5, 5)]
]


def length_reward(completions: list, **kwargs) -> list[float]:
    """A reward that differs within a group: the completion's length in characters, scaled."""
    return [len(completion[0]["content"]) / 10 for completion in completions]


def common_args(tmp_path: Path, **overrides) -> dict:
    return {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "learning_rate": 0.05,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": 2,
        "num_iterations": 2,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "delta": 3.0,
        **overrides,
    }


def make_trainer(model, tokenizer, args: GRPOConfig) -> GRPOTrainer:
    trainer_class = CEGPPOTrainer if isinstance(args, CEGPPOConfig) else GRPOTrainer
    return trainer_class(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )


def train(tmp_path: Path, tokenizer, **overrides) -> tuple[CEGPPOTrainer, list[dict]]:
    """Train a fresh tiny Llama; return the trainer and the inputs its loss received at each micro-step."""
    trainer = make_trainer(
        tiny_model("llama", tokenizer), tokenizer, CEGPPOConfig(**common_args(tmp_path, **overrides))
    )
    seen = []
    compute_loss = trainer._compute_loss

    def recording(model, inputs):
        seen.append(inputs)
        return compute_loss(model, inputs)

    trainer._compute_loss = recording
    trainer.train()
    return trainer, seen


def loss_and_grad(trainer: GRPOTrainer, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    trainer.model.zero_grad()
    return loss.detach(), grads


@pytest.fixture(scope="module")
def ce_gppo_run(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[CEGPPOTrainer, list[dict]]:
    return train(
        tmp_path_factory.mktemp("ce_gppo"), tiny_tokenizer, loss_mode="ce_gppo", beta1=0.75, beta2=1.0
    )


# Gradient accumulation over 2 micro-batches, a generation batch of 4 micro-batches: TRL's normalisers for this
# schedule differ from the single-batch case.
SCHEDULE = {"gradient_accumulation_steps": 2, "steps_per_generation": 4, "num_iterations": 1, "max_steps": 2}


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[CEGPPOTrainer, list[dict]]:
    return train(tmp_path_factory.mktemp("vanilla"), tiny_tokenizer, loss_mode="vanilla", **SCHEDULE)


def test_trains_two_steps_and_logs_clip_metrics(ce_gppo_run, tiny_tokenizer) -> None:
    trainer, seen = ce_gppo_run
    logs = [entry for entry in trainer.state.log_history if "actor/pg_clipfrac_low" in entry]
    assert len(logs) == 2
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy"):
        assert key in logs[0]
    # Step 1 is on-policy (ratio 1, nothing clipped); step 2 reuses step 1's completions after an update.
    assert "old_per_token_logps" in seen[1]
    assert logs[0]["actor/pg_clipfrac"] == 0
    second = logs[1]
    assert second["actor/pg_clipfrac_low"] + second["actor/pg_clipfrac_high"] > 0
    assert second["actor/pg_clipfrac_low"] == pytest.approx(second["clip_ratio/low_mean"])
    assert second["actor/pg_clipfrac_high"] == pytest.approx(second["clip_ratio/high_mean"])
    before = tiny_model("llama", tiny_tokenizer).state_dict()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_loss_equals_the_registry_on_the_same_tensors(ce_gppo_run) -> None:
    trainer, seen = ce_gppo_run
    inputs = seen[1]  # off-policy: old log-probs from before step 1's update, model after step 2's
    loss, grads = loss_and_grad(trainer, inputs)

    completion_ids = inputs["completion_ids"]
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model,
        torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        completion_ids.size(1),
    )
    config = PolicyLossConfig(
        beta1=0.75, beta2=1.0, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
        batch_num_tokens=int(inputs["num_items_in_batch"]),
    )  # fmt: skip
    expected, metrics = get_policy_loss_fn("ce_gppo")(
        old_log_prob=inputs["old_per_token_logps"],
        log_prob=logps,
        advantages=inputs["advantages"].unsqueeze(1).expand_as(logps),
        response_mask=inputs["completion_mask"],
        loss_agg_mode="token-mean",
        config=config,
    )
    torch.testing.assert_close(loss, expected.detach())
    trainer.model.zero_grad()
    expected.backward()
    expected_grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want)
    assert metrics["actor/pg_clipfrac_low"] + metrics["actor/pg_clipfrac_high"] > 0


@pytest.mark.parametrize(
    ("loss_agg_mode", "loss_type"),
    [("token-mean", "dapo"), ("seq-mean-token-mean", "grpo"), ("seq-mean-token-sum-norm", "dr_grpo")],
)
def test_vanilla_equals_trls_own_loss(
    vanilla_run, tiny_tokenizer, tmp_path: Path, loss_agg_mode: str, loss_type: str
) -> None:
    """Same model and inputs: our vanilla with an aggregation equals TRL's loss of the matching loss_type."""
    trained, seen = vanilla_run
    inputs = seen[-1]  # the 4th micro-batch of the generation batch: 3 updates after its generation
    assert "old_per_token_logps" in inputs
    args = common_args(tmp_path, **SCHEDULE)
    ours = make_trainer(
        trained.model, tiny_tokenizer, CEGPPOConfig(**args, loss_mode="vanilla", loss_agg_mode=loss_agg_mode)
    )
    reference = make_trainer(trained.model, tiny_tokenizer, GRPOConfig(**args, loss_type=loss_type))
    for trainer in (ours, reference):
        trainer.current_gradient_accumulation_steps = trained.current_gradient_accumulation_steps
    our_loss, our_grads = loss_and_grad(ours, inputs)
    their_loss, their_grads = loss_and_grad(reference, inputs)
    torch.testing.assert_close(our_loss, their_loss)
    for grad, want in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(grad, want)
    region = reference._metrics["train"]["clip_ratio/region_mean"][-1]
    assert region > 0
    assert ours._metrics["train"]["clip_ratio/region_mean"][-1] == pytest.approx(region)
    # Evaluation (no accumulation, one micro-batch) normalises differently in TRL; it must still agree.
    trained.model.eval()
    try:
        torch.testing.assert_close(loss_and_grad(ours, inputs)[0], loss_and_grad(reference, inputs)[0])
    finally:
        trained.model.train()


def test_bad_config_is_rejected(tmp_path: Path) -> None:
    args = common_args(tmp_path)
    with pytest.raises(ValueError, match="unknown policy loss 'cegppo'"):
        CEGPPOConfig(**args, loss_mode="cegppo")
    with pytest.raises(ValueError, match="beta1"):
        CEGPPOConfig(**args, beta1=-1.0)
    with pytest.raises(ValueError, match="dro_beta"):
        CEGPPOConfig(**args, loss_mode="dro")
    peers = CEGPPOConfig(
        **args, sapo_temperature_neg=2.0, vespo_lambda_pos=4.0, dro_beta=0.1
    ).policy_loss_config()
    assert (peers.tau_neg, peers.vespo_lambda_pos, peers.dro_beta) == (2.0, 4.0, 0.1)
    with pytest.raises(ValueError, match="bypass_mode"):
        CEGPPOConfig(**args, loss_mode="bypass_mode")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        CEGPPOConfig(**args, loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        CEGPPOConfig(**args, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="entropy_coef"):
        CEGPPOConfig(**args, entropy_coef=0.01)
    with pytest.raises(ValueError, match="token_truncate"):
        CEGPPOConfig(**args, loss_mode="vespo", use_vllm=True, vllm_importance_sampling_mode="sequence_mask")
    with pytest.raises(ValueError, match="geo_mean"):
        CEGPPOConfig(**args, loss_mode="geo_mean", top_entropy_quantile=0.5)
    with pytest.raises(TypeError, match="CEGPPOConfig"):
        CEGPPOTrainer(model="unused", args=GRPOConfig(**args))


def test_example_script_trains_a_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "train_ce_gppo", REPO / "examples" / "trl" / "train_ce_gppo.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    output = tmp_path / "out"
    model, small = (
        ["--model", str(tiny_model_dir)],
        ["--max-completion-length", "8", "--num-generations", "2"],
    )
    example.main([*model, "--output-dir", str(output), "--cpu", "--max-steps", "1", *small])
    assert (output / "model.safetensors").is_file()


class _SingleProcess:
    """The slice of ``accelerate.Accelerator`` that TRL's loss uses, for one process."""

    num_processes = 1

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @staticmethod
    def reduce(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor

    @staticmethod
    def pad_across_processes(tensor: torch.Tensor, dim: int, pad_index: float) -> torch.Tensor:
        return tensor


def loss_without_model(
    config: GRPOConfig, batch: dict[str, torch.Tensor], **state
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_compute_loss`` of TRL's ``GRPOTrainer`` (or of ours, for a ``CEGPPOConfig``) on chosen tensors, and its
    gradient w.r.t. the log-probs.

    The trainer is built without a model: its forward pass returns ``batch["log_prob"]`` (and ``batch["entropy"]``
    when given), so the loss and its gradient are exactly the trainer's arithmetic on our inputs (one process,
    one micro-batch, no accumulation). ``state`` overrides trainer attributes (``use_vllm``, ...).
    """
    ours = isinstance(config, CEGPPOConfig)
    trainer = (CEGPPOTrainer if ours else GRPOTrainer).__new__(CEGPPOTrainer if ours else GRPOTrainer)
    log_prob = batch["log_prob"].detach().clone().requires_grad_(True)
    entropy = batch.get("entropy", torch.zeros_like(log_prob))
    rows, length = log_prob.shape
    attributes = dict(
        args=config,
        loss_type=config.loss_type,
        epsilon_low=config.epsilon,
        epsilon_high=config.epsilon_high,
        importance_sampling_level=config.importance_sampling_level,
        beta=0.0,
        top_entropy_quantile=config.top_entropy_quantile,
        off_policy_mask_threshold=config.off_policy_mask_threshold,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        max_completion_length=length,
        current_gradient_accumulation_steps=1,
        accelerator=_SingleProcess(),
        model=torch.nn.Module().train(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (log_prob, entropy, None),
    )
    trainer.__dict__.update(attributes, **state)
    if ours:
        trainer.policy_loss_fn = get_policy_loss_fn(config.loss_mode)
        trainer.policy_loss_settings = config.policy_loss_config()
        trainer._model_input_keys = []
    mask = batch["response_mask"].long()
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": batch["advantages"][:, 0],
        "old_per_token_logps": batch["old_log_prob"],
        "num_items_in_batch": mask.sum(),
    }
    if "importance_sampling_ratio" in batch:
        inputs["importance_sampling_ratio"] = batch["importance_sampling_ratio"]
    loss = trainer._compute_loss(trainer.model, inputs)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad


def trl_loss(loss_type: str, batch: dict[str, torch.Tensor], **args) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` on chosen tensors (see ``loss_without_model``)."""
    settings = {
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "delta": None,
        "importance_sampling_level": "token",
        **args,
    }
    config = GRPOConfig(output_dir="unused", use_cpu=True, report_to="none", loss_type=loss_type, **settings)
    return loss_without_model(config, batch)


def edge_batch(seed: int, rows: int = 6, length: int = 9) -> dict[str, torch.Tensor]:
    """Off-policy float64 inputs: log δ ~ N(0, 0.5²) plus ratios e^±6 far outside any band, a dual-clip token,
    a row with A = 0 and an all-masked row; one advantage per response, as TRL's."""
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(rows, length, generator=g, dtype=torch.float64)
    new = old + 0.5 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    new[2, 0], new[3, 1] = old[2, 0] + 6.0, old[3, 1] - 6.0
    lengths = torch.randint(2, length + 1, (rows,), generator=g)
    lengths[1] = 0
    advantages = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, length).clone()
    advantages[0], new[0, 0] = -1.0, old[0, 0] + 1.6
    advantages[5] = 0.0
    return {
        "old_log_prob": old,
        "log_prob": new,
        "advantages": advantages,
        "response_mask": (torch.arange(length) < lengths.unsqueeze(1)).to(torch.float64),
    }


def ours(name: str, batch: dict, mode: str, **settings) -> tuple[torch.Tensor, torch.Tensor, dict]:
    log_prob = batch["log_prob"].detach().clone().requires_grad_(True)
    config = PolicyLossConfig(
        **{"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": None, **settings}
    )
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=batch["old_log_prob"],
        log_prob=log_prob,
        advantages=batch["advantages"],
        response_mask=batch["response_mask"],
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=batch.get("importance_sampling_ratio"),
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


def assert_equal(our: tuple, their: tuple) -> None:
    torch.testing.assert_close(our[0], their[0])
    torch.testing.assert_close(our[1], their[1])
    assert their[1].abs().sum() > 0


ROWS = 6  # TRL's per-sequence modes average over every row, the all-masked one included


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temperatures", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_equals_trls_sapo(seed: int, temperatures: tuple[float, float]) -> None:
    batch = edge_batch(seed)
    tau_pos, tau_neg = temperatures
    their = trl_loss("sapo", batch, sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg)
    our = ours("sapo", batch, "seq-mean-token-mean", tau_pos=tau_pos, tau_neg=tau_neg, global_batch_size=ROWS)
    assert_equal(our, their)


@pytest.mark.parametrize("delta", [None, 3.0])
def test_luspo_equals_trls_luspo(delta: float | None) -> None:
    """TRL's recommended sequence level; ``delta`` is our dual-clip bound on the sequence ratio."""
    batch = edge_batch(2)
    old = batch["old_log_prob"]
    noise = 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batch["log_prob"] = old + noise  # inside the band, but for:
    batch["log_prob"][4] += 0.5 * batch["advantages"][4].sign()  # clipped on its advantage's side
    batch["log_prob"][0] += 1.5  # A = -1 and s ≈ e^1.5 > 3: dual-clipped
    their = trl_loss("luspo", batch, importance_sampling_level="sequence", delta=delta)
    our = ours("luspo", batch, "seq-mean-token-sum", clip_ratio_c=delta, global_batch_size=ROWS)
    assert_equal(our, their)
    assert our[2]["actor/pg_clipfrac"] > 0


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("with_sampler_ratio", [False, True], ids=["no_is", "sampler_is"])
def test_vespo_equals_trls_vespo(seed: int, with_sampler_ratio: bool) -> None:
    batch = edge_batch(seed)
    settings = {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}
    if with_sampler_ratio:  # TRL folds the sampler IS ratio into w; it sums its log over every position
        g = torch.Generator().manual_seed(seed)
        ratio = torch.exp(0.3 * torch.randn(batch["log_prob"].shape, generator=g, dtype=torch.float64))
        batch["importance_sampling_ratio"] = torch.where(batch["response_mask"] > 0, ratio, 1.0)
    their = trl_loss("vespo", batch, **settings)
    our = ours("vespo", batch, "token-mean", **settings)
    assert_equal(our, their)
    assert our[2]["actor/vespo_phi_mean"] > 0


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo"])
@pytest.mark.parametrize("delta", [None, 2.5])
def test_trls_delta_is_dual_clip_and_bnpo_is_a_local_token_mean(loss_type: str, delta: float | None) -> None:
    """INTELLECT-2's two-sided clip (TRL's ``delta``) is vanilla's dual-clip ``clip_ratio_c``; on one micro-batch
    TRL's ``bnpo`` is ``token-mean`` over the micro-batch's own tokens (ours without global counts)."""
    batch = edge_batch(5)
    their = trl_loss(loss_type, batch, delta=delta)
    mode = "seq-mean-token-mean" if loss_type == "grpo" else "token-mean"
    our = ours(
        "vanilla", batch, mode, clip_ratio_c=delta, global_batch_size=ROWS if loss_type == "grpo" else None
    )
    assert_equal(our, their)
    assert (our[2]["actor/pg_clipfrac_dual"] > 0) == (delta is not None)


VESPO = {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}


@pytest.mark.parametrize("with_sampler_ratio", [False, True], ids=["no_is", "sampler_is"])
def test_vespo_multiplies_its_loss_by_trls_masks_as_trl(with_sampler_ratio: bool) -> None:
    """TRL's entropy mask and off-policy sequence mask multiply VESPO's token loss; only the vLLM ratio enters
    the sequence weight w. CEGPPOTrainer with loss_mode='vespo' equals TRL's loss_type='vespo' with both masks."""
    batch = edge_batch(6)
    shape = batch["log_prob"].shape
    g = torch.Generator().manual_seed(6)
    batch["entropy"] = 2 * torch.rand(shape, generator=g, dtype=torch.float64)
    state = {}
    if with_sampler_ratio:
        ratio = torch.exp(0.3 * torch.randn(shape, generator=g, dtype=torch.float64))
        batch["importance_sampling_ratio"] = torch.where(batch["response_mask"] > 0, ratio, 1.0)
        state = {"use_vllm": True, "vllm_importance_sampling_correction": True}
    threshold = 0.05
    off_policy = GRPOTrainer.get_off_policy_mask(
        advantages=batch["advantages"][:, :1],
        per_token_logps=batch["log_prob"],
        sampling_per_token_logps=batch["old_log_prob"],
        mask=batch["response_mask"],
        off_policy_threshold=threshold,
    )
    assert 0 < off_policy.sum() < ROWS  # the mask drops some sequences and keeps others
    settings = {"output_dir": "unused", "use_cpu": True, "report_to": "none", **VESPO}
    settings.update(top_entropy_quantile=0.5, off_policy_mask_threshold=threshold)
    their = loss_without_model(GRPOConfig(**settings, loss_type="vespo"), batch, **state)
    our = loss_without_model(CEGPPOConfig(**settings, loss_mode="vespo"), batch, **state)
    assert_equal(our, their)
    unmasked = dict(settings, top_entropy_quantile=1.0, off_policy_mask_threshold=None)
    assert not torch.allclose(
        our[1], loss_without_model(GRPOConfig(**unmasked, loss_type="vespo"), batch, **state)[1]
    )


@pytest.mark.parametrize(
    ("loss_type", "message"),
    [
        ("grpo", "loss_mode='vanilla', loss_agg_mode='seq-mean-token-mean'"),
        ("dr_grpo", "loss_mode='vanilla', loss_agg_mode='seq-mean-token-sum-norm'"),
        ("vespo", "loss_mode='vespo', loss_agg_mode='token-mean'"),
        ("bnpo", "no replacement"),
    ],
)
def test_a_trl_loss_type_is_an_error_that_names_its_replacement(
    tmp_path: Path, loss_type: str, message: str
) -> None:
    args = common_args(tmp_path)
    with pytest.raises(ValueError, match="loss_type") as error:
        CEGPPOConfig(**args, loss_type=loss_type)
    assert message in str(error.value)
    assert CEGPPOConfig(**args, loss_type="dapo").loss_mode == "ce_gppo"  # TRL's default: not a choice


def test_trl_bounds_in_pyproject_are_the_tested_ones() -> None:
    """The trl extra declares the range the plug-in is tested with, and importing it under another warns."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [Requirement(line).specifier for line in extras["trl"]] == [SUPPORTED["trl"]]
    assert trl.__version__ in SUPPORTED["trl"]
    with pytest.warns(UserWarning, match="tested with trl"):
        warn_if_untested("trl", "1.17.0")
