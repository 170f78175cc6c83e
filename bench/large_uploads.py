"""Memory of the service under large uploads: N films of about 49 megapixels, 16-bit, sent at once.

    .venv/bin/python -m bench.large_uploads                 # 8 at once, then 1 for comparison
    .venv/bin/python -m bench.large_uploads --concurrent 4

The films are made here (a 7000 x 7000 16-bit PNG, a gradient and a checkerboard: under the 50-megapixel limit, so
each is decoded whole before the film check refuses it with 422). A few dozen of them in flight at once must not run
the machine out of memory: the decoders share a pixel budget (`utils.imaging.checks.DECODING`). Prints the server's
peak RSS (VmHWM) before and after the uploads, each answer's status and the wall time. The server is the real one
(uvicorn subprocess, temporary database, storage and MLflow store), stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.harness import Server

SIDE = 7000


def large_film() -> bytes:
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    pixels = ((x // 200 + y // 200) % 2 * 20000 + x * 3 + y * 2).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def post(base_url: str, data: bytes, i: int) -> int:
    with httpx.Client(base_url=base_url, timeout=600.0, trust_env=False) as client:
        return client.post("/predict", data={"patient_id": f"LARGE-{i}"},
                           files={"image": ("large.png", data, "image/png")}).status_code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    data = large_film()
    print(f"film: {SIDE}x{SIDE} 16-bit PNG, {len(data) / 1e6:.1f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            server.start()
            print(f"started in {server.cold_start_s:.1f} s, peak RSS {server.memory()['vmhwm_mib']:.0f} MiB")
            for n in (1, args.concurrent):
                started = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    statuses = list(pool.map(lambda i: post(server.base_url, data, i), range(n)))
                print(f"{n} at once: statuses {sorted(set(statuses))}, {time.perf_counter() - started:.1f} s, "
                      f"server peak RSS since start {server.memory()['vmhwm_mib']:.0f} MiB")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
