#!/usr/bin/env bash
# Trains the shipped weights: one network on both sexes, then fine-tuned per sex. Each step resumes from its
# checkpoint (checkpoints/*.ckpt, not in git) if the run was interrupted. About 1-1.5 h on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/rsna-train-100px}
python -m male_boneage.train --data "$DATA" --sex both --epochs "${JOINT_EPOCHS:-18}" --out checkpoints/joint.pt
for sex in male female; do
  python -m male_boneage.train --data "$DATA" --sex "$sex" --epochs "${FINETUNE_EPOCHS:-4}" --lr 5e-4 \
    --init checkpoints/joint.pt --out "male_boneage/weights/$sex.pt"
done
