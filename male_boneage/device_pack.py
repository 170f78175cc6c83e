"""Pack the training films for a GPU run (`device_train.sh`) into parts small enough to travel to the device.

    python -m male_boneage.device_pack                     # writes device_pack/part-01.tar, part-02.tar, ...

The device tool sends at most 64 MiB per call, the working tree included (about 27 MiB, most of it the shipped
weights), and `../shared` does not travel. Each part holds at most `--part-mib` MiB: the training films of
`rsna-train-299` (every id of `rsna-train-512` left out, as `train.py` leaves them out) with a `labels.csv` listing
them, and `rsna-train-512/labels.csv` alone, whose ids `train.py --raw` leaves out. The raw films themselves stay
here: the GPU run trains `--no-validation` and the weights are finalised on this machine (`device_train.sh
finalise`). Each part is one call's `carry`; `device_train.sh unpack` on the device unpacks whatever parts it holds.
The folder is git-ignored.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import tarfile
from pathlib import Path

from male_boneage.data import SHARED_DATA, Case
from male_boneage.train import TrainConfig, split_cases

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MEMBER_OVERHEAD = 1024  # a member's header and its padding to 512-byte blocks, at most
ARCHIVE_END = 1024 + tarfile.RECORDSIZE  # the end-of-archive blocks and the padding to a whole record, at most


def labels_csv(cases: list[Case]) -> bytes:
    """A labels.csv (image,boneage_months,male) listing `cases`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "boneage_months", "male"])
    writer.writerows([case.path.name, case.boneage_months, int(case.male)] for case in cases)
    return out.getvalue().encode()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


MIN_PART_MIB, MAX_PART_MIB = 1.0, 60.0  # a part is one device call's carry


def pack(data: Path, raw: Path, out: Path, part_bytes: int) -> list[Path]:
    """Write the parts (any old ones removed first); returns their paths. The films are those `train.py --raw`
    trains on (`split_cases`)."""
    cases = split_cases(TrainConfig(data=data, raw=raw, sex="both", out=Path(), validate=False))["train"]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.tar"):
        old.unlink()
    labels = {f"{data.name}/labels.csv": labels_csv(cases), f"{raw.name}/labels.csv": (raw / "labels.csv").read_bytes()}
    parts: list[list[Path]] = [[]]
    used = sum(len(b) + MEMBER_OVERHEAD for b in labels.values()) + ARCHIVE_END
    for case in cases:
        size = case.path.stat().st_size + MEMBER_OVERHEAD
        if used + size > part_bytes and parts[-1]:
            parts.append([])
            used = ARCHIVE_END
        parts[-1].append(case.path)
        used += size
    paths = []
    for number, files in enumerate(parts, start=1):
        path = out / f"part-{number:02d}.tar"
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            if number == 1:
                for name, payload in labels.items():
                    add_bytes(tar, name, payload)
            for film in files:
                tar.add(film, arcname=f"{data.name}/{film.name}")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "rsna-train-299")
    parser.add_argument("--raw", type=Path, default=SHARED_DATA / "rsna-train-512")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "device_pack")
    parser.add_argument("--part-mib", type=float, default=34.0,
                        help="largest part (64 MiB per call, less the working tree)")
    args = parser.parse_args(argv)
    if not MIN_PART_MIB <= args.part_mib <= MAX_PART_MIB:  # 0 wrote a part per film, 11,411 of them
        parser.error(f"--part-mib must be {MIN_PART_MIB}-{MAX_PART_MIB} (a call carries 64 MiB, the tree included)")
    try:
        paths = pack(args.data, args.raw, args.out, int(args.part_mib * 2**20))
    except (OSError, ValueError, KeyError) as exc:  # missing or malformed labels.csv, an --out that is no folder
        parser.error(f"{type(exc).__name__}: {exc}")
    for path in paths:
        sys.stdout.write(f"{path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path}: "
                         f"{path.stat().st_size / 2**20:.1f} MiB\n")


if __name__ == "__main__":
    main()
