"""Padding waste in the update's micro-batches: a step's rows are padded to the step's longest prompt and response,
and each micro-batch now runs only the columns its own rows use (``cegppo.ops.causal_lm``'s trimming).

A long-response case: 4 prompts × 4 responses whose lengths spread from short to ``--longest`` tokens (a
long-tailed draw, as reasoning responses are), one micro-batch per group, log-probs and entropies forward and
backward through a random-init model of SmolLM2-135M's width and ``--layers`` layers under bf16 autocast, one
thread. Both variants run in one process, interleaved, ``--repeats`` times; prints one JSON object with the
positions each ran and the median times.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_padding.py [--longest 1024] [--layers 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from unittest import mock

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench_ops import _machine  # this folder is on the path when a benchmark runs as a script
from cegppo.ops import causal_lm, causal_lm_logprobs_and_entropy


def step_batch(longest: int, prompt: int, groups: int, group_size: int, seed: int = 0):
    """Left-padded prompts and right-padded responses, all padded to the step's longest row."""
    gen = torch.Generator().manual_seed(seed)
    rows = groups * group_size
    lengths = (longest * torch.rand(rows, generator=gen) ** 3).long().clamp(min=16)
    lengths[0] = longest
    prompt_lengths = torch.randint(prompt // 2, prompt + 1, (groups,), generator=gen).repeat_interleave(
        group_size
    )
    ids = torch.randint(5, 49152, (rows, prompt + longest), generator=gen)
    mask = torch.zeros(rows, prompt + longest, dtype=torch.long)
    for row in range(rows):
        mask[row, prompt - prompt_lengths[row] : prompt + lengths[row]] = 1
    return ids * mask, mask, longest


def run(model, ids, mask, response_len, group_size, trim: bool) -> tuple[float, int]:
    """CPU seconds for forward+backward over micro-batches of ``group_size`` consecutive rows, and the positions
    the backbone ran."""
    positions = 0
    forward = type(model.model).forward

    def counting(self, input_ids=None, **kwargs):
        nonlocal positions
        positions += input_ids.numel()
        return forward(self, input_ids, **kwargs)

    identity = mock.patch.object(causal_lm, "_trim_padding", lambda i, m, first: (i, m, first))
    with (
        mock.patch.object(type(model.model), "forward", counting),
        contextlib.nullcontext() if trim else identity,
    ):
        start = time.process_time()
        for first in range(0, ids.shape[0], group_size):
            rows = slice(first, first + group_size)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logp, entropy = causal_lm_logprobs_and_entropy(model, ids[rows], mask[rows], response_len)
            (logp.sum() + entropy.sum()).backward()
        seconds = time.process_time() - start
    model.zero_grad(set_to_none=True)
    return seconds, positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--longest", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=args.prompt + args.longest + 1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    ids, mask, response_len = step_batch(args.longest, args.prompt, groups=4, group_size=4)
    # grouped: the rows sorted by length first, as actor.micro_batch_tokens packs them (here 4 rows a micro-batch)
    order = torch.argsort(mask.sum(-1))
    cases = {
        "padded": (ids, mask, False),
        "trimmed": (ids, mask, True),
        "grouped": (ids[order], mask[order], True),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    positions: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, (case_ids, case_mask, trim) in cases.items():  # interleaved
            seconds, positions[name] = run(model, case_ids, case_mask, response_len, 4, trim=trim)
            times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        json.dumps(
            {
                "case": f"16 responses (4 groups), longest {args.longest}, prompts <= {args.prompt}, "
                f"SmolLM2-135M width x {args.layers} layers, bf16 autocast, 1 thread",
                "machine": _machine(),
                "real_tokens": int(mask.sum()),
                "positions": positions,
                "cpu_s_median": medians,
                "time_ratio_over_padded": {name: medians[name] / medians["padded"] for name in cases},
                "positions_ratio_over_padded": {
                    name: positions[name] / positions["padded"] for name in cases
                },
            }
        )
    )


if __name__ == "__main__":
    main()
