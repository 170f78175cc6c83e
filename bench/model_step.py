"""The model step alone: inference + Grad-CAM per film, before and after the on-device CAM.

    .venv/bin/python -m bench.model_step                 # both models, batch 1 and 8; prints a Markdown report
    .venv/bin/python -m bench.model_step --out FILE      # also writes it to FILE
    python3 -m bench.model_step --device cuda --served-only --films device_data/rsna-train-299 --batches 1 8 64
                                                         # on a GPU (device_train.sh): films/s, as served only

"before" is pytorch-grad-cam over every TTA variant with the maps made on the CPU
(`male_boneage.gradcam_reference.reference_predict_batch`, how the service ran until the on-device CAM; since the
stage 6 weights, the element-wise `GradCAMElementWise` that the service now computes);
"after" is `BoneAgeModel.predict_batch(images, with_heatmap=True)` as served. Both run on the same films of
`rsna-test-20` (or the first films of `--films`, as many as the largest batch) in the same process, interleaved
repetition by repetition, so a busy machine slows both alike. `--served-only` times the served step alone (no
pytorch-grad-cam needed: a GPU machine may lack it) and adds films per second.

Rows: each model alone on one torch thread (the service's setting on 2 cores), and "both, as served": the male and
female passes of the same films at once on two threads of one torch thread each, as the service's two micro-batching
workers run them (this is the `inference_gradcam` stage of `bench.run`, without the queueing). Figures are medians
of ms per film (a batch's time divided by its films), wall-clock and CPU time of the process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.harness import DEFAULT_DATA, REPO, command_line, fmt, loadavg, machine_info, median, table
from male_boneage.inference import PRECISIONS, BoneAgeModel, ModelEstimate
from male_boneage.preprocess import film_pixels

MODULE = "bench.model_step"
Step = Callable[[BoneAgeModel, list[np.ndarray]], list[ModelEstimate]]
BEFORE, AFTER = "before (pytorch-grad-cam)", "after (on-device CAM)"


def served_step(model: BoneAgeModel, images: list[np.ndarray]) -> list[ModelEstimate]:
    return model.predict_batch(images, with_heatmap=True)


def steps(served_only: bool) -> dict[str, Step]:
    """The steps to time: the served one ("after"), and unless `served_only` pytorch-grad-cam's ("before")."""
    if served_only:
        return {AFTER: served_step}
    from male_boneage.gradcam_reference import reference_predict_batch  # pytorch-grad-cam: only when asked

    return {BEFORE: reference_predict_batch, AFTER: served_step}


def time_ms(run: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, CPU ms of this process) of `run()`; the CPU time hardly changes when other processes share the
    cores, the wall time does."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def both_at_once(pool: ThreadPoolExecutor, step: Step, models: dict[str, BoneAgeModel],
                 chunk: dict[str, list[np.ndarray]]) -> None:
    """Both models' passes of the same films at once on two threads, as the service's two workers run them."""
    for future in [pool.submit(step, models[sex], chunk[sex]) for sex in models]:
        future.result()


def measure(models: dict[str, BoneAgeModel], films: dict[str, list[np.ndarray]], batch: int, reps: int,
            warmup: int, timed: dict[str, Step]) -> dict[tuple[str, str, str], list[float]]:
    """ms per film (wall and CPU) of every (step, row): each model alone, and both at once on two threads."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for rep in range(warmup + reps):
            start = (rep * batch) % (len(films["male"]) - batch + 1)
            chunk = {sex: films[sex][start:start + batch] for sex in models}
            for step_name, step in timed.items():
                timings = {sex: time_ms(functools.partial(step, models[sex], chunk[sex])) for sex in models}
                timings["both, as served"] = time_ms(functools.partial(both_at_once, pool, step, models, chunk))
                if rep >= warmup:
                    for row, (wall, cpu) in timings.items():
                        samples.setdefault((step_name, row, "wall"), []).append(wall / batch)
                        samples.setdefault((step_name, row, "cpu"), []).append(cpu / batch)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (films per pass)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per batch size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the service: half the cores)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="what the convolutions run in (the service's BONEAGE_INFERENCE_PRECISION)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--films", type=Path, help="folder of films (default: DATA/rsna-test-20)")
    parser.add_argument("--served-only", action="store_true",
                        help="time the served step alone, with films/s (no pytorch-grad-cam needed)")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = {sex: BoneAgeModel.from_file(REPO / "male_boneage" / "weights" / f"{sex}.pt", device,
                                          precision=args.precision) for sex in ("male", "female")}
    folder = args.films or args.data / "rsna-test-20"
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))[:max(20, *args.batches)]
    if len(paths) < max(args.batches):
        parser.error(f"{folder} has {len(paths)} films; batch {max(args.batches)} needs as many")
    films = {sex: [film_pixels(p.read_bytes(), m.input_size) for p in paths] for sex, m in models.items()}
    timed = steps(args.served_only)
    load_start, info = loadavg(), machine_info()
    rows = []
    for batch in args.batches:
        samples = measure(models, films, batch, args.reps, args.warmup, timed)
        for row in ("male", "female", "both, as served"):
            cells = [str(batch), row]
            for clock in ("wall", "cpu"):
                after = median(samples[(AFTER, row, clock)])
                if args.served_only:
                    cells += [fmt(after)] + ([f"{1000 / after:.0f}"] if clock == "wall" else [])
                else:
                    before = median(samples[(BEFORE, row, clock)])
                    cells += [fmt(before), fmt(after), f"{(1 - after / before) * 100:.0f}%"]
            rows.append(cells)
    header = (["batch", "model", "wall ms/film", "films/s", "CPU ms/film"] if args.served_only else
              ["batch", "model", "before wall ms/film", "after wall ms/film", "cheaper by",
               "before CPU ms/film", "after CPU ms/film", "cheaper by"])
    report = "\n".join([
        "## Model step: inference + Grad-CAM per film, before and after the on-device CAM",
        "",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- command: `{command_line(MODULE, argv)}`",
        f"- machine: `nproc` = {info['nproc']}, CPU {info['cpu']}; device {device} ({models['male'].precision}); "
        "torch threads per pass "
        f"{args.threads}; {len(models['male'].tta)} TTA variants; load average at start {load_start}, at end "
        f"{loadavg()}",
        f"- {args.reps} timed repetitions per batch size after {args.warmup} warm-up; {len(paths)} films of "
        f"{folder.name}",
        "",
        table(header, rows),
        "",
        "Wall: as the caller waits (on a busy machine it includes waiting for a core). CPU: the process's CPU time "
        "(all its threads; on a busy machine the steadier figure). Medians per film.",
        "",
    ])
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
