#!/usr/bin/env bash
# Trains the shipped weights (model card): one ResNet-18-shaped network on both sexes at 224 px, sex as an input,
# then fine-tuned per sex; then the sigma scale is calibrated on the 955 trainable raw films of rsna-train-512, each
# sent as one of the robustness variants. The ids of rsna-train-512 are never trained on (its 245 held-out films
# are the benchmark). Each step resumes from its checkpoint (checkpoints/*.ckpt, not in git) if interrupted.
# On 2 CPU cores (avx512_bf16, bfloat16 autocast): about 45 min for the joint run, 15 min for the two fine-tunes,
# 5 min for the calibration and the film check.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/rsna-train-299}
RAW=${RAW:-../shared/data/rsna-train-512}
python -m male_boneage.train --data "$DATA" --raw "$RAW" --sex both --epochs "${JOINT_EPOCHS:-10}" \
  --out checkpoints/joint.pt
for sex in male female; do
  python -m male_boneage.train --data "$DATA" --raw "$RAW" --sex "$sex" --epochs "${FINETUNE_EPOCHS:-3}" --lr 5e-4 \
    --init checkpoints/joint.pt --out "checkpoints/$sex.pt"
done
python -m male_boneage.recalibrate --data "$RAW" --split train --male-weights checkpoints/male.pt \
  --female-weights checkpoints/female.pt --write
cp checkpoints/male.pt checkpoints/female.pt male_boneage/weights/
python -m male_boneage.film_check train --out male_boneage/weights/film_check.pt
