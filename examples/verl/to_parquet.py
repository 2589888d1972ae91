"""Write prompts as a verl RL parquet file (``data_source``, ``prompt``, ``ability``, ``reward_model``, ``extra_info``).

SOURCE is a benchmark packaged with cegppo (aime24, aime25, amc23, math500, gsm8k) or a ``.jsonl``/``.json``/
``.parquet`` file with ``{"problem", "answer"}`` rows or rows already in verl's schema (for example
KlearReasoner-MathSub-30K's ``train_math_30K.json``). Rows are read and checked by ``cegppo.data``.

    python3 examples/verl/to_parquet.py aime24 ~/data/cegppo/aime24.parquet
    python3 examples/verl/to_parquet.py train_math_30K.json ~/data/cegppo/klear_math_30k.parquet
    python3 examples/verl/to_parquet.py gsm8k ~/data/gsm8k.parquet --template boxed --limit 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cegppo.data import BOXED_INSTRUCTION, PromptExample, list_benchmarks, load_benchmark, load_prompt_file


def load(source: str, template: str | None, data_source: str | None) -> list[PromptExample]:
    if Path(source).suffix:
        return load_prompt_file(source, question_template=template, data_source=data_source)
    examples = load_benchmark(source, question_template=template)
    if data_source is not None:
        for example in examples:
            example.data_source = data_source
    return examples


def verl_rows(examples: list[PromptExample], split: str) -> list[dict]:
    """One verl row per example; ``extra_info.index`` is the row number (verl reads it for some reward managers)."""
    return [
        {
            "data_source": example.data_source,
            "prompt": example.messages,
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": example.ground_truth},
            "extra_info": {**example.extra_info, "split": split, "index": index},
        }
        for index, example in enumerate(examples)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source", help=f"a .jsonl/.json/.parquet file or one of: {', '.join(list_benchmarks())}"
    )
    parser.add_argument("output", type=Path, help="the parquet file to write")
    parser.add_argument(
        "--template",
        default=None,
        help="rewrite each question: 'boxed' for the step-by-step \\boxed{} instruction, or a string "
        "containing {problem} (default: the question as written)",
    )
    parser.add_argument(
        "--data-source", default=None, help="data_source of every row (default: the file's stem)"
    )
    parser.add_argument("--split", default="train", help="extra_info.split (default: train)")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N rows")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")

    template = BOXED_INSTRUCTION if args.template == "boxed" else args.template
    examples = load(args.source, template, args.data_source)[: args.limit]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(verl_rows(examples, args.split)), args.output)
    print(f"wrote {len(examples)} rows to {args.output}")


if __name__ == "__main__":
    main()
