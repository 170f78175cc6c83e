"""Run timing-sensitive tests again and again beside a CPU-heavy load, and count how often they pass.

    python -m bench.stress_tests --runs 20 tests/pipeline/test_batch_scoring.py tests/pacs/test_receiver.py

A test that decides on timing instead of on an event passes on an idle machine and fails when the cores are
busy. This script starts one busy loop per CPU core (plain Python spinning, at the same priority as the tests)
and runs pytest on the given tests `--runs` times in a row, each run in a fresh process, then prints per test id
how many runs it passed, failed or skipped, and each run's wall time. The busy loops stop with the script.
Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def spin() -> None:
    """Keep one core busy until killed."""
    while True:
        pass


def outcomes(junit_xml: Path, reasons: dict[str, str] | None = None) -> dict[str, str]:
    """{test id: passed | failed | skipped} from a pytest JUnit XML report; a failure's message goes into
    `reasons` (test id: message) when given."""
    results = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        failure = case.find("failure")
        failure = case.find("error") if failure is None else failure
        if failure is not None:
            results[name] = "failed"
            if reasons is not None:
                reasons[name] = f"{failure.get('message', '')} ({case.get('time')} s)"
        elif case.find("skipped") is not None:
            results[name] = "skipped"
        else:
            results[name] = "passed"
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tests", nargs="+", help="test files or node ids, as pytest takes them")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy loops beside the tests")
    args = parser.parse_args(argv)

    # A SIGTERM ends the script through `finally`, so the busy loops never outlive it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    loops = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for loop in loops:
        loop.start()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    seconds = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for run in range(args.runs):
                report = Path(tmp) / f"run-{run}.xml"
                started = time.monotonic()
                subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", f"--junitxml={report}",
                                *args.tests], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, check=False)
                seconds.append(time.monotonic() - started)
                reasons: dict[str, str] = {}
                found = (outcomes(report, reasons) if report.is_file()
                         else {"(no report: pytest crashed)": "failed"})
                for name, outcome in found.items():
                    counts[name][outcome] += 1
                failed = sum(o == "failed" for o in found.values())
                print(f"run {run + 1}/{args.runs}: {len(found)} tests, {failed} failed, {seconds[-1]:.0f} s",
                      flush=True)
                for name, reason in reasons.items():
                    print(f"  failed: {name}: {reason[:300]}", flush=True)
    finally:
        for loop in loops:
            loop.kill()
    print(f"\n{args.runs} runs beside {args.busy} busy loops; wall {min(seconds):.0f}-{max(seconds):.0f} s per run")
    for name, count in sorted(counts.items()):
        print(f"  {count['passed']:3d} passed {count['failed']:3d} failed {count['skipped']:3d} skipped  {name}")
    return 1 if any(count["failed"] for count in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
