"""Plug-ins that put cegppo's policy losses into other RL trainers, without forking them.

- :mod:`cegppo.integrations.verl`: registers ``ce_gppo``, ``gppo`` and ``cegppo_<name>`` for the other losses
  in verl's policy-loss registry (needs ``verl``).
- :mod:`cegppo.integrations.trl`: ``CEGPPOTrainer``/``CEGPPOConfig``, a TRL ``GRPOTrainer`` whose loss comes from
  the cegppo registry (needs ``trl``).

Neither is imported here: each needs its trainer installed. ``docs/scaling.md`` explains when to use which.
"""
