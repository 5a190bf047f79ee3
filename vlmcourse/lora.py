"""The captioner of notebook 06: stage 2 plus LoRA on the LLM, how it is trained and saved, and a one-call API.

    connector (Q-Former | mean-pooled patches | all patches) -> projection -> LLM (+ LoRA)

Stage 2 alone keeps the LLM frozen: the soft prompts must say everything. LoRA
(``LoraSettings``) also lets the LLM's attention adapt to them, training low-rank
updates (1.8M weights at r=16, 1.4% of SmolLM2-135M) and leaving the LLM's own untouched. The base LLM is
shared, never copied: ``LoRACaptioner`` injects its adapters into a module tree of
its own over the same weight tensors (``shared_copy``), so several captioners
(with and without LoRA) can be trained in one process on one loaded LLM.

Saved models (``LoRACaptioner.save_pretrained``) hold the connector, the projection
and the LoRA weights as safetensors, and a config.json; the LLM comes from the
profile. ``vlmcourse.caption(images, model_dir)`` captions photos in one call.
Its evaluation, baselines and diagnostics are in evaluate.py.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, replace
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
from .recipes import (Recipe, Stage1Recipe, Stage2Recipe, bridge_config, fit_captioner, load_or_train_stage2,
                      profile_tag, save_trained, stage2_connector)
from .stage2 import MeanPoolConnector, PatchConnector, SoftPromptCaptioner
from .stage1 import Stage1Config
from .train import TrainResult
from .utils import cache_dir, seed_everything

# How long ``python -m vlmcourse train captioner`` takes with CaptionerRecipe.cli_default() (shown in --help).
CLI_TRAINING_TIME = ("about 25 minutes on a quiet 2-core CPU with bf16 (AVX512-BF16 or AMX; measured before the latest "
                     "speed-ups), about 45 on one without (AVX2 only: float32; measured: 2707 and 2680 s for seeds 0 and 1)")
ADAPTER_FILE = "adapter_model.safetensors"     # PEFT's name for the LoRA weights
MODEL_FILE = "model.safetensors"               # connector and projection (SoftPromptCaptioner.save_pretrained)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# What every captioner's config.json holds (LoRACaptioner.save_pretrained); "lora" is null without LoRA.
CAPTIONER_KEYS = ("bridge", "connector", "connector_size", "llm", "lora")
CONNECTORS = ("qformer", "meanpool", "linear")
# LoRA settings of notebook 06's ablation rows (and the command line), chosen on the dev split (40 steps, one seed):
# with LoRA the LLM itself adapts, so the stage-1 Q-Former stays frozen (its outputs are computed once) and lr 1e-3
# trains a fresh projection and the adapters.
NOTEBOOK_STAGE2 = Stage2Recipe(freeze_qformer=True, lr=1e-3, proj_lr_scale=1.0)


@dataclass
class LoraSettings:
    """LoRA adds ``B @ A`` (rank ``r``) to each target weight, scaled by ``lora_alpha / r``: the rank bounds what
    can change, alpha how strongly. Targets: the attention projections of a Llama-type LLM (SmolLM2)."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0   # peft's usual 0.05 costs a tenth of a CPU step and a 40-step run does not overfit
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        return cls(**{**d, "target_modules": tuple(d["target_modules"])})

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.target_modules))


@dataclass
class CaptionerRecipe(Recipe):
    """A captioner: which connector, LoRA or not, and the stage-2 training settings (``stage2``; its
    ``stage1`` recipe gives the Q-Former when ``connector="qformer"``).

    - ``connector``: "qformer" (BLIP-2), "meanpool" (the patch grid average-pooled to ``pooled`` x ``pooled``
      tokens) or "linear" (LLaVA: every patch token, through the linear projection).
    - ``padding``: the bridge's label layout; "left_unmasked" and "mask_by_pad_id" reproduce the classic
      mistakes (see stage2.py), "right" is the fix.
    - ``base``: a stage-2 model to start from (``load_or_train_stage2``; notebook 05's): its trained Q-Former
      and projection, which ``stage2``'s settings then train further. None: the stage-1 Q-Former of
      ``stage2.stage1`` (or a mean-pool/linear connector) and a fresh projection.
    """

    connector: str = "qformer"
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    stage2: Stage2Recipe = field(default_factory=Stage2Recipe)
    pooled: int = 4
    padding: str = "right"
    base: Stage2Recipe | None = None

    def __post_init__(self):
        if self.connector not in CONNECTORS:
            raise ValueError(f"unknown connector {self.connector!r}: choose one of {CONNECTORS}")
        if self.base is not None and self.connector != "qformer":
            raise ValueError(f"a stage-2 base model has a Q-Former connector, not {self.connector!r}")
        if self.base is not None and self.base.prompt != self.stage2.prompt:
            raise ValueError("the base stage-2 model was trained with another prompt than stage2.prompt")

    def bridge_config(self):
        return replace(bridge_config(self.stage2), padding=self.padding)

    @classmethod
    def cli_default(cls) -> "CaptionerRecipe":
        """The settings of ``python -m vlmcourse train captioner``: a longer run than the notebooks can afford
        (``CLI_TRAINING_TIME``): LoRA and a fresh projection (``NOTEBOOK_STAGE2``) trained 460 steps of 16 captions
        on a stage-1 Q-Former trained 120 steps (notebook 04's recipe, longer; reused from the cache when present)."""
        stage1 = replace(Stage1Recipe(), steps=120)
        return cls(connector="qformer", lora=LoraSettings(),
                   stage2=replace(NOTEBOOK_STAGE2, steps=460, warmup_steps=20, batch_size=16, stage1=stage1))

    def with_overrides(self, steps: int | None = None, seed: int | None = None,
                       stage1_steps: int | None = None) -> "CaptionerRecipe":
        """A copy with the stage-2 (+ LoRA) steps, the seed of both stages, or the stage-1 steps replaced
        (None keeps the value)."""
        stage2, stage1 = self.stage2, self.stage2.stage1
        if stage1 is not None:
            stage1 = replace(stage1, **_given(seed=seed, steps=stage1_steps))
        return replace(self, stage2=replace(stage2, stage1=stage1, **_given(seed=seed, steps=steps)))

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionerRecipe":
        """The recipe ``asdict(recipe)`` (as saved in config.json) describes."""
        def stage2_recipe(r: dict) -> Stage2Recipe:
            r = {"proj_lr_scale": 1.0, **r}        # saved before the field existed: trained at 1x
            if r.get("stage1"):
                stage1 = dict(r["stage1"])
                model = {**stage1["model"], "losses": tuple(stage1["model"]["losses"])}
                r["stage1"] = Stage1Recipe(**{**stage1, "model": Stage1Config(**model)})
            return Stage2Recipe(**r)

        lora = LoraSettings.from_dict(d["lora"]) if d.get("lora") else None
        base = stage2_recipe(d["base"]) if d.get("base") else None
        return cls(**{**d, "lora": lora, "stage2": stage2_recipe(d["stage2"]), "base": base})


# Notebook 06's captioner: LoRA on top of one of notebook 05's two stage-2 models (its Q-Former frozen, its projection
# trained further), 40 steps of 8 at lr 3e-4. Chosen on the dev split (one seed each; CIDEr-D against the same model
# shown a blank photo): on the stage-2 model whose Q-Former started fresh from BERT 0.133 vs 0.044, on the one that
# started from notebook 04's stage-1 Q-Former 0.045 vs 0.039 (the stage-2 models alone: 0.092 vs 0.069, 0.014 vs 0.022).
NOTEBOOK_CAPTIONER = CaptionerRecipe(connector="qformer", lora=LoraSettings(), base=Stage2Recipe(stage1=None),
                                     stage2=replace(NOTEBOOK_STAGE2, lr=3e-4))


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


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


def build_connector(profile: Profile, recipe: CaptionerRecipe, vision) -> tuple[nn.Module, int]:
    """(connector, its output width) for ``recipe.connector``."""
    if recipe.connector == "qformer":
        return stage2_connector(profile, recipe.stage2, vision)
    if recipe.connector == "meanpool":
        return MeanPoolConnector(vision.grid_size, recipe.pooled), vision.hidden_size
    return PatchConnector(vision.num_patches), vision.hidden_size


def train_captioner(profile: Profile | str | None = None, recipe: CaptionerRecipe | None = None, llm=None,
                    eval_split: str | None = "dev") -> tuple[LoRACaptioner, TrainResult]:
    """Train a captioner on cached image features of the train split (stage 2's loop, ``recipes.fit_captioner``),
    with the ``eval_split`` caption loss at the end (None: no evaluation). ``llm`` (``load_llm(profile)``) is
    shared, not modified."""
    profile, recipe = as_profile(profile), recipe or CaptionerRecipe()
    vision = load_vision_encoder(profile)
    llm = llm or load_llm(profile)
    base = None
    if recipe.base is not None:
        base, _ = load_or_train_stage2(profile, recipe.base, llm=llm)
        connector, width = base.connector, base.proj.in_features
        for p in connector.parameters():
            p.requires_grad_(not recipe.stage2.freeze_qformer)
    else:
        connector, width = build_connector(profile, recipe, vision)
    seed_everything(recipe.stage2.seed)
    model = LoRACaptioner(connector, width, llm, recipe.bridge_config(), lora=recipe.lora)
    if base is not None:
        model.proj.load_state_dict(base.proj.state_dict())      # stage 2's projection, trained further
    model.recipe, model.profile_name, model.vision_name = recipe, profile.name, vision.name
    result = fit_captioner(model, profile, recipe.stage2, eval_split, vision, desc="captioner")
    return model.eval(), result


def captioner_dir(profile: Profile, recipe: CaptionerRecipe) -> Path:
    return cache_dir("models") / f"captioner-{profile_tag(profile)}-{recipe.key()}"


def load_or_train_captioner(profile: Profile | str | None = None, recipe: CaptionerRecipe | None = None,
                            retrain: bool = False, llm=None, eval_split: str | None = "dev"
                            ) -> tuple[LoRACaptioner, TrainResult]:
    """The captioner of this recipe: loaded from ``captioner_dir`` if it was trained before, else trained (with
    the ``eval_split`` caption loss at the end; None skips it, e.g. for runs only scored by their captions) and
    saved there (written aside, then renamed)."""
    profile, recipe = as_profile(profile), recipe or CaptionerRecipe()
    path = captioner_dir(profile, recipe)
    if (path / "config.json").is_file() and (path / "history.json").is_file() and not retrain:
        history = json.loads((path / "history.json").read_text())
        return LoRACaptioner.from_pretrained(path, llm, profile), TrainResult(**history)
    model, result = train_captioner(profile, recipe, llm, eval_split)
    save_trained(model, recipe, result, path, check=False)   # our cache folder
    return model, result


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
