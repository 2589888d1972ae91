"""The RLVR loop. One step reads like the algorithm: sample, score, advantage, update."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cegppo.advantages import get_advantage_fn, uniform_groups
from cegppo.config import HELDOUT_BENCHMARK, Config, load_config, to_yaml
from cegppo.data import (
    PromptDataset,
    PromptExample,
    arithmetic_problems,
    held_out_arithmetic,
    load_prompt_file,
    render_prompt,
)
from cegppo.data.benchmark import ARITHMETIC
from cegppo.dynamics import entropy_covariance
from cegppo.evaluation import CHUNK_SIZE, benchmark_name, evaluate_examples, load_problems
from cegppo.losses import masked_mean
from cegppo.models import disable_dropout, load_model_and_tokenizer
from cegppo.rewards import RewardErrorGuard, RewardFailure, RewardResult, RewardScorer, overlong_penalty
from cegppo.rollout import RolloutEngine, SamplingParams, build_rollout_engine
from cegppo.runfiles import CONFIG_FILE, RUN_DIR_RULE, SAMPLES_FILE, SUMMARY_FILE, is_run_dir
from cegppo.trainer.actor import Actor, ActorSettings, Experience, PiOld, UpdateResult
from cegppo.trainer.checkpoint import (
    MODEL_DIR,
    latest_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from cegppo.trainer.dynamic_sampling import (
    GenerationRound,
    NoRewardSignal,
    check_signal,
    needs_another_round,
    training_batch,
)
from cegppo.trainer.host_memory import keep_freed_host_memory
from cegppo.trainer.memory import MemoryEstimate, ModelShape, check_fits, device_memory, estimate_memory
from cegppo.trainer.mfu import StepRoofline
from cegppo.trainer.optim import allocate_state
from cegppo.trainer.probe import Probe
from cegppo.trainer.progress import Progress
from cegppo.trainer.steering import BetaSteering
from cegppo.trainer.tracking import RunTracker

log = logging.getLogger(__name__)

# Training prompts whose greedy responses check the reward before a run starts: enough that one odd response
# does not stop a working reward, few enough to cost a second.
REWARD_CHECK_PROMPTS = 4
# Held-out prompts generated per call: larger batches generate faster on CPU, 64 keeps memory modest.
HELDOUT_CHUNK = 64


class Interrupted(Exception):
    """Raised by :meth:`Trainer.fit` after SIGINT/SIGTERM, once the checkpoint is saved."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name}: checkpoint saved at {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


def new_run_dir(config: Config) -> Path:
    """``output_dir/name`` (a timestamp by default); refuses to overwrite an existing run."""
    name = config.trainer.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.trainer.output_dir) / name
    if run_dir.exists():
        raise ValueError(
            f"run directory {run_dir} already exists: resume it with --resume, or set trainer.name"
        )
    return run_dir


def _checkpoint_to_resume(run_dir: Path) -> Path:
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise ValueError(
            f"nothing to resume in {run_dir}: no complete checkpoint under checkpoints/ (the run stopped before "
            f"its first save; trainer.save_every=0 saves only at the end): delete {run_dir} to start it again"
        )
    return checkpoint


def _check_new_run_dir(run_dir: Path) -> None:
    """A new run's directory must not exist, nor lie inside another run's, nor below a file."""
    if run_dir.exists():
        raise ValueError(f"run directory {run_dir} already exists: resume it, or choose another name")
    _check_not_inside_a_run(run_dir)
    blocking = next((path for path in run_dir.parents if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise ValueError(
            f"trainer.output_dir: {blocking} is a file, so run directory {run_dir} cannot be created"
        )


def _check_not_inside_a_run(run_dir: Path) -> None:
    """A run directory is never created inside another run's (``trainer.output_dir`` naming a run, as TRL's
    ``output_dir`` would)."""
    outer = next((path for path in run_dir.parents if is_run_dir(path)), None)
    if outer is not None:
        raise ValueError(
            f"trainer.output_dir={run_dir.parent} is inside the run {outer}, and a new run would go in "
            f"{run_dir} ({RUN_DIR_RULE}). To continue that run: cegppo train --resume {outer}; for a new run "
            f"beside it: trainer.output_dir={outer.parent} trainer.name=<new name>"
        )


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config a run was started with, plus overrides (e.g. a larger ``trainer.total_steps``)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: {CONFIG_FILE} is missing")
    return load_config(path, overrides)


# Settings whose values a checkpoint's state replaces on --resume. Changed optimiser and schedule settings are applied
# to the restored optimizer and scheduler (and said); the others come back from the checkpoint, so changing them is
# refused rather than recorded in config.yaml and ignored.
APPLIED_ON_RESUME = ("actor.lr", "actor.weight_decay", "actor.adam_betas", "actor.warmup_steps")
RESTORED_ON_RESUME = {
    "trainer.seed": "the random generators' states are restored",
    "data.seed": "the data order is restored",
    "data.shuffle": "the data order is restored",
    "model.path": "the policy is the checkpoint's model",
}


def _resume_changes(saved: Config, config: Config) -> list[str]:
    """``key old -> new`` for each changed setting of ``APPLIED_ON_RESUME``; ValueError naming the changed settings
    that a checkpoint restores (the entropy controllers' too, while they are on)."""
    restored = dict(RESTORED_ON_RESUME)
    if config.actor.entropy_control.enabled:
        restored["actor.policy_loss.beta1"] = restored["actor.policy_loss.beta2"] = (
            "actor.entropy_control's β is restored"
        )
    if config.actor.use_adaptive_entropy:
        restored["actor.entropy_coeff"] = "the adaptive coefficient is restored"
    refused = [
        f"{key} ({attrgetter(key)(saved)!r} -> {attrgetter(key)(config)!r}: {why})"
        for key, why in restored.items()
        if attrgetter(key)(saved) != attrgetter(key)(config)
    ]
    if refused:
        raise ValueError(
            f"--resume cannot change {'; '.join(refused)}. Resume without them, or start a new run"
        )
    return [
        f"{key} {attrgetter(key)(saved)} -> {attrgetter(key)(config)}"
        for key in APPLIED_ON_RESUME
        if attrgetter(key)(saved) != attrgetter(key)(config)
    ]


class Trainer:
    """Single-process RLVR trainer: a policy, a rollout engine, a reward, and the actor update."""

    def __init__(
        self, config: Config, run_dir: Path, *, resume: bool = False, heldout_acc_before: float | None = None
    ) -> None:
        """``heldout_acc_before``: the starting model's held-out accuracy when it is already known (a sweep's
        earlier run of the same model and held-out set), which skips that evaluation."""
        self.config = config
        self.run_dir = run_dir
        if config.trainer.num_threads:
            torch.set_num_threads(config.trainer.num_threads)
        keep_freed_host_memory(config.trainer.keep_host_memory)
        if not resume:
            _check_new_run_dir(run_dir)
        checkpoint = _checkpoint_to_resume(run_dir) if resume else None
        self.resumed = checkpoint is not None
        # Everything a bad input can break is loaded before the run directory exists (or, resumed, is written to).
        self.resume_changes = _resume_changes(load_run_config(run_dir), config) if checkpoint else []
        self.train_data, self.heldout = self._load_data()
        saved = load_trainer_state(checkpoint) if checkpoint else None
        if saved is not None:
            try:
                self.train_data.load_state_dict(saved["trainer"]["data"])
            except ValueError as error:
                raise ValueError(
                    f"--resume: the training prompts are not the ones {run_dir} was trained on ({error}); resume "
                    "with its data.* settings, or start a new run"
                ) from None
        self.scorer = RewardScorer(config.reward)
        self.reward_guard = RewardErrorGuard(config.reward)
        self._load_policy(checkpoint)
        self.engine = self._build_engine()
        self._check_reward()
        self.roofline = StepRoofline(config, self.model.config, self.actor.device)
        self.probe = (
            Probe(config, self.engine, self.heldout, self._render) if config.analysis.probe_every else None
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(to_yaml(config))
        random.seed(config.trainer.seed)
        np.random.seed(config.trainer.seed)
        torch.manual_seed(config.trainer.seed)

        self.steering = BetaSteering(config.actor)
        self.step_count = 0
        self.state: dict[str, Any] = {
            "heldout_acc_before": heldout_acc_before,
            "wall_s": 0.0,
            "last_entropy": None,
        }
        if saved is not None:
            self._restore(saved)
        self.tracker = RunTracker(
            run_dir, tensorboard=config.trainer.tensorboard, resume_step=self.step_count
        )
        self._stop_signal: int | None = None

    def _load_policy(self, checkpoint: Path | None) -> None:
        """``model`` (the checkpoint's when resuming), checked against the device's memory before anything is put
        there, ``tokenizer``, and ``actor`` with its optimiser state allocated."""
        config = self.config
        device = self._device()
        param_dtype = getattr(torch, config.actor.param_dtype)
        self.model, self.tokenizer = load_model_and_tokenizer(
            str(checkpoint / MODEL_DIR if checkpoint else config.model.path), dtype=param_dtype
        )
        self.memory_estimate = self._check_memory(device)
        model = self.model
        disable_dropout(model).to(device)
        if config.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        ref_model = None
        if config.actor.use_kl_loss and checkpoint is not None:  # the reference is the starting policy
            ref_model = disable_dropout(load_model_and_tokenizer(config.model.path, dtype=param_dtype)[0])
            ref_model.to(device)
        self.actor = Actor(model, ActorSettings.from_config(config), ref_model=ref_model)
        # Before the rollout engine starts: vLLM sizes itself against what is left, and AdamW would otherwise
        # create its state inside the first update, in the blocks a sleeping vLLM gave back.
        allocate_state(self.actor.optimizer)

    def _restore(self, saved: dict[str, Any]) -> None:
        """The optimiser, schedule, steering, counters and RNG states of a checkpoint's trainer state."""
        self.actor.optimizer.load_state_dict(saved["optimizer"])
        self.actor.scheduler.load_state_dict(saved["scheduler"])
        if self.resume_changes:
            self._apply_optimiser_settings()
        self.actor.skipped_updates = saved["trainer"]["skipped_updates"]
        self.steering.load_state_dict(saved["trainer"]["steering"])
        if "entropy_coeff" in saved["trainer"]:  # absent in checkpoints before the adaptive coefficient
            self.actor.entropy_coefficient.load_state_dict(saved["trainer"]["entropy_coeff"])
        self.state = saved["trainer"]["state"]
        self.step_count = saved["step"]
        set_rng_state(saved["rng"])

    def _check_memory(self, device: torch.device) -> MemoryEstimate:
        """The run's memory estimate against the device (:mod:`cegppo.trainer.memory`): raises ValueError with
        the numbers when it cannot fit, logs a warning when it may not."""
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"trainer.device={self.config.trainer.device}: CUDA is not available here")
        free, total = device_memory(device)
        rendered = [self._render(example) for example in self.train_data.examples]
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        estimate = estimate_memory(
            self.config,
            ModelShape.of(self.model),
            prompt_tokens=max(len(row) for row in ids),
            device_bytes=total,
        )
        warning = check_fits(estimate, self.config, free, total, device)
        if warning is not None:
            log.warning("%s", warning)
        if self.config.actor.optimizer_offload and device.type == "cpu":
            log.warning(
                "actor.optimizer_offload on the CPU saves no memory: the policy is on the CPU already"
            )
        return estimate

    def _apply_optimiser_settings(self) -> None:
        """The configured lr, weight decay, Adam betas and warm-up over a restored optimizer and scheduler: the lr in
        force is the new lr times the (new) schedule's factor at the restored step."""
        actor, optimizer, scheduler = self.config.actor, self.actor.optimizer, self.actor.scheduler
        scheduler.base_lrs = [actor.lr for _ in optimizer.param_groups]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group.update(
                initial_lr=actor.lr,
                lr=actor.lr * factor(scheduler.last_epoch),
                weight_decay=actor.weight_decay,
                betas=tuple(actor.adam_betas),
            )

    def _build_engine(self) -> RolloutEngine:
        config = self.config
        engine_options: dict[str, Any] = {
            "batch_size": config.rollout.batch_size,
            "autocast_dtype": torch.bfloat16 if config.actor.bf16_autocast else None,
        }
        if config.rollout.engine == "vllm":
            engine_options.update(seed=config.trainer.seed, **dataclasses.asdict(config.rollout.vllm))
        elif config.rollout.engine == "hf":  # vLLM caches shared prefixes itself
            engine_options["share_prompt"] = config.actor.share_prompt
        return build_rollout_engine(config.rollout.engine, self.model, self.tokenizer, **engine_options)

    def _device(self) -> torch.device:
        device = self.config.trainer.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(device)

    def _load_data(self) -> tuple[PromptDataset, list[PromptExample]]:
        data = self.config.data
        if data.task == ARITHMETIC:  # its train and held-out pools are disjoint by construction
            train = arithmetic_problems(
                data.train_size, seed=data.seed, digits=data.digits, few_shot=data.few_shot
            )
        else:
            train = [
                example
                for path in data.train_files
                for example in load_prompt_file(path, question_template=data.question_template)
            ]
        if not train:
            raise ValueError(f"the training set is empty: data.train_files={data.train_files}")
        dataset = PromptDataset(train, seed=data.seed, shuffle=data.shuffle)
        if data.heldout is None:
            return dataset, []
        # The built-in task's own held-out pool: of its digits and sized by heldout_size (the benchmark is fixed)
        if data.heldout == ARITHMETIC:
            return dataset, held_out_arithmetic(data.heldout_size, digits=data.digits, few_shot=data.few_shot)
        return dataset, load_problems(
            data.heldout, limit=data.heldout_size, question_template=data.question_template
        )

    def start_notes(self) -> list[str]:
        """What the run trains and measures on, and what it should know about its settings (printed at start)."""
        notes = []
        if self.step_count:
            notes.append(f"resumed from step {self.step_count}")
        if self.resume_changes:
            notes.append(
                "changed since the checkpoint, applied to the restored optimiser and schedule: "
                + ", ".join(self.resume_changes)
            )
        notes += self.data_description()
        if self.config.rollout.n == 1:
            notes.append(
                "warning: rollout.n=1: each group is one response, whose advantage is its raw reward (REINFORCE "
                "without a baseline, as verl treats singleton groups): a 0/1 reward only reinforces correct responses"
            )
        return notes

    def first_step_warnings(self, metrics: dict[str, float]) -> list[str]:
        """What makes a step unable to teach anything, said after the first step rather than found in the logs."""
        warnings = []
        max_new_tokens = self.config.rollout.max_new_tokens
        if metrics["response_length/clip_ratio"] == 1.0:
            warnings.append(
                f"warning: every response was truncated at {max_new_tokens} tokens, so none finished its answer: "
                f"raise rollout.max_new_tokens (now {max_new_tokens})"
            )
        if metrics["data/groups_with_signal"] == 0:
            warnings.append(
                f"warning: no group had reward signal (mean reward {metrics['reward/mean']:.3f}): every response to "
                "a prompt got the same reward, so every advantage was 0 and the step changed nothing. Check the "
                f"reward on {self.run_dir / SAMPLES_FILE}, or give easier prompts"
            )
        return warnings

    def data_description(self) -> list[str]:
        """What the run trains and measures on, in words."""
        data = self.config.data
        if data.task == ARITHMETIC:
            train = f"the arithmetic task, {len(self.train_data)} {data.digits}-digit additions (data.seed={data.seed})"
        else:
            train = f"{len(self.train_data)} prompts from {', '.join(data.train_files)}"
        if not self.heldout:
            heldout = "none (data.heldout=FILE or a benchmark name measures greedy accuracy before and after training)"
        else:
            heldout = (
                f"{data.heldout}, {_problems(len(self.heldout))}, greedy accuracy before and after training"
            )
            if data.heldout == ARITHMETIC:
                heldout += " (disjoint from the training problems)"
        return [f"train set: {train}", f"held-out set: {heldout}"]

    def _render(self, example: PromptExample) -> str:
        return render_prompt(self.tokenizer, example, system_prompt=self.config.data.system_prompt)

    # -- the algorithm -------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One RL step: sample, score, advantage, update. Returns the step's metrics."""
        config = self.config
        timings: dict[str, float] = {}
        step_start, step_cpu = time.perf_counter(), time.process_time()
        n = config.rollout.n

        # 1-3. Sample, score and take advantages.
        rounds, experience, ragged = self._sample_batch(timings)

        # 4. Update: π_old (recomputed with the current weights; or, for one on-policy optimiser step and for
        #    bypass_mode, taken from the update's own forward passes), then the clipped policy-gradient epochs.
        beta1, beta2 = self.steering.betas(self.step_count + 1)
        self.actor.loss_config = self.actor.loss_config.replace(beta1=beta1, beta2=beta2)
        update: UpdateResult | None = None
        old_logprob_passes = 0
        if len(experience):
            recomputed = self.actor.pi_old_source(len(experience), n) == "recomputed"
            old_logprob_passes = recomputed + (
                self.actor.ref_model is not None
            )  # the passes the roofline counts
            with _timed(timings, "old_logprob"):
                batch = self.actor.old_policy(experience, group_size=n)
            if self.probe is not None and self.probe.due(self.step_count + 1):
                with _timed(timings, "probe"):  # every variant's update from here, then back to here
                    rows = self.probe.run(self.step_count + 1, config.trainer.seed, batch, self.actor, n)
                self.tracker.log_probe(rows)
            with _timed(timings, "update"):
                update = self.actor.update(batch, group_size=n)
                self.engine.sync_weights(self.model)
        else:  # a step that trains nothing still counts for the lr warm-up (RL steps)
            self.actor.scheduler.step()
        timings["step"] = time.perf_counter() - step_start
        timings["step_cpu"] = time.process_time() - step_cpu

        self.step_count += 1
        self._log_samples(rounds[0])
        metrics = {
            **RewardResult.concat([r.scored for r in rounds]).metrics(),
            **self._rollout_metrics(rounds, len(experience) // n),
            "data/ragged_dropped_responses": float(ragged),
            **(update.metrics if update else {}),
            **{f"timing/{name}_s": seconds for name, seconds in timings.items()},
            "perf/tokens_per_s": sum(r.rollout.attention_mask.sum().item() for r in rounds) / timings["step"],
            **self.roofline.metrics(
                [r.rollout for r in rounds],
                (
                    experience.input_ids[:, : -experience.response_len],
                    experience.attention_mask[:, : -experience.response_len],
                    experience.response_mask,
                ),
                timings,
                old_logprob_passes,
            ),
        }
        if update is not None:
            mean_entropy = masked_mean(update.policy.entropy, experience.response_mask).item()
            self.steering.observe_entropy(mean_entropy)  # the controller, if on, sets the next step's β
            metrics.update(self._entropy_metrics(mean_entropy, experience, update.policy))
            metrics.update(self._sampler_mismatch(experience, update))
        return metrics

    def _sample_batch(self, timings: dict[str, float]) -> tuple[list[GenerationRound], Experience, int]:
        """The step's generation rounds, its training batch, and the responses cut from it. DAPO's dynamic
        sampling repeats the round on new prompts until train_batch_size groups have reward signal (or
        algorithm.max_num_gen_batches rounds); the groups kept are cut to whole mini-batches, as verl does."""
        config = self.config
        max_rounds = config.algorithm.max_num_gen_batches if config.algorithm.filter_groups else 1
        rounds: list[GenerationRound] = []
        while needs_another_round(rounds, config.data.train_batch_size, max_rounds):
            rounds.append(self._generation_round(timings))
            check_signal(rounds)
        experience = training_batch(rounds, config.data.train_batch_size, self.tokenizer.pad_token_id)
        ragged = len(experience) % self.actor.mini_batch_rows(config.rollout.n)
        return rounds, experience.select(slice(0, len(experience) - ragged)).to(self.actor.device), ragged

    def probe_from_here(self, seeds: Sequence[int]) -> Iterator[list[dict[str, Any]]]:
        """``cegppo probe``: for each seed, a batch sampled with that seed (prompts in that seed's order) from the
        current weights, and the probe's rows for it. Nothing is trained: every seed starts from the same state."""
        assert self.probe is not None, "analysis.probe_every must be set to build the probe"
        n = self.config.rollout.n
        for seed in seeds:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            self.train_data = PromptDataset(
                self.train_data.examples, seed=seed, shuffle=self.config.data.shuffle
            )
            _, experience, _ = self._sample_batch({})
            if not len(experience):
                log.warning("probe seed %d: no group with reward signal, nothing to probe", seed)
                continue
            batch = self.actor.old_policy(experience, group_size=n, recompute=True)
            yield self.probe.run(self.step_count, seed, batch, self.actor, n)

    def _generation_round(self, timings: dict[str, float]) -> GenerationRound:
        """Sample, score and take advantages for ``data.gen_batch_size`` (default ``train_batch_size``) new prompts."""
        config = self.config
        examples = self.train_data.next_batch(config.data.gen_batch_size or config.data.train_batch_size)
        n = config.rollout.n

        # 1. Sample n responses per prompt.
        with _timed(timings, "gen"):
            rollout = self.engine.generate(
                [self._render(example) for example in examples],
                SamplingParams(
                    n=n,
                    temperature=config.rollout.temperature,
                    top_p=config.rollout.top_p,
                    top_k=config.rollout.top_k,
                    max_new_tokens=config.rollout.max_new_tokens,
                ),
            )

        # 2. Score each response against its prompt's ground truth; a reward that keeps raising stops the run.
        with _timed(timings, "score"):
            scored = self.scorer.score(
                rollout.response_texts,
                [example.ground_truth for example in examples for _ in range(n)],
                [example.data_source for example in examples for _ in range(n)],
                [example.extra_info for example in examples for _ in range(n)],
            )
        self.reward_guard.check(scored)
        rewards = torch.tensor(scored.scores, dtype=torch.float32) + overlong_penalty(
            rollout.response_mask.sum(-1),
            config.rollout.max_new_tokens,
            config.reward.overlong_buffer_len,
            config.reward.overlong_penalty_factor,
        )

        # 3. Advantages within each prompt's group; dynamic sampling keeps only the groups with signal.
        group_ids = torch.arange(len(examples)).repeat_interleave(n)
        advantages = get_advantage_fn(config.algorithm.adv_estimator)(rewards, group_ids)
        keep = torch.ones(len(examples), dtype=torch.bool)
        if config.algorithm.filter_groups:
            keep = ~uniform_groups(rewards, group_ids).view(len(examples), n)[:, 0]
        return GenerationRound(examples, rollout, scored, rewards, advantages, keep)

    def _rollout_metrics(self, rounds: list[GenerationRound], train_groups: int) -> dict[str, float]:
        rewards = torch.cat([r.rewards for r in rounds])
        scores = torch.tensor([score for r in rounds for score in r.scored.scores])
        lengths = torch.cat([r.rollout.response_mask.sum(-1).float() for r in rounds])
        truncated = torch.cat([r.rollout.truncated for r in rounds])
        metrics = {
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "response_length/mean": lengths.mean().item(),
            "response_length/max": lengths.max().item(),
            "response_length/clip_ratio": truncated.float().mean().item(),
            "data/filtered_groups": float(sum(int((~r.keep).sum()) for r in rounds)),
            # groups with a nonzero advantage: the others teach nothing (all n rewards equal; n=1: reward 0)
            "data/groups_with_signal": float(
                sum(int((r.advantages.view(-1, r.rollout.n) != 0).any(dim=1).sum()) for r in rounds)
            ),
            "data/gen_rounds": float(len(rounds)),
            "data/train_groups": float(train_groups),
        }
        if self.config.reward.overlong_buffer_len:
            metrics["reward/overlong_penalty"] = (rewards - scores).mean().item()
        return metrics

    def _entropy_metrics(
        self, mean_entropy: float, experience: Experience, policy: PiOld
    ) -> dict[str, float]:
        """Observed entropy, its change since the last step, and the covariance that predicts it (Eq. 7)."""
        metrics = {
            "entropy/mean": mean_entropy,
            "entropy/cov_logp_pA": entropy_covariance(
                policy.log_prob,
                experience.advantages.unsqueeze(1).expand_as(policy.log_prob),
                experience.response_mask,
            ),
        }
        if self.state["last_entropy"] is not None:
            metrics["entropy/delta"] = mean_entropy - self.state["last_entropy"]
        self.state["last_entropy"] = mean_entropy
        return metrics

    def _sampler_mismatch(self, experience: Experience, update: UpdateResult) -> dict[str, float]:
        """How far the sampler's log-probs are from the trainer's policy, and the token-level IS weights against
        it (the rollout correction's, under the names of rollout.tis_cap's metrics)."""
        mismatch = (update.policy.log_prob - experience.sampler_log_prob).abs()
        metrics = {"rollout/logprob_diff": masked_mean(mismatch, experience.response_mask).item()}
        if self.actor.loss_config.rollout_is == "token" and not self.actor.loss.pi_old_from_sampler:
            metrics["rollout/is_weight_mean"] = update.metrics["actor/rollout_is_mean"]
            metrics["rollout/is_capped_frac"] = update.metrics["actor/rollout_is_ratio_fraction_high"]
        return metrics

    # -- the run --------------------------------------------------------------------------------------

    def evaluate_heldout(self) -> float | None:
        """Greedy accuracy on the held-out set, or None when none is configured."""
        if not self.heldout:
            return None
        result = evaluate_examples(
            self.engine,
            self.scorer,
            self.tokenizer,
            "heldout",
            self.heldout,
            SamplingParams(n=1, temperature=0.0, max_new_tokens=self.config.rollout.max_new_tokens),
            system_prompt=self.config.data.system_prompt,
            chunk_size=HELDOUT_CHUNK,
        )
        return result.avg_at_n

    def evaluate_benchmarks(self) -> dict[str, float]:
        """``eval.benchmarks`` sampled as configured: ``val/<bench>/avg@<n>`` and ``val/<bench>/pass@<n>``
        (``heldout``: the run's held-out set).

        Sampled under its own seed (``trainer.seed``, the same at every evaluation, so that evaluations differ by
        the model only), with the training generator's state restored afterwards: a run with evaluation samples
        the same training responses as the run without.
        """
        cfg = self.config.eval
        params = SamplingParams(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens or self.config.rollout.max_new_tokens,
            seed=self.config.trainer.seed,
        )
        metrics = {}
        for benchmark in cfg.benchmarks:
            if benchmark == HELDOUT_BENCHMARK:  # as many problems a generate call as the greedy pass
                examples, chunk_size = self.heldout[: cfg.limit], HELDOUT_CHUNK
            else:
                examples, chunk_size = load_problems(benchmark, limit=cfg.limit), CHUNK_SIZE
            result = evaluate_examples(
                self.engine,
                self.scorer,
                self.tokenizer,
                benchmark_name(benchmark),
                examples,
                params,
                system_prompt=self.config.data.system_prompt,
                chunk_size=chunk_size,
            )
            metrics[f"val/{result.name}/avg@{cfg.n}"] = result.avg_at_n
            metrics[f"val/{result.name}/pass@{cfg.n}"] = result.pass_at_k[cfg.n]
        return metrics

    def _check_reward(self) -> None:
        """Score greedy responses to the first training prompts: a reward that raises on every one of them stops
        the run here, before a run directory exists and before the held-out evaluation."""
        examples = self.train_data.examples[:REWARD_CHECK_PROMPTS]
        rollout = self.engine.generate(
            [self._render(example) for example in examples],
            SamplingParams(n=1, temperature=0.0, max_new_tokens=self.config.rollout.max_new_tokens),
        )
        scored = self.scorer.score(
            rollout.response_texts,
            [example.ground_truth for example in examples],
            [example.data_source for example in examples],
            [example.extra_info for example in examples],
        )
        try:
            RewardErrorGuard(self.config.reward).check(scored)
        except RewardFailure as failure:
            raise RewardFailure(
                f"before training, on greedy responses to the first training prompts: {failure}"
            ) from None

    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.total_steps``; checkpoint on schedule, at the end and on SIGINT/SIGTERM.

        A new run that stops before its first step is done (an error, a second Ctrl-C) is deleted with its
        directory: nothing was trained, and the same command starts it again.
        """
        try:
            return self._fit()
        except BaseException:
            if self.step_count == 0 and not self.resumed:
                self.close()
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _fit(self) -> dict[str, Any]:
        config = self.config.trainer
        started = time.perf_counter() - self.state["wall_s"]
        with Progress(total=config.total_steps, done=self.step_count, quiet=config.quiet) as progress:
            progress.note(self.memory_estimate.describe())
            for line in self.start_notes():
                progress.note(line)
            first_step = self.step_count + 1
            if self.state["heldout_acc_before"] is None and self.heldout:
                progress.note("evaluating the held-out set before training")
                self.state["heldout_acc_before"] = self.evaluate_heldout()
            if self.heldout and self.step_count == 0:
                progress.note(f"held-out accuracy before: {self.state['heldout_acc_before']:.3f}")
            with self._signals_deferred():
                while self.step_count < config.total_steps:
                    try:
                        metrics = self.step()
                    except (RewardFailure, NoRewardSignal):
                        if self.step_count:  # keep the steps trained on a working reward: fix it, then resume
                            self.save()
                        raise
                    last = self.step_count == config.total_steps
                    if config.eval_every and (self.step_count % config.eval_every == 0 or last):
                        metrics.update(self.evaluate_benchmarks())
                    self.tracker.log(self.step_count, metrics)
                    progress.advance(self.step_count, metrics)
                    if self.step_count == first_step:
                        for warning in self.first_step_warnings(metrics):
                            progress.note(warning)
                    self.state["wall_s"] = time.perf_counter() - started
                    if self._stop_signal is not None:
                        checkpoint = self.save()
                        raise Interrupted(self._stop_signal, checkpoint)
                    if config.save_every and self.step_count % config.save_every == 0:
                        self.save()
            if self.heldout:
                progress.note("evaluating the held-out set after training")
            summary = self._summary(self.evaluate_heldout(), time.perf_counter() - started)
            self.state["wall_s"] = summary["wall_s"]
            self.save()
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        self.close()
        return summary

    def save(self) -> Path:
        checkpoint = save_checkpoint(
            self.run_dir / "checkpoints",
            self.step_count,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.actor.optimizer,
            scheduler=self.actor.scheduler,
            trainer_state={
                "data": self.train_data.state_dict(),
                "skipped_updates": self.actor.skipped_updates,
                "steering": self.steering.state_dict(),
                "entropy_coeff": self.actor.entropy_coefficient.state_dict(),
                "state": self.state,
            },
        )
        prune_checkpoints(self.run_dir / "checkpoints", self.config.trainer.keep_checkpoints)
        return checkpoint

    def close(self) -> None:
        self.tracker.close()
        self.scorer.close()

    def _summary(self, heldout_after: float | None, wall_s: float) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "steps": self.step_count,
            "wall_s": round(wall_s, 1),
        }
        if self.heldout:
            summary["heldout_acc_before"] = self.state["heldout_acc_before"]
            summary["heldout_acc_after"] = heldout_after
            summary["heldout_size"] = len(self.heldout)
            summary["heldout"] = self.config.data.heldout
        return summary

    def _log_samples(self, first: GenerationRound) -> None:
        """The first ``trainer.num_logged_samples`` responses of the step's first generation round."""
        count, n, texts = (
            self.config.trainer.num_logged_samples,
            first.rollout.n,
            first.rollout.response_texts,
        )
        samples = [
            {
                "question": first.examples[row // n].messages[-1]["content"],
                "response": texts[row],
                "ground_truth": first.examples[row // n].ground_truth,
                "reward": first.scored.scores[row],
            }
            for row in range(min(count, len(texts)))
        ]
        if samples:
            self.tracker.log_samples(self.step_count, samples)

    @contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """SIGINT/SIGTERM let the current step finish, then checkpoint; a second SIGINT stops at once."""

        def request_stop(signum: int, frame: object) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning(
                "%s received: finishing this step, then saving a checkpoint", signal.Signals(signum).name
            )

        if threading.current_thread() is not threading.main_thread():  # signal handlers need the main thread
            yield
            return
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _problems(count: int) -> str:
    return f"{count} problem{'s' if count != 1 else ''}"


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the block's wall seconds to ``timings[name]`` and this process's CPU seconds (all its threads) to
    ``timings[name + "_cpu"]``: on a machine shared with other jobs the CPU time still counts the work done."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - wall
    timings[f"{name}_cpu"] = timings.get(f"{name}_cpu", 0.0) + time.process_time() - cpu
