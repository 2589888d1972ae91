"""Memory-efficient tensor kernels: per-token log-probs and entropy without holding [tokens x vocab] logits.

>>> from cegppo.ops import linear_logprobs_and_entropy, logprobs_and_entropy
>>> logp, ent = logprobs_and_entropy(logits, labels, temperature=1.0, chunk_size=1024)  # doctest: +SKIP
>>> logp, ent = linear_logprobs_and_entropy(hidden, lm_head.weight, labels)  # doctest: +SKIP

``causal_lm_logprobs_and_entropy`` applies them to a Hugging Face causal LM's response tokens.
``docs/performance.md`` has the measured time and memory.
"""

from cegppo.ops.causal_lm import causal_lm_logprobs_and_entropy
from cegppo.ops.fused_linear import linear_logprobs_and_entropy
from cegppo.ops.logprobs import logprobs_and_entropy
from cegppo.ops.shared_prompt import sampler_position_ids

__all__ = [
    "causal_lm_logprobs_and_entropy",
    "linear_logprobs_and_entropy",
    "logprobs_and_entropy",
    "sampler_position_ids",
]
