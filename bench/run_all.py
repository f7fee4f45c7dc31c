"""Run every speed benchmark, one after the other, each in its own process.

    python bench/run_all.py            # full runs (several minutes on 2 cores)
    python bench/run_all.py --quick    # smaller counts

Each benchmark prints its figures next to the reference it is compared with, measured in the
same run; see the docstring of each ``bench/bench_*.py``. The training-quality benchmark is
separate and much longer: ``python bench/quality/run.py``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: script -> (full-run arguments, quick-run arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "bench_engine.py": (["--points", "200000", "--repeats", "5"], ["--points", "50000", "--repeats", "3"]),
    "bench_detectors.py": ([], []),
    "bench_exporter.py": (["--jobs", "1000", "--repeat", "20"], ["--jobs", "1000", "--repeat", "5"]),
    "bench_client.py": ([], ["--quick"]),
    "bench_daemon.py": ([], ["--quick"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts for every benchmark")
    parser.add_argument("only", nargs="*", help="run only these (e.g. bench_engine.py)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; expected some of {', '.join(BENCHMARKS)}")
    failed = []
    for script, (full, quick) in BENCHMARKS.items():
        if args.only and script not in args.only:
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"\n=== {' '.join(['python', f'bench/{script}', *cmd[2:]])}", flush=True)
        started = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"=== {script}: exit {rc} after {time.perf_counter() - started:.0f} s", flush=True)
        if rc != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
