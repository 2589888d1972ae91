"""The RLVR loop. One step reads like the algorithm: sample, score, advantage, update."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cegppo.advantages import get_advantage_fn, uniform_groups
from cegppo.config import Config, config_from_dict, load_yaml_mapping, to_yaml
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
from cegppo.evaluation import evaluate_benchmark, evaluate_examples, load_problems
from cegppo.losses import masked_mean
from cegppo.models import disable_dropout, load_model_and_tokenizer
from cegppo.rewards import RewardErrorGuard, RewardFailure, RewardResult, RewardScorer, overlong_penalty
from cegppo.rollout import SamplingParams, build_rollout_engine
from cegppo.runfiles import CONFIG_FILE, SUMMARY_FILE
from cegppo.trainer.actor import Actor, ActorSettings, Experience
from cegppo.trainer.checkpoint import (
    MODEL_DIR,
    latest_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from cegppo.trainer.dynamic_sampling import GenerationRound, needs_another_round, training_batch
from cegppo.trainer.mfu import StepRoofline
from cegppo.trainer.probe import Probe
from cegppo.trainer.progress import Progress
from cegppo.trainer.steering import BetaSteering
from cegppo.trainer.tracking import RunTracker

log = logging.getLogger(__name__)

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


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config a run was started with, plus overrides (e.g. a larger ``trainer.total_steps``)."""
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: {CONFIG_FILE} is missing")
    values = OmegaConf.to_container(
        OmegaConf.merge(load_yaml_mapping(path), OmegaConf.from_dotlist(list(overrides)))
    )
    return config_from_dict(values)


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
        checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume else None
        if resume and checkpoint is None:
            raise ValueError(f"nothing to resume in {run_dir}: no complete checkpoint under checkpoints/")
        if not resume and run_dir.exists():
            raise ValueError(f"run directory {run_dir} already exists: resume it, or choose another name")
        blocking = next((path for path in run_dir.parents if path.exists() and not path.is_dir()), None)
        if blocking is not None:
            raise ValueError(
                f"trainer.output_dir: {blocking} is a file, so run directory {run_dir} cannot be created"
            )
        # Everything a bad input can break is loaded before the run directory exists.
        self.train_data, self.heldout = self._load_data()
        self.scorer = RewardScorer(config.reward)
        self.reward_guard = RewardErrorGuard(config.reward)
        device = self._device()
        self.model, self.tokenizer = load_model_and_tokenizer(
            str(checkpoint / MODEL_DIR if checkpoint else config.model.path)
        )
        disable_dropout(self.model).to(device)
        if config.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        ref_model = None
        if config.actor.use_kl_loss and checkpoint is not None:  # the reference is the starting policy
            ref_model = disable_dropout(load_model_and_tokenizer(config.model.path)[0]).to(device)
        self.actor = Actor(self.model, ActorSettings.from_config(config), ref_model=ref_model)
        engine_options: dict[str, Any] = {
            "batch_size": config.rollout.batch_size,
            "autocast_dtype": torch.bfloat16 if config.actor.bf16_autocast else None,
        }
        if config.rollout.engine == "vllm":
            engine_options.update(seed=config.trainer.seed, **dataclasses.asdict(config.rollout.vllm))
        elif config.rollout.engine == "hf":  # vLLM caches shared prefixes itself
            engine_options["share_prompt"] = config.actor.share_prompt
        self.engine = build_rollout_engine(
            config.rollout.engine, self.model, self.tokenizer, **engine_options
        )
        self.roofline = StepRoofline(config, self.model.config, device)
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
        if checkpoint is not None:
            saved = load_trainer_state(checkpoint)
            self.actor.optimizer.load_state_dict(saved["optimizer"])
            self.actor.scheduler.load_state_dict(saved["scheduler"])
            self.train_data.load_state_dict(saved["trainer"]["data"])
            self.actor.skipped_updates = saved["trainer"]["skipped_updates"]
            self.steering.load_state_dict(saved["trainer"]["steering"])
            if "entropy_coeff" in saved["trainer"]:  # absent in checkpoints before the adaptive coefficient
                self.actor.entropy_coefficient.load_state_dict(saved["trainer"]["entropy_coeff"])
            self.state = saved["trainer"]["state"]
            self.step_count = saved["step"]
            set_rng_state(saved["rng"])
        self.tracker = RunTracker(
            run_dir, tensorboard=config.trainer.tensorboard, resume_step=self.step_count
        )
        self._stop_signal: int | None = None

    def _device(self) -> torch.device:
        device = self.config.trainer.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(device)

    def _load_data(self) -> tuple[PromptDataset, list[PromptExample]]:
        data = self.config.data
        if data.task == "arithmetic":  # its train and held-out pools are disjoint by construction
            train = arithmetic_problems(data.train_size, seed=data.seed, digits=data.digits)
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
            return dataset, held_out_arithmetic(data.heldout_size, digits=data.digits)
        return dataset, load_problems(
            data.heldout, limit=data.heldout_size, question_template=data.question_template
        )

    def _render(self, example: PromptExample) -> str:
        return render_prompt(self.tokenizer, example, system_prompt=self.config.data.system_prompt)

    # -- the algorithm -------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One RL step: sample, score, advantage, update. Returns the step's metrics."""
        config = self.config
        timings: dict[str, float] = {}
        step_start = time.perf_counter()
        n = config.rollout.n

        # 1-3. Sample, score and take advantages.
        rounds, experience = self._sample_batch(timings)

        # 4. Update: old log-probs with the current weights, then the clipped policy-gradient epochs. One
        #    optimiser step over every row is on-policy, and bypass_mode's π_old is the sampler's: the update's
        #    own forward passes then give the old log-probs the metrics read.
        beta1, beta2 = self.steering.betas(self.step_count + 1)
        self.actor.loss_config = dataclasses.replace(self.actor.loss_config, beta1=beta1, beta2=beta2)
        update_metrics: dict[str, float] = {}
        old_logprob_passes = 0
        if len(experience):
            reference_only = self.actor.old_from_update(len(experience), n)
            old_logprob_passes = (not reference_only) + (self.actor.ref_model is not None)
            with _timed(timings, "old_logprob"):
                self.actor.compute_old_log_probs(experience, reference_only=reference_only)
            if self.probe is not None and self.probe.due(self.step_count + 1):
                with _timed(timings, "probe"):  # every variant's update from here, then back to here
                    rows = self.probe.run(self.step_count + 1, config.trainer.seed, experience, self.actor, n)
                self.tracker.log_probe(rows)
            with _timed(timings, "update"):
                update_metrics = self.actor.update(experience, group_size=n)
                self.engine.sync_weights(self.model)
        timings["step"] = time.perf_counter() - step_start

        self.step_count += 1
        self._log_samples(rounds[0])
        metrics = {
            **RewardResult.concat([r.scored for r in rounds]).metrics(),
            **self._rollout_metrics(rounds, len(experience) // n),
            **update_metrics,
            **{f"timing/{name}_s": seconds for name, seconds in timings.items()},
            "perf/tokens_per_s": sum(r.rollout.attention_mask.sum().item() for r in rounds) / timings["step"],
            **self.roofline.metrics(
                [r.rollout for r in rounds],
                (experience.attention_mask[:, : -experience.response_len], experience.response_mask),
                timings,
                old_logprob_passes,
            ),
        }
        if len(experience):
            mean_entropy = masked_mean(experience.old_entropy, experience.response_mask).item()
            self.steering.observe_entropy(mean_entropy)  # the controller, if on, sets the next step's β
            metrics.update(self._entropy_metrics(mean_entropy, experience))
            metrics.update(self._sampler_mismatch(experience))
        return metrics

    def _sample_batch(self, timings: dict[str, float]) -> tuple[list[GenerationRound], Experience]:
        """The step's generation rounds and training batch. DAPO's dynamic sampling repeats the round on new
        prompts until train_batch_size groups have reward signal (or algorithm.max_num_gen_batches rounds)."""
        config = self.config
        max_rounds = config.algorithm.max_num_gen_batches if config.algorithm.filter_groups else 1
        rounds: list[GenerationRound] = []
        while needs_another_round(rounds, config.data.train_batch_size, max_rounds):
            rounds.append(self._generation_round(timings))
        experience = training_batch(rounds, config.data.train_batch_size, self.tokenizer.pad_token_id)
        return rounds, experience.to(self.actor.device)

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
            _, experience = self._sample_batch({})
            if not len(experience):
                log.warning("probe seed %d: no group with reward signal, nothing to probe", seed)
                continue
            self.actor.compute_old_log_probs(experience)
            yield self.probe.run(self.step_count, seed, experience, self.actor, n)

    def _generation_round(self, timings: dict[str, float]) -> GenerationRound:
        """Sample, score and take advantages for ``data.train_batch_size`` new prompts."""
        config = self.config
        examples = self.train_data.next_batch(config.data.train_batch_size)
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
            "data/gen_rounds": float(len(rounds)),
            "data/train_groups": float(train_groups),
        }
        if self.config.reward.overlong_buffer_len:
            metrics["reward/overlong_penalty"] = (rewards - scores).mean().item()
        return metrics

    def _entropy_metrics(self, mean_entropy: float, experience: Experience) -> dict[str, float]:
        """Observed entropy, its change since the last step, and the covariance that predicts it (Eq. 7)."""
        metrics = {
            "entropy/mean": mean_entropy,
            "entropy/cov_logp_pA": entropy_covariance(
                experience.old_log_prob,
                experience.advantages.unsqueeze(1).expand_as(experience.old_log_prob),
                experience.response_mask,
            ),
        }
        if self.state["last_entropy"] is not None:
            metrics["entropy/delta"] = mean_entropy - self.state["last_entropy"]
        self.state["last_entropy"] = mean_entropy
        return metrics

    def _sampler_mismatch(self, experience: Experience) -> dict[str, float]:
        """How far the sampler's log-probs are from the trainer's recomputation (and the IS weights, if on)."""
        mask = experience.response_mask
        metrics = {
            "rollout/logprob_diff": masked_mean(
                (experience.old_log_prob - experience.sampler_log_prob).abs(), mask
            ).item()
        }
        weights = self.actor.rollout_is_weights(experience)
        if weights is not None:
            metrics["rollout/is_weight_mean"] = masked_mean(weights, mask).item()
            capped = (experience.old_log_prob - experience.sampler_log_prob) > math.log(
                self.config.rollout.tis_cap
            )
            metrics["rollout/is_capped_frac"] = masked_mean(capped, mask).item()
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
        """``eval.benchmarks`` sampled as configured: ``val/<bench>/avg@<n>`` and ``val/<bench>/pass@<n>``."""
        cfg = self.config.eval
        params = SamplingParams(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens or self.config.rollout.max_new_tokens,
        )
        metrics = {}
        for benchmark in cfg.benchmarks:
            result = evaluate_benchmark(
                self.engine,
                self.scorer,
                self.tokenizer,
                benchmark,
                params,
                limit=cfg.limit,
                system_prompt=self.config.data.system_prompt,
            )
            metrics[f"val/{result.name}/avg@{cfg.n}"] = result.avg_at_n
            metrics[f"val/{result.name}/pass@{cfg.n}"] = result.pass_at_k[cfg.n]
        return metrics

    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.total_steps``; checkpoint on schedule, at the end and on SIGINT/SIGTERM."""
        config = self.config.trainer
        started = time.perf_counter() - self.state["wall_s"]
        with Progress(total=config.total_steps, done=self.step_count, quiet=config.quiet) as progress:
            if self.state["heldout_acc_before"] is None and self.heldout:
                progress.note("evaluating the held-out set before training")
                self.state["heldout_acc_before"] = self.evaluate_heldout()
            if self.heldout and self.step_count == 0:
                progress.note(f"held-out accuracy before: {self.state['heldout_acc_before']:.3f}")
            with self._signals_deferred():
                while self.step_count < config.total_steps:
                    try:
                        metrics = self.step()
                    except RewardFailure:
                        if self.step_count:  # keep the steps trained on a working reward: fix it, then resume
                            self.save()
                        raise
                    last = self.step_count == config.total_steps
                    if config.eval_every and (self.step_count % config.eval_every == 0 or last):
                        metrics.update(self.evaluate_benchmarks())
                    self.tracker.log(self.step_count, metrics)
                    progress.advance(self.step_count, metrics)
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


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
