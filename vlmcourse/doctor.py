"""``python -m vlmcourse doctor``: is everything the course needs here, and how fast does it load?

The data check reads the annotations as the course does and decodes every photo of each split.
Exit code: 0 all good, 1 only some photos are unreadable, 2 anything else missing or wrong.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
import warnings

import torch

from .data import (DATA_ENV, HUB_DATASET, SPLITS, DataNotFoundError, Flickr8k, find_data_root, hub_subset_root,
                   read_annotations)
from .profiles import get_profile, hub_reachable, hub_unavailable
from .utils import peak_memory_mb

PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "gguf", "nbval")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def doctor(profile_name: str | None = None, data: str | None = None, out=sys.stdout) -> int:
    """Print the environment, the data and each pretrained part's load time; the exit code (see the module)."""
    from .backbones import load_llm, load_text_encoder, load_vision_encoder

    def say(*parts):
        print(*parts, file=out, flush=True)

    problems = []
    profile = get_profile(profile_name)
    say(f"vlmcourse {_version('vlmcourse')} on Python {platform.python_version()} ({platform.machine()})")
    say("packages: " + ", ".join(f"{n} {_version(n)}" for n in PACKAGES))
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    say(f"device:   {profile.device} ({cuda}); torch threads {torch.get_num_threads()}")
    say(f"profile:  {profile.name} (vision {profile.vision}, text {profile.text}, llm {profile.llm})")

    if profile.data == "local" or data is not None:
        try:
            root = find_data_root(data)
            say(f"data:     {root}")
            with warnings.catch_warnings(record=True) as caught:    # duplicates, shared images, missing photos
                warnings.simplefilter("always")
                read_annotations(root)      # a leak or a bad row stops here, before any split
                for split in SPLITS:
                    try:
                        ds = Flickr8k(split, root=root)
                    except ValueError as error:     # an empty split
                        problems.append(f"{split} split")
                        say(f"  {split:<5} EMPTY: {error}")
                        continue
                    bad = ds.verify()
                    if bad:
                        problems.append(f"{split} photos")
                    say(f"  {split:<5} {len(ds):>5} images {sum(map(len, ds.captions)):>6} captions ({ds.layout} "
                        f"layout)" + (f"; {len(bad)} unreadable: {', '.join(bad[:3])}" if bad else ""))
            for message in dict.fromkeys(str(w.message) for w in caught if "skipped" not in str(w.message)):
                say(f"  warning: {message}")
        except DataNotFoundError as error:
            if data is None and not os.environ.get(DATA_ENV) and hub_reachable():    # load_flickr8k downloads it
                say(f"data:     none on disk; an 800-photo subset of {HUB_DATASET} will be downloaded from the "
                    f"Hugging Face Hub on first use, into {hub_subset_root()}")
            else:
                problems.append("data")
                say(f"data:     MISSING: {error}")
        except ValueError as error:         # a caption or split file we cannot read, a leak between splits
            problems.append("data")
            say(f"data:     BAD: {error}")
    elif hub_reachable():
        say(f"data:     {profile.data} from the Hugging Face Hub (downloaded on first use)")
    else:
        problems.append("data")
        say(f"data:     FAILED: {hub_unavailable('the dataset ' + profile.data)}")

    for part, load in (("vision", load_vision_encoder), ("text", load_text_encoder), ("llm", load_llm)):
        start = time.perf_counter()
        try:
            model = load(profile)
        except Exception as error:  # report every part, then fail
            problems.append(part)
            say(f"{part + ':':<9} FAILED: {error}")
            continue
        module = getattr(model, "model", model)
        params = sum(p.numel() for p in module.parameters()) / 1e6
        say(f"{part + ':':<9} {getattr(model, 'name', type(model).__name__)}: {params:.1f}M parameters, "
            f"loaded in {time.perf_counter() - start:.1f} s")
        del model
    say(f"peak memory: {peak_memory_mb():.0f} MB")
    if problems:
        say(f"{len(problems)} problem(s): {', '.join(problems)} (see above)")
        return 1 if all(p.endswith(" photos") for p in problems) else 2
    say("all good")
    return 0
