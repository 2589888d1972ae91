"""PromptExample and the chat-message plumbing shared by every prompt source (files, benchmarks, arithmetic)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")

# Qwen2.5-Math's chain-of-thought instruction: a ready-made ``question_template`` for math benchmarks.
BOXED_INSTRUCTION = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass
class PromptExample:
    """One prompt: chat turns ending with the user's question, and the gold answer its responses are scored
    against.

    ``messages`` may start with a system turn and hold few-shot user/assistant turns before the question.
    ``data_source`` and ``extra_info`` are passed to the reward function as in verl.
    """

    messages: list[dict[str, str]]
    ground_truth: str
    data_source: str
    extra_info: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The content of the final user turn."""
        return self.messages[-1]["content"]


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Validate a chat list (``[{"role", "content"}, ...]``) and return a copy with only those two keys.

    Raises ValueError starting with ``where`` (e.g. ``"file.jsonl:3: prompt"``) and naming the bad turn.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of chat turns, got {type(messages).__name__}")
    out = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            raise ValueError(
                f"{where}[{i}]: expected a {{'role', 'content'}} object, got {type(turn).__name__}"
            )
        for key in ("role", "content"):
            if key not in turn:
                raise ValueError(f"{where}[{i}]: missing key {key!r}")
            if not isinstance(turn[key], str):
                raise ValueError(f"{where}[{i}].{key}: expected a string, got {type(turn[key]).__name__}")
        if turn["role"] not in ROLES:
            raise ValueError(f"{where}[{i}].role: {turn['role']!r} is not one of {ROLES}")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def few_shot_messages(few_shot: Any) -> list[dict[str, str]]:
    """Normalise a few-shot spec to chat turns.

    Accepts None (no turns), a list of ``{"question": ..., "answer": ...}`` pairs (each becomes a user turn and an
    assistant turn), or a list of chat turns ``{"role", "content"}`` that alternate user/assistant, starting with
    user and ending with assistant. A system prompt is set separately (``system_prompt``), not here.
    """
    if few_shot is None:
        return []
    if isinstance(few_shot, (str, bytes, Mapping)) or not isinstance(few_shot, Sequence):
        raise ValueError(f"few_shot: expected a list, got {type(few_shot).__name__}")
    if not few_shot:
        return []
    if all(isinstance(item, Mapping) and "role" not in item for item in few_shot):
        turns = []
        for i, pair in enumerate(few_shot):
            for key in ("question", "answer"):
                if key not in pair:
                    raise ValueError(
                        f"few_shot[{i}]: missing key {key!r} (expected {{'question', 'answer'}})"
                    )
                if not isinstance(pair[key], str):
                    raise ValueError(
                        f"few_shot[{i}].{key}: expected a string, got {type(pair[key]).__name__}"
                    )
            turns += [
                {"role": "user", "content": pair["question"]},
                {"role": "assistant", "content": pair["answer"]},
            ]
        return turns
    turns = check_messages(few_shot, "few_shot")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ValueError(
                f"few_shot[{i}].role: expected {expected!r} (turns alternate user/assistant), got {turn['role']!r}"
            )
    if len(turns) % 2:
        raise ValueError("few_shot: the last turn must be an assistant answer")
    return turns


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``messages`` with its system turn replaced by ``system_prompt`` (or one added); unchanged if None."""
    if system_prompt is None:
        return messages
    if not isinstance(system_prompt, str):
        raise ValueError(f"system_prompt: expected a string, got {type(system_prompt).__name__}")
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": system_prompt}, *rest]


def check_question_template(template: str | None) -> None:
    """A question template must contain ``{problem}`` (replaced literally, so LaTeX braces need no escaping)."""
    if template is not None and (not isinstance(template, str) or "{problem}" not in template):
        raise ValueError(f"question_template must be a string containing '{{problem}}', got {template!r}")


def build_messages(
    conversation: list[dict[str, str]],
    *,
    system_prompt: str | None,
    few_shot: list[dict[str, str]],
    question_template: str | None,
) -> list[dict[str, str]]:
    """Assemble ``[system] + few-shot turns + conversation``; the template rewrites the final user turn.

    A system turn at the start of ``conversation`` stays first (or is replaced by ``system_prompt``).
    """
    system = conversation[:1] if conversation[0]["role"] == "system" else []
    rest = conversation[len(system) :]
    if question_template is not None:
        last = rest[-1]
        rest = [
            *rest[:-1],
            {"role": last["role"], "content": question_template.replace("{problem}", last["content"])},
        ]
    return with_system_prompt([*system, *few_shot, *rest], system_prompt)
