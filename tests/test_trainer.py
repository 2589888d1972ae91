"""The RL step and run on tiny models: learning, gradient accumulation, checkpoints, resume, signals."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from _tiny import tiny_model, tiny_overrides, tiny_tokenizer
from cegppo.config import load_config
from cegppo.trainer import Interrupted, Trainer, load_run_config
from cegppo.trainer.actor import Actor, Experience
from cegppo.trainer.tracking import read_metrics

SHORT_IS_RIGHT = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if len(solution_str) < 6 else 0.0
"""


@pytest.fixture
def short_reward(tmp_path: Path) -> str:
    path = tmp_path / "short_reward.py"
    path.write_text(SHORT_IS_RIGHT)
    return f"{path}:compute_score"


def run_dir_of(config) -> Path:
    return Path(config.trainer.output_dir) / config.trainer.name


def test_a_run_writes_metrics_samples_checkpoint_and_summary(tiny_model_dir, tmp_path, short_reward):
    config = load_config(
        None,
        tiny_overrides(
            tiny_model_dir,
            tmp_path,
            **{
                "reward.name": short_reward,
                "trainer.tensorboard": True,
                "trainer.eval_every": 1,
                "eval.benchmarks": "[arithmetic]",
                "eval.n": 2,
                "eval.limit": 2,
            },
        ),
    )
    run_dir = run_dir_of(config)
    summary = Trainer(config, run_dir).fit()

    assert summary["steps"] == 2 and summary["heldout_size"] == 4
    assert 0 <= summary["heldout_acc_before"] <= 1 and 0 <= summary["heldout_acc_after"] <= 1
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for key in [
        "reward/mean",
        "acc/mean",
        "response_length/mean",
        "response_length/max",
        "response_length/clip_ratio",
        "entropy/mean",
        "actor/pg_loss",
        "actor/pg_clipfrac",
        "actor/pg_clipfrac_low",
        "actor/pg_clipfrac_high",
        "actor/pg_clipfrac_dual",
        "actor/ppo_kl",
        "actor/grad_norm",
        "actor/lr",
        "data/filtered_groups",
        "timing/gen_s",
        "timing/score_s",
        "timing/old_logprob_s",
        "timing/update_s",
        "timing/step_s",
        "perf/tokens_per_s",
    ]:
        assert key in records[0], key
    assert records[0]["actor/num_updates"] == 2  # 4 prompts / mini-batches of 2
    assert all(0 <= r["val/arithmetic/avg@2"] <= r["val/arithmetic/pass@2"] <= 1 for r in records)
    assert "entropy/delta" in records[1] and "entropy/cov_logp_pA" in records[0]
    assert sum(records[0][f"quadrant/{q}/frac"] for q in ("PA&HP", "PA&LP", "NA&HP", "NA&LP")) <= 1 + 1e-9
    assert records[0]["actor/beta1"] == 0.5 and records[0]["actor/beta2"] == 1.0
    assert 0 < records[0]["entropy/mean"] < torch.log(torch.tensor(float(len(tiny_tokenizer())))).item()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {"question", "response", "ground_truth", "reward", "step"} <= set(samples[0])
    assert (run_dir / "checkpoints" / "step_2" / "model" / "model.safetensors").is_file()
    assert list((run_dir / "tensorboard").iterdir())
    assert load_run_config(run_dir) == config


def test_the_policy_learns_a_trivial_reward(tmp_path, short_reward):
    # Reward: a response shorter than 6 characters. The tiny model's first-token EOS probability must rise.
    model_dir = tmp_path / "model"
    from _tiny import save_tiny

    save_tiny(model_dir, eos_bias=2.0)
    config = load_config(
        None,
        tiny_overrides(
            model_dir,
            tmp_path,
            **{
                "reward.name": short_reward,
                "trainer.total_steps": 8,
                "data.heldout": "null",
                "actor.lr": 3e-3,
                "rollout.n": 8,
                "data.train_batch_size": 4,
            },
        ),
    )
    trainer = Trainer(config, run_dir_of(config))

    def eos_first_prob() -> float:
        prompt = trainer._render(trainer.train_data.examples[0])
        ids = trainer.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = trainer.model(ids).logits[0, -1]
        return logits.softmax(-1)[trainer.tokenizer.eos_token_id].item()

    before = eos_first_prob()
    trainer.fit()
    rewards = [r["reward/mean"] for r in read_metrics(trainer.run_dir)]
    assert eos_first_prob() > before + 0.1
    assert sum(rewards[-3:]) > sum(rewards[:3])


def _experience(model, tokenizer, rows: int = 8, prompt_len: int = 5, response_len: int = 7) -> Experience:
    generator = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    prompt = torch.randint(3, vocab, (rows, prompt_len), generator=generator)
    response = torch.randint(3, vocab, (rows, response_len), generator=generator)
    prompt_mask = torch.ones(rows, prompt_len, dtype=torch.long)
    prompt_mask[::3, :2] = 0  # left padding
    response_mask = torch.ones(rows, response_len)
    for row in range(rows):
        response_mask[row, 2 + row % (response_len - 2) :] = 0  # right padding, varied lengths
    return Experience(
        input_ids=torch.cat([prompt, response], 1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], 1),
        response_mask=response_mask,
        advantages=torch.randn(rows, generator=generator),
        correct=torch.arange(rows) % 2 == 0,
    )


@pytest.mark.parametrize("loss", ["ce_gppo", "vanilla", "gspo", "luspo", "geo_mean", "dppo_tv"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_splitting_never_changes_the_gradient(loss, agg):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=1)
    config = load_config(
        None,
        [
            f"actor.policy_loss={loss}",
            f"actor.loss_agg_mode={agg}",
            "actor.lr=0.05",
            "actor.bf16_autocast=false",
            "actor.positive_loss_coeff=0.1",
            "actor.entropy_coeff=0.01",
            "actor.clip_ratio_low=0.01",
            "actor.clip_ratio_high=0.01",
        ],
    )
    actor = Actor(model, config)
    batch = _experience(model, tokenizer)
    actor.compute_old_log_probs(batch)
    actor._update_mini_batch(batch)  # move the weights, so the ratios leave 1 and clipping acts

    grads, clipped = [], []
    for micro in (8, 3, 1):
        actor.config.actor.micro_batch_size = micro
        actor.optimizer.zero_grad()
        metrics, _, finite = actor.accumulate_gradients(batch)
        assert finite
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        clipped.append(metrics["actor/pg_clipfrac"])
    assert clipped[0] > 0
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], rtol=1e-4, atol=1e-7)
    assert clipped[1] == pytest.approx(clipped[0]) and clipped[2] == pytest.approx(clipped[0])


def test_a_non_finite_loss_skips_the_update(monkeypatch):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer)
    actor = Actor(model, load_config(None, ["actor.bf16_autocast=false"]))
    batch = _experience(model, tokenizer)
    actor.compute_old_log_probs(batch)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(actor, "loss_fn", lambda **kw: (kw["log_prob"].sum() * float("nan"), {}))
    metrics = actor.update(batch, group_size=1)  # 4 prompts per mini-batch: 2 updates
    assert metrics["actor/skipped_updates"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/"))} for r in records]


def test_a_resumed_run_continues_exactly(tiny_model_dir, tmp_path, short_reward):
    common = {"reward.name": short_reward, "data.heldout": "null", "actor.policy_loss": "clip_cov"}
    straight = load_config(
        None,
        tiny_overrides(
            tiny_model_dir, tmp_path / "a", **common, **{"trainer.total_steps": 4, "trainer.save_every": 2}
        ),
    )
    Trainer(straight, run_dir_of(straight)).fit()

    first = load_config(
        None, tiny_overrides(tiny_model_dir, tmp_path / "b", **common, **{"trainer.total_steps": 2})
    )
    Trainer(first, run_dir_of(first)).fit()
    run_dir = run_dir_of(first)
    resumed = load_run_config(run_dir, ["trainer.total_steps=4"])
    Trainer(resumed, run_dir, resume=True).fit()

    expected = _comparable(read_metrics(run_dir_of(straight)))
    got = _comparable(read_metrics(run_dir))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got == expected


def test_sigint_saves_a_checkpoint_and_the_run_resumes(tiny_model_dir, tmp_path, short_reward, monkeypatch):
    config = load_config(
        None,
        tiny_overrides(
            tiny_model_dir,
            tmp_path,
            **{"reward.name": short_reward, "data.heldout": "null", "trainer.total_steps": 3},
        ),
    )
    run_dir = run_dir_of(config)
    trainer = Trainer(config, run_dir)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or CI, else Python's default
    original_step = Trainer.step

    def step_then_ctrl_c(self):
        metrics = original_step(self)
        if self.step_count == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    monkeypatch.setattr(Trainer, "step", step_then_ctrl_c)
    with pytest.raises(Interrupted) as stop:
        trainer.fit()
    trainer.close()
    assert stop.value.signum == signal.SIGINT
    assert stop.value.checkpoint == run_dir / "checkpoints" / "step_1"
    assert signal.getsignal(signal.SIGINT) is handler_before
    monkeypatch.setattr(Trainer, "step", original_step)

    summary = Trainer(load_run_config(run_dir), run_dir, resume=True).fit()
    assert summary["steps"] == 3
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_kl_entropy_and_nll_terms_and_dynamic_sampling(tiny_model_dir, tmp_path, short_reward):
    config = load_config(
        None,
        tiny_overrides(
            tiny_model_dir,
            tmp_path,
            **{
                "reward.name": short_reward,
                "data.heldout": "null",
                "trainer.total_steps": 1,
                "actor.use_kl_loss": True,
                "actor.entropy_coeff": 0.01,
                "actor.positive_loss_coeff": 0.1,
                "algorithm.filter_groups": True,
                "algorithm.adv_estimator": "rloo",
            },
        ),
    )
    Trainer(config, run_dir_of(config)).fit()
    (record,) = read_metrics(run_dir_of(config))
    assert 0 <= record["data/filtered_groups"] <= 4
    if record["data/filtered_groups"] < 4:
        assert {"actor/kl_loss", "actor/entropy_loss"} <= set(record)
        assert record["actor/kl_loss"] >= 0


def test_fused_and_plain_log_prob_paths_train_identically(tiny_model_dir, tmp_path, short_reward):
    records = []
    for fused in (True, False):
        config = load_config(
            None,
            tiny_overrides(
                tiny_model_dir,
                tmp_path / str(fused),
                **{"reward.name": short_reward, "data.heldout": "null", "model.fused_logprobs": fused},
            ),
        )
        Trainer(config, run_dir_of(config)).fit()
        records.append(_comparable(read_metrics(run_dir_of(config))))
    for fused, plain in zip(*records, strict=True):
        assert fused.keys() == plain.keys()
        for key in fused:
            assert fused[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-5), key


def test_bad_input_fails_before_the_run_directory_exists(tiny_model_dir, tmp_path):
    config = load_config(
        None,
        tiny_overrides(
            tiny_model_dir,
            tmp_path,
            **{"data.task": "null", "data.train_files": f"[{tmp_path / 'missing.jsonl'}]"},
        ),
    )
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        Trainer(config, run_dir_of(config))
    assert not run_dir_of(config).exists()

    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path))
    run_dir_of(config).mkdir(parents=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        Trainer(config, run_dir_of(config), resume=True)
    with pytest.raises(ValueError, match="already exists"):
        Trainer(config, run_dir_of(config))


def _grad(actor: Actor, batch: Experience) -> torch.Tensor:
    actor.optimizer.zero_grad()
    metrics, _, finite = actor.accumulate_gradients(batch)
    assert finite
    return torch.cat([p.grad.flatten() for p in actor.model.parameters() if p.grad is not None]), metrics


def _mismatched_experience(model, tokenizer) -> Experience:
    """An experience whose sampler log-probs differ from the recomputed ones, with an outlier in row 1."""
    batch = _experience(model, tokenizer)
    Actor(model, load_config(None, ["actor.bf16_autocast=false"])).compute_old_log_probs(batch)
    noise = 0.1 * torch.randn(batch.old_log_prob.shape, generator=torch.Generator().manual_seed(3))
    batch.sampler_log_prob = batch.old_log_prob + noise
    batch.sampler_log_prob[1, 0] -= 3.0  # π_old/π_sampler = e^3 on one token
    return batch


def test_rollout_correction_weights_and_rejects_before_any_loss():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=2)
    batch = _mismatched_experience(model, tokenizer)
    settings = ["actor.bf16_autocast=false", "actor.policy_loss=sapo", "actor.rollout_is=token"]
    settings += [
        "actor.rollout_is_threshold=1.5",
        "actor.rollout_rs=seq_max_k3",
        "actor.rollout_rs_threshold=1.0",
    ]
    actor = Actor(model, load_config(None, settings))
    corrected, metrics = actor.correct_for_sampler(batch)
    assert torch.all(corrected.response_mask[1] == 0) and torch.equal(
        corrected.response_mask[2:], batch.response_mask[2:]
    )
    expected = (batch.old_log_prob - batch.sampler_log_prob).exp().clamp(max=1.5) * batch.response_mask
    torch.testing.assert_close(corrected.rollout_is_weights, expected)
    assert metrics["actor/rollout_rs_seq_masked_fraction"] == pytest.approx(1 / 8)
    grads = []
    for micro in (8, 3):
        actor.config.actor.micro_batch_size = micro
        grads.append(_grad(actor, corrected)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(_grad(actor, batch)[0], grads[0])


def test_bypass_mode_takes_the_sampler_log_probs_as_pi_old():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=2)
    batch = _mismatched_experience(model, tokenizer)
    bypass = Actor(model, load_config(None, ["actor.bf16_autocast=false", "actor.policy_loss=bypass_mode"]))
    vanilla = Actor(model, load_config(None, ["actor.bf16_autocast=false", "actor.policy_loss=vanilla"]))
    two_policies = Experience(**{**vars(batch), "old_log_prob": batch.sampler_log_prob})
    torch.testing.assert_close(_grad(bypass, batch)[0], _grad(vanilla, two_policies)[0])
    assert not torch.allclose(_grad(vanilla, batch)[0], _grad(vanilla, two_policies)[0])


@pytest.mark.parametrize(
    ("settings", "metric"),
    [
        ({"actor.policy_loss": "sapo"}, "actor/sapo_gate_mean"),
        ({"actor.policy_loss": "dppo_tv", "actor.clip_ratio_low": 0.01}, "actor/dppo_masked_frac"),
        ({"actor.policy_loss": "vespo"}, "actor/vespo_phi_mean"),
        ({"actor.policy_loss": "geo_mean", "actor.rollout_rs": "seq_mean_k3", "actor.rollout_rs_threshold": 1e-9},
         "actor/rollout_rs_masked_fraction"),
        ({"actor.policy_loss": "bypass_mode", "actor.rollout_is": "sequence"}, "actor/rollout_is_mean"),
    ],
)  # fmt: skip
def test_each_method_logs_its_own_quantity(tiny_model_dir, tmp_path, short_reward, settings, metric):
    config = load_config(
        None,
        tiny_overrides(
            tiny_model_dir, tmp_path, **{"reward.name": short_reward, "data.heldout": "null", "trainer.total_steps": 1},
            **settings,
        ),
    )  # fmt: skip
    Trainer(config, run_dir_of(config)).fit()
    (record,) = read_metrics(run_dir_of(config))
    # The HF engine's sampler log-probs equal the recomputation here, so rejection finds nothing to reject.
    assert 0 <= record[metric] <= 2 and math.isfinite(record["actor/pg_loss"])
