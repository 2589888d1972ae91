"""Packaged evaluation sets: the math benchmarks shipped as JSONL, and the held-out arithmetic problems."""

from __future__ import annotations

from importlib import resources
from typing import Any

from cegppo.data.arithmetic import held_out_arithmetic
from cegppo.data.examples import PromptExample, build_messages, check_question_template
from cegppo.data.files import load_prompt_file

ARITHMETIC = "arithmetic"


def _folder():
    return resources.files("cegppo.data").joinpath("benchmarks")


def list_benchmarks() -> list[str]:
    """Names accepted by ``load_benchmark``: the packaged JSONL files and ``arithmetic``."""
    files = [p.name.removesuffix(".jsonl") for p in _folder().iterdir() if p.name.endswith(".jsonl")]
    return sorted([*files, ARITHMETIC])


def load_benchmark(
    name: str,
    *,
    system_prompt: str | None = None,
    few_shot: Any = None,
    question_template: str | None = None,
) -> list[PromptExample]:
    """Load a benchmark by name (see ``list_benchmarks``; origins in ``benchmarks/SOURCES.md``).

    ``data_source`` is the benchmark's name. The math benchmarks have no few-shot turns and no template unless
    given (``BOXED_INSTRUCTION`` is a ready-made ``question_template``). ``arithmetic`` is the fixed set of 200
    held-out additions with the built-in 2-shot prompt unless ``few_shot`` is given (``[]`` for none).
    """
    names = list_benchmarks()
    if name not in names:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    check_question_template(question_template)
    if name == ARITHMETIC:
        examples = held_out_arithmetic(few_shot=True if few_shot is None else few_shot)
        for ex in examples:
            ex.messages = build_messages(
                ex.messages, system_prompt=system_prompt, few_shot=[], question_template=question_template
            )
        return examples
    with resources.as_file(_folder().joinpath(f"{name}.jsonl")) as path:
        return load_prompt_file(
            path,
            system_prompt=system_prompt,
            few_shot=few_shot,
            question_template=question_template,
            data_source=name,
        )
