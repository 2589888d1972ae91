"""The toy policy of docs/toy.md (toy scale): a ~0.9M-parameter Llama that RL can be compared on in minutes on a CPU.

Builds, with nothing downloaded, a character-level tokenizer (a transformers ``PreTrainedTokenizerFast`` with
ChatML specials and chat template, so the trainer renders prompts as for any chat model) and a 4-layer Llama
from a config, then fine-tunes it on the task of ``configs/toy_cpu.yaml`` (additions of ``data.digits``-digit
numbers from the training pool, asked without worked examples, answered ``\\boxed{SUM}``) until its sampled
accuracy at T = 1 reaches ``--target`` (30%: low enough that RL has room, high enough that most groups of 8
carry reward signal). It saves model and tokenizer to ``--output`` with ``save_pretrained``, and
``toy_policy.json`` beside them: the supervised stage's steps, time and accuracy, and the held-out avg@n the RL
runs start from, measured as a run of the config measures it (``val/heldout/avg@8``).

    OMP_NUM_THREADS=1 python examples/toy_policy.py --output models/toy
"""

from __future__ import annotations

import argparse
import json
import string
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cegppo.config import HELDOUT_BENCHMARK, Config, load_config
from cegppo.data import PromptExample, arithmetic_problems, render_prompt
from cegppo.evaluation import evaluate_examples
from cegppo.rewards import RewardScorer
from cegppo.rollout import SamplingParams, build_rollout_engine
from cegppo.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy_cpu.yaml"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PAD, BOS, EOS, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
# Every printable ASCII character and the newline: any prompt of the task, and any template, round-trips.
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384}
SUMMARY_FILE = "toy_policy.json"
CHECK_PROBLEMS = 256  # training-pool problems the stopping rule samples (never the held-out set)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (a BPE without merges), ChatML specials, EOS ``<|im_end|>``, left padding."""
    specials = [PAD, BOS, EOS, UNK]
    vocab = {token: i for i, token in enumerate([*specials, *CHARACTERS])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.decoder = decoders.Fuse()  # characters are joined as they are, not with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[],
        padding_side="left",
        chat_template=CHATML_TEMPLATE,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int, **shape: int) -> LlamaForCausalLM:
    """A Llama of ``SHAPE`` (overridden by ``shape``) for ``tokenizer``, float32, initialised under ``seed``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**SHAPE, **shape},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def answer(example: PromptExample) -> str:
    """The response the supervised stage teaches: the sum, boxed, and nothing else (the reward reads the last
    ``\\boxed{}``; a short answer keeps every RL step's generation to a dozen tokens)."""
    return f"\\boxed{{{example.ground_truth}}}"


def batch_tensors(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[PromptExample]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and labels (-100 except on the answer and its EOS), right-padded."""
    rows = []
    for example in examples:
        prompt = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
        response = tokenizer(answer(example) + EOS, add_special_tokens=False)["input_ids"]
        rows.append((prompt + response, [-100] * len(prompt) + response))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for row, (tokens, targets) in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, : len(targets)] = torch.tensor(targets)
    return ids, mask, labels


def sampled_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    config: Config,
    examples: Sequence[PromptExample],
    scorer: RewardScorer,
) -> float:
    """One response per problem at the training temperature, scored by the run's reward."""
    engine = build_rollout_engine(
        "hf", model, tokenizer, batch_size=None, autocast_dtype=None, share_prompt=True
    )
    params = SamplingParams(
        n=1, temperature=config.rollout.temperature, max_new_tokens=config.rollout.max_new_tokens, seed=0
    )
    return evaluate_examples(engine, scorer, tokenizer, "check", examples, params, chunk_size=64).avg_at_n


def supervised_stage(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    config: Config,
    *,
    target: float,
    max_steps: int,
    batch_size: int,
    lr: float,
    check_every: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """AdamW on the answers' cross-entropy, batches drawn from the training pool (problems never repeat within
    ``max_steps``), until the sampled accuracy on ``CHECK_PROBLEMS`` other training problems reaches ``target``
    (checked every ``check_every`` steps) or ``max_steps`` is spent."""
    data = config.data
    pool = arithmetic_problems(
        max_steps * batch_size + CHECK_PROBLEMS, seed=seed, digits=data.digits, few_shot=data.few_shot
    )
    check, train = pool[:CHECK_PROBLEMS], pool[CHECK_PROBLEMS:]
    scorer = RewardScorer(replace(config.reward, num_workers=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(100, max_steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    started, accuracy, step = time.perf_counter(), 0.0, 0
    try:
        while step < max_steps:
            model.train()
            ids, mask, labels = batch_tensors(tokenizer, train[step * batch_size : (step + 1) * batch_size])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % check_every == 0 or step == max_steps:
                model.eval()
                accuracy = sampled_accuracy(model, tokenizer, config, check, scorer)
                log(
                    f"step {step}: loss {loss.item():.3f}, sampled accuracy {accuracy:.3f} "
                    f"({time.perf_counter() - started:.0f} s)"
                )
                if accuracy >= target:
                    break
    finally:
        scorer.close()
    return {
        "sft_steps": step,
        "sft_seconds": round(time.perf_counter() - started, 1),
        "sft_sampled_accuracy": accuracy,
        "sft_check_problems": CHECK_PROBLEMS,
    }


def heldout_start(config: Config, model_dir: Path) -> dict[str, float]:
    """The saved model's ``eval.benchmarks`` metrics (``val/heldout/avg@8``) as a run of ``config`` on it computes
    them at its end: what every RL run starts from."""
    with tempfile.TemporaryDirectory() as tmp:
        run = replace(
            config,
            model=replace(config.model, path=str(model_dir)),
            trainer=replace(config.trainer, output_dir=tmp, name="start", quiet=True, tensorboard=False),
        )
        trainer = Trainer(run, Path(tmp) / "start")
        try:
            return trainer.evaluate_benchmarks()
        finally:
            trainer.close()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=CONFIG, help="the RL config the policy is built for")
    parser.add_argument("--output", type=Path, required=True, help="where the model and tokenizer are saved")
    parser.add_argument("--target", type=float, default=0.30, help="sampled accuracy that ends the stage")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--check-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, key.sub=value (e.g. data.heldout_size=100)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"toy policy: {parameters:,} parameters, vocabulary {len(tokenizer)}")
    summary: dict[str, Any] = {
        "parameters": parameters,
        **SHAPE,
        "seed": args.seed,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "target": args.target,
    }
    summary.update(
        supervised_stage(
            model,
            tokenizer,
            config,
            target=args.target,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            check_every=args.check_every,
            seed=args.seed,
        )
    )
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    if HELDOUT_BENCHMARK in config.eval.benchmarks:
        summary.update(heldout_start(config, args.output))
    (args.output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
