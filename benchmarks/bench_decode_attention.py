"""Two variants of the hf engine's arithmetic on the demo's generation: time and sampler accuracy.

``--compare attention`` (the default): the engine's decode attention against transformers' own call.
``--compare head``: the prompts' shared first tokens run once (``prefill_prompts``, ``head``) against each
distinct prompt run whole (``per-prompt``), which computes the prompts' keys and values in another split.

At one query per row with no mask (the demo's prompts all have one length), transformers 5.2x calls the CPU SDPA
kernel with ``enable_gqa=True``, which runs query head by query head; with a mask it packs the query heads of
each KV head as that head's queries (``pack_gqa``), about 4x faster at the demo's decode shape, and the engine
packs always (``cegppo.rollout.hf.sampler_attention``). The packed call rounds differently, so whether the sampler
stays as close to the trainer is measured on the same tokens.

For each seed, the demo's generation (8 prompts x 8 samples, 32 new tokens, bf16 autocast) is sampled once with
each variant (``sdpa``: transformers' own attention; ``packed``: the engine's), interleaved in alternating
order, CPU time measured; then each of the two token sets is scored with the other variant too (the engine's log-probs of given tokens),
and each scoring is compared with the trainer's pass on the same tokens (mean |log π_trainer − log π_sampler| over
response tokens, ``rollout/logprob_diff``). Scoring both attentions on both engines' draws cancels the advantage
a sampler has on tokens its own rounding picked. Prints one JSON object per seed and a summary: the CPU-time
ratio and the paired difference of the gap (second variant − first; 95% paired bootstrap interval, two-sided
sign-flip p).

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_attention.py [--compare attention|head] [--seeds 25]
        [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import cegppo.ops.shared_prompt as shared_prompt
import cegppo.rollout.hf as hf
from cegppo.config import load_config
from cegppo.ops import causal_lm_logprobs_and_entropy
from cegppo.report.stats import describe_paired
from cegppo.rollout.base import RolloutBatch, SamplingParams
from cegppo.trainer import Trainer

# transformers' own SDPA call under another name: the engine packs the decode attention only for a model whose
# implementation is "sdpa" (``cegppo.rollout.hf.sampler_attention``), so this name keeps transformers' call.
TRANSFORMERS_SDPA = "bench_transformers_sdpa"
AttentionInterface.register(TRANSFORMERS_SDPA, sdpa_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(TRANSFORMERS_SDPA, sdpa_mask)


@contextlib.contextmanager
def attention(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    saved = model.config._attn_implementation
    model.config._attn_implementation = implementation
    try:
        yield
    finally:
        model.config._attn_implementation = saved


@contextlib.contextmanager
def shared_head(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """The engine with (``on``) or without the prompts' shared first tokens run once."""
    if on:
        yield
        return
    saved = hf.common_prefix_length, shared_prompt.common_prefix_length
    hf.common_prefix_length = shared_prompt.common_prefix_length = lambda prompts: 0
    try:
        yield
    finally:
        hf.common_prefix_length, shared_prompt.common_prefix_length = saved


# per comparison, its two variants, the engine's own second: a context manager for each, given the model
VARIANTS: dict[str, dict[str, Callable[[torch.nn.Module], contextlib.AbstractContextManager[None]]]] = {
    "attention": {
        "sdpa": lambda model: attention(model, TRANSFORMERS_SDPA),
        "packed": lambda model: attention(model, "sdpa"),
    },
    "head": {
        "per-prompt": lambda model: shared_head(model, on=False),
        "head": lambda model: shared_head(model, on=True),
    },
}


class GivenTokens(hf._DrawAndRecord):
    """Picks the given tokens instead of drawing (pad past a row's end) and records their log-probs."""

    def __init__(self, params: SamplingParams, tokens: torch.Tensor, pad: int) -> None:
        super().__init__(params)
        self._tokens, self._pad = tokens, pad

    def _pick(self, scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        step = len(self._logprobs)
        if step < self._tokens.shape[1]:
            return self._tokens[:, step : step + 1].to(scores.device)
        return torch.full((len(scores), 1), self._pad, device=scores.device)


@contextlib.contextmanager
def given_tokens(tokens: torch.Tensor, pad: int) -> Iterator[None]:
    """The given tokens for every row, in one ``generate`` call over all rows (finished rows kept: the step index
    is then the column of ``tokens``)."""
    saved, stop = hf._DrawAndRecord, hf._StopWhenRowsDone.__call__
    hf._DrawAndRecord = lambda params, *rows: GivenTokens(params, tokens, pad)  # type: ignore[misc, assignment]
    hf._StopWhenRowsDone.__call__ = lambda self, ids, scores, **kwargs: ids[:, 0] < 0  # type: ignore[method-assign]
    try:
        yield
    finally:
        hf._DrawAndRecord, hf._StopWhenRowsDone.__call__ = saved, stop  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=sorted(VARIANTS), default="attention")
    parser.add_argument("--seeds", type=int, default=25, help="seeds; each gives two token sets")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            None, ["data.heldout=null", f"trainer.output_dir={out}", "trainer.quiet=true", *args.overrides]
        )
        trainer = Trainer(config, Path(out) / "bench")
        model, engine, pad = trainer.model, trainer.engine, trainer.tokenizer.pad_token_id
        rollout = config.rollout

        def trainer_gap(batch: RolloutBatch) -> float:
            """The sampler's log-probs against the trainer's old-log-prob pass (its micro-batches, bf16)."""
            ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
            mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1)
            micro = config.actor.micro_batch_size
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                logprobs = torch.cat(
                    [
                        causal_lm_logprobs_and_entropy(
                            model,
                            ids[start : start + micro],
                            mask[start : start + micro],
                            batch.response_ids.shape[1],
                            temperature=rollout.temperature,
                            with_entropy=False,
                            share_prompt=config.actor.share_prompt,
                        )[0]
                        for start in range(0, len(ids), micro)
                    ]
                )
            response = batch.response_mask.bool()
            return (logprobs - batch.sampler_logprobs).abs()[response].mean().item()

        variants = VARIANTS[args.compare]
        first, second = variants
        cpu: dict[str, list[float]] = {first: [], second: []}
        gaps: dict[str, list[float]] = {first: [], second: []}
        for seed in range(args.seeds + 1):  # seed 0 warms up and is not counted
            prompts = [
                trainer._render(e) for e in trainer.train_data.next_batch(config.data.train_batch_size)
            ]
            params = SamplingParams(
                n=rollout.n,
                temperature=rollout.temperature,
                top_p=rollout.top_p,
                top_k=rollout.top_k,
                max_new_tokens=rollout.max_new_tokens,
                seed=seed,
            )
            drawn: dict[str, RolloutBatch] = {}
            for name in (first, second) if seed % 2 == 0 else (second, first):
                with variants[name](model):
                    start = time.process_time()
                    drawn[name] = engine.generate(prompts, params)
                    seconds = time.process_time() - start
                if seed:
                    cpu[name].append(seconds)
            record: dict[str, object] = {"seed": seed, "cpu_s": {k: v[-1] for k, v in cpu.items() if seed}}
            for source, batch in drawn.items():
                scored = {source: batch}
                other = second if source == first else first
                given = dataclasses.replace(params, max_new_tokens=batch.response_ids.shape[1])
                with (
                    variants[other](model),
                    given_tokens(batch.response_ids, pad),
                ):
                    scored[other] = engine.generate(prompts, given)
                if not torch.equal(scored[other].response_ids, batch.response_ids):
                    raise RuntimeError(f"seed {seed}: scoring {source}'s tokens did not reproduce them")
                pair = {name: trainer_gap(b) for name, b in scored.items()}
                record[f"gap_on_{source}_draws"] = pair
                if seed:
                    for name, value in pair.items():
                        gaps[name].append(value)
            print(json.dumps(record), flush=True)
        differences = [b - a for b, a in zip(gaps[second], gaps[first], strict=True)]
        mean, ci, p = describe_paired(differences)
        print(
            json.dumps(
                {
                    "case": f"sampler_{args.compare}",
                    "machine": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(),
                    "token_sets": len(differences),
                    "cpu_s_median": {k: statistics.median(v) for k, v in cpu.items()},
                    f"cpu_ratio_{second}_over_{first}": statistics.median(
                        [b / a for b, a in zip(cpu[second], cpu[first], strict=True)]
                    ),
                    "gap_mean": {k: statistics.fmean(v) for k, v in gaps.items()},
                    f"gap_{second}_minus_{first}": {"mean": mean, "ci95": ci, "p_two_sided": p},
                }
            )
        )


if __name__ == "__main__":
    main()
