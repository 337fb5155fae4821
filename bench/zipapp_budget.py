"""`make size`: the shipped file's budgets, each a ratio measured in one run.

- file size against 1.5 MB;
- median wall time of `python3 -I -S dist/memory-backfill --help` against the
  median of `python3 -I -S -c pass` (the interpreter's own start-up), budget 5x.
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZE_BUDGET = 1_500_000
HELP_BUDGET = 5.0
RUNS = 21


def median_seconds(argv) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "dist/memory-backfill")
    python = sys.executable
    size = path.stat().st_size
    bare = median_seconds([python, "-I", "-S", "-c", "pass"])
    help_ = median_seconds([python, "-I", "-S", str(path), "--help"])
    rows = [
        ("file size", "%d bytes" % size, size / SIZE_BUDGET, "< 1.0 (1.5 MB)"),
        (
            "--help median / bare python median",
            "%.1f ms / %.1f ms" % (help_ * 1e3, bare * 1e3),
            help_ / bare / HELP_BUDGET,
            "< 1.0 (5x)",
        ),
    ]
    print("%-36s %-22s %-14s %s" % ("budget", "measured", "ratio/budget", "target"))
    for name, measured, ratio, target in rows:
        print("%-36s %-22s %-14.2f %s" % (name, measured, ratio, target))
    print("(%s, %d runs each, Python %s)" % (path, RUNS, sys.version.split()[0]))
    return 0 if all(ratio < 1.0 for _, _, ratio, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
