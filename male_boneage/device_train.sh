#!/usr/bin/env bash
# Train the bone-age models on a lent GPU, within the device tool's limits (15 minutes a session, 64 MiB sent and
# 8 files of 16 MiB back per call), then finalise them on this machine. The recipe of train_release.sh, one stage,
# longer and at 288 px: one network on both sexes from scratch, then fine-tuned per sex.
#
#   here:    python -m male_boneage.device_pack        # device_pack/part-01.tar ... (about 34 MiB each)
#   device:  one call per part, back to back (the machine stays warm 30 s), each carrying its part:
#              run(carry=["device_pack/part-01.tar"], command="bash male_boneage/device_train.sh unpack")
#              ... the last one: command="bash male_boneage/device_train.sh unpack train bench"
#            `bench` times the shipped models as served on the GPU (bench.model_step, batch 1, 8 and 64: films/s)
#            into $OUT/model_step.md. `train` copies male.pt and female.pt (float16, 12.9 MB each) and train.log to
#            $OUT. A run cut off by the call's limit resumes from its checkpoints when `train` is called again on
#            the warm machine.
#   here:    bash male_boneage/device_train.sh finalise /work/.device/.../files   # folder holding male.pt, female.pt
#
# Dry run on the CPU (the same steps, tiny): DEVICE=cpu SIZE=112 LIMIT=256 JOINT_EPOCHS=1 SEX_EPOCHS=1 \
#   BENCH_ARGS="--reps 1 --warmup 0" bash male_boneage/device_train.sh unpack train bench finalise checkpoints/device
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-288}
WIDTH=${WIDTH:-48}  # channels of the first stage: 48 as served; 64 is ResNet-18's own (model card: stage 16)
BATCH=${BATCH:-128}
JOINT_EPOCHS=${JOINT_EPOCHS:-60}
JOINT_LR=${JOINT_LR:-3e-3}
SEX_EPOCHS=${SEX_EPOCHS:-10}
SEX_LR=${SEX_LR:-5e-4}
DATA=device_data/rsna-train-299
WORK=checkpoints/device
limit=(); [ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
export PYTHONUNBUFFERED=1

while [ $# -gt 0 ]; do
  case "$1" in
    unpack)  # every part this machine holds; a part already unpacked is unpacked again (same files)
      mkdir -p device_data
      for part in device_pack/part-*.tar; do tar -xf "$part" -C device_data; done
      echo "training films unpacked: $(($(wc -l < "$DATA/labels.csv") - 1)) listed," \
        "$(find "$DATA" -name '*.jpg' | wc -l) present"
      ;;
    bench)
      "$PY" -m bench.model_step --device "$DEVICE" --served-only --films "$DATA" --batches 1 8 64 ${BENCH_ARGS:-} \
        ${OUT:+--out "$OUT/model_step.md"}
      ;;
    train)
      [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
      args=(--data "$DATA" --raw device_data/rsna-train-512 --no-validation --device "$DEVICE" --input-size "$SIZE"
            --width "$WIDTH" --batch-size "$BATCH" "${limit[@]}")
      mkdir -p "$WORK"
      {
        "$PY" -m male_boneage.train "${args[@]}" --sex both --epochs "$JOINT_EPOCHS" --lr "$JOINT_LR" \
          --out "$WORK/joint.pt"
        for sex in male female; do
          "$PY" -m male_boneage.train "${args[@]}" --sex "$sex" --epochs "$SEX_EPOCHS" --lr "$SEX_LR" \
            --init "$WORK/joint.pt" --out "$WORK/$sex.pt"
        done
      } 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v -E "(it/s|s/it)" \
        | tee -a "$WORK/train.log" ${OUT:+"$OUT/train.log"}  # in $OUT as it grows: a call cut off returns it
      if [ -n "${OUT:-}" ]; then cp "$WORK/male.pt" "$WORK/female.pt" "$OUT/"; fi
      ;;
    finalise)  # on this machine: BatchNorm, sigma scale, validation and limits on the raw films, nothing trained
      from=$2; shift
      mkdir -p "$WORK/final"
      for sex in male female; do
        "$PY" -m male_boneage.train --data ../shared/data/rsna-train-299 --raw ../shared/data/rsna-train-512 \
          --input-size "$SIZE" --width "$WIDTH" --sex "$sex" --epochs 0 --init "$from/$sex.pt" \
          --out "$WORK/final/$sex.pt" "${limit[@]}"
      done
      "$PY" -m male_boneage.recalibrate --data ../shared/data/rsna-train-512 --split train \
        --male-weights "$WORK/final/male.pt" --female-weights "$WORK/final/female.pt" --write
      echo "finalised: $WORK/final/male.pt $WORK/final/female.pt (measure them with male_boneage.evaluate)"
      ;;
    *) echo "usage: $0 [unpack] [bench] [train] [finalise FOLDER]" >&2; exit 2 ;;
  esac
  shift
done
