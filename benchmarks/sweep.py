"""What the settings sweeps (stage1_settings.py, stage2_settings.py) share: their command line and their output,
one JSON line per run (printed, and appended to --out)."""
from __future__ import annotations

import argparse
import json


def sweep_parser(description: str, steps: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--only", nargs="*", help="names of SWEEP entries to run")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return parser


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
