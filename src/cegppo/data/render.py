"""Rendering a PromptExample to the text a model is prompted with."""

from __future__ import annotations

from typing import Any

from cegppo.data.examples import PromptExample, with_system_prompt


def render_prompt(tokenizer: Any, example: PromptExample, *, system_prompt: str | None = None) -> str:
    """The prompt text: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``.

    ``system_prompt`` replaces the example's system turn (or adds one). With None, the example is rendered as it
    is, so a template's default system prompt still applies: SmolLM2's template adds "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face" whenever the first turn is not a system turn. To suppress
    it, give an explicit system turn, e.g. ``system_prompt=""`` (an empty system turn).

    Raises ValueError if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template (a Jinja string)"
        )
    messages = with_system_prompt(example.messages, system_prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
