"""The run configuration: typed sections, YAML files and dotted command-line overrides.

The defaults *are* the embedded demo (``configs/demo_cpu.yaml`` spells them out): SmolLM2-135M-Instruct
learning 2-digit addition with CE-GPPO on a CPU. Keys follow verl's names where verl has one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cegppo import presets
from cegppo.advantages import ADVANTAGE_REGISTRY
from cegppo.data.benchmark import ARITHMETIC
from cegppo.losses import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    PolicyLoss,
    PolicyLossConfig,
    SettingError,
    declared_settings,
    get_policy_loss,
    list_policy_losses,
)
from cegppo.losses.settings import ACTOR, POLICY_LOSS, ROLLOUT_CORRECTION, Declared, find_setting
from cegppo.rewards import RewardConfig

# data.task / data.heldout: follow the training data (resolved when a config is loaded, see resolve_data)
AUTO = "auto"


class ConfigError(ValueError):
    """A configuration file or override that is wrong; the message names the key."""


@dataclass
class ModelConfig:
    path: str = "smollm2-135m-instruct"  # the embedded default, or a local transformers directory
    fused_logprobs: bool = True  # log-probs/entropy from hidden states without materialising the logits
    logprob_chunk_size: int = 1024
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    # The built-in task trained on: auto is arithmetic, unless data.train_files are given (then none: the files)
    task: str | None = AUTO
    train_files: list[str] = field(default_factory=list)  # JSONL/Parquet, {problem, answer} or verl's schema
    train_size: int = 5000  # problems generated for a built-in task
    digits: int = 2  # operand digits of the arithmetic task and of the `arithmetic` held-out set (1-4)
    # The arithmetic task's two worked examples before each question, in training and held-out prompts; false:
    # the question alone (a model fine-tuned on the task, e.g. the toy policy of docs/toy.md)
    few_shot: bool = True
    # Greedy accuracy before/after training: a benchmark name or a prompt file; auto is the built-in task's own
    # held-out set (arithmetic), and none for train_files (give their held-out file here); null: none
    heldout: str | None = AUTO
    heldout_size: int = 200
    train_batch_size: int = 8  # prompts per step
    # prompts sampled per generation round with algorithm.filter_groups (verl's); None: train_batch_size
    gen_batch_size: int | None = None
    system_prompt: str | None = None  # replaces the chat template's default system turn
    question_template: str | None = (
        None  # files/benchmarks, e.g. "{problem} Put the final answer in \\boxed{}."
    )
    shuffle: bool = True
    seed: int = 0


@dataclass
class VLLMEngineConfig:
    """Settings of the ``vllm`` rollout engine only (the sampling seed is ``trainer.seed``)."""

    # The share of the GPU's memory vLLM takes (weights, activations, KV cache); the rest holds the policy,
    # its gradients and the optimizer state. vLLM's CPU build reads it as a share of the RAM, unless
    # kv_cache_gib is set.
    gpu_memory_utilization: float = 0.5
    kv_cache_gib: float | None = None  # an explicit KV-cache size instead (e.g. 1 on a CPU machine)
    dtype: str = "bfloat16"  # vLLM's weights and activations; the policy keeps its own
    enforce_eager: bool | None = None  # None: CUDA graphs on a GPU, eager on CPU (compiling takes ~150 s)
    enable_sleep_mode: bool = True  # free vLLM's GPU memory during the update (GPU only; ignored on CPU)
    max_model_len: int | None = None  # None: the model's context length


@dataclass
class RolloutConfig:
    engine: str = "hf"
    n: int = 8  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 32
    batch_size: int | None = None  # generation micro-batch in sequences (None: all at once)
    # Deprecated: algorithm.rollout_correction.rollout_is=token with rollout_is_threshold=<cap> (verl's Token-TIS),
    # which it maps to.
    tis_cap: float | None = None
    vllm: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)


# -- the loss settings' keys: made from the losses' declarations (cegppo.losses.settings) -------------------------

# Where each of verl's places for a loss setting is in the run config.
SECTIONS = {
    ACTOR: "actor",
    POLICY_LOSS: "actor.policy_loss",
    ROLLOUT_CORRECTION: "algorithm.rollout_correction",
}


def setting_key(declared: Declared) -> str:
    """The run-config key of a declared loss setting, e.g. ``actor.policy_loss.beta1``."""
    return f"{SECTIONS[declared.place]}.{declared.key}"


def _key_field(declared: Declared) -> tuple[str, Any, Any]:
    """The setting as a dataclass field of its section. OmegaConf has no float-or-string type, so verl's thresholds
    (2.0, or "0.5_2.0" for a band) are text here, read back as numbers by :meth:`Config.policy_loss_config`."""
    kind, default = declared.type, declared.default
    args = typing.get_args(kind)
    if float in args and str in args:
        kind = str | None if type(None) in args else str
        default = None if default is None else str(default)
    return declared.key, kind, field(default=default)


def _loss_keys(place: str) -> list[tuple[str, Any, Any]]:
    return [_key_field(d) for d in declared_settings().values() if d.place == place]


@dataclass
class PolicyLossSection:
    """``actor.policy_loss`` (verl's): the registered loss (``loss_mode``) and the settings verl keeps in this section
    of every registered loss, each declared by its loss (:func:`policy_loss_section` adds them)."""

    loss_mode: str = "ce_gppo"


def policy_loss_section() -> PolicyLossSection:
    """A default ``actor.policy_loss`` with a key for each setting declared so far, so that a loss registered after
    this module was imported brings its keys too."""
    return _policy_loss_class(tuple(d for d in declared_settings().values() if d.place == POLICY_LOSS))()


@functools.cache
def _policy_loss_class(declared: tuple[Declared, ...]) -> type[PolicyLossSection]:
    cls = dataclasses.make_dataclass(
        "PolicyLossSection", [_key_field(d) for d in declared], bases=(PolicyLossSection,)
    )
    cls.__module__, cls.__doc__ = __name__, PolicyLossSection.__doc__
    return cls


# The loss keys directly on actor (verl's: the shared trust interval, dual-clip, loss_scale_factor; SAPO's tau_*),
# after the policy_loss section.
ActorLossKeys = dataclasses.make_dataclass(
    "ActorLossKeys",
    [("policy_loss", PolicyLossSection, field(default_factory=policy_loss_section)), *_loss_keys(ACTOR)],
)
# verl's algorithm.rollout_correction: importance weights and rejection against the sampler, for any loss, and
# bypass_mode's loss_type.
RolloutCorrectionConfig = dataclasses.make_dataclass(
    "RolloutCorrectionConfig", _loss_keys(ROLLOUT_CORRECTION)
)
# The flat actor.* keys of the loss settings that moved to their sections: old key -> its key now.
MOVED_KEYS = {
    f"actor.{d.name}": setting_key(d)
    for d in declared_settings().values()
    if setting_key(d) != f"actor.{d.name}"
}


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"  # grpo | dr_grpo | rloo
    # DAPO's dynamic sampling: drop the groups whose rewards are all equal and sample data.gen_batch_size new
    # prompts a round until data.train_batch_size groups have signal, in at most max_num_gen_batches rounds per
    # step (verl's name; 0: no cap, but 20 rounds in a row without a group with signal stop the run; 1: no
    # re-sampling, train on the groups left, as the CE-GPPO release does). The groups kept are cut to a whole
    # number of mini-batches, as verl does: a last, ragged update over a few groups would be normalised as if it
    # were full (the cut responses: data/ragged_dropped_responses).
    filter_groups: bool = False
    max_num_gen_batches: int = 10
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)


@dataclass
class ScheduleConfig:
    """A value over training steps: ``constant`` (the plain setting), ``step`` (piecewise constant:
    each ``[step, value]`` point holds from its step on, e.g. the paper's Fig. 6 switch
    ``[[0, 0.0], [585, 0.5]]``) or ``linear`` (interpolated between points, flat outside them)."""

    kind: str = "constant"
    points: list[list[float]] = field(default_factory=list)


@dataclass
class EntropyControlConfig:
    """Keep ``entropy/mean`` in [target_low, target_high] by moving β1 (and β2 if asked) after each step.

    The controller compares the entropy it expects at the next step, H_t + trend_weight·(H_t − H_{t−1}), with
    the band. Above it: β1 += step_size (and β2 -= step_size): NA&LP tokens, which lower entropy, get more
    weight (CE-GPPO §5.1). Below it: the opposite. β stays within its bounds.
    """

    enabled: bool = False
    target_low: float = 0.0
    target_high: float = 0.0
    step_size: float = 0.05
    # 0 reacts to the entropy measured; 1 extrapolates the last change, so that a fall already under way is
    # not sped up while entropy is still above the band (and a rise not while it is below)
    trend_weight: float = 1.0
    beta1_min: float = 0.0
    beta1_max: float = 1.0
    adjust_beta2: bool = False
    beta2_min: float = 0.5
    beta2_max: float = 1.5


@dataclass
class ActorConfig(ActorLossKeys):
    """The update. The loss is ``policy_loss.loss_mode`` with its settings in ``policy_loss``; the settings every
    loss shares (``clip_ratio_*``, ``loss_scale_factor``) and SAPO's ``tau_*`` are keys of ``actor`` itself, as in
    verl (:data:`ActorLossKeys`: both from the losses' declarations; docs/losses.md lists which loss reads which)."""

    beta1_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    beta2_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    entropy_control: EntropyControlConfig = field(default_factory=EntropyControlConfig)
    loss_agg_mode: str = "token-mean"
    ppo_epochs: int = 1
    ppo_mini_batch_size: int = 4  # prompts per optimiser update
    # Responses per optimiser update instead (replaces ppo_mini_batch_size): a group may then span two updates,
    # as with TRL's completion-counted batches; more updates per rollout batch from fewer prompts.
    ppo_mini_batch_responses: int | None = None
    micro_batch_size: int = 8  # sequences per forward/backward (memory only: never changes the gradient)
    # verl's use_dynamic_bsz with ppo_max_token_len_per_gpu: micro-batches of at most this many positions (rows ×
    # their longest prompt + longest response), rows grouped by length; replaces micro_batch_size. None: off
    micro_batch_tokens: int | None = None
    # Run each prompt once per group (and micro-batch) in the update, the log-prob passes and hf generation,
    # with its KV cache repeated to the n responses: the same numbers, ~1/n of the prompt work (rollout.n > 1).
    share_prompt: bool = True
    lr: float = 5e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # Linear warm-up of the lr over this many RL steps (verl's lr_warmup_steps): every optimiser update of a step
    # uses the step's lr, from 0 at the first step to actor.lr at step warmup_steps + 1
    warmup_steps: int = 0
    grad_clip: float = 1.0
    bf16_autocast: bool = True  # bfloat16 autocast for the update's forward passes (~2.4x faster on CPU)
    # The policy's weights: float32, or bfloat16 with float32 master weights in the optimizer (verl's FSDP mixed
    # precision; plain bfloat16 AdamW would round away lr = 1e-6 steps). Half the weights' and gradients' memory.
    param_dtype: str = "float32"
    # The float32 master weights and AdamW's state on the CPU, the optimizer step there (DeepSpeed's
    # ZeRO-Offload): the GPU keeps only the weights, their gradients and the activations.
    optimizer_offload: bool = False
    entropy_coeff: float = 0.0
    # Skywork-OR1's controller, as TRL's use_adaptive_entropy: after each optimiser update the coefficient moves
    # by entropy_coeff_delta (up when the update's entropy is <= entropy_target, else down), within
    # [entropy_coeff_min, entropy_coeff_max], starting from entropy_coeff; it applies only while entropy <= target
    use_adaptive_entropy: bool = False
    entropy_target: float = 0.2
    entropy_coeff_delta: float = 0.005
    entropy_coeff_min: float = 0.0
    entropy_coeff_max: float = 1.0
    # The 80/20 rule (TRL's top_entropy_quantile): train on the tokens whose entropy is in the top fraction of
    # the mini-batch (1.0: every token; the paper uses 0.2)
    top_entropy_quantile: float = 1.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    positive_loss_coeff: float = 0.0  # NLL on correct responses (the CE-GPPO release used 0.1)


# The probe's name for the run's own update (always probed); analysis.probe_variants may list it explicitly.
PROBE_TRAJECTORY = "trajectory"


@dataclass
class AnalysisConfig:
    prob_threshold: float = 0.5  # HP vs LP tokens in the quadrant metrics: π_old(token) >= threshold
    # The paired probe (docs/entropy.md): every probe_every steps, apply each variant's update to a copy of the
    # step's batch from the same state, measure it on a fixed probe set, restore, then take the run's own update.
    probe_every: int = 0  # 0: off
    probe_variants: list[str] = field(
        default_factory=list
    )  # loss settings: "ce_gppo(beta1=0,beta2=1)", "cispo"
    probe_prompts: int = 16  # probe-set prompts, drawn once from the held-out pool (never trained on)
    probe_samples: int = (
        4  # responses per probe prompt, sampled afresh at each probe step with the probe's seed
    )
    probe_epochs: int | None = (
        None  # passes over the batch a probed update makes (a row after each); None: ppo_epochs
    )


# The eval benchmark name of the run's own held-out set (data.heldout, as the run loads it), sampled as eval.*
# says rather than greedily
HELDOUT_BENCHMARK = "heldout"


@dataclass
class EvalConfig:
    """Benchmarks evaluated every ``trainer.eval_every`` steps, logged as ``val/<bench>/avg@n``: packaged
    benchmarks, prompt files, or ``heldout`` (:data:`HELDOUT_BENCHMARK`)."""

    benchmarks: list[str] = field(default_factory=list)
    n: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    limit: int | None = None  # first K problems of each benchmark


@dataclass
class TrainerConfig:
    total_steps: int = 10
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None  # run directory name; default: a timestamp
    save_every: int = 0  # checkpoint every N steps; 0: only at the end (and on SIGINT/SIGTERM)
    # Keep only the newest N checkpoints, deleting older ones after each save (HF's save_total_limit, verl's
    # max_actor_ckpt_to_keep): a 135M model's checkpoint with its AdamW state is 1.6 GB. 0: keep all. Two: the
    # newest, and one to fall back on.
    keep_checkpoints: int = 2
    eval_every: int = 0  # evaluate eval.benchmarks every N steps (and at the end); 0: never
    num_logged_samples: int = 4
    tensorboard: bool = True
    quiet: bool = False
    num_threads: int | None = None
    # Keep freed host memory in the process for reuse instead of returning it to the OS and faulting it in again
    # (cegppo.trainer.host_memory): the update's vocabulary-sized CPU buffers then cost no page faults, and the
    # resident size stays at its peak. None: where the C library is glibc; true: a warning where it is not.
    keep_host_memory: bool | None = None
    device: str = "auto"  # auto: cuda if available, else cpu
    # Refuse to start when the memory estimate (printed at start) exceeds the device's free memory (the CPU's
    # RAM); false: a warning instead.
    check_memory: bool = True
    # The peak matmul rate perf/mfu/* divides by, e.g. a GPU's datasheet bf16 dense figure (989 for an H100
    # SXM); None: measured once per process by a short matmul probe in each phase's dtype.
    peak_tflops: float | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(strict_boxed=None))
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def policy_loss_config(self) -> PolicyLossConfig:
        """The loss settings, from their keys (:func:`setting_key`), validated by the losses that declare them
        (ConfigError naming the key).

        ``seq-mean-token-sum-norm`` (Dr. GRPO) divides by ``loss_scale_factor``; left unset, it is
        ``rollout.max_new_tokens``, a constant, not the padded width of the step's longest response, which
        would scale the learning rate by 1/(longest response), the length bias Dr. GRPO removes.
        """
        settings = {name: _setting_value(self, d) for name, d in declared_settings().items()}
        if self.rollout.tis_cap is not None:  # the older spelling of token-level TIS
            settings.update(rollout_is="token", rollout_is_threshold=self.rollout.tis_cap)
        if settings["loss_scale_factor"] is None and self.actor.loss_agg_mode == "seq-mean-token-sum-norm":
            settings["loss_scale_factor"] = self.rollout.max_new_tokens
        try:
            return PolicyLossConfig(**settings)
        except SettingError as error:
            declared = find_setting(error.name)
            key = setting_key(declared) if declared else error.name
            raise ConfigError(f"{key}={error.value!r} is invalid: {error.rule}") from None


def _setting_value(config: Config, declared: Declared) -> Any:
    """The setting's value in ``config`` as its loss declares it: a number kept as text for OmegaConf (see
    :func:`_key_field`) as the number it is ("_" is a band's separator here, not a digit separator); the declared
    default for a key the config lacks (a loss registered after it was made)."""
    try:
        value = attrgetter(setting_key(declared))(config)
    except AttributeError:
        return declared.default
    args = typing.get_args(declared.type)
    if float in args and str in args and isinstance(value, str) and "_" not in value:
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides in order; typed, resolved and validated.

    A list-of-text key (``data.train_files``, ``eval.benchmarks``) also takes one value without brackets.
    ``actor.policy_loss=NAME`` or ``NAME(key=value, ...)`` is short for ``actor.policy_loss.loss_mode=NAME`` and
    the settings named (:func:`parse_loss_spec`). The flat ``actor.<setting>`` keys of the loss settings that
    moved to their sections (:data:`MOVED_KEYS`) still work, with one FutureWarning naming each.
    """
    merged = OmegaConf.structured(Config)
    moved: list[tuple[str, str]] = []
    if path is not None:
        merged = _merge_file(merged, Path(path), moved)
    for override in overrides:
        merged = _merge_override(merged, override, moved)
    if moved:
        renames = ", ".join(f"{old} -> {new}" for old, new in dict.fromkeys(moved))
        warnings.warn(
            f"loss settings have their own sections now (verl's layout): {renames}. The old keys still work "
            "and will be removed in a future release",
            FutureWarning,
            stacklevel=2,
        )
    config = OmegaConf.to_object(merged)
    assert isinstance(config, Config)
    resolve_data(config.data)
    validate(config)
    return config


def _merge_file(merged: DictConfig, path: Path, moved: list[tuple[str, str]]) -> DictConfig:
    values = load_yaml_mapping(path)
    for key in _TEXT_LIST_KEYS:
        if isinstance(OmegaConf.select(values, key), str):
            OmegaConf.update(values, key, [OmegaConf.select(values, key)])
    container = OmegaConf.to_container(values)  # interpolations stay text, resolved once merged
    assert isinstance(container, dict)
    moved += _move_old_keys(container, path)
    try:
        return OmegaConf.merge(merged, container)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {_describe(error)}") from None


def _move_old_keys(values: dict[str, Any], path: Path) -> list[tuple[str, str]]:
    """Put a file's older spellings where the settings are now: the ``actor.policy_loss: NAME(...)`` shorthand and
    the flat keys of :data:`MOVED_KEYS`. Returns the (old key, key) pairs moved; a setting given twice in the file
    (under both spellings) is a ConfigError naming both."""
    actor = values.get("actor")
    if not isinstance(actor, dict):
        return []
    found: list[tuple[str, str, Any]] = []  # (as the file spells it, its key now, value)
    if isinstance(actor.get("policy_loss"), str):
        found += [("actor.policy_loss", key, value) for key, value in _shorthand(actor.pop("policy_loss"))]
    for old, new in MOVED_KEYS.items():
        if (leaf := old.removeprefix("actor.")) in actor:
            found.append((old, new, actor.pop(leaf)))
    spelled: dict[str, str] = {}
    for spelling, key, value in found:
        if key in spelled or _contains(values, key):
            raise ConfigError(
                f"{path}: {spelled.get(key, key)} and {spelling} are the same setting; give it once, as {key}"
            )
        _put(values, key, value)
        spelled[key] = spelling
    return [(spelling, key) for spelling, key, _ in found if spelling != "actor.policy_loss"]


def _contains(values: dict[str, Any], key: str) -> bool:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _put(values: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = values
    for part in sections:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _merge_override(merged: DictConfig, override: str, moved: list[tuple[str, str]]) -> DictConfig:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, value = override.split("=", 1)
    try:
        if key == "actor.policy_loss" and not value.lstrip().startswith("{"):
            for setting, typed in _shorthand(value):
                merged = OmegaConf.merge(merged, _nested(setting, typed))
            return merged
        if key in MOVED_KEYS:
            moved.append((key, MOVED_KEYS[key]))
            key = MOVED_KEYS[key]
        # As typed: from_dotlist reads values as YAML, so `trainer.name=007` would name the run "7"; and one path
        # without brackets is a list of one.
        if _is_text(key) and value not in ("null", "~"):
            update: Any = _nested(key, value)
        elif key in _TEXT_LIST_KEYS and not value.lstrip().startswith("[") and value not in ("null", "~"):
            update = _nested(key, [value])
        else:
            update = OmegaConf.from_dotlist([f"{key}={value}"])
        return OmegaConf.merge(merged, update)
    except OmegaConfBaseException as error:
        raise ConfigError(f"override {override!r}: {_describe(error)}") from None


def _nested(key: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for the key ``a.b``."""
    nested: dict[str, Any] = {}
    _put(nested, key, value)
    return nested


def resolve_data(data: DataConfig) -> None:
    """Settle ``auto``: the arithmetic task unless train files are given, and the held-out set that goes with the
    training data (the task's own; none for files). Resolved values are what a run's config.yaml records."""
    if data.task == AUTO:
        data.task = None if data.train_files else ARITHMETIC
    if data.heldout == AUTO:
        data.heldout = ARITHMETIC if data.task == ARITHMETIC else None


def _is_text(key: str) -> bool:
    """Whether the dotted key is a ``str`` (or ``str | None``) field of ``Config``."""
    node = _field_type(key)
    is_union = typing.get_origin(node) in (typing.Union, types.UnionType)
    return node is str or (is_union and set(typing.get_args(node)) == {str, type(None)})


def _field_type(key: str) -> Any:
    """The declared type of the dotted key in ``Config`` (None for an unknown key)."""
    node: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return None
        node = hints[part]
        if node is PolicyLossSection:  # the registered losses' keys are the made section's
            node = type(policy_loss_section())
    return node


def _text_list_keys(node: Any = None, prefix: str = "") -> list[str]:
    """The dotted keys of ``list[str]`` fields, e.g. ``data.train_files``."""
    keys = []
    for name, hint in typing.get_type_hints(node or Config).items():
        if dataclasses.is_dataclass(hint):
            keys += _text_list_keys(hint, f"{prefix}{name}.")
        elif hint == list[str]:
            keys.append(prefix + name)
    return keys


def load_yaml_mapping(path: str | Path) -> DictConfig:
    """A YAML file of ``section: {key: value}`` settings; ConfigError naming the file (and line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = OmegaConf.load(path)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {error.problem or error.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(values, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, ...), got a YAML list")
    return values


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


_TEXT_LIST_KEYS = _text_list_keys()


def _describe(error: OmegaConfBaseException) -> str:
    # OmegaConf's first line already says what is wrong and suggests close matches ("Did you mean");
    # the rest is its internal object types.
    message = str(error).splitlines()[0]
    key = getattr(error, "full_key", None)
    return f"key '{key}': {message}" if key and key not in message else message


def validate(config: Config) -> None:
    """Range and consistency checks that types alone cannot express: each section's own, then the rules that
    tie sections together, then the reward's. The first violation raises ConfigError as
    ``key=value is invalid: rule``."""
    _check_model(config.model)
    _check_data(config.data)
    _check_rollout(config.rollout)
    _check_algorithm(config.algorithm)
    _check_actor(config.actor)
    _check_loss(config)
    _check_eval(config.eval)
    _check(
        HELDOUT_BENCHMARK not in config.eval.benchmarks or config.data.heldout is not None,
        "eval.benchmarks",
        config.eval.benchmarks,
        f"{HELDOUT_BENCHMARK!r} is the run's held-out set, and data.heldout is null",
    )
    _check_trainer(config.trainer)
    _check_analysis(config)
    d, r, a = config.data, config.rollout, config.actor
    _check(
        not (config.algorithm.filter_groups and r.n == 1),
        "algorithm.filter_groups",
        config.algorithm.filter_groups,
        "it keeps the groups whose rewards differ, and with rollout.n=1 a group is one response: every group would "
        "be dropped and nothing trained; set rollout.n >= 2",
    )
    _check(
        d.gen_batch_size is None or config.algorithm.filter_groups or d.gen_batch_size == d.train_batch_size,
        "data.gen_batch_size",
        d.gen_batch_size,
        "samples more prompts than data.train_batch_size only with algorithm.filter_groups=true (it keeps "
        "train_batch_size of the groups with signal)",
    )
    _check(
        d.gen_batch_size is None or d.gen_batch_size >= d.train_batch_size,
        "data.gen_batch_size",
        d.gen_batch_size,
        f"must be >= data.train_batch_size={d.train_batch_size}",
    )
    responses, mini, mini_responses = (
        d.train_batch_size * r.n,
        a.ppo_mini_batch_size,
        a.ppo_mini_batch_responses,
    )
    if mini_responses is not None and responses % mini_responses:
        _check(
            False,
            "actor.ppo_mini_batch_responses",
            mini_responses,
            f"must divide data.train_batch_size × rollout.n = {responses}: use "
            f"{_divisor_fix('actor.ppo_mini_batch_responses', mini_responses, responses)}",
        )
    if mini_responses is None and d.train_batch_size % mini:
        _check(
            False,
            "actor.ppo_mini_batch_size",
            mini,
            f"must divide data.train_batch_size={d.train_batch_size}: use "
            f"{_divisor_fix('actor.ppo_mini_batch_size', mini, d.train_batch_size)}, or "
            f"data.train_batch_size={-(-d.train_batch_size // mini) * mini}",
        )
    _check(
        not (a.share_prompt and config.model.gradient_checkpointing),
        "actor.share_prompt",
        a.share_prompt,
        "set it to false with model.gradient_checkpointing=true (checkpointed layers drop the KV cache)",
    )
    _check(
        not config.trainer.eval_every or bool(config.eval.benchmarks),
        "eval.benchmarks",
        config.eval.benchmarks,
        "trainer.eval_every needs at least one benchmark",
    )
    _check(
        config.reward.overlong_buffer_len < r.max_new_tokens,
        "reward.overlong_buffer_len",
        config.reward.overlong_buffer_len,
        f"must be below rollout.max_new_tokens={r.max_new_tokens}",
    )
    try:
        config.reward.validate()
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_analysis(config: Config) -> None:
    an = config.analysis
    _check(0 < an.prob_threshold < 1, "analysis.prob_threshold", an.prob_threshold, "must be in (0, 1)")
    _non_negative("analysis", an, "probe_every")
    _positive("analysis", an, "probe_prompts", "probe_samples")
    _positive("analysis", an, "probe_epochs", optional=True)
    if not an.probe_every:
        return
    _check(
        config.data.heldout is not None,
        "analysis.probe_every",
        an.probe_every,
        "needs data.heldout: the probe set's prompts are drawn from the held-out pool, never trained on",
    )
    for spec in an.probe_variants:
        if spec != PROBE_TRAJECTORY:
            variant_config(config, spec)


_LOSS_SPEC = re.compile(r"([A-Za-z_]\w*)\s*(?:\((.*)\))?", re.DOTALL)
# Settings are separated by the commas that precede "key=", so a value may be a list: adam_betas=[0.9, 0.99].
_SETTING_SEPARATOR = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")


def parse_loss_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name(key=value, ...)``: a registered loss and its settings (loss settings by the name the loss
    reads, or ``actor`` keys: :func:`_shorthand`), values read as YAML (``0`` an int, ``0.28`` a float, ``null``,
    ``true``)."""
    match = _LOSS_SPEC.fullmatch(spec.strip())
    if match is None:
        raise ConfigError(f"loss setting {spec!r} must look like name or name(key=value, ...)")
    name, body = match.group(1), match.group(2)
    settings: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _SETTING_SEPARATOR.split(body or ""))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"loss setting {spec!r}: {item!r} must look like key=value")
        settings[key.strip()] = _yaml_value(value.strip())
    return name, settings


def _yaml_value(text: str) -> Any:
    value = yaml.safe_load(text) if text else None
    if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as text; a setting means the number
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def _shorthand(spec: str) -> list[tuple[str, Any]]:
    """``actor.policy_loss=NAME`` or ``NAME(key=value, ...)``: the keys it stands for, with their values: the loss
    mode, then each setting named (a loss setting by the name the loss reads or by its key, or an actor key)."""
    name, settings = parse_loss_spec(spec)
    keys = {}
    for declared in declared_settings().values():
        keys[declared.name] = keys[declared.key] = setting_key(declared)
    keys.update({f.name: f"actor.{f.name}" for f in dataclasses.fields(ActorConfig) if f.name not in keys})
    for key in settings:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"loss setting {spec!r}: {key!r} is neither a loss setting nor an actor key{hint}"
            )
    return [("actor.policy_loss.loss_mode", name), *((keys[key], value) for key, value in settings.items())]


def variant_config(config: Config, spec: str) -> Config:
    """``config`` with the loss setting ``spec`` (:func:`parse_loss_spec`) in place of its own, validated.

    Settings the spec does not name keep the run's values, as a ``cegppo train`` override would; the variant
    has no probe of its own.
    """
    name, _ = parse_loss_spec(spec)
    if name not in list_policy_losses():
        raise ConfigError(f"loss setting {spec!r}: unknown loss {name!r}; registered: {list_policy_losses()}")
    values = OmegaConf.to_container(OmegaConf.structured(config))
    assert isinstance(values, dict)
    for key, value in _shorthand(spec):
        _put(values, key, value)
    values["analysis"].update(probe_every=0, probe_variants=[])
    try:
        variant = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(values)))
        assert isinstance(variant, Config)
        validate(variant)
    except OmegaConfBaseException as error:
        raise ConfigError(f"loss setting {spec!r}: {_describe(error)}") from None
    except ConfigError as error:
        raise ConfigError(f"loss setting {spec!r}: {error}") from None
    return variant


def _divisor_fix(key: str, value: int, total: int) -> str:
    """``key=a or key=b``: the divisors of ``total`` nearest to ``value`` from below and above."""
    divisors = [k for k in range(1, total + 1) if total % k == 0]
    nearest = {max(k for k in divisors if k <= value)}
    if value < total:
        nearest.add(min(k for k in divisors if k >= value))
    return " or ".join(f"{key}={k}" for k in sorted(nearest))


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _positive(section: str, values: object, *names: str, optional: bool = False) -> None:
    """Each of ``names`` in the section is > 0 (or None, when ``optional``)."""
    for name in names:
        value = getattr(values, name)
        ok = (optional and value is None) or (value is not None and value > 0)
        _check(ok, f"{section}.{name}", value, "must be > 0")


def _non_negative(section: str, values: object, *names: str) -> None:
    for name in names:
        value = getattr(values, name)
        _check(math.isfinite(value) and value >= 0, f"{section}.{name}", value, "must be >= 0")


def _check_model(m: ModelConfig) -> None:
    _positive("model", m, "logprob_chunk_size")


def _check_data(d: DataConfig) -> None:
    _check(d.task is not None or bool(d.train_files), "data.task", d.task, "set a task or data.train_files")
    _check(d.task in (None, AUTO, ARITHMETIC), "data.task", d.task, f"built-in tasks: [{ARITHMETIC!r}]")
    _check(
        d.task in (None, AUTO) or not d.train_files,
        "data.task",
        d.task,
        f"data.train_files={d.train_files} are given too: set data.task=auto to train on the files, or drop them",
    )
    _check(type(d.digits) is int and 1 <= d.digits <= 4, "data.digits", d.digits, "an integer in [1, 4]")
    _check(
        d.few_shot or ARITHMETIC in (d.task, d.heldout),
        "data.few_shot",
        d.few_shot,
        "applies to the arithmetic task and its held-out set only (prompt files carry their own turns)",
    )
    _positive("data", d, "train_batch_size", "train_size", "heldout_size")


def _check_not_a_preset(name: str) -> None:
    """``actor.policy_loss=grpo`` (or dapo, ...) names a configuration: say which keys make it."""
    if name in list_policy_losses() or not presets.is_preset(name):
        return
    note = f"; {presets.NOTES[name]}" if name in presets.NOTES else ""
    _check(
        False,
        "actor.policy_loss",
        name,
        f"{name} is a configuration, not a loss of its own: {' '.join(presets.variant_overrides(name))}, or "
        f"`cegppo train --preset {name}` (the settings `cegppo sweep --variants {name}` runs){note}",
    )


def _check_rollout(r: RolloutConfig) -> None:
    _positive("rollout", r, "n", "max_new_tokens", "temperature")
    _positive("rollout", r, "batch_size", "tis_cap", optional=True)
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
    _check(r.top_k == -1 or r.top_k > 0, "rollout.top_k", r.top_k, "must be -1 (off) or > 0")
    v = r.vllm
    _check(
        0 < v.gpu_memory_utilization <= 1,
        "rollout.vllm.gpu_memory_utilization",
        v.gpu_memory_utilization,
        "must be in (0, 1]",
    )
    _positive("rollout.vllm", v, "kv_cache_gib", "max_model_len", optional=True)
    dtypes = ["bfloat16", "float16", "float32", "auto"]
    _check(v.dtype in dtypes, "rollout.vllm.dtype", v.dtype, f"one of {dtypes}")


def _check_algorithm(al: AlgorithmConfig) -> None:
    _check(
        al.adv_estimator in ADVANTAGE_REGISTRY,
        "algorithm.adv_estimator",
        al.adv_estimator,
        f"known estimators are {sorted(ADVANTAGE_REGISTRY)}",
    )
    _non_negative("algorithm", al, "max_num_gen_batches")


def _check_actor(a: ActorConfig) -> None:
    _positive("actor", a, "ppo_epochs", "ppo_mini_batch_size", "micro_batch_size", "lr", "grad_clip")
    _positive("actor", a, "micro_batch_tokens", optional=True)
    _positive("actor", a, "ppo_mini_batch_responses", optional=True)
    _non_negative(
        "actor",
        a,
        "weight_decay",
        "warmup_steps",
        "entropy_coeff",
        "entropy_target",
        "kl_loss_coef",
        "positive_loss_coeff",
    )
    _check(
        a.loss_agg_mode in LOSS_AGG_MODES,
        "actor.loss_agg_mode",
        a.loss_agg_mode,
        f"allowed values are {list(LOSS_AGG_MODES)}",
    )
    _check(
        a.kl_loss_type in KL_ESTIMATORS,
        "actor.kl_loss_type",
        a.kl_loss_type,
        f"allowed values are {list(KL_ESTIMATORS)}",
    )
    _check(
        len(a.adam_betas) == 2 and all(0 <= b < 1 for b in a.adam_betas),
        "actor.adam_betas",
        a.adam_betas,
        "must be two numbers in [0, 1)",
    )
    _check(
        0 <= a.top_entropy_quantile <= 1,
        "actor.top_entropy_quantile",
        a.top_entropy_quantile,
        "must be in [0, 1] (1: every token)",
    )
    _check(a.entropy_coeff_delta > 0, "actor.entropy_coeff_delta", a.entropy_coeff_delta, "must be > 0")
    _check(
        0 <= a.entropy_coeff_min <= a.entropy_coeff_max,
        "actor.entropy_coeff_min/entropy_coeff_max",
        (a.entropy_coeff_min, a.entropy_coeff_max),
        "need 0 <= entropy_coeff_min <= entropy_coeff_max",
    )
    for name in ("beta1_schedule", "beta2_schedule"):
        _check_schedule(f"actor.{name}", getattr(a, name))
    if a.entropy_control.enabled:
        _check_entropy_control(a)


def _check_loss(config: Config) -> None:
    """The loss: a registered ``loss_mode`` (not a preset's name), the sampler corrections that do not combine, its
    settings as their losses declare them, the ones it needs set, and a warning for the ones it ignores."""
    mode = config.actor.policy_loss.loss_mode
    _check_not_a_preset(mode)
    registered = list_policy_losses()
    _check(mode in registered, "actor.policy_loss.loss_mode", mode, f"registered losses are {registered}")
    loss = get_policy_loss(mode)
    _check_sampler_correction(config, loss)
    settings = config.policy_loss_config()
    declared = declared_settings()
    for name in loss.required:
        _check(
            getattr(settings, name) is not None,
            setting_key(declared[name]),
            None,
            f"actor.policy_loss={mode} needs it (see docs/losses.md)",
        )
    defaults = PolicyLossConfig()
    ignored = [
        f"{setting_key(d)}={getattr(settings, name)!r}"
        for name, d in declared.items()
        if name not in loss.reads and getattr(settings, name) != getattr(defaults, name)
    ]
    if ignored:
        warnings.warn(
            f"{', '.join(ignored)}: no effect with actor.policy_loss={mode}, which reads "
            f"{list(loss.own) or 'none of the loss-specific settings'} besides the shared ones",
            UserWarning,
            stacklevel=4,
        )


def _check_sampler_correction(config: Config, loss: PolicyLoss) -> None:
    """``rollout.tis_cap`` (deprecated) is the rollout correction's Token-TIS; a loss whose π_old is the sampler's
    (``bypass_mode``) corrects for the sampler itself and ignores the token weights other options reach it by."""
    r, correction = config.rollout, config.algorithm.rollout_correction
    if r.tis_cap is not None:
        warnings.warn(
            f"rollout.tis_cap={r.tis_cap} is deprecated: it is verl's token-level TIS, now spelled "
            f"algorithm.rollout_correction.rollout_is=token algorithm.rollout_correction.rollout_is_threshold="
            f"{r.tis_cap} (the same weights, logged as actor/rollout_is_*)",
            FutureWarning,
            stacklevel=5,
        )
    _check(
        r.tis_cap is None or correction.rollout_is is None,
        "algorithm.rollout_correction.rollout_is",
        correction.rollout_is,
        "rollout.tis_cap is token-level TIS already; set one of them (rollout_is=token, rollout_is_threshold=cap)",
    )
    for ignored, key, value in (
        (r.tis_cap is not None, "rollout.tis_cap", r.tis_cap),
        (
            config.actor.top_entropy_quantile < 1,
            "actor.top_entropy_quantile",
            config.actor.top_entropy_quantile,
        ),
    ):
        _check(
            not (ignored and loss.pi_old_from_sampler),
            key,
            value,
            f"has no effect with actor.policy_loss={loss.name} (its loss ignores token weights; use "
            "algorithm.rollout_correction.rollout_is / rollout_rs for the sampler correction)",
        )


def _check_schedule(key: str, schedule: ScheduleConfig) -> None:
    _check(
        schedule.kind in ("constant", "step", "linear"),
        f"{key}.kind",
        schedule.kind,
        "allowed are constant, step, linear",
    )
    points = schedule.points
    if schedule.kind == "constant":
        _check(not points, f"{key}.points", points, f"{key}.kind is 'constant': set kind to step or linear")
        return
    _check(
        bool(points) and all(len(point) == 2 for point in points),
        f"{key}.points",
        points,
        "give [[step, value], ...]",
    )
    steps = [point[0] for point in points]
    _check(
        steps == sorted(steps) and all(point[1] >= 0 for point in points),
        f"{key}.points",
        points,
        "steps must increase and values be >= 0",
    )


def _check_entropy_control(a: ActorConfig) -> None:
    control, key = a.entropy_control, "actor.entropy_control"
    low, high = control.target_low, control.target_high
    _check(
        0 <= low < high, f"{key}.target_low/target_high", (low, high), "need 0 <= target_low < target_high"
    )
    _check(control.step_size > 0, f"{key}.step_size", control.step_size, "must be > 0")
    _check(control.trend_weight >= 0, f"{key}.trend_weight", control.trend_weight, "must be >= 0")
    steered = [("beta1", control.beta1_min, control.beta1_max)]
    if control.adjust_beta2:
        steered.append(("beta2", control.beta2_min, control.beta2_max))
    for name, lowest, highest in steered:
        start = getattr(a.policy_loss, name)
        _check(
            0 <= lowest <= start <= highest,
            f"{key}.{name}_min/{name}_max",
            (lowest, highest),
            f"need 0 <= min <= actor.policy_loss.{name}={start} <= max",
        )
        kind = getattr(a, f"{name}_schedule").kind
        _check(
            kind == "constant",
            f"actor.{name}_schedule.kind",
            kind,
            f"{key} steers {name} already: choose one",
        )


def _check_eval(e: EvalConfig) -> None:
    _positive("eval", e, "n")
    _positive("eval", e, "max_new_tokens", "limit", optional=True)
    _check(e.temperature >= 0, "eval.temperature", e.temperature, "must be >= 0 (0: greedy)")
    _check(0 < e.top_p <= 1, "eval.top_p", e.top_p, "must be in (0, 1]")


def _check_trainer(t: TrainerConfig) -> None:
    _positive("trainer", t, "total_steps")
    _positive("trainer", t, "num_threads", "peak_tflops", optional=True)
    _non_negative("trainer", t, "save_every", "keep_checkpoints", "num_logged_samples")
    _check(
        t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
        "trainer.device",
        t.device,
        "allowed values are auto, cpu, cuda, cuda:N",
    )
