"""Run configuration: the embedded default, presets, overrides and the errors a user sees."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cegppo.config import MOVED_KEYS, ConfigError, load_config, setting_key, to_yaml
from cegppo.losses import PolicyLossConfig, declared_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_demo_yaml_spells_out_the_built_in_defaults():
    assert load_config(CONFIGS / "demo_cpu.yaml") == load_config(None)


def test_demo_default_is_ce_gppo_with_two_updates_per_rollout_batch():
    config = load_config(None)
    assert config.actor.policy_loss.loss_mode == "ce_gppo"
    # the trainer's loss settings are the loss library's defaults, setting by setting (every one is a key)
    assert config.policy_loss_config() == PolicyLossConfig()
    assert set(PolicyLossConfig().settings()) == set(declared_settings())
    # ... which are the paper's "generally effective setting" (Limitations) with the release's dual-clip
    assert (PolicyLossConfig().beta1, PolicyLossConfig().beta2, PolicyLossConfig().clip_ratio_c) == (
        0.5,
        1.0,
        10.0,
    )
    assert config.data.train_batch_size // config.actor.ppo_mini_batch_size >= 2


@pytest.mark.parametrize("name,beta1", [("paper_1p5b.yaml", 0.5), ("paper_7b.yaml", 0.75)])
def test_paper_presets_carry_the_recipe(name, beta1):
    config = load_config(CONFIGS / name)
    actor, loss = config.actor, config.actor.policy_loss
    assert (loss.beta1, loss.beta2, actor.clip_ratio_low, actor.clip_ratio_high) == (beta1, 1.0, 0.2, 0.2)
    assert (actor.lr, actor.ppo_mini_batch_size, actor.loss_agg_mode) == (1e-6, 16, "token-mean")
    assert (config.rollout.n, config.rollout.temperature, config.rollout.max_new_tokens) == (8, 1.0, 16384)
    assert config.data.train_batch_size == 128
    # gen_batch_size=256 prompts sampled, <= 128 groups with signal kept; lr_warmup_steps=10 RL steps
    assert (config.data.gen_batch_size, actor.warmup_steps, actor.weight_decay) == (256, 10, 0.1)
    # the release's dynamic sampling drops groups without re-generating (max_num_gen_batches=1)
    assert config.algorithm.filter_groups and config.algorithm.max_num_gen_batches == 1
    assert not actor.use_kl_loss and actor.entropy_coeff == 0


def test_entropy_control_preset_is_the_demo_with_clipping_active_and_the_controller_on():
    demo, preset = load_config(None), load_config(CONFIGS / "entropy_control_cpu.yaml")
    assert (preset.model, preset.data, preset.reward, preset.algorithm) == (
        demo.model,
        demo.data,
        demo.reward,
        demo.algorithm,
    )
    assert preset.data.train_batch_size // preset.actor.ppo_mini_batch_size == 8
    control = preset.actor.entropy_control
    assert control.enabled and control.adjust_beta2
    assert control.beta2_min <= preset.actor.policy_loss.beta2 <= control.beta2_max
    # without the controller the same file is the fixed-β reference run
    fixed = load_config(CONFIGS / "entropy_control_cpu.yaml", ["actor.entropy_control.enabled=false"])
    assert fixed.actor.policy_loss == demo.actor.policy_loss


def test_overrides_are_typed_and_round_trip_through_yaml(tmp_path):
    config = load_config(None, ["actor.lr=1e-5", "rollout.n=4", "data.train_files=[a.jsonl,b.parquet]"])
    assert (config.actor.lr, config.rollout.n, config.data.train_files) == (1e-5, 4, ["a.jsonl", "b.parquet"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override,message",
    [
        ("actor.lrr=1", r"key 'actor.lrr'.*Did you mean: 'lr'"),
        ("rollout.n=abc", r"rollout.n.*could not be converted to Integer"),
        ("actor.ppo_mini_batch_size=3", r"must divide data.train_batch_size=8"),
        ("actor.ppo_mini_batch_responses=5", r"must divide data.train_batch_size × rollout.n = 64"),
        ("data.digits=5", r"data.digits=5 is invalid: an integer in \[1, 4\]"),
        ("actor.policy_loss=ppo", r"registered losses are \[.*'ce_gppo'"),
        ("actor.policy_loss.beta1=-1", r"actor.policy_loss.beta1=-1.0 is invalid"),
        ("actor.clip_ratio_c=1", r"actor.clip_ratio_c"),
        ("reward.timeout_s=0", r"reward.timeout_s"),
        ("rollout.top_p=0", r"rollout.top_p"),
        ("trainer.device=tpu", r"trainer.device"),
        ("actor.loss_agg_mode=sum", r"allowed values are \['token-mean'"),
        ("no_equals_sign", r"must look like key.sub=value"),
        ("actor.clip_ratio_low=1.5", r"actor.clip_ratio_low=1.5 is invalid: must be in \[0, 1\]"),
        ("actor.clip_ratio_high=0", r"actor.clip_ratio_high=0.0 is invalid: must be a finite number > 0"),
        ("algorithm.max_num_gen_batches=-1", r"algorithm.max_num_gen_batches=-1 is invalid"),
        ("reward.overlong_buffer_len=32", r"reward.overlong_buffer_len=32 is invalid: must be below"),
        (
            "reward.overlong_penalty_factor=-1",
            r"reward.overlong_penalty_factor=-1.0 is invalid: must be >= 0",
        ),
        ("reward.max_error_fraction=1.5", r"reward.max_error_fraction=1.5 is invalid: must be in \[0, 1\]"),
        ("reward.max_error_steps=0", r"reward.max_error_steps=0 is invalid: must be an integer >= 1"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["rollout.tis_cap=2", "actor.top_entropy_quantile=0.2"])
def test_bypass_mode_rejects_the_token_weights_its_loss_would_ignore(override):
    load_config(None, [override])
    with pytest.raises(
        ConfigError, match=rf"{override.split('=')[0]}=.* has no effect with actor.policy_loss=bypass_mode"
    ):
        load_config(None, [override, "actor.policy_loss=bypass_mode"])


def test_a_bad_yaml_file_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("actor:\n  beta3: 1.0\n")
    with pytest.raises(ConfigError, match=rf"{path}: key 'actor.beta3'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "text,message",
    [
        ("actor:\n  lr: [1,\n  beta1: 2\n", r"bad.yaml:4: invalid YAML: did not find expected ',' or '\]'$"),
        ("actor:\n  lr: 1\n   beta1: 2\n", r"bad.yaml:3: invalid YAML: mapping values are not allowed"),
        ("- actor\n- data\n", r"bad.yaml: expected a mapping of sections .*got a YAML list$"),
    ],
)
def test_a_yaml_file_that_is_not_a_config_is_one_line_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_dr_grpo_normalises_by_max_new_tokens_unless_told_otherwise():
    norm = ["actor.loss_agg_mode=seq-mean-token-sum-norm", "rollout.max_new_tokens=48"]
    assert load_config(None, norm).policy_loss_config().loss_scale_factor == 48
    assert (
        load_config(None, [*norm, "actor.loss_scale_factor=100"]).policy_loss_config().loss_scale_factor
        == 100
    )
    assert load_config(None, ["rollout.max_new_tokens=48"]).policy_loss_config().loss_scale_factor is None


def test_a_custom_reward_works_with_the_default_strict_boxed():
    config = load_config(None, ["reward.name=my_rewards:score"])
    assert config.reward.strict_boxed is None  # on for the built-in reward, not applicable to this one
    with pytest.raises(
        ConfigError, match=r"reward.strict_boxed=True is invalid: applies only to the built-in .math. reward"
    ):
        load_config(None, ["reward.name=my_rewards:score", "reward.strict_boxed=true"])


def test_text_overrides_are_taken_as_typed():
    # YAML would read these as a bool, an int and a float
    config = load_config(
        None, ["trainer.name=on", "data.system_prompt=007", "model.path=1e3", "reward.name=no"]
    )
    assert (config.trainer.name, config.data.system_prompt, config.model.path, config.reward.name) == (
        "on", "007", "1e3", "no"
    )  # fmt: skip
    assert load_config(None, ["trainer.name=null"]).trainer.name is None
    assert load_config(None, ["rollout.n=4"]).rollout.n == 4  # other types still parse
    # null stays null: an error for a field that needs text
    with pytest.raises(ConfigError, match=r"trainer\.output_dir"):
        load_config(None, ["trainer.output_dir=null"])


def test_loss_settings_are_keys_at_verls_places_made_from_the_losses_declarations():
    keys = OmegaConf.structured(load_config(None))
    assert {setting_key(d) for d in declared_settings().values()} == {
        *(f"actor.policy_loss.{k}" for k in keys.actor.policy_loss if k != "loss_mode"),
        *(f"algorithm.rollout_correction.{k}" for k in keys.algorithm.rollout_correction),
        "actor.clip_ratio_low",
        "actor.clip_ratio_high",
        "actor.clip_ratio_c",
        "actor.loss_scale_factor",
        "actor.tau_pos",
        "actor.tau_neg",
    }
    assert setting_key(declared_settings()["bypass_loss_type"]) == "algorithm.rollout_correction.loss_type"
    # actor holds no loss-specific key of its own: each moved to actor.policy_loss or the rollout correction
    assert not set(keys.actor) & {key.split(".", 1)[1] for key in MOVED_KEYS}


def test_the_policy_loss_shorthand_sets_the_loss_mode_and_the_settings_it_names():
    config = load_config(None, ["actor.policy_loss=ce_gppo(beta1=1,beta2=0.5,clip_ratio_high=0.28,lr=1e-6)"])
    loss = config.actor.policy_loss
    assert (loss.loss_mode, loss.beta1, loss.beta2) == ("ce_gppo", 1.0, 0.5)
    assert (config.actor.clip_ratio_high, config.actor.lr) == (0.28, 1e-6)
    bypass = load_config(None, ["actor.policy_loss=bypass_mode(bypass_loss_type=reinforce)"])
    assert bypass.algorithm.rollout_correction.loss_type == "reinforce"
    assert load_config(None, ["actor.policy_loss=gppo"]).actor.policy_loss.loss_mode == "gppo"
    with pytest.raises(
        ConfigError, match="'betaX' is neither a loss setting nor an actor key; did you mean beta2"
    ):
        load_config(None, ["actor.policy_loss=ce_gppo(betaX=1)"])


def test_old_flat_keys_map_to_their_sections_with_one_warning_naming_each(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(
        "actor:\n  policy_loss: ce_gppo\n  beta1: 0.25\n  clip_cov_lb: 0.5\n  rollout_is: token\n"
        "  bypass_loss_type: reinforce\n  clip_ratio_high: 0.28\n"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(path, ["actor.beta2=0.75", "actor.rollout_is_threshold=0.5_2.0"])
    (moved,) = [w for w in caught if issubclass(w.category, FutureWarning)]
    for old in (
        "actor.beta1",
        "actor.clip_cov_lb",
        "actor.rollout_is",
        "actor.bypass_loss_type",
        "actor.beta2",
        "actor.rollout_is_threshold",
    ):
        assert f"{old} -> {MOVED_KEYS[old]}" in str(moved.message)
    assert "actor.clip_ratio_high ->" not in str(moved.message)  # still actor's, as in verl
    loss, correction = config.actor.policy_loss, config.algorithm.rollout_correction
    assert (loss.loss_mode, loss.beta1, loss.beta2, loss.clip_cov_lb) == ("ce_gppo", 0.25, 0.75, 0.5)
    assert (correction.rollout_is, correction.rollout_is_threshold, correction.loss_type) == (
        "token",
        "0.5_2.0",
        "reinforce",
    )
    # the same run in the new layout, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert load_config(_saved(tmp_path, config)) == config


def _saved(tmp_path: Path, config) -> Path:
    path = tmp_path / "new.yaml"
    path.write_text(to_yaml(config))
    return path


@pytest.mark.parametrize(
    "overrides,beta1",
    [
        (["actor.beta1=0.1", "actor.policy_loss.beta1=0.2"], 0.2),
        (["actor.policy_loss.beta1=0.2", "actor.beta1=0.1"], 0.1),
        (["actor.policy_loss=ce_gppo(beta1=0.3)", "actor.beta1=0.1"], 0.1),
        (["actor.beta1=0.1", "actor.policy_loss=ce_gppo(beta1=0.3)"], 0.3),
        (["actor.beta1=0.1", "actor.policy_loss=ce_gppo"], 0.1),  # the shorthand sets only what it names
    ],
)
def test_overrides_apply_in_order_whichever_spelling(overrides, beta1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert load_config(None, overrides).actor.policy_loss.beta1 == beta1


@pytest.mark.parametrize(
    "text,first,second",
    [
        ("actor:\n  beta1: 0.1\n  policy_loss:\n    beta1: 0.2\n", "actor.policy_loss.beta1", "actor.beta1"),
        ("actor:\n  policy_loss: ce_gppo(beta1=0.1)\n  beta1: 0.2\n", "actor.policy_loss", "actor.beta1"),
        (
            "actor:\n  rollout_is: token\nalgorithm:\n  rollout_correction:\n    rollout_is: sequence\n",
            "algorithm.rollout_correction.rollout_is",
            "actor.rollout_is",
        ),
    ],
)
def test_a_file_giving_a_setting_under_both_spellings_is_an_error_naming_both(tmp_path, text, first, second):
    path = tmp_path / "both.yaml"
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=rf"both.yaml: {first} and {second} are the same setting; give it once"
    ):
        load_config(path)


def test_an_old_key_error_names_the_new_key():
    with (
        pytest.raises(ConfigError, match=r"actor.policy_loss.beta1=-1.0 is invalid"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", FutureWarning)
        load_config(None, ["actor.beta1=-1"])
