#!/usr/bin/env bash
# Stage 1 of the paired design (docs/results.md): one lane of trajectories, one torch thread, resumable.
# Each finished trajectory's small files (config, metrics, summary, probe.jsonl; never checkpoints) are copied
# under docs/results/probe/stage1/s<seed>/ and committed. Usage: run_lane.sh SEED [SEED ...]
set -euo pipefail
cd "$(dirname "$0")/../../../.."
out=runs/stage1
for seed in "$@"; do
  dest=docs/results/probe/stage1/s$seed
  [ -f "$dest/summary.json" ] && continue
  # a run killed before its first checkpoint has nothing to resume: start it again
  if [ -d "$out/s$seed" ] && ! ls -d "$out/s$seed"/checkpoints/*/ >/dev/null 2>&1; then rm -rf "$out/s$seed"; fi
  if [ -d "$out/s$seed" ]; then
    .venv/bin/cegppo train --quiet --resume "$out/s$seed"
  else
    .venv/bin/cegppo train --quiet --config configs/entropy_study_cpu.yaml trainer.seed=$seed \
      trainer.total_steps=16 analysis.probe_every=2 analysis.probe_epochs=2 data.heldout_size=16 \
      trainer.save_every=2 trainer.keep_checkpoints=1 trainer.num_threads=1 trainer.output_dir=$out \
      trainer.name=s$seed \
      'analysis.probe_variants=["ce_gppo(beta1=1,beta2=1)","ce_gppo(beta1=0,beta2=1)","ce_gppo(beta1=1,beta2=0)"]'
  fi
  mkdir -p "$dest"
  cp "$out/s$seed"/{config.yaml,metrics.jsonl,probe.jsonl,summary.json} "$dest/"
  for try in 1 2 3 4 5; do
    git add "$dest" && git commit -q --only -m "Stage 1: trajectory s$seed (16 steps, 8 probe points)" -- "$dest" && break
    sleep 7
  done
done
