#!/usr/bin/env bash
# Trains the shipped weights (model card): one ResNet-18-shaped network on both sexes at 224 px, sex as an input,
# then fine-tuned per sex; then the sigma scale is calibrated on the 955 trainable raw films of rsna-train-512, each
# sent as one of the robustness variants. The ids of rsna-train-512 are never trained on (its 245 held-out films
# are the benchmark). Each step resumes from its checkpoint (checkpoints/*.ckpt, not in git) if interrupted.
#
# Two stages. Stage 1: 10 joint epochs from scratch, 3 per sex. Stage 2 (a second one-cycle schedule, warm-started
# from stage 1's male model, with the JPEG and wide-padding augmentation): 12 joint epochs at peak 1e-3, 3 per sex
# at 3e-4. On 2 CPU cores (avx512_bf16, bfloat16 autocast), measured: stage 1 about 65 min, stage 2 about 35 min
# (2.2 min per joint epoch on an otherwise idle machine), the calibration and the film check about 5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/rsna-train-299}
RAW=${RAW:-../shared/data/rsna-train-512}
train() { python -m male_boneage.train --data "$DATA" --raw "$RAW" "$@"; }

train --sex both --epochs 10 --out checkpoints/stage1/joint.pt
for sex in male female; do
  train --sex "$sex" --epochs 3 --lr 5e-4 --init checkpoints/stage1/joint.pt --out "checkpoints/stage1/$sex.pt"
done

train --sex both --epochs 12 --lr 1e-3 --init checkpoints/stage1/male.pt --out checkpoints/joint2.pt
for sex in male female; do
  train --sex "$sex" --epochs 3 --lr 3e-4 --init checkpoints/joint2.pt --out "checkpoints/$sex.pt"
done

python -m male_boneage.recalibrate --data "$RAW" --split train --male-weights checkpoints/male.pt \
  --female-weights checkpoints/female.pt --write
cp checkpoints/male.pt checkpoints/female.pt male_boneage/weights/
python -m male_boneage.film_check train --out male_boneage/weights/film_check.pt
