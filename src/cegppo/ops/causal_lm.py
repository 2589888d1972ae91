"""Log-probs and entropy of a causal LM's response tokens: the call the trainer makes on its policy."""

from __future__ import annotations

import torch
from torch import nn

from cegppo.ops._validation import check_settings
from cegppo.ops.fused_linear import linear_logprobs_and_entropy
from cegppo.ops.logprobs import logprobs_and_entropy
from cegppo.ops.shared_prompt import (
    check_cache_usable,
    continue_from_cache,
    distinct_prompts,
    prefill_prompts,
    sampler_position_ids,
)

# Config fields of models whose LM head does more than hidden @ W.T + b, with the value that makes it a no-op.
# The fused path only sees the head's weight and bias, so it would silently drop these transforms.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def causal_lm_logprobs_and_entropy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    fused: bool = True,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    share_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log p and entropy [B, R] of the last ``response_len`` tokens of each row under ``model``.

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...).
        input_ids: [B, P + R] prompt (left-padded) followed by response (right-padded).
        attention_mask: [B, P + R], 1 on real tokens.
        response_len: R; response token t is scored from the hidden state at the position before it.
        temperature: the sampler's temperature (log-probs then match the sampling distribution).
        fused: run the backbone only and apply :func:`linear_logprobs_and_entropy` to the LM head, so no
            logits are ever held; ``False`` asks the model for the logits of the R positions and applies
            :func:`logprobs_and_entropy`.
        chunk_size: tokens per chunk in the log-prob kernel.
        with_entropy: return the entropy (else ``None``; it then costs nothing in backward).
        share_prompt: run each distinct prompt of the batch once and the responses against its KV cache
            (see :mod:`cegppo.ops.shared_prompt`): the same values and gradients as the plain pass, for
            about one prompt's cost per group instead of one per row. Response positions past the batch's
            longest response are 0 rather than computed.

    Position ids follow the attention mask as in ``generate``, so left-padded rows see the positions the
    sampler used. Gradients reach every parameter, including a tied embedding through both of its uses.

    Raises:
        ValueError: on mismatched shapes, a response length outside [1, P + R), (fused only) a model whose
            head rescales or soft-caps its logits, or (shared only) gradient checkpointing under autograd.
    """
    check_settings(temperature, chunk_size)
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"input_ids must be an integer [B, L] tensor, got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
        )
    seq_len = input_ids.shape[1]
    if isinstance(response_len, bool) or not isinstance(response_len, int) or not 0 < response_len < seq_len:
        raise ValueError(
            f"response_len must be an int in [1, {seq_len}) for sequences of {seq_len}, got {response_len!r}"
        )
    if fused:
        _reject_logit_transforms(model)
    input_ids, attention_mask, first = _trim_padding(input_ids, attention_mask, seq_len - response_len)
    features, labels = (_shared_prompt_features if share_prompt else _features)(
        model, input_ids, attention_mask, first, fused
    )
    if fused:
        head = model.get_output_embeddings()
        logp, entropy = linear_logprobs_and_entropy(
            features,
            head.weight,
            labels,
            bias=getattr(head, "bias", None),
            temperature=temperature,
            chunk_size=chunk_size,
        )
    else:
        logp, entropy = logprobs_and_entropy(features, labels, temperature=temperature, chunk_size=chunk_size)
    if labels.shape[1] < response_len:  # the pass stopped at the batch's longest response
        logp, entropy = (nn.functional.pad(x, (0, response_len - labels.shape[1])) for x in (logp, entropy))
    return logp, entropy if with_entropy else None


def _trim_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The batch without the columns no row uses: the prompts' leading padding and the responses' trailing
    padding beyond this batch's longest row (a micro-batch is padded to the longest row of the whole step).
    Positions follow the attention mask, so every real token keeps its position; returns the new ``first``."""
    used = attention_mask.any(dim=0)
    prompt_used = used[:first].nonzero()
    start = int(prompt_used[0]) if len(prompt_used) else first - 1
    response_used = used[first:].nonzero()
    stop = first + (int(response_used[-1]) + 1 if len(response_used) else 1)
    if start == 0 and stop == input_ids.shape[1]:
        return input_ids, attention_mask, first
    return input_ids[:, start:stop], attention_mask[:, start:stop], first - start


def _features(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """What scores each response token (last hidden state if ``fused``, else logits) and the tokens."""
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": sampler_position_ids(attention_mask),
        "use_cache": False,
    }
    seq_len = input_ids.shape[1]
    if fused:
        features = _backbone(model)(**inputs).last_hidden_state[:, first - 1 : seq_len - 1]
    else:
        positions = torch.arange(first - 1, seq_len - 1, device=input_ids.device)
        features = model(**inputs, logits_to_keep=positions).logits
    return features, input_ids[:, first:]


def _shared_prompt_features(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_features` with each distinct prompt run once: the first response token is scored from the
    prompt's last position, the others from the responses' own pass over the row-gathered prompt cache."""
    check_cache_usable(model)
    prompts = distinct_prompts(input_ids[:, :first], attention_mask[:, :first])
    response_mask = attention_mask[:, first:]
    used = response_mask.any(dim=0).nonzero()
    width = int(used[-1]) + 1 if len(used) else 1
    labels = input_ids[:, first : first + width]
    module = _backbone(model) if fused else model

    def features(outputs: object) -> torch.Tensor:
        return outputs.last_hidden_state if fused else outputs.logits

    extra = {} if fused else {"logits_to_keep": 1}
    cache, prompts, outputs = prefill_prompts(module, prompts, **extra)
    scored = [features(outputs)[:, -1:][prompts.inverse]]
    if width > 1:
        cache.batch_select_indices(prompts.inverse)
        extra = {} if fused else {"logits_to_keep": 0}
        outputs = continue_from_cache(
            module, cache, prompts, labels[:, :-1], response_mask[:, : width - 1], **extra
        )
        scored.append(features(outputs))
    return torch.cat(scored, dim=1), labels


def _backbone(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _reject_logit_transforms(model: nn.Module) -> None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, neutral)
        if value != neutral:
            raise ValueError(
                f"{type(model).__name__} has config.{name}={value}, which the fused path would ignore; "
                "pass fused=False"
            )
