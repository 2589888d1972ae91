#!/usr/bin/env bash
# One-GPU smoke run before a big one: CE-GPPO on Qwen2.5-0.5B-Instruct with GSM8K (the setting of verl's
# quickstart), 20 steps. Each batch of 64 prompts × 4 responses is split into 4 mini-batches, so the policy moves
# between updates and the clipping (actor/pg_clipfrac_low, _high) is exercised. Not run in this repository's CI
# (no GPU); its config is checked against verl 0.9.1. Extra arguments are Hydra overrides, e.g.
# `trainer.total_training_steps=5`.
#
# Environment: MODEL_PATH [Qwen/Qwen2.5-0.5B-Instruct]; DATA_DIR [~/data/cegppo-smoke]; PYTHON [python3];
# LAUNCH [$PYTHON -m verl.trainer.main_ppo].
# The data are the GSM8K test problems packaged with cegppo (the train split is not shipped): a pipeline check,
# not an evaluation.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-0.5B-Instruct}
DATA_DIR=${DATA_DIR:-$HOME/data/cegppo-smoke}
PYTHON=${PYTHON:-python3}
LAUNCH=${LAUNCH:-$PYTHON -m verl.trainer.main_ppo}

if [[ ! -f $DATA_DIR/gsm8k_train.parquet || ! -f $DATA_DIR/gsm8k_val.parquet ]]; then
    "$PYTHON" "$HERE/to_parquet.py" gsm8k "$DATA_DIR/gsm8k_train.parquet" --template boxed
    "$PYTHON" "$HERE/to_parquet.py" gsm8k "$DATA_DIR/gsm8k_val.parquet" --template boxed --split test --limit 256
fi

# shellcheck disable=SC2086  # LAUNCH is a command line, split on purpose
$LAUNCH \
    actor_rollout_ref.model.external_lib=cegppo.integrations.verl \
    actor_rollout_ref.actor.policy_loss.loss_mode=ce_gppo \
    actor_rollout_ref.actor.policy_loss._target_=cegppo.integrations.verl.CEGPPOPolicyLossConfig \
    +actor_rollout_ref.actor.policy_loss.beta1=0.5 \
    +actor_rollout_ref.actor.policy_loss.beta2=1.0 \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.2 \
    actor_rollout_ref.actor.clip_ratio_c=10.0 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    algorithm.adv_estimator=grpo \
    reward.custom_reward_function.path="$HERE/reward.py" \
    reward.custom_reward_function.name=compute_score \
    data.train_files="$DATA_DIR/gsm8k_train.parquet" \
    data.val_files="$DATA_DIR/gsm8k_val.parquet" \
    data.train_batch_size=64 \
    data.max_prompt_length=512 \
    data.max_response_length=512 \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    trainer.logger="['console']" \
    trainer.project_name=cegppo-smoke \
    trainer.experiment_name=qwen2.5-0.5b-gsm8k-ce_gppo \
    trainer.nnodes=1 \
    trainer.n_gpus_per_node=1 \
    trainer.val_before_train=True \
    trainer.test_freq=10 \
    trainer.save_freq=-1 \
    trainer.total_training_steps=20 \
    "$@"
