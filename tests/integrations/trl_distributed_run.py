"""Two CEGPPOTrainer steps on a saved tiny model, for ``test_trl_distributed.py``.

Run either as a plain script (one process) or under ``accelerate launch --multi_gpu --num_processes 2`` on a
machine without a GPU (two CPU processes, gloo; accelerate 1.15's ``--cpu`` starts a single process);
``--per-device-batch`` sets the share of the global batch each process gets. Completions are sampled from
the policy with one seed per (prompt, sample) pair, so the 1- and 2-process runs train on the same samples
and their updates can be compared. The main process saves the final weights to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import zlib
from collections import Counter

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is TRL's experimental hook

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cegppo.integrations.trl import CEGPPOConfig, CEGPPOTrainer

PROMPTS = [
    [{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(2, 3), (14, 7), (30, 12), (5, 5)]
]
MAX_COMPLETION = 8


def length_reward(completions: list, **kwargs) -> list[float]:
    return [len(completion[0]["content"]) / 10 for completion in completions]


def seeded_rollout(prompts: list, trainer: CEGPPOTrainer) -> dict:
    """One sampled completion per prompt entry, seeded by the prompt and its occurrence in this batch."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.processing_class
    eos = tokenizer.eos_token_id
    seen: Counter[str] = Counter()
    prompt_ids, completion_ids = [], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(zlib.crc32(text.encode()) + seen[text])
            output = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=True,
                top_k=0,
                max_new_tokens=MAX_COMPLETION,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids) :].tolist()
        seen[text] += 1
        prompt_ids.append(ids)
        completion_ids.append(output[: output.index(eos) + 1] if eos in output else output)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, help="a directory: one <loss>.safetensors per loss")
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("losses", nargs="+", metavar="LOSS:AGG", help="e.g. ce_gppo:token-mean")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    for spec in args.losses:
        loss_mode, loss_agg_mode = spec.split(":")
        config = CEGPPOConfig(
            output_dir=args.out,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            seed=0,
            # SGD without clipping: the update is proportional to the gradient, so a gradient scaled wrongly
            # across processes shows (Adam and a clipped norm would hide a constant factor).
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            per_device_train_batch_size=args.per_device_batch,
            num_generations=4,
            max_completion_length=MAX_COMPLETION,
            max_steps=2,
            num_iterations=2,  # the second step reuses the first step's samples: the ratio has moved
            epsilon=0.2,
            epsilon_high=0.28,
            loss_mode=loss_mode,
            loss_agg_mode=loss_agg_mode,
            beta1=0.75,
        )
        trainer = CEGPPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(args.model),
            reward_funcs=length_reward,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tokenizer,
            rollout_func=seeded_rollout,
        )
        trainer.train()
        if trainer.accelerator.is_main_process:
            model = trainer.accelerator.unwrap_model(trainer.model)
            weights = {name: p.detach().contiguous() for name, p in model.named_parameters()}
            processes = {"num_processes": str(trainer.accelerator.num_processes)}
            save_file(weights, os.path.join(args.out, f"{loss_mode}.safetensors"), metadata=processes)


if __name__ == "__main__":
    main()
