#!/usr/bin/env bash
# Trains the shipped weights (model card): one ResNet-18-shaped network on both sexes at 224 px, sex as an input,
# then fine-tuned per sex; then the sigma scale is calibrated on the 955 trainable raw films of rsna-train-512, each
# sent as every robustness variant. The ids of rsna-train-512 are never trained on (its 245 held-out films
# are the benchmark). Each step resumes from its checkpoint (checkpoints/*.ckpt, not in git) if interrupted.
#
# Six one-cycle schedules, the `stage` lines below (joint epochs, peak lr, starting weights, per-sex lr): the first from
# scratch, each later one warm-started from the one before. The model card ("Training") gives what each stage gained
# on the 955 trainable raw films; stage 4 (288 px) and stage 8 (a seventh schedule: 7.69 against stage 7's 7.70
# months) were not kept ("What was tried"). Time on 2 CPU cores (AMD EPYC, avx512_bf16, bfloat16 autocast, real-time
# priority): about 5 h 20 min in all, 10.6 CPU core-hours, stage 7 alone about 81 min (per stage: the card's
# "Compute").
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/rsna-train-299}
RAW=${RAW:-../shared/data/rsna-train-512}
train() { python -m male_boneage.train --data "$DATA" --raw "$RAW" "$@"; }

# One schedule: JOINT_EPOCHS on both sexes at peak JOINT_LR from INIT ("" = from scratch) into JOINT, then 3 epochs per
# sex at peak SEX_LR from JOINT into SEX_DIR/male.pt and SEX_DIR/female.pt.
stage() {  # stage JOINT JOINT_EPOCHS JOINT_LR INIT SEX_DIR SEX_LR
  local joint=$1 epochs=$2 lr=$3 init=$4 sex_dir=$5 sex_lr=$6
  train --sex both --epochs "$epochs" --lr "$lr" ${init:+--init "$init"} --out "$joint"
  for sex in male female; do
    train --sex "$sex" --epochs 3 --lr "$sex_lr" --init "$joint" --out "$sex_dir/$sex.pt"
  done
}

stage checkpoints/stage1/joint.pt  10 2e-3 ""                           checkpoints/stage1 5e-4
stage checkpoints/joint2.pt        12 1e-3 checkpoints/stage1/male.pt   checkpoints/stage2 3e-4
stage checkpoints/stage3/joint3.pt 12 6e-4 checkpoints/joint2.pt        checkpoints/stage3 2e-4
stage checkpoints/stage5/joint5.pt 20 8e-4 checkpoints/stage3/joint3.pt checkpoints/stage5 2e-4
stage checkpoints/stage6/joint6.pt 12 5e-4 checkpoints/stage5/joint5.pt checkpoints/stage6 2e-4
stage checkpoints/stage7/joint7.pt 16 5e-4 checkpoints/stage6/male.pt   checkpoints/stage7 2e-4

python -m male_boneage.recalibrate --data "$RAW" --split train --male-weights checkpoints/stage7/male.pt \
  --female-weights checkpoints/stage7/female.pt --write
cp checkpoints/stage7/male.pt checkpoints/stage7/female.pt male_boneage/weights/
python -m male_boneage.film_check train --out male_boneage/weights/film_check.pt
