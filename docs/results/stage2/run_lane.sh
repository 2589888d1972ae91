#!/usr/bin/env bash
# Stage 2 of the paired design (docs/results.md): one lane of whole runs, one torch thread, resumable. Per seed,
# seed-major (each finished seed is a complete replicate), the four arms CE-GPPO (β1, β2) ∈ {0, 1}², 15 steps,
# no held-out evaluation. Each finished run's small files (config, metrics, summary; never checkpoints) are
# copied under docs/results/stage2/<arm>-s<seed>/ and committed. Usage: run_lane.sh SEED [SEED ...]
set -euo pipefail
cd "$(dirname "$0")/../../.."
# Every Stage 2 run samples with the hf engine of 6fee402 (decode attention as transformers calls it). The engine
# packs the decode attention since f91cd28, which draws other tokens on some rows: a seed's four arms must not mix
# the two. In this worktree: git checkout 6fee402 -- src/cegppo/rollout/hf.py
pinned=6fee402
if ! git diff --quiet "$pinned" -- src/cegppo/rollout/hf.py; then
  echo "Stage 2 samples with the hf engine of $pinned; in this worktree: git checkout $pinned -- src/cegppo/rollout/hf.py" >&2
  exit 2
fi
out=runs/stage2
for seed in "$@"; do
  for arm in ce_gppo_b0_0 ce_gppo_b1_0 ce_gppo_b0_1 ce_gppo_b1_1; do
    dest=docs/results/stage2/$arm-s$seed
    [ -f "$dest/summary.json" ] && continue
    # finished runs are skipped and interrupted ones resumed from their last checkpoint (every 5 steps)
    .venv/bin/cegppo sweep --config configs/entropy_study_cpu.yaml --output-dir $out --seeds "$seed" \
      --variants $arm trainer.total_steps=15 data.heldout=null trainer.save_every=5 trainer.keep_checkpoints=1 \
      trainer.num_threads=1 trainer.quiet=true
    mkdir -p "$dest"
    cp "$out/$arm-s$seed"/{config.yaml,metrics.jsonl,summary.json} "$dest/"
    for try in 1 2 3 4 5; do
      git add "$dest" && git commit -q --only -m "Stage 2: $arm-s$seed (15 steps)" -- "$dest" && break
      sleep 7
    done
  done
done
