"""Stands in for ``python3 -m verl.trainer.main_ppo`` when the tests run the launch scripts in examples/verl.

It composes verl's Hydra config with the script's overrides (a key that verl does not have fails here, as it
would at launch), runs verl's own ``validate_config``, builds the actor config as verl's workers do, and prints
the settings the tests check as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import verl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass, validate_config

from cegppo.integrations.verl import policy_loss_config_from_verl


def main(overrides: list[str]) -> None:
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(
        config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    ours = policy_loss_config_from_verl(actor)
    reward_path = Path(config.reward.custom_reward_function.path)
    data_files = OmegaConf.to_container(config.data, resolve=True)
    print(
        json.dumps(
            {
                "loss_mode": actor.policy_loss.loss_mode,
                "policy_loss_class": type(actor.policy_loss).__qualname__,
                "external_lib": config.actor_rollout_ref.model.external_lib,
                "reward_file_exists": reward_path.is_file(),
                "train_files": data_files["train_files"],
                "val_files": data_files["val_files"],
                "ours": {
                    key: getattr(ours, key)
                    for key in ("beta1", "beta2", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c")
                },
                "loss_agg_mode": actor.loss_agg_mode,
                "train_batch_size": config.data.train_batch_size,
                "rollout_n": config.actor_rollout_ref.rollout.n,
                "ppo_mini_batch_size": actor.ppo_mini_batch_size,
                "world_size": config.trainer.nnodes * config.trainer.n_gpus_per_node,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
