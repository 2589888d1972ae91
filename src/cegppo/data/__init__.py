"""Prompt data: prompt files (JSONL/JSON/Parquet, ``{problem, answer}`` or verl schema), packaged benchmarks,
the default arithmetic task, chat-template rendering and a resumable prompt stream."""

from cegppo.data.arithmetic import (
    ARITHMETIC_FEW_SHOT,
    arithmetic_problems,
    arithmetic_question,
    held_out_arithmetic,
)
from cegppo.data.benchmark import list_benchmarks, load_benchmark
from cegppo.data.dataset import PromptDataset
from cegppo.data.examples import BOXED_INSTRUCTION, PromptExample, few_shot_messages
from cegppo.data.files import load_prompt_file
from cegppo.data.render import render_prompt

__all__ = [
    "ARITHMETIC_FEW_SHOT",
    "BOXED_INSTRUCTION",
    "PromptDataset",
    "PromptExample",
    "arithmetic_problems",
    "arithmetic_question",
    "few_shot_messages",
    "held_out_arithmetic",
    "list_benchmarks",
    "load_benchmark",
    "load_prompt_file",
    "render_prompt",
]
