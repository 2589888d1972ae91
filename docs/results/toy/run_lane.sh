#!/usr/bin/env bash
# Stage 3 of the paired design (docs/results.md): one lane of the toy testbed's H3 runs, one torch thread,
# resumable. Per seed, seed-major, the three arms GRPO, DAPO and CE-GPPO (0.5, 1) on configs/toy_cpu.yaml
# unchanged. A run committed under docs/results/toy/gate/ (seeds 0-3) or docs/results/toy/h3/ is skipped; each
# newly finished run's config, metrics and summary are committed under docs/results/toy/h3/<arm>-s<seed>/.
# Usage: run_lane.sh SEED [SEED ...]
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=runs/toy-h3
gate=docs/results/toy/gate
# The supervised stage is deterministic for its seed and step count: build it once (two lanes share it), and
# check that it stopped where the gate's model did.
mkdir -p runs
(
  flock 9
  if [ ! -f models/toy/toy_policy.json ]; then
    .venv/bin/python examples/toy_policy.py --output models/toy --threads 1
  fi
) 9>runs/.toy-model.lock
.venv/bin/python - "$gate/toy_policy.json" models/toy/toy_policy.json <<'PY'
import json, sys
gate, here = (json.load(open(path)) for path in sys.argv[1:])
keys = ("parameters", "seed", "lr", "batch_size", "target", "sft_steps")
differ = {k: (gate.get(k), here.get(k)) for k in keys if gate.get(k) != here.get(k)}
if differ:
    sys.exit(f"models/toy is not the gate's policy (gate, here): {differ}; rebuild it as the gate did")
PY
for seed in "$@"; do
  for arm in grpo dapo ce_gppo_b0.5_1; do
    dest=docs/results/toy/h3/$arm-s$seed
    [ -f "$gate/$arm-s$seed/summary.json" ] || [ -f "$dest/summary.json" ] && continue
    # finished runs are skipped and interrupted ones resumed from their last checkpoint (every 50 steps)
    .venv/bin/cegppo sweep --config configs/toy_cpu.yaml --output-dir $out --seeds "$seed" --variants $arm \
      trainer.quiet=true
    mkdir -p "$dest"
    cp "$out/$arm-s$seed"/{config.yaml,metrics.jsonl,summary.json} "$dest/"
    for try in 1 2 3 4 5; do
      git add "$dest" && git commit -q --only -m "Stage 3: $arm-s$seed (400 steps, toy scale)" -- "$dest" && break
      sleep 7
    done
  done
done
