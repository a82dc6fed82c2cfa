#!/usr/bin/env bash
# The live-memory probe (issue 24): four continuations of the committed no-knowledge draft under one budget
# (150 steps x 16 x 256 tokens, peak learning rate 5e-4, the teacher's three corpus sources), differing only in the
# memory; then the in-loop acceptance of each on unfamiliar code (measure.py) and the record (record.py).
# About 45 minutes alone on 2 cores. Run from the repository root: bash outputs/live_memory/run.sh
set -euo pipefail
P=${P:-outputs/runs/probe24}
COMMON="--config tiny --set training.init_from=outputs/ablation_no_knowledge --learning-rate 5e-4 --num-epochs 1
        --steps-per-epoch 150 --text-sources stdlib,torch,transformers --checkpoint-every 1000"
LIVE="--knowledge live --set knowledge_enhancement.gate_init=0.1"
qd distill $COMMON --knowledge none --run-dir $P/none
for arm in live25 live05 live3l; do python -c "from qdlib.trainer import share_prepared as s; s('$P/none', '$P/$arm')"; done
qd distill $COMMON $LIVE --fusion-lr-scale 5 --run-dir $P/live25
qd distill $COMMON $LIVE --fusion-lr-scale 5 --set "knowledge_enhancement.after_layers=[0,5]" --run-dir $P/live05
qd distill $COMMON $LIVE --fusion-lr-scale 10 --set "knowledge_enhancement.after_layers=[0,5]" \
  --set "knowledge_enhancement.memory_layers=[3,13,27]" --run-dir $P/live3l
python outputs/live_memory/measure.py 24 "$P"
python outputs/live_memory/record.py "$P"
