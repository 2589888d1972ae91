"""CE-GPPO with TRL: GSM8K (packaged with cegppo) and any causal LM, on one GPU or many.

    pip install '.[trl]'      # in a cegppo checkout (or its wheel with [trl]); add 'trl[vllm]' for use_vllm=True
    python examples/trl/train_ce_gppo.py --model Qwen/Qwen2.5-0.5B-Instruct --output-dir runs/trl-ce-gppo
    accelerate launch --num_processes 8 examples/trl/train_ce_gppo.py --model ... --output-dir ...

Each generation batch (16 prompts × 8 completions per process) is split into 8 micro-batches, 2 per optimizer
step: 4 optimizer steps per generation, so the policy moves away from the one that sampled the completions and
the clipping (logged as clip_ratio/* and actor/pg_clipfrac_*) matters.
The reward is TRL's ``accuracy_reward`` (math-verify, 1 or 0). The GSM8K file is the test split: this is a
demonstration, not an evaluation.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from trl.rewards import accuracy_reward

from cegppo.data import BOXED_INSTRUCTION, load_benchmark
from cegppo.integrations.trl import CEGPPOConfig, CEGPPOTrainer


def gsm8k_dataset() -> Dataset:
    examples = load_benchmark("gsm8k", question_template=BOXED_INSTRUCTION)
    return Dataset.from_dict(
        {"prompt": [ex.messages for ex in examples], "solution": [ex.ground_truth for ex in examples]}
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hub id or local directory of a causal LM")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--beta1", type=float, default=0.5, help="CE-GPPO left-boundary weight (paper: 0.5)")
    parser.add_argument("--beta2", type=float, default=1.0, help="CE-GPPO right-boundary weight (paper: 1)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--max-completion-length", type=int, default=512)
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt (GRPO group)")
    parser.add_argument("--cpu", action="store_true", help="train on CPU in float32 (for a quick check)")
    args = parser.parse_args(argv)

    config = CEGPPOConfig(
        output_dir=args.output_dir,
        loss_mode="ce_gppo",
        beta1=args.beta1,
        beta2=args.beta2,
        epsilon=0.2,
        epsilon_high=0.2,
        delta=10.0,
        loss_agg_mode="token-mean",
        learning_rate=1e-6,
        per_device_train_batch_size=2 * args.num_generations,
        gradient_accumulation_steps=2,
        steps_per_generation=8,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=args.cpu,
        bf16=not args.cpu,
    )
    trainer = CEGPPOTrainer(
        model=args.model, reward_funcs=accuracy_reward, args=config, train_dataset=gsm8k_dataset()
    )
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
