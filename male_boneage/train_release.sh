#!/usr/bin/env bash
# Trains the shipped weights (model card): one ResNet-18-shaped network on both sexes at 224 px, sex as an input,
# then fine-tuned per sex (stage 7); the same trained on at 288 px (stage 9); each of those per-sex nets finished
# with 3 epochs of milder augmentation (stage 11); per sex, the two finished nets as one ensemble (their estimates
# averaged); then the sigma scale is calibrated on the 955 trainable raw films of rsna-train-512, each sent as every
# robustness variant. The ids of rsna-train-512 are never trained on (its 245 held-out films are the benchmark).
# Each step resumes from its checkpoint (checkpoints/*.ckpt, not in git) if interrupted.
#
# Seven one-cycle schedules, the `stage` lines below (joint epochs, peak lr, starting weights, per-sex lr, input
# size): the first from scratch, each later one warm-started from the one before; then stage 11's per-sex finish.
# The model card ("Training") gives what each stage gained on the 955 trainable raw films; stage 4 (288 px), stage 8
# (a seventh schedule at 224 px: 7.69 against stage 7's 7.70 months) and stage 10 (an eighth at 288 px: 7.56
# against 7.58 in the ensemble) were not kept ("What was tried"). Time on 2 CPU cores (AMD EPYC, avx512_bf16,
# bfloat16 autocast, real-time priority): about 7 h 50 min in all, 15.6 CPU core-hours; stage 7 alone about 81 min,
# stage 9 about 100, stage 11 about 37 (per stage: the card's "Compute").
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/rsna-train-299}
RAW=${RAW:-../shared/data/rsna-train-512}
train() { python -m male_boneage.train --data "$DATA" --raw "$RAW" "$@"; }

# One schedule: JOINT_EPOCHS on both sexes at peak JOINT_LR from INIT ("" = from scratch) into JOINT, then 3 epochs per
# sex at peak SEX_LR from JOINT into SEX_DIR/male.pt and SEX_DIR/female.pt, at SIZE x SIZE input (default 224).
stage() {  # stage JOINT JOINT_EPOCHS JOINT_LR INIT SEX_DIR SEX_LR [SIZE]
  local joint=$1 epochs=$2 lr=$3 init=$4 sex_dir=$5 sex_lr=$6 size=${7:-224}
  train --sex both --epochs "$epochs" --lr "$lr" --input-size "$size" ${init:+--init "$init"} --out "$joint"
  for sex in male female; do
    train --sex "$sex" --epochs 3 --lr "$sex_lr" --input-size "$size" --init "$joint" --out "$sex_dir/$sex.pt"
  done
}

stage checkpoints/stage1/joint.pt  10 2e-3 ""                           checkpoints/stage1 5e-4
stage checkpoints/joint2.pt        12 1e-3 checkpoints/stage1/male.pt   checkpoints/stage2 3e-4
stage checkpoints/stage3/joint3.pt 12 6e-4 checkpoints/joint2.pt        checkpoints/stage3 2e-4
stage checkpoints/stage5/joint5.pt 20 8e-4 checkpoints/stage3/joint3.pt checkpoints/stage5 2e-4
stage checkpoints/stage6/joint6.pt 12 5e-4 checkpoints/stage5/joint5.pt checkpoints/stage6 2e-4
stage checkpoints/stage7/joint7.pt 16 5e-4 checkpoints/stage6/male.pt   checkpoints/stage7 2e-4
stage checkpoints/stage9/joint9.pt 10 4e-4 checkpoints/stage7/joint7.pt checkpoints/stage9 2e-4 288

# Stage 11: each per-sex net of stages 7 and 9 finished with 3 epochs at peak 1e-4 of the mild augmentation
# (augment.MILD: the same kinds of variants, milder and rarer); about 37 min in all.
for sex in male female; do
  train --sex "$sex" --epochs 3 --lr 1e-4 --augmentation mild --init "checkpoints/stage7/$sex.pt" \
    --out "checkpoints/stage11/224/$sex.pt"
  train --sex "$sex" --epochs 3 --lr 1e-4 --augmentation mild --input-size 288 --init "checkpoints/stage9/$sex.pt" \
    --out "checkpoints/stage11/288/$sex.pt"
done

# Per sex: stage 11's 224 px net (the 4 served test-time variants, its Grad-CAM the heatmap) and its 288 px net (the
# film and its mirror image), averaged.
for sex in male female; do
  python -m male_boneage.ensemble --raw "$RAW" --out "checkpoints/ensemble/$sex.pt" \
    --member "checkpoints/stage11/224/$sex.pt" --member "checkpoints/stage11/288/$sex.pt:2"
done
# The sigma scale fitted as the service runs the nets on this machine: trunks in bfloat16 (2026-12-07; --precision
# fp32 for a machine that serves float32).
python -m male_boneage.recalibrate --data "$RAW" --split train --male-weights checkpoints/ensemble/male.pt \
  --female-weights checkpoints/ensemble/female.pt --precision bf16 --write
cp checkpoints/ensemble/*.pt male_boneage/weights/  # each ensemble file and its nets (male-net0.pt, ...)
python -m male_boneage.film_check train --out male_boneage/weights/film_check.pt
