"""The captioner of notebook 06: stage 2 plus LoRA on the LLM, how it is saved, and a one-call API.

    connector (Q-Former | mean-pooled patches | all patches) -> projection -> LLM (+ LoRA)

Stage 2 alone keeps the LLM frozen: the soft prompts must say everything. LoRA
(``recipes.LoraSettings``) also lets the LLM's attention adapt to them, training low-rank
updates (1.8M weights at r=16, 1.4% of SmolLM2-135M) and leaving the LLM's own untouched. The base LLM is
shared, never copied: ``LoRACaptioner`` injects its adapters into a module tree of
its own over the same weight tensors (``shared_copy``), so several captioners
(with and without LoRA) can be trained in one process on one loaded LLM.

Saved models (``LoRACaptioner.save_pretrained``) hold the connector, the projection
and the LoRA weights as safetensors, and a config.json; the LLM comes from the
profile. ``vlmcourse.caption(images, model_dir)`` captions photos in one call.
Its recipe (``CaptionerRecipe``) is in recipes.py, its training in pipeline.py
(``train_captioner``), its evaluation, baselines and diagnostics in evaluate.py.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .backbones import load_llm, load_vision_encoder
from .data import load_image, to_rgb
from .features import patch_tokens
from .profiles import Profile, as_profile
from .recipes import CaptionerRecipe, LoraSettings
from .stage2 import SoftPromptCaptioner

ADAPTER_FILE = "adapter_model.safetensors"     # PEFT's name for the LoRA weights
MODEL_FILE = "model.safetensors"               # connector and projection (SoftPromptCaptioner.save_pretrained)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# What every captioner's config.json holds (LoRACaptioner.save_pretrained); "lora" is null without LoRA.
CAPTIONER_KEYS = ("bridge", "connector", "connector_size", "llm", "lora")
# ----------------------------------------------------------------------------- the model
def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the *same* weight tensors (no weight is copied).

    peft injects LoRA by replacing submodules in place: done in this copy, it leaves the original model
    (its modules, weights and requires_grad flags) untouched, at no memory cost. The shared weights are
    frozen here and must never be written to (so never ``merge_adapter`` a shared copy).
    """
    memo = {id(p): nn.Parameter(p.data, requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


class LoRACaptioner(SoftPromptCaptioner):
    """connector -> projection -> LLM with optional LoRA adapters; also knows its recipe, profile and vision
    encoder, so a saved one can be loaded and used with nothing but its folder.

    The LLM handed in is never modified: the captioner works on a ``shared_copy`` of it.
    """

    def __init__(self, connector: nn.Module, connector_size: int, llm, config=None, freeze_llm: bool = True,
                 lora: LoraSettings | None = None):
        if not freeze_llm:
            raise ValueError("a LoRACaptioner shares the LLM's weights and never trains them: adapt it with LoRA")
        llm = copy.copy(llm)
        llm.model = shared_copy(llm.model)
        super().__init__(connector, connector_size, llm, config, freeze_llm)
        self.lora: LoraSettings | None = None
        self.recipe: CaptionerRecipe | None = None
        self.profile_name: str | None = None
        self.vision_name: str | None = None
        if lora is not None:
            self.add_lora(lora)

    def add_lora(self, lora: LoraSettings) -> "LoRACaptioner":
        """Inject LoRA adapters (B = 0: the output is unchanged until they train); only they, of the LLM, train."""
        from peft import inject_adapter_in_model

        if self.lora is not None:
            raise ValueError("this captioner already has LoRA adapters")
        inject_adapter_in_model(lora.to_peft(), self.llm_model)
        for name, p in self.llm_model.named_parameters():
            if "lora_" in name:      # float32 even on a float16 LLM (hub): Adam's small updates vanish in fp16
                p.data = p.data.float()
        self.lora = lora
        return self

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.llm_model).items()}

    def check_vision(self, vision) -> None:
        """Image features must come from the vision encoder the captioner was trained on."""
        if self.vision_name and vision.name != self.vision_name:
            raise ValueError(f"this captioner was trained on {self.vision_name} features, not {vision.name}: "
                             f"use the profile it was trained with ({self.profile_name})")

    @torch.no_grad()
    def caption_images(self, images: list[Image.Image], vision, max_new_tokens: int = 30,
                       batch_size: int = 16) -> list[str]:
        """Greedy captions of RGB PIL images, through ``vision`` (the profile's encoder)."""
        self.check_vision(vision)
        return self.generate(patch_tokens(vision, images, batch_size), max_new_tokens, batch_size=batch_size)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path) -> None:
        """model.safetensors (connector, projection), adapter_model.safetensors (LoRA) and config.json (bridge,
        connector, LLM, LoRA settings, recipe, profile, vision encoder). The LLM's own weights are never saved."""
        super().save_pretrained(path)
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        config.update(lora=asdict(self.lora) if self.lora else None, profile=self.profile_name,
                      vision=self.vision_name, recipe=asdict(self.recipe) if self.recipe else None)
        if self.lora:
            save_file(self.lora_state_dict(), str(path / ADAPTER_FILE))
        (path / "config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path, llm=None, profile: Profile | str | None = None) -> "LoRACaptioner":
        """The captioner saved at ``path``, in eval mode, on ``llm`` or the LLM of ``profile`` (default: the
        profile it was saved with). Safetensors only: nothing is unpickled."""
        from peft import set_peft_model_state_dict

        config = read_config(path)
        profile = as_profile(profile or config.get("profile"))
        llm = llm or load_llm(profile)
        try:
            model = super().from_pretrained(path, llm)
        except (RuntimeError, KeyError, TypeError) as error:     # weights of another connector, or a bad setting
            raise ModelFolderError(f"model folder {path}: {MODEL_FILE} does not fit the connector config.json "
                                   f"describes ({str(error).splitlines()[0][:200]})") from None
        model = model.to(profile.device)
        model.profile_name, model.vision_name = config.get("profile"), config.get("vision")
        model.recipe = CaptionerRecipe.from_dict(config["recipe"]) if config.get("recipe") else None
        if config.get("lora"):
            model.add_lora(LoraSettings.from_dict(config["lora"]))
            state = load_file(str(Path(path) / ADAPTER_FILE), device=str(model.device))
            result = set_peft_model_state_dict(model.llm_model, state)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing or result.unexpected_keys:
                raise ModelFolderError(f"model folder {path}: {ADAPTER_FILE} does not fit the LoRA settings in "
                                       f"config.json: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
        return model.eval()


class ModelFolderError(ValueError):
    """A model folder that is not a captioner, lacks or has extra weight files, or is damaged (names folder and file)."""


def check_weights(path: Path, name: str) -> None:
    """Every tensor of ``path/name`` can be read and is finite; else ModelFolderError("model folder ... is damaged")."""
    try:
        with safe_open(str(path / name), framework="pt") as f:
            bad = [k for k in f.keys() if not torch.isfinite(f.get_tensor(k)).all()]
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFolderError(f"model folder {path} is damaged: {name} cannot be read ({error}); "
                               f"train it again or restore it") from None
    if bad:
        raise ModelFolderError(f"model folder {path} is damaged: {name} holds NaN or infinite weights "
                               f"({', '.join(bad[:3])})")


def read_config(path) -> dict:
    """config.json of a saved captioner, after checking the folder: FileNotFoundError when it or config.json is
    missing; ModelFolderError (naming the folder and what is wrong) when config.json is not valid JSON or does not
    describe a captioner, or a weight file is missing, extra (an adapter config.json does not ask for) or damaged."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no saved captioner at {path}: the folder does not exist "
                                f"(train one with: python -m vlmcourse train captioner --out {path})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no saved captioner at {path} (config.json missing)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"model folder {path} is damaged: {path / 'config.json'} is not valid JSON "
                               f"({error})") from None
    missing = [k for k in CAPTIONER_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        what = ("a stage-1 model" if "stage1" in config else "a stage-2 model" if "bridge" in config
                else "something else") if isinstance(config, dict) else "no object"
        raise ModelFolderError(f"model folder {path} is not a captioner: its config.json describes {what} "
                               f"(no {', '.join(missing)}); give a folder saved by 'python -m vlmcourse train "
                               f"captioner'")
    # Weight files: exactly the ones config.json describes, each readable (no silent fallback to fewer weights).
    expected = {MODEL_FILE, *([ADAPTER_FILE] if config["lora"] else [])}
    present = {p.name for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)}
    if expected - present:
        raise ModelFolderError(f"model folder {path} is damaged: {', '.join(sorted(expected - present))} missing")
    if present - expected:
        extra = ", ".join(sorted(present - expected))
        reason = "config.json has no LoRA settings, so this adapter would be ignored" if ADAPTER_FILE in present \
            else "config.json does not describe them"
        raise ModelFolderError(f"model folder {path} holds {extra}, but {reason}: remove the file or use the "
                               f"folder it came from")
    for name in sorted(expected):
        check_weights(path, name)
    return config


# ----------------------------------------------------------------------------- the one-call API
_LOADED: dict[tuple, tuple[LoRACaptioner, nn.Module]] = {}


def load_captioner(model_dir, profile: Profile | str | None = None) -> tuple[LoRACaptioner, nn.Module]:
    """(LoRACaptioner, its vision encoder) for inference. The last one loaded is kept (it holds an LLM), so
    calling ``caption`` again with the same folder costs no loading."""
    path = Path(model_dir).resolve()
    config_file = path / "config.json"
    stamp = config_file.stat().st_mtime_ns if config_file.is_file() else None
    key = (str(path), stamp, str(profile))
    if stamp is None or key not in _LOADED:
        _LOADED.clear()
        model = LoRACaptioner.from_pretrained(path, profile=profile)    # checks the folder first (read_config)
        vision = load_vision_encoder(as_profile(profile or model.profile_name))
        model.check_vision(vision)
        _LOADED[key] = model, vision
    return _LOADED[key]


def caption(images, model_dir, profile: Profile | str | None = None, max_new_tokens: int = 30) -> list[str]:
    """Captions of photos with the captioner saved in ``model_dir`` (``python -m vlmcourse train captioner``):

        vlmcourse.caption(["dog.jpg", pil_image], "models/captioner")   # -> ["A dog runs on the grass.", ...]

    ``images``: paths or PIL images (any mode; converted to RGB), or a single one. An unreadable file
    raises data.ImageLoadError naming it, before anything is captioned.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    pil = [to_rgb(image) if isinstance(image, Image.Image) else load_image(image) for image in images]
    model, vision = load_captioner(model_dir, profile)
    return model.caption_images(pil, vision, max_new_tokens)
