"""cegppo: RL fine-tuning of language models with verifiable rewards, built around CE-GPPO.

Layers, lowest first (a layer never imports a higher one):
``ops`` (tensor kernels) -> ``losses`` (pure functions of tensors) -> ``rollout``, ``rewards``, ``data``
-> ``trainer`` -> ``cli``.
"""

__version__ = "0.1.0"
