"""Seconds per rollout: TRL's ``GRPOTrainer`` against cegppo's trainer on the same work, interleaved in one process.

The work: SmolLM2-135M-Instruct (the embedded default), the demo's 2-shot addition prompts, 8 prompts x 8
samples per rollout, up to 64 new tokens, temperature 1, bf16 autocast, lr 5e-6 constant, AdamW (0.9, 0.999),
no weight decay, grad-norm clip 1, PPO clip ε = 0.2 both sides with dual-clip c = 10, token-mean loss (TRL's
``dapo``, our ``vanilla``), GRPO advantages, no KL, the demo's strict ``\\boxed{}`` reward, micro-batches of 8
sequences. Two cases: one optimiser step per rollout (TRL ``num_iterations=1``; ours on-policy, one epoch of
one mini-batch) and two (TRL ``num_iterations=2``; ours ``actor.ppo_epochs=2``). TRL samples with transformers'
``generate``; ours with the ``hf`` engine (the same library) or, ``--engine vllm``, vLLM's CPU build in this
process as ``benchmarks/bench_engines.py`` sets it up (run from ``.venv-vllm`` with TRL installed and
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so that this process's CPU time counts vLLM's work).

TRL trains as usual; a callback runs one of our RL steps each time TRL finishes a rollout, so the two take
turns and share whatever load the machine has. A rollout's TRL time runs from the end of our previous step
to the end of TRL's last optimiser step on that rollout (generation, scoring, old log-probs, updates,
logging). Both wall and this process's CPU time are recorded; on a machine shared with other jobs, run with
``--threads 1`` and read the CPU-time ratio, which the other jobs' load does not change. Prints one JSON
object per rollout and a summary per case: the median over rollouts after the first (which includes
warm-up), and the ratio TRL / ours.

    python benchmarks/bench_vs_trl.py [--rollouts 2] [--cases 1,2] [--threads N] [--no-share-prompt]
        [--engine hf|vllm]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from bench_engines import ENGINES
from cegppo.config import load_config
from cegppo.data import arithmetic_problems, render_prompt
from cegppo.models import load_model_and_tokenizer
from cegppo.trainer import Trainer

PROMPTS, SAMPLES, NEW_TOKENS, MICRO, LR = 8, 8, 64, 8, 5e-6


def our_trainer(
    out: str, optimizer_steps: int, share_prompt: bool, model: str | None, engine: str
) -> Trainer:
    config = load_config(
        None,
        [
            *([f"model.path={model}"] if model else []),
            f"rollout.engine={engine}",
            *ENGINES[engine],
            "data.heldout=null",
            f"data.train_batch_size={PROMPTS}",
            f"rollout.n={SAMPLES}",
            f"rollout.max_new_tokens={NEW_TOKENS}",
            "actor.policy_loss=vanilla",
            "actor.clip_ratio_low=0.2",
            "actor.clip_ratio_high=0.2",
            "actor.clip_ratio_c=10.0",
            "actor.loss_agg_mode=token-mean",
            f"actor.lr={LR}",
            f"actor.ppo_mini_batch_size={PROMPTS}",
            f"actor.ppo_epochs={optimizer_steps}",
            f"actor.micro_batch_size={MICRO}",
            f"actor.share_prompt={share_prompt}",
            "actor.bf16_autocast=true",
            f"trainer.output_dir={out}",
            f"trainer.name=ours-{optimizer_steps}",
            "trainer.quiet=true",
            "trainer.tensorboard=false",
        ],
    )
    return Trainer(config, Path(out) / f"ours-{optimizer_steps}")


def trl_trainer(
    out: str, optimizer_steps: int, rollouts: int, ours: Trainer, callback: TrainerCallback
) -> GRPOTrainer:
    model, tokenizer = load_model_and_tokenizer(ours.config.model.path)
    data = ours.config.data
    examples = arithmetic_problems(data.train_size, seed=data.seed)
    dataset = Dataset.from_dict(
        {
            # the very text our trainer samples from
            "prompt": [render_prompt(tokenizer, ex, system_prompt=data.system_prompt) for ex in examples],
            "solution": [example.ground_truth for example in examples],
            "data_source": [example.data_source for example in examples],
        }
    )

    def reward(
        completions: list[str], solution: list[str], data_source: list[str], **_: object
    ) -> list[float]:
        return ours.scorer.score(completions, solution, data_source, [None] * len(completions)).scores

    args = GRPOConfig(
        output_dir=str(Path(out) / f"trl-{optimizer_steps}"),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=PROMPTS * SAMPLES // MICRO,  # one optimiser step per pass over a rollout
        num_generations=SAMPLES,
        num_iterations=optimizer_steps,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.2,
        delta=10.0,
        beta=0.0,
        max_steps=rollouts * optimizer_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=True,
        seed=ours.config.trainer.seed,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )


class Interleave(TrainerCallback):
    """After each TRL rollout, time it, then run (and time) one of our RL steps."""

    def __init__(self, case: int, ours: Trainer) -> None:
        self.case, self.ours = case, ours
        self.rollouts: list[dict] = []
        self.mark = self.cpu_mark = 0.0
        self.trl_lengths: list[float] = []

    def start(self) -> None:
        self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "completions/mean_length" in logs:
            self.trl_lengths.append(logs["completions/mean_length"])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.case:
            return
        trl_s, trl_cpu_s = time.perf_counter() - self.mark, time.process_time() - self.cpu_mark
        cpu = time.process_time()
        metrics = self.ours.step()
        record = {
            "case": f"{self.case}_optimizer_steps_per_rollout",
            "rollout": len(self.rollouts) + 1,
            "trl_s": round(trl_s, 2),
            "ours_s": round(metrics["timing/step_s"], 2),
            "trl_cpu_s": round(trl_cpu_s, 2),
            "ours_cpu_s": round(time.process_time() - cpu, 2),
            "ours_phases_s": {
                phase: round(metrics[f"timing/{phase}_s"], 2) for phase in ("gen", "old_logprob", "update")
            },
            "trl_completion_length": round(self.trl_lengths[-1], 1) if self.trl_lengths else None,
            "ours_response_length": round(metrics["response_length/mean"], 1),
        }
        print(json.dumps(record), flush=True)
        self.rollouts.append(record)
        self.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=2, help="rollouts per case (the first is warm-up)")
    parser.add_argument("--cases", default="1,2", help="optimiser steps per rollout, comma-separated")
    parser.add_argument("--no-share-prompt", action="store_true", help="ours with actor.share_prompt=false")
    parser.add_argument("--model", help="a local model directory instead of the embedded default")
    parser.add_argument("--threads", type=int, help="torch threads for both (default: torch's)")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="hf", help="our rollout engine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    summary: dict = {
        "case": "vs_trl_summary",
        "rollouts": args.rollouts,
        "share_prompt": not args.no_share_prompt,
        "engine": args.engine,
    }
    with tempfile.TemporaryDirectory() as out:
        for case in (int(c) for c in args.cases.split(",")):
            ours = our_trainer(out, case, not args.no_share_prompt, args.model, args.engine)
            interleave = Interleave(case, ours)
            trl = trl_trainer(out, case, args.rollouts, ours, interleave)
            interleave.start()
            trl.train()
            ours.close()
            later = interleave.rollouts[1:] or interleave.rollouts
            result = {}
            for clock in ("s", "cpu_s"):
                trl_s = statistics.median(r[f"trl_{clock}"] for r in later)
                ours_s = statistics.median(r[f"ours_{clock}"] for r in later)
                result[f"trl_{clock}_per_rollout"] = trl_s
                result[f"ours_{clock}_per_rollout"] = ours_s
                result[f"trl_over_ours_{clock}"] = round(trl_s / ours_s, 2)
            summary[f"{case}_optimizer_steps_per_rollout"] = result
    summary["torch_threads"] = torch.get_num_threads()
    summary["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    summary["versions"] = {
        name: __import__(name).__version__ for name in ("torch", "transformers", "trl", "accelerate")
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
