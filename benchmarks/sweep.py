"""What the benchmarks share: the settings sweeps' (stage1_settings.py, stage2_settings.py) command line and output,
one JSON line per run (printed, and appended to --out), and the learning curves they record for the notebooks
(``save_record``: the JSON files of vlmcourse/recorded/ that ``recipes.recorded_run`` reads)."""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vlmcourse.train import bf16_supported


def sweep_parser(description: str, steps: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--only", nargs="*", help="names of SWEEP entries to run")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--eval-every", type=int, default=0, help="a learning curve: evaluate every N steps")
    parser.add_argument("--save-curve", default=None, help="write the runs' learning curves to this JSON file "
                        "(vlmcourse/recorded/ keeps those the notebooks draw)")
    return parser


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def last_mean(values: list, n: int) -> float:
    """The mean of the last ``n`` values (of all, if fewer): a run's closing loss."""
    return sum(values[-n:]) / len(values[-n:])


def machine() -> str:
    """The machine a run was measured on: the CPU's name and vector units, threads, and the precision training used
    (bf16 autocast where the hardware has it, unless $VLMCOURSE_BF16=0)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    units = ("AVX-512 with bf16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
             else "AVX2" if "avx2" in flags else "")
    return (f"{platform.machine()} CPU ({name}{', ' + units if units else ''}), {torch.get_num_threads()} threads, "
            f"{'bf16 autocast' if bf16_supported('cpu') else 'float32'}")


def save_record(path, what: str, runs: dict, append: bool = False) -> None:
    """Learning curves and where they came from (the command, the machine, the date), as ``recipes.recorded_run``
    reads them: ``runs`` is {name: (recipe, TrainResult, figures at the end)}; each run keeps its recipe, seconds
    per step (evaluations included), its evaluations, steps counted from 1, and the machine it ran on. ``append``:
    keep the runs of the record already at ``path`` (a later invocation adds its own; the commands are kept one per
    line, the record's machine names every machine of its runs, its date is the latest invocation's)."""
    command = "python benchmarks/" + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    old = json.loads(Path(path).read_text()) if append and Path(path).is_file() else None
    commands = [] if old is None else old["command"].split("\n")
    here = machine()
    record = {"what": what, "command": "\n".join(commands + [command] * (command not in commands)),
              "machine": here, "date": time.strftime("%Y-%m-%d"),
              "seeds": sorted({recipe.seed for recipe, _, _ in runs.values()}),
              "runs": {name: {"recipe": asdict(recipe), "seconds_per_step": round(result.seconds / recipe.steps, 2),
                              "points": [{**p, "step": p["step"] + 1} for p in result.evals], "final": final,
                              "machine": here}
                       for name, (recipe, result, final) in runs.items()}}
    if old is not None:
        record["runs"] = {**{name: {**run, "machine": run.get("machine", old["machine"])}
                             for name, run in old["runs"].items()}, **record["runs"]}
        record["seeds"] = sorted(set(old["seeds"]) | set(record["seeds"]))
        record["machine"] = " / ".join(dict.fromkeys(run["machine"] for run in record["runs"].values()))
    Path(path).write_text(json.dumps(record, indent=1, default=str) + "\n")
