"""Loading prompt files: JSONL, JSON or Parquet, in the ``{problem, answer}`` schema or verl's."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cegppo.data.examples import (
    PromptExample,
    build_messages,
    check_messages,
    check_question_template,
    few_shot_messages,
)

SIMPLE_KEYS = ("problem", "answer")


def read_utf8(path: Path) -> str:
    """The file's text; ValueError naming the file and line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: {exc.reason})"
        ) from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = read_utf8(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        for i, row in enumerate(rows, start=1):
            yield f"{path}: row {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        yield f"{path}:{lineno}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as Parquet: {exc}") from exc
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}: row {i}", row


def to_ground_truth(value: Any, where: str) -> str:
    """A gold answer as a string; integers and integral floats are written without a decimal point."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: the gold answer is empty")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{where}: expected the gold answer as a string or number, got {type(value).__name__}"
        )
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: the gold answer is {value}")
        if value.is_integer():
            return str(int(value))
    return str(value)


def _require(row: Mapping, key: str, where: str, schema: str) -> Any:
    if key not in row or row[key] is None:
        raise ValueError(f"{where}: missing key {key!r} ({schema})")
    return row[key]


def example_from_row(
    row: Any,
    where: str,
    *,
    default_source: str,
    system_prompt: str | None = None,
    few_shot: list[dict[str, str]] | None = None,
    question_template: str | None = None,
) -> PromptExample:
    """Convert one row of either schema; ``where`` (``"file:line"``) starts every error message.

    ``{"problem", "answer"}`` schema: optional ``data_source`` and ``extra_info``; any other keys (``id``,
    ``level``, ...) are added to ``extra_info``. verl schema: ``prompt`` (a chat list, or a string taken as one
    user turn), ``reward_model.ground_truth``, optional ``data_source`` and ``extra_info``. A missing
    ``data_source`` defaults to ``default_source`` (the file's stem).
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object with keys, got {type(row).__name__}")
    if "prompt" in row:
        schema = "verl schema: prompt, reward_model.ground_truth"
        prompt = _require(row, "prompt", where, schema)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        conversation = check_messages(prompt, f"{where}: prompt")
        if conversation[-1]["role"] != "user":
            raise ValueError(f"{where}: prompt must end with a user turn, got {conversation[-1]['role']!r}")
        reward_model = _require(row, "reward_model", where, schema)
        if not isinstance(reward_model, Mapping):
            raise ValueError(f"{where}: reward_model: expected an object, got {type(reward_model).__name__}")
        value = _require(reward_model, "ground_truth", f"{where}: reward_model", schema)
        gold = to_ground_truth(value, f"{where}: reward_model.ground_truth")
        extra = row.get("extra_info")
        extra_info = {}
    else:
        schema = "schema {problem, answer}, or verl's with 'prompt'"
        problem = _require(row, "problem", where, schema)
        if not isinstance(problem, str):
            raise ValueError(f"{where}: problem: expected a string, got {type(problem).__name__}")
        gold = to_ground_truth(_require(row, "answer", where, schema), f"{where}: answer")
        conversation = [{"role": "user", "content": problem}]
        extra = row.get("extra_info")
        # A null cell is how Parquet stores a key that a row does not have.
        extra_info = {
            k: v
            for k, v in row.items()
            if k not in (*SIMPLE_KEYS, "data_source", "extra_info") and v is not None
        }
    if not conversation[-1]["content"].strip():
        raise ValueError(f"{where}: the question (the final user turn) is empty")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise ValueError(f"{where}: extra_info: expected an object, got {type(extra).__name__}")
        extra_info.update(extra)
    source = row.get("data_source")
    if source is None:
        source = default_source
    elif not isinstance(source, str):
        raise ValueError(f"{where}: data_source: expected a string, got {type(source).__name__}")
    messages = build_messages(
        conversation,
        system_prompt=system_prompt,
        few_shot=few_shot or [],
        question_template=question_template,
    )
    return PromptExample(messages=messages, ground_truth=gold, data_source=source, extra_info=extra_info)


def load_prompt_file(
    path: str | Path,
    *,
    system_prompt: str | None = None,
    few_shot: Any = None,
    question_template: str | None = None,
    data_source: str | None = None,
) -> list[PromptExample]:
    """Load prompts from a ``.jsonl`` (or ``.json``: JSON lines or one array) or ``.parquet`` file.

    The schema is detected per row: a row with ``prompt`` is verl's, otherwise ``{"problem", "answer"}``.
    ``system_prompt`` replaces the row's system turn (or adds one); ``few_shot`` (see ``few_shot_messages``) is
    inserted after the system turn; ``question_template`` (containing ``{problem}``) rewrites the final user
    turn. ``data_source`` is the default for rows without one (default: the file's stem).

    Raises FileNotFoundError for a missing file and ValueError ``"<path>:<line>: ..."`` (``"<path>: row <n>"``
    for Parquet and JSON arrays) for a bad row: invalid JSON, a missing key, a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    check_question_template(question_template)
    turns = few_shot_messages(few_shot)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _json_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise ValueError(
            f"{path}: unsupported prompt file type {suffix!r}; expected .jsonl, .json or .parquet"
        )
    examples = [
        example_from_row(
            row,
            where,
            default_source=data_source if data_source is not None else path.stem,
            system_prompt=system_prompt,
            few_shot=turns,
            question_template=question_template,
        )
        for where, row in rows
    ]
    if not examples:
        raise ValueError(f"{path}: no prompts in the file")
    return examples
