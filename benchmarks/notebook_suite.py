"""Time the whole notebook suite under nbval, as CI runs it, and report each notebook's share and the peak memory.

The course's budget: the suite under 25 minutes on a 2-core CPU (goal 15), each notebook under 6, peak memory
under 4 GB. By default the feature and model caches are emptied first (as on a fresh CI machine), so every model
is trained; the LLM's safetensors cache is kept (``scripts/setup.sh`` makes it before the tests). Run by hand, on a quiet
machine (two jobs on 2 cores time each other):

    python benchmarks/notebook_suite.py            # cold: empty caches, then pytest notebooks
    python benchmarks/notebook_suite.py --warm     # keep the caches: a re-run that loads the saved models

Prints one JSON object: wall seconds, peak RSS of the largest process (the heaviest notebook kernel), and
seconds per notebook (the sum of nbval's cell durations).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", action="store_true", help="keep the feature and model caches")
    args = parser.parse_args()
    if not args.warm:
        for name in ("features", "models"):
            shutil.rmtree(cache_dir(name), ignore_errors=True)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "notebooks", "-q", "--durations=0"], cwd=ROOT,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    per_notebook: dict[str, float] = defaultdict(float)
    for line in run.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)s (?:call|setup|teardown)\s+notebooks/([^:]+)\.ipynb", line)
        if m:
            per_notebook[m.group(2)] += float(m.group(1))
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]
    print(json.dumps({"cold": not args.warm, "pytest": summary, "wall_s": round(wall),
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 2),
                      "seconds_per_notebook": {k: round(v) for k, v in sorted(per_notebook.items())}}, indent=1))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
