#!/usr/bin/env bash
# The CE-GPPO paper's training recipe (arXiv 2509.20712 §4.1 and the authors' released scripts) on stock
# verl 0.9.1 with the cegppo plug-in. run_1.5b.sh and run_7b.sh set the model and β1; everything else is here.
#
#   MODEL_PATH=... BETA1=0.5 bash examples/verl/ce_gppo_recipe.sh [extra Hydra overrides]
#
# Environment (defaults in brackets): MODEL_PATH, BETA1 (required); BETA2 [1.0]; DATA_DIR [~/data/cegppo];
# TRAIN_FILE [$DATA_DIR/klear_math_30k.parquet]; VAL_FILES [[$DATA_DIR/aime24.parquet,$DATA_DIR/aime25.parquet]];
# NNODES [16]; GPUS_PER_NODE [8]; SP_SIZE (Ulysses sequence parallel) [4]; GEN_TP (vLLM tensor parallel) [2];
# OFFLOAD (FSDP parameter/optimizer offload) [True]; PROJECT [cegppo]; EXPERIMENT; CKPT_DIR;
# LOGGER [['console','wandb']]; LAUNCH [python3 -m verl.trainer.main_ppo] (e.g. prefix with `ray job submit --`).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${MODEL_PATH:?set MODEL_PATH to a local copy of DeepSeek-R1-Distill-Qwen-1.5B or -7B}"
: "${BETA1:?set BETA1 (the paper: 0.5 for 1.5B, 0.75 for 7B)}"
BETA2=${BETA2:-1.0}
DATA_DIR=${DATA_DIR:-$HOME/data/cegppo}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/klear_math_30k.parquet}
VAL_FILES=${VAL_FILES:-"[$DATA_DIR/aime24.parquet,$DATA_DIR/aime25.parquet]"}
NNODES=${NNODES:-16}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
SP_SIZE=${SP_SIZE:-4}
GEN_TP=${GEN_TP:-2}
OFFLOAD=${OFFLOAD:-True}
PROJECT=${PROJECT:-cegppo}
EXPERIMENT=${EXPERIMENT:-ce_gppo_$(basename "$MODEL_PATH")_beta1_${BETA1}_beta2_${BETA2}}
CKPT_DIR=${CKPT_DIR:-$HOME/ckpts/$PROJECT/$EXPERIMENT}
LOGGER=${LOGGER:-"['console','wandb']"}
LAUNCH=${LAUNCH:-python3 -m verl.trainer.main_ppo}

max_prompt_length=$((1024 * 4))
max_response_length=$((1024 * 16))
# Tokens per GPU in one forward/backward (dynamic batch size); with Ulysses each GPU holds 1/SP_SIZE of a sequence.
token_len_per_gpu=$(((max_prompt_length + max_response_length) / SP_SIZE))

# shellcheck disable=SC2086  # LAUNCH is a command line, split on purpose
$LAUNCH \
    actor_rollout_ref.model.external_lib=cegppo.integrations.verl \
    actor_rollout_ref.actor.policy_loss.loss_mode=ce_gppo \
    actor_rollout_ref.actor.policy_loss._target_=cegppo.integrations.verl.CEGPPOPolicyLossConfig \
    +actor_rollout_ref.actor.policy_loss.beta1="$BETA1" \
    +actor_rollout_ref.actor.policy_loss.beta2="$BETA2" \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.2 \
    actor_rollout_ref.actor.clip_ratio_c=10.0 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.use_kl_loss=False \
    algorithm.use_kl_in_reward=False \
    algorithm.adv_estimator=grpo \
    algorithm.norm_adv_by_std_in_grpo=True \
    algorithm.filter_groups.enable=True \
    algorithm.filter_groups.metric=acc \
    algorithm.filter_groups.max_inflight_gen_batches=2 \
    reward.custom_reward_function.path="$HERE/reward.py" \
    reward.custom_reward_function.name=compute_score \
    data.train_files="$TRAIN_FILE" \
    data.val_files="$VAL_FILES" \
    data.prompt_key=prompt \
    data.truncation=left \
    data.max_prompt_length=$max_prompt_length \
    data.max_response_length=$max_response_length \
    data.train_batch_size=128 \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.ppo_epochs=1 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.optim.lr_warmup_steps=10 \
    actor_rollout_ref.actor.optim.weight_decay=0.1 \
    actor_rollout_ref.actor.optim.clip_grad=1.0 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.top_p=1.0 \
    actor_rollout_ref.rollout.top_k=-1 \
    actor_rollout_ref.rollout.val_kwargs.do_sample=True \
    actor_rollout_ref.rollout.val_kwargs.temperature=0.6 \
    actor_rollout_ref.rollout.val_kwargs.top_p=0.95 \
    actor_rollout_ref.rollout.val_kwargs.top_k=-1 \
    actor_rollout_ref.rollout.val_kwargs.n=32 \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$token_len_per_gpu \
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True \
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=$token_len_per_gpu \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$token_len_per_gpu \
    actor_rollout_ref.actor.ulysses_sequence_parallel_size="$SP_SIZE" \
    actor_rollout_ref.ref.ulysses_sequence_parallel_size="$SP_SIZE" \
    actor_rollout_ref.actor.fsdp_config.param_offload="$OFFLOAD" \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload="$OFFLOAD" \
    actor_rollout_ref.ref.fsdp_config.param_offload="$OFFLOAD" \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.tensor_model_parallel_size="$GEN_TP" \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.8 \
    actor_rollout_ref.rollout.enable_chunked_prefill=True \
    actor_rollout_ref.rollout.max_num_batched_tokens=$((max_prompt_length + max_response_length)) \
    actor_rollout_ref.rollout.max_model_len=$((max_prompt_length + max_response_length)) \
    trainer.logger="$LOGGER" \
    trainer.project_name="$PROJECT" \
    trainer.experiment_name="$EXPERIMENT" \
    trainer.nnodes="$NNODES" \
    trainer.n_gpus_per_node="$GPUS_PER_NODE" \
    trainer.val_before_train=True \
    trainer.test_freq=5 \
    trainer.save_freq=5 \
    trainer.total_epochs=10 \
    trainer.default_local_dir="$CKPT_DIR" \
    trainer.resume_mode=auto \
    "$@"
