"""Time the whole notebook suite under nbval, as CI runs it, and report each notebook's share and the peak memory.

The course's budget: the suite under 25 minutes on a 2-core CPU (goal 15), each notebook under 6, peak memory
under 4 GB. By default the feature, model and shapes-world caches are emptied first (as on a fresh CI machine), so
every model is trained and the shapes world generated; the LLM's safetensors cache is kept (``scripts/setup.sh`` makes it before the tests). Run by hand, on a quiet
machine (two jobs on 2 cores time each other):

    python benchmarks/notebook_suite.py            # cold: empty caches, then pytest notebooks
    python benchmarks/notebook_suite.py --warm     # keep the caches: a re-run that loads the saved models

Prints one JSON object: wall seconds, peak RSS of the largest process (the heaviest notebook kernel), seconds
per notebook (the sum of nbval's cell durations) and the slowest cells.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from vlmcourse.utils import cache_dir

ROOT = Path(__file__).resolve().parents[1]


def durations(pytest_stdout: str) -> tuple[dict[str, int], dict[str, int]]:
    """Seconds per notebook and per cell (setup, call and teardown added up), from ``pytest --durations=0``."""
    per_notebook: dict[str, float] = defaultdict(float)
    per_cell: dict[str, float] = defaultdict(float)
    for line in pytest_stdout.splitlines():
        m = re.match(r"\s*([\d.]+)s (?:call|setup|teardown)\s+notebooks/([^:\s]+)\.ipynb::(.+?)\s*$", line)
        if m:
            per_notebook[m.group(2)] += float(m.group(1))
            per_cell[f"{m.group(2)}::{m.group(3)}"] += float(m.group(1))
    return ({k: round(v) for k, v in sorted(per_notebook.items())}, {k: round(v) for k, v in per_cell.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", action="store_true", help="keep the feature, model and shapes-world caches")
    parser.add_argument("--top", type=int, default=12, help="how many of the slowest cells to list")
    args = parser.parse_args()
    if not args.warm:
        for name in ("features", "models", "shapes"):   # all that a fresh CI machine lacks (the LLM's cache aside)
            shutil.rmtree(cache_dir(name), ignore_errors=True)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "notebooks", "-q", "--durations=0"], cwd=ROOT,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    per_notebook, cells = durations(run.stdout)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]
    print(json.dumps({"cold": not args.warm, "pytest": summary, "wall_s": round(wall),
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 2),
                      "seconds_per_notebook": per_notebook,
                      # where the time goes: the cells to make cheaper first
                      "slowest_cells": dict(sorted(cells.items(), key=lambda kv: -kv[1])[:args.top])},
                     indent=1))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
