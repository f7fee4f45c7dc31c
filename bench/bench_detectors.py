"""Per-point cost of each detector, and of all eight together, on a 100k-point stream.

Run it with ``python bench/bench_detectors.py`` from the repository root. The stream is a
noisy, slowly descending loss reported at every step, with val_loss every 100 steps, a
grad_norm at every step and a NaN now and then; records are built before timing, so the
figures are the detectors' cost alone. Each figure is the median of several repeats, per
record (``feed``) and per 100-step frame (``feed_columns``, the daemon's path).
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitor.engine.base import Detector
from monitor.engine.detectors.divergence import DivergenceDetector
from monitor.engine.detectors.non_finite import NonFiniteDetector
from monitor.engine.detectors.oscillation import OscillationDetector
from monitor.engine.detectors.overshoot import OvershootDetector
from monitor.engine.detectors.plateau import PlateauDetector
from monitor.engine.detectors.slow_progress import SlowProgressDetector
from monitor.engine.detectors.spike import SpikeDetector
from monitor.engine.detectors.stalled import StalledDetector
from monitor.engine.events import Metrics

POINTS = 100_000
REPEATS = 5
FRAME = 100


def make_stream(points: int, seed: int = 0) -> list[Metrics]:
    """A noisy exponential decay with rare spikes and NaNs, val_loss every 100 steps."""
    rng = random.Random(seed)
    records = []
    for step in range(points):
        loss = (0.2 + 2.0 * math.exp(-step / 20_000)) * (1.0 + rng.gauss(0.0, 0.05))
        if rng.random() < 1e-3:
            loss *= 5.0
        if rng.random() < 1e-4:
            loss = math.nan
        values = {"loss": loss, "grad_norm": abs(rng.gauss(1.0, 0.2))}
        if step % 100 == 99:
            values["val_loss"] = loss * 1.1
        records.append(Metrics(step=step, values=values))
    return records


FACTORIES: dict[str, Callable[[], list[Detector]]] = {
    "non_finite": lambda: [NonFiniteDetector()],
    "plateau": lambda: [PlateauDetector()],
    "spike": lambda: [SpikeDetector()],
    "oscillation": lambda: [OscillationDetector()],
    "divergence": lambda: [DivergenceDetector()],
    "slow_progress": lambda: [SlowProgressDetector()],
    "overshoot": lambda: [OvershootDetector()],
    "stalled": lambda: [StalledDetector()],
    "all eight": lambda: [
        NonFiniteDetector(),
        SpikeDetector(),
        OscillationDetector(),
        DivergenceDetector(),
        OvershootDetector(),
        StalledDetector(),
        SlowProgressDetector(),
        PlateauDetector(),
    ],
}


def time_once(detectors: list[Detector], records: list[Metrics]) -> float:
    """Seconds to feed every record to every detector."""
    feeds = [d.feed for d in detectors]
    start = time.perf_counter()
    for record in records:
        for feed in feeds:
            feed(record)
    return time.perf_counter() - start


def to_columns(
    records: list[Metrics], frame: int
) -> list[tuple[list[int], dict[str, list[float | None]]]]:
    """The records as the daemon receives them: frames of ``frame`` steps, one column per metric."""
    frames = []
    for start in range(0, len(records), frame):
        chunk = records[start : start + frame]
        names = sorted({name for r in chunk for name in r.values})
        columns = {name: [r.values.get(name) for r in chunk] for name in names}
        frames.append(([r.step for r in chunk], columns))
    return frames


def time_columns(
    detectors: list[Detector], frames: list[tuple[list[int], dict[str, list[float | None]]]]
) -> float:
    """Seconds to feed every frame to every detector with ``feed_columns``."""
    feeds = [d.feed_columns for d in detectors]
    start = time.perf_counter()
    for steps, columns in frames:
        n = len(steps)
        for feed in feeds:
            feed(steps, columns, 0, n)
    return time.perf_counter() - start


def main() -> None:
    records = make_stream(POINTS)
    frames = to_columns(records, FRAME)
    empty = time_once([], records)  # the loop itself, subtracted below
    print(
        f"{POINTS} points, median of {REPEATS} repeats (loop overhead {empty / POINTS * 1e6:.3f} µs/point removed);"
        f" columns: frames of {FRAME} steps through feed_columns, as the daemon feeds them"
    )
    print(f"{'detector':<14} {'record µs/pt':>13} {'columns µs/pt':>14} {'ratio':>6}")
    for name, factory in FACTORIES.items():
        runs = [time_once(factory(), records) for _ in range(REPEATS)]
        per_point = (statistics.median(runs) - empty) / POINTS * 1e6
        col_runs = [time_columns(factory(), frames) for _ in range(REPEATS)]
        col_point = statistics.median(col_runs) / POINTS * 1e6
        print(f"{name:<14} {per_point:>13.3f} {col_point:>14.3f} {col_point / per_point:>6.2f}")


if __name__ == "__main__":
    main()
