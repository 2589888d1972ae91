"""The RL step and run on tiny models: learning, gradient accumulation, checkpoints, resume, signals."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from _tiny import tiny_model, tiny_overrides, tiny_tokenizer
from cegppo.cli import main
from cegppo.config import ConfigError, load_config
from cegppo.rewards import RewardFailure
from cegppo.runfiles import read_metrics
from cegppo.trainer import Interrupted, Trainer, load_run_config
from cegppo.trainer.actor import Actor, ActorSettings, Experience, PiOld, UpdateBatch
from cegppo.trainer.checkpoint import STATE_FILE, prune_checkpoints

SHORT_IS_RIGHT = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if len(solution_str) < 6 else 0.0
"""


# As SHORT_IS_RIGHT, but every response to a prompt with an odd answer scores 1: those groups have A = 0.
ODD_ANSWERS_ARE_FREE = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if int(ground_truth) % 2 or len(solution_str) < 6 else 0.0
"""


def reward_file(directory: Path, name: str, source: str) -> str:
    """``reward.name`` of ``compute_score`` in ``source``, written to ``directory/name``."""
    path = directory / name
    path.write_text(source)
    return f"{path}:compute_score"


@pytest.fixture
def short_reward(tmp_path: Path) -> str:
    return reward_file(tmp_path, "short_reward.py", SHORT_IS_RIGHT)


def run_dir_of(config) -> Path:
    return Path(config.trainer.output_dir) / config.trainer.name


def one_step(model_dir: Path, out: Path, reward: str, **extra: object):
    """The config of a one-step run of the tiny model with ``reward``, no held-out set."""
    overrides = {"reward.name": reward, "data.heldout": "null", "trainer.total_steps": 1, **extra}
    return load_config(None, tiny_overrides(model_dir, out, **overrides))


def test_a_run_writes_metrics_samples_checkpoint_and_summary(tiny_model_dir, tmp_path):
    reward = reward_file(tmp_path, "odd_answers_are_free.py", ODD_ANSWERS_ARE_FREE)
    config = load_config(
        None,
        tiny_overrides(
            tiny_model_dir,
            tmp_path,
            **{
                "reward.name": reward,
                "trainer.tensorboard": True,
                "trainer.eval_every": 1,
                "eval.benchmarks": "[arithmetic]",
                "eval.n": 2,
                "eval.limit": 2,
            },
        ),
    )
    run_dir = run_dir_of(config)
    trainer = Trainer(config, run_dir)
    update, trained = trainer.actor.update, []
    trainer.actor.update = lambda batch, group_size: (
        trained.append(batch.experience) or update(batch, group_size)
    )
    untrained = Trainer(
        dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, name="other")),
        tmp_path / "other",
    )
    summary = trainer.fit()

    assert summary["steps"] == 2 and summary["heldout_size"] == 4
    # greedy, so evaluating the same weights again gives the same accuracy
    assert summary["heldout_acc_before"] == untrained.evaluate_heldout()
    assert summary["heldout_acc_after"] == trainer.evaluate_heldout()
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
        "timing/gen_cpu_s",
        "timing/update_cpu_s",
        "timing/step_cpu_s",
        "perf/tokens_per_s",
    ]:
        assert key in records[0], key
    assert records[0]["actor/num_updates"] == 2  # 4 prompts / mini-batches of 2
    assert all(0 <= r["val/arithmetic/avg@2"] <= r["val/arithmetic/pass@2"] <= 1 for r in records)
    assert "entropy/delta" in records[1] and "entropy/cov_logp_pA" in records[0]
    # the quadrants split the tokens with A != 0 (A = 0 tokens belong to none)
    mask = trained[0].response_mask
    zero_share = (
        (trained[0].advantages == 0).unsqueeze(1) * mask
    ).sum().double() / mask.sum()  # exact, as the metric
    assert 0 < zero_share < 1
    quadrant_share = sum(records[0][f"quadrant/{q}/frac"] for q in ("PA&HP", "PA&LP", "NA&HP", "NA&LP"))
    assert quadrant_share == pytest.approx(1 - zero_share.item(), abs=1e-9)
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


def actor_settings(overrides: list[str]) -> ActorSettings:
    return ActorSettings.from_config(load_config(None, overrides))


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


@pytest.mark.parametrize(
    "loss", ["ce_gppo", "vanilla", "gspo", "clip_cov", "kl_cov", "luspo", "geo_mean", "dppo_tv"]
)
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
            # Clip-Cov/KL-Cov: select several tokens (Clip-Cov among |Cov| in (0.05, 5)), so a per-micro-batch
            # selection would differ
            "actor.policy_loss.clip_cov_ratio=0.1",
            "actor.policy_loss.clip_cov_lb=0.05",
            "actor.policy_loss.kl_cov_ratio=0.1",
        ],
    )
    actor = Actor(model, ActorSettings.from_config(config))
    batch = actor.old_policy(_experience(model, tokenizer), group_size=1, recompute=True)
    actor._update_mini_batch(batch)  # move the weights, so the ratios leave 1 and clipping acts

    grads, clipped = [], []
    # rows, or a token budget (rows sorted by length, packed): 12 positions fit one row, 30 two or three
    for micro, budget in ((8, None), (3, None), (1, None), (8, 30), (8, 12)):
        actor.settings.actor.micro_batch_size = micro
        actor.settings.actor.micro_batch_tokens = budget
        actor.optimizer.zero_grad()
        torch.manual_seed(0)  # Clip-Cov's random draw among its candidates
        result = actor.accumulate_gradients(batch)
        metrics, finite = result.metrics, result.finite
        assert finite
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        clipped.append(metrics["actor/pg_clipfrac"])
        if loss in ("clip_cov", "kl_cov"):
            assert metrics[f"actor/{loss}_frac"] > 0
    assert clipped[0] > 0
    for other in grads[1:]:  # float32; with actor.share_prompt the prompt runs apart from its responses
        torch.testing.assert_close(other, grads[0], rtol=1e-4, atol=1e-6)
    assert all(other == pytest.approx(clipped[0]) for other in clipped[1:])


def test_a_token_budget_packs_rows_by_length_and_keeps_the_batch_order():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=1)
    actor = Actor(model, ActorSettings.from_config(load_config(None, ["actor.bf16_autocast=false"])))
    experience = _experience(model, tokenizer)
    by_rows = actor.recompute_pi_old(experience)
    actor.settings.actor.micro_batch_tokens = 25
    micro_rows = actor._micro_rows(experience)
    lengths = experience.attention_mask.sum(-1)
    assert sorted(torch.cat(micro_rows).tolist()) == list(range(len(experience)))
    assert [lengths[rows].tolist() for rows in micro_rows] == [
        sorted(lengths[rows].tolist()) for rows in micro_rows
    ]  # each micro-batch holds rows of neighbouring lengths
    responses = experience.attention_mask[:, -experience.response_len :].sum(-1)
    prompts = lengths - responses
    assert len(micro_rows) > 1
    for rows in micro_rows:  # within the budget once trimmed: rows × (longest prompt + longest response)
        assert len(rows) == 1 or len(rows) * int(prompts[rows].max() + responses[rows].max()) <= 25
    by_budget = actor.recompute_pi_old(experience)
    mask = experience.response_mask  # past its own longest response a micro-batch scores 0
    for got, want in ((by_budget.log_prob, by_rows.log_prob), (by_budget.entropy, by_rows.entropy)):
        torch.testing.assert_close(got * mask, want * mask, rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_skips_the_update(monkeypatch):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer)
    actor = Actor(model, actor_settings(["actor.bf16_autocast=false"]))
    batch = actor.old_policy(_experience(model, tokenizer), group_size=1, recompute=True)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(
        actor.policy_gradient, "loss_fn", lambda **kw: (kw["log_prob"].sum() * float("nan"), {})
    )
    metrics = actor.update(batch, group_size=1).metrics  # 4 prompts per mini-batch: 2 updates
    assert metrics["actor/skipped_updates"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/"))} for r in records]


def test_a_resumed_run_continues_exactly(tiny_model_dir, tmp_path, short_reward):
    common = {"reward.name": short_reward, "data.heldout": "null", "actor.policy_loss": "clip_cov"}
    straight = load_config(
        None,
        tiny_overrides(
            tiny_model_dir,
            tmp_path / "a",
            **common,
            **{"trainer.total_steps": 4, "trainer.save_every": 2, "trainer.keep_checkpoints": 1},
        ),
    )
    Trainer(straight, run_dir_of(straight)).fit()
    # step_2 went when step_4 was saved
    assert [p.name for p in (run_dir_of(straight) / "checkpoints").iterdir()] == ["step_4"]

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


def test_evaluation_leaves_the_training_stream_untouched(tiny_model_dir, tmp_path, short_reward):
    """Sampled evaluations between steps and the greedy held-out passes change what is logged, never what is
    trained: the same seed trains on the same responses with evaluation every step as without any."""
    common = {"reward.name": short_reward, "trainer.total_steps": 3}
    plain = load_config(
        None, tiny_overrides(tiny_model_dir, tmp_path / "a", **common, **{"data.heldout": "null"})
    )
    evaluated = load_config(
        None,
        tiny_overrides(
            tiny_model_dir,
            tmp_path / "b",
            **common,
            **{"trainer.eval_every": 1, "eval.benchmarks": "[heldout]", "eval.n": 2, "eval.temperature": 1.0},
        ),
    )
    Trainer(plain, run_dir_of(plain)).fit()
    Trainer(evaluated, run_dir_of(evaluated)).fit()

    def trained(run_dir: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if not k.startswith("val/")}
            for r in _comparable(read_metrics(run_dir))
        ]

    with_eval = read_metrics(run_dir_of(evaluated))
    assert all("val/heldout/avg@2" in r for r in with_eval)
    assert trained(run_dir_of(evaluated)) == trained(run_dir_of(plain))


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


def _plain_log_probs_and_entropy(model, batch: Experience) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-token log-probs and entropies from the full logits, written out independently of cegppo.ops."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    log_probs = logits[:, -batch.response_len - 1 : -1].float().log_softmax(-1)
    tokens = batch.input_ids[:, -batch.response_len :]
    token_log_prob = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return token_log_prob, -(log_probs.exp() * log_probs).sum(-1)


def test_kl_entropy_and_nll_terms_match_a_hand_computation():
    tokenizer = tiny_tokenizer()
    model, reference = tiny_model("llama", tokenizer, seed=0), tiny_model("llama", tokenizer, seed=5)
    config = load_config(
        None,
        [
            "actor.bf16_autocast=false",
            "actor.use_kl_loss=true",
            "actor.kl_loss_coef=0.1",
            "actor.entropy_coeff=0.01",
            "actor.positive_loss_coeff=0.1",
            "actor.micro_batch_size=3",
        ],
    )
    actor = Actor(model, ActorSettings.from_config(config), ref_model=reference)
    batch = _experience(model, tokenizer)
    result = actor.accumulate_gradients(actor.old_policy(batch, group_size=1, recompute=True))
    metrics, finite = result.metrics, result.finite
    assert finite

    mask = batch.response_mask
    log_prob, entropy = _plain_log_probs_and_entropy(model.eval(), batch)
    ref_log_prob, _ = _plain_log_probs_and_entropy(reference, batch)
    k3 = torch.exp(ref_log_prob - log_prob) - (ref_log_prob - log_prob) - 1
    positive = mask * batch.correct.unsqueeze(1)
    assert metrics["actor/kl_loss"] == pytest.approx(((k3 * mask).sum() / mask.sum()).item(), rel=1e-4)
    assert metrics["actor/kl_loss"] > 0.01  # two different random models
    assert metrics["actor/entropy_loss"] == pytest.approx(
        ((entropy * mask).sum() / mask.sum()).item(), rel=1e-4
    )
    expected_nll = (-log_prob * positive).sum() / positive.sum()
    assert metrics["actor/positive_nll"] == pytest.approx(expected_nll.item(), rel=1e-4)


def test_the_kl_reference_is_the_starting_policy(tiny_model_dir, tmp_path, short_reward):
    config = one_step(
        tiny_model_dir,
        tmp_path,
        short_reward,
        **{
            "actor.use_kl_loss": True,
            "actor.ppo_mini_batch_size": 4,  # one update: the policy is still the reference
            "algorithm.adv_estimator": "rloo",
        },
    )
    Trainer(config, run_dir_of(config)).fit()
    (record,) = read_metrics(run_dir_of(config))
    assert record["actor/kl_loss"] == 0.0 and record["actor/num_updates"] == 1


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

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    config = load_config(None, tiny_overrides(tiny_model_dir, blocked))
    with pytest.raises(ValueError, match=r"trainer.output_dir: .*a_file is a file"):
        Trainer(config, run_dir_of(config))

    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path))
    run_dir_of(config).mkdir(parents=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        Trainer(config, run_dir_of(config), resume=True)
    with pytest.raises(ValueError, match="already exists"):
        Trainer(config, run_dir_of(config))


# Reward by call order (in-process, so the counter is shared): with 4 prompts x 4 samples per round, round 0
# scores everything 0 (no group has signal), round 1 gives groups 0 and 1 mixed scores, round 2 all four. The first
# 4 calls are the trainer's start-up check of the reward (REWARD_CHECK_PROMPTS greedy responses).
BY_CALL_ORDER = """
calls = -4

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    global calls
    index, calls = calls, calls + 1
    if index < 0:
        return 0.0
    round_, row = divmod(index, 16)
    if round_ == 0 or (round_ == 1 and row >= 8):
        return 0.0
    return float(row % 2)
"""


# One round of 8 prompts x 4 samples: groups 0-2 have signal, the others score 0 (the first 4 calls are the
# trainer's start-up check of the reward).
THREE_GROUPS_WITH_SIGNAL = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    compute_score.calls = getattr(compute_score, "calls", -5) + 1
    return float(compute_score.calls % 2) if 0 <= compute_score.calls < 12 else 0.0
"""


def test_generation_batch_as_the_release_runs_it_and_the_ragged_mini_batch_is_cut(tiny_model_dir, tmp_path):
    # gen_batch_size=8 prompts sampled once (max_num_gen_batches=1), at most train_batch_size=4 groups kept:
    # 3 have signal, and mini-batches of 2 groups leave 1 ragged group, cut as verl cuts it
    config = one_step(
        tiny_model_dir,
        tmp_path,
        reward_file(tmp_path, "three_groups.py", THREE_GROUPS_WITH_SIGNAL),
        **{"data.gen_batch_size": 8, "algorithm.filter_groups": True, "algorithm.max_num_gen_batches": 1},
    )
    trainer = Trainer(config, run_dir_of(config))
    trained = []
    update = trainer.actor.update
    trainer.actor.update = lambda batch, group_size: trained.append(len(batch)) or update(batch, group_size)
    trainer.fit()
    (record,) = read_metrics(run_dir_of(config))
    assert (record["data/gen_rounds"], record["data/filtered_groups"], record["data/train_groups"]) == (
        1,
        5,
        2,
    )
    assert (
        record["data/ragged_dropped_responses"] == 4 and record["actor/num_updates"] == 1 and trained == [8]
    )
    with pytest.raises(
        ConfigError, match=r"data.gen_batch_size=16 is invalid: .* only with algorithm.filter_groups"
    ):
        load_config(None, ["data.gen_batch_size=16"])
    with pytest.raises(
        ConfigError, match=r"data.gen_batch_size=4 is invalid: must be >= data.train_batch_size=8"
    ):
        load_config(None, ["data.gen_batch_size=4", "algorithm.filter_groups=true"])


@pytest.mark.parametrize("max_rounds", [10, 1])
def test_dynamic_sampling_refills_the_batch_with_groups_that_have_signal(
    tiny_model_dir, tmp_path, max_rounds
):
    config = one_step(
        tiny_model_dir,
        tmp_path,
        reward_file(tmp_path, "by_call_order.py", BY_CALL_ORDER),
        **{
            "algorithm.filter_groups": True,
            "algorithm.max_num_gen_batches": max_rounds,
        },
    )
    trainer = Trainer(config, run_dir_of(config))
    old_log_prob_rows = []
    compute = trainer.actor.recompute_pi_old
    trainer.actor.recompute_pi_old = lambda batch, **kw: (
        old_log_prob_rows.append(len(batch)) or compute(batch, **kw)
    )
    trainer.fit()
    (record,) = read_metrics(run_dir_of(config))
    if max_rounds == 1:  # no re-sampling: nothing had signal, nothing is trained, no old-log-prob pass
        assert (record["data/gen_rounds"], record["data/filtered_groups"], record["data/train_groups"]) == (
            1,
            4,
            0,
        )
        assert old_log_prob_rows == [] and "actor/pg_loss" not in record
        return
    # rounds 0-2: 0 + 2 + 4 groups with signal, trimmed to train_batch_size = 4; 6 groups dropped
    assert (record["data/gen_rounds"], record["data/filtered_groups"], record["data/train_groups"]) == (
        3,
        6,
        4,
    )
    assert old_log_prob_rows == [16]  # only the kept rows
    assert record["actor/num_updates"] == 2  # 4 groups in mini-batches of 2
    assert record["acc/mean"] == pytest.approx((0 + 4 + 8) / 48)  # over every response sampled this step


ALWAYS_RAISES = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    raise KeyError("answer_key")
"""


def test_a_reward_that_always_raises_stops_the_run_before_it_starts(tiny_model_dir, tmp_path):
    config = one_step(tiny_model_dir, tmp_path, reward_file(tmp_path, "broken.py", ALWAYS_RAISES))
    with pytest.raises(
        RewardFailure, match=r"^before training.*broken\.py:compute_score.* 4 of 4 .*KeyError: 'answer_key'"
    ):
        Trainer(config, run_dir_of(config))
    assert not run_dir_of(config).exists()


# Scores the start-up check's 4 responses and the first step's 16, then raises: the reward broke during the run.
BREAKS_AFTER_ONE_STEP = """
calls = 0

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    global calls
    calls += 1
    if calls > 20:
        raise ConnectionError("reward server went away")
    return float(len(solution_str) < 6)
"""


def test_a_reward_that_breaks_mid_run_stops_it_with_a_checkpoint_to_resume(tiny_model_dir, tmp_path, capsys):
    reward = reward_file(tmp_path, "breaks.py", BREAKS_AFTER_ONE_STEP)
    overrides = tiny_overrides(tiny_model_dir, tmp_path, **{"reward.name": reward, "data.heldout": "null"})
    assert main(["train", *map(str, overrides), "trainer.total_steps=3"]) == 1
    output = capsys.readouterr().out
    assert "ConnectionError: reward server went away" in output and "cegppo train --resume" in output
    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run_dir)] == [1]
    assert (run_dir / "checkpoints" / "step_1" / "model" / "model.safetensors").is_file()


def test_dropout_is_off_so_the_first_on_policy_ratio_is_exactly_one(tmp_path, short_reward):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer)
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = load_config(
        None,
        tiny_overrides(
            tmp_path / "model",
            tmp_path,
            **{"reward.name": short_reward, "data.heldout": "null", "trainer.total_steps": 1},
        ),
    )
    trainer = Trainer(config, run_dir_of(config))
    first_log_ratios = []
    loss_fn = trainer.actor.policy_gradient.loss_fn

    def recording(**kwargs):
        first_log_ratios.append((kwargs["log_prob"] - kwargs["old_log_prob"]) * kwargs["response_mask"])
        return loss_fn(**kwargs)

    trainer.actor.policy_gradient.loss_fn = recording
    trainer.fit()
    assert torch.count_nonzero(first_log_ratios[0]) == 0


def test_overlong_reward_shaping_reaches_the_rewards(tiny_model_dir, tmp_path, short_reward):
    # max_new_tokens 6, buffer 5: every response (>= 1 token) is in the buffer, penalty -(len - 1) / 5 * 0.5
    config = one_step(
        tiny_model_dir,
        tmp_path,
        short_reward,
        **{
            "reward.overlong_buffer_len": 5,
            "reward.overlong_penalty_factor": 0.5,
        },
    )
    Trainer(config, run_dir_of(config)).fit()
    (record,) = read_metrics(run_dir_of(config))
    expected = -(record["response_length/mean"] - 1) / 5 * 0.5
    assert expected < 0 and record["reward/overlong_penalty"] == pytest.approx(expected)


def test_an_update_stopped_by_a_non_finite_value_adds_nothing_to_the_metrics():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer)
    actor = Actor(model, actor_settings(["actor.bf16_autocast=false", "actor.micro_batch_size=2"]))
    batch = _experience(
        model, tokenizer
    )  # 8 rows, group size 1: two mini-batches of 4 rows, 2 micro-batches each
    batch = actor.old_policy(batch, group_size=1, recompute=True)
    loss_fn, losses = actor.policy_gradient.loss_fn, []

    def nan_in_the_second_micro_batch(**kwargs):
        loss, metrics = loss_fn(**kwargs)
        losses.append(loss.item())
        return (loss * float("nan"), metrics) if len(losses) == 2 else (loss, metrics)

    actor.policy_gradient.loss_fn = nan_in_the_second_micro_batch
    metrics = actor.update(batch, group_size=1).metrics
    assert metrics["actor/skipped_updates"] == 1 and len(losses) == 4
    assert metrics["actor/pg_loss"] == pytest.approx(losses[2] + losses[3])  # the second mini-batch only


def _grad(actor: Actor, batch: UpdateBatch) -> torch.Tensor:
    actor.optimizer.zero_grad()
    result = actor.accumulate_gradients(batch)
    assert result.finite
    return torch.cat(
        [p.grad.flatten() for p in actor.model.parameters() if p.grad is not None]
    ), result.metrics


def _mismatched_experience(model, tokenizer) -> UpdateBatch:
    """An experience whose sampler log-probs differ from the recomputed ones, with an outlier in row 1."""
    experience = _experience(model, tokenizer)
    batch = Actor(model, actor_settings(["actor.bf16_autocast=false"])).old_policy(
        experience, group_size=1, recompute=True
    )
    noise = 0.1 * torch.randn(batch.pi_old.log_prob.shape, generator=torch.Generator().manual_seed(3))
    experience.sampler_log_prob = batch.pi_old.log_prob + noise
    experience.sampler_log_prob[1, 0] -= 3.0  # π_old/π_sampler = e^3 on one token
    return batch


def test_rollout_correction_weights_and_rejects_before_any_loss():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=2)
    batch = _mismatched_experience(model, tokenizer)
    settings = [
        "actor.bf16_autocast=false",
        "actor.policy_loss=sapo",
        "algorithm.rollout_correction.rollout_is=token",
    ]
    settings += [
        "algorithm.rollout_correction.rollout_is_threshold=1.5",
        "algorithm.rollout_correction.rollout_rs=seq_max_k3",
        "algorithm.rollout_correction.rollout_rs_threshold=1.0",
    ]
    actor = Actor(model, actor_settings(settings))
    corrected, metrics = actor.correct_for_sampler(batch)
    assert torch.all(corrected.experience.response_mask[1] == 0) and torch.equal(
        corrected.experience.response_mask[2:], batch.experience.response_mask[2:]
    )
    experience = batch.experience
    expected = (batch.pi_old.log_prob - experience.sampler_log_prob).exp().clamp(
        max=1.5
    ) * experience.response_mask
    torch.testing.assert_close(corrected.is_weights, expected)
    assert metrics["actor/rollout_rs_seq_masked_fraction"] == pytest.approx(1 / 8)
    grads = []
    for micro in (8, 3):
        actor.settings.actor.micro_batch_size = micro
        grads.append(_grad(actor, corrected)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(_grad(actor, batch)[0], grads[0])


def test_bypass_mode_takes_the_sampler_log_probs_as_pi_old():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=2)
    batch = _mismatched_experience(model, tokenizer)
    bypass = Actor(model, actor_settings(["actor.bf16_autocast=false", "actor.policy_loss=bypass_mode"]))
    vanilla = Actor(model, actor_settings(["actor.bf16_autocast=false", "actor.policy_loss=vanilla"]))
    two_policies = dataclasses.replace(
        batch, pi_old=PiOld(batch.experience.sampler_log_prob, None, "sampler")
    )
    torch.testing.assert_close(
        _grad(bypass, bypass.old_policy(batch.experience, group_size=1))[0], _grad(vanilla, two_policies)[0]
    )
    assert not torch.allclose(_grad(vanilla, batch)[0], _grad(vanilla, two_policies)[0])


def test_bypass_mode_quadrants_clip_against_the_sampler_as_its_loss_does():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=2)
    batch = _mismatched_experience(model, tokenizer)  # π_old recomputed, and sampler log-probs ~0.1 off it
    clip = ["actor.clip_ratio_low=0.05", "actor.clip_ratio_high=0.05"]
    actor = Actor(
        model, actor_settings(["actor.bf16_autocast=false", "actor.policy_loss=bypass_mode", *clip])
    )
    batch = actor.old_policy(batch.experience, group_size=1)  # the sampler's π_old, as bypass_mode takes it
    _, metrics = _grad(actor, batch)
    quadrants = actor.accumulate_gradients(batch).quadrants
    clipped = quadrants.clipped.sum().item() / quadrants.total_tokens
    assert metrics["actor/pg_clipfrac_low"] + metrics["actor/pg_clipfrac_high"] > 0.2
    assert clipped == pytest.approx(metrics["actor/pg_clipfrac_low"] + metrics["actor/pg_clipfrac_high"])
    batch = batch.experience
    high_prob = (batch.sampler_log_prob.exp() >= 0.5) & (batch.response_mask > 0)
    assert quadrants.tokens[[0, 2]].sum().item() == high_prob.sum().item()  # HP by the sampler's π_old


@pytest.mark.parametrize(
    ("settings", "metric"),
    [
        ({"actor.policy_loss": "sapo"}, "actor/sapo_gate_mean"),
        ({"actor.policy_loss": "dppo_tv", "actor.clip_ratio_low": 0.01}, "actor/dppo_masked_frac"),
        ({"actor.policy_loss": "vespo"}, "actor/vespo_phi_mean"),
        ({"actor.policy_loss": "geo_mean", "algorithm.rollout_correction.rollout_rs": "seq_mean_k3", "algorithm.rollout_correction.rollout_rs_threshold": 1e-9},
         "actor/rollout_rs_masked_fraction"),
        ({"actor.policy_loss": "bypass_mode", "algorithm.rollout_correction.rollout_is": "sequence"}, "actor/rollout_is_mean"),
        ({"actor.policy_loss": "dgpo"}, "actor/dgpo_weight_mean"),
        ({"actor.policy_loss": "grpo_erc"}, "actor/erc_clipfrac"),
        ({"actor.top_entropy_quantile": 0.2}, "actor/top_entropy_kept_frac"),
        ({"actor.use_adaptive_entropy": True}, "actor/adaptive_entropy_coeff"),
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


def test_mini_batches_counted_in_responses_may_split_groups(monkeypatch):
    tokenizer = tiny_tokenizer()
    base = ["actor.bf16_autocast=false", "actor.lr=0.05", "rollout.n=4", "data.train_batch_size=2"]

    def updated_weights(*overrides: str) -> tuple[torch.Tensor, list[list[int]]]:
        model = tiny_model("llama", tokenizer, seed=1)
        actor = Actor(model, actor_settings([*base, *overrides]))
        batch = _experience(model, tokenizer)
        batch.advantages = torch.arange(8.0)  # tags each row, to see which rows each update takes
        batch = actor.old_policy(batch, group_size=4, recompute=True)
        seen: list[list[int]] = []
        step = actor._update_mini_batch
        monkeypatch.setattr(
            actor,
            "_update_mini_batch",
            lambda mini, **kw: (seen.append(mini.experience.advantages.int().tolist()), step(mini, **kw))[1],
        )
        metrics = actor.update(batch, group_size=4).metrics
        assert metrics["actor/num_updates"] == len(seen)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), seen

    by_groups, groups = updated_weights("actor.ppo_mini_batch_size=1")
    by_rows, rows = updated_weights("actor.ppo_mini_batch_responses=4")
    assert groups == rows == [[0, 1, 2, 3], [4, 5, 6, 7]]
    torch.testing.assert_close(by_rows, by_groups, rtol=0, atol=0)
    split, halves = updated_weights("actor.ppo_mini_batch_responses=2")
    assert halves == [[0, 1], [2, 3], [4, 5], [6, 7]]  # four updates; each group spans two
    assert not torch.equal(split, by_groups)


def test_the_lr_warm_up_counts_rl_steps_and_every_update_of_a_step_uses_its_lr(monkeypatch):
    # verl steps its scheduler once per RL step: lr_warmup_steps=10 with 8 updates a step is ten RL steps
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=1)
    actor = Actor(
        model, actor_settings(["actor.bf16_autocast=false", "actor.lr=0.01", "actor.warmup_steps=2"])
    )
    step, lrs = actor._update_mini_batch, []
    monkeypatch.setattr(
        actor,
        "_update_mini_batch",
        lambda mini, **kw: lrs.append(actor.optimizer.param_groups[0]["lr"]) or step(mini, **kw),
    )
    reported = []
    for _ in range(3):  # 8 rows, group size 1, 4 prompts per mini-batch: 2 updates a step
        batch = actor.old_policy(_experience(model, tokenizer), group_size=1)
        reported.append(actor.update(batch, group_size=1).metrics["actor/lr"])
    assert lrs == pytest.approx([0.0, 0.0, 0.005, 0.005, 0.01, 0.01])
    assert reported == pytest.approx([0.0, 0.005, 0.01])


def test_the_arithmetic_task_takes_its_digits_and_held_out_size(tiny_model_dir, tmp_path, short_reward):
    settings = {"data.digits": 3, "data.heldout": "arithmetic", "data.heldout_size": 300}
    config = one_step(tiny_model_dir, tmp_path, short_reward, **settings)
    trainer = Trainer(config, run_dir_of(config))
    train = {(ex.extra_info["a"], ex.extra_info["b"]) for ex in trainer.train_data.examples}
    held_out = {(ex.extra_info["a"], ex.extra_info["b"]) for ex in trainer.heldout}
    assert len(held_out) == 300 and all(100 <= a <= 999 and 100 <= b <= 999 for a, b in train | held_out)
    assert not train & held_out


def test_pruning_keeps_the_newest_complete_checkpoints_and_nothing_else_is_touched(tmp_path):
    for name in ("step_5", "step_20", "step_10", "step_30", ".step_40.tmp-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text("")
    (tmp_path / "step_35").mkdir()  # incomplete: no state file, so not a checkpoint to count or delete
    assert prune_checkpoints(tmp_path, 0) == []
    assert [p.name for p in prune_checkpoints(tmp_path, 2)] == ["step_5", "step_10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_40.tmp-1", "step_20", "step_30", "step_35"]
