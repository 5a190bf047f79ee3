"""The captioner of notebook 06: stage 2 plus LoRA on the LLM, its baselines and diagnostics, and a one-call API.

    connector (Q-Former | mean-pooled patches | all patches) -> projection -> LLM (+ LoRA)

Stage 2 alone keeps the LLM frozen: the soft prompts must say everything. LoRA
(``LoraSettings``) also lets the LLM's attention adapt to them, training low-rank
updates (1.8M weights at r=16, 1.4% of SmolLM2-135M) and leaving the LLM's own untouched. The base LLM is
shared, never copied: ``Captioner`` injects its adapters into a module tree of
its own over the same weight tensors (``shared_copy``), so several captioners
(with and without LoRA) can be trained in one process on one loaded LLM.

Honest numbers need baselines measured the same way: the same model shown a
blank gray photo (what it says from the prompt alone), the caption of the most
similar train photo (``nearest_neighbour_captions``), and one caption for every
photo (``constant_caption``). A model that does not beat them is not looking at
the image. ``evaluate_captioner`` reports all of them with the diagnostics of
the "emits only EOS" failure: P(EOS) at the first step, empty and distinct
captions, and how many captions change when the photos' soft prompts are swapped.

Saved models (``Captioner.save_pretrained``) hold the connector, the projection
and the LoRA weights as safetensors, and a config.json; the LLM comes from the
profile. ``vlmcourse.caption(images, model_dir)`` captions photos in one call.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .bridge import GENERATION_BATCH, MeanPoolConnector, PatchConnector, SoftPromptCaptioner, evaluate_captions
from .profiles import Profile, get_profile
from .recipes import (Stage1Recipe, Stage2Recipe, bridge_config, captions_for, fit_captioner, load_or_train_stage2,
                      profile_tag, recipe_key, save_trained, split_features, stage2_connector)
from .stage1 import Stage1Config
from .train import TrainResult
from .utils import cache_dir, seed_everything

# How long ``python -m vlmcourse train captioner`` takes with CaptionerRecipe.cli_default() (shown in --help).
CLI_TRAINING_TIME = ("about 25 minutes on a quiet 2-core CPU with bf16 (AVX512-BF16 or AMX; measured before the latest "
                     "speed-ups), about 45 on one without (AVX2 only: float32; measured: 2707 and 2680 s for seeds 0 and 1)")
ADAPTER_FILE = "adapter_model.safetensors"     # PEFT's name for the LoRA weights
MODEL_FILE = "model.safetensors"               # connector and projection (SoftPromptCaptioner.save_pretrained)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# What every captioner's config.json holds (Captioner.save_pretrained); "lora" is null without LoRA.
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
class CaptionerRecipe:
    """A captioner: which connector, LoRA or not, and the stage-2 training settings (``stage2``; its
    ``stage1`` recipe gives the Q-Former when ``connector="qformer"``).

    - ``connector``: "qformer" (BLIP-2), "meanpool" (the patch grid average-pooled to ``pooled`` x ``pooled``
      tokens) or "linear" (LLaVA: every patch token, through the linear projection).
    - ``padding``: the bridge's label layout; "left_unmasked" and "mask_by_pad_id" reproduce the classic
      mistakes (see bridge.py), "right" is the fix.
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

    def key(self) -> str:
        return recipe_key(self)

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


def _profile(profile: Profile | str | None) -> Profile:
    return profile if isinstance(profile, Profile) else get_profile(profile)


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


class Captioner(SoftPromptCaptioner):
    """connector -> projection -> LLM with optional LoRA adapters; also knows its recipe, profile and vision
    encoder, so a saved one can be loaded and used with nothing but its folder.

    The LLM handed in is never modified: the captioner works on a ``shared_copy`` of it.
    """

    def __init__(self, connector: nn.Module, connector_size: int, llm, config=None, freeze_llm: bool = True,
                 lora: LoraSettings | None = None):
        if not freeze_llm:
            raise ValueError("a Captioner shares the LLM's weights and never trains them: adapt it with LoRA")
        llm = copy.copy(llm)
        llm.model = shared_copy(llm.model)
        super().__init__(connector, connector_size, llm, config, freeze_llm)
        self.lora: LoraSettings | None = None
        self.recipe: CaptionerRecipe | None = None
        self.profile_name: str | None = None
        self.vision_name: str | None = None
        if lora is not None:
            self.add_lora(lora)

    def add_lora(self, lora: LoraSettings) -> "Captioner":
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
        return self.generate(image_features(vision, images, batch_size), max_new_tokens, batch_size=batch_size)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path) -> None:
        """model.safetensors (connector, projection), adapter_model.safetensors (LoRA) and config.json (bridge,
        connector, LLM, LoRA settings, recipe, profile, vision encoder). The LLM's own weights are never saved."""
        from safetensors.torch import save_file

        super().save_pretrained(path)
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        config.update(lora=asdict(self.lora) if self.lora else None, profile=self.profile_name,
                      vision=self.vision_name, recipe=asdict(self.recipe) if self.recipe else None)
        if self.lora:
            save_file(self.lora_state_dict(), str(path / ADAPTER_FILE))
        (path / "config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path, llm=None, profile: Profile | str | None = None) -> "Captioner":
        """The captioner saved at ``path``, in eval mode, on ``llm`` or the LLM of ``profile`` (default: the
        profile it was saved with). Safetensors only: nothing is unpickled."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from .backbones import load_llm

        config = read_config(path)
        profile = _profile(profile or config.get("profile"))
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
    from safetensors import SafetensorError, safe_open

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
                    eval_split: str | None = "dev") -> tuple[Captioner, TrainResult]:
    """Train a captioner on cached image features of the train split (stage 2's loop, ``recipes.fit_captioner``),
    with the ``eval_split`` caption loss at the end (None: no evaluation). ``llm`` (``load_llm(profile)``) is
    shared, not modified."""
    from .backbones import load_llm, load_vision_encoder

    profile, recipe = _profile(profile), recipe or CaptionerRecipe()
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
    model = Captioner(connector, width, llm, recipe.bridge_config(), lora=recipe.lora)
    if base is not None:
        model.proj.load_state_dict(base.proj.state_dict())      # stage 2's projection, trained further
    model.recipe, model.profile_name, model.vision_name = recipe, profile.name, vision.name
    result = fit_captioner(model, profile, recipe.stage2, eval_split, vision, desc="captioner")
    return model.eval(), result


def captioner_dir(profile: Profile, recipe: CaptionerRecipe) -> Path:
    return cache_dir("models") / f"captioner-{profile_tag(profile)}-{recipe.key()}"


def load_or_train_captioner(profile: Profile | str | None = None, recipe: CaptionerRecipe | None = None,
                            retrain: bool = False, llm=None, eval_split: str | None = "dev"
                            ) -> tuple[Captioner, TrainResult]:
    """The captioner of this recipe: loaded from ``captioner_dir`` if it was trained before, else trained (with
    the ``eval_split`` caption loss at the end; None skips it, e.g. for runs only scored by their captions) and
    saved there (written aside, then renamed)."""
    profile, recipe = _profile(profile), recipe or CaptionerRecipe()
    path = captioner_dir(profile, recipe)
    if (path / "config.json").is_file() and (path / "history.json").is_file() and not retrain:
        history = json.loads((path / "history.json").read_text())
        return Captioner.from_pretrained(path, llm, profile), TrainResult(**history)
    model, result = train_captioner(profile, recipe, llm, eval_split)
    save_trained(model, recipe, result, path, check=False)   # our cache folder
    return model, result


# ----------------------------------------------------------------------------- features and diagnostics
@torch.no_grad()
def image_features(vision, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
    """(N, T, D) patch tokens of RGB PIL images, rounded through float16 as the feature cache stores them
    (so a photo captioned from its file and from the cache gets the same caption)."""
    return torch.cat([vision(vision.preprocess(images[i:i + batch_size])).last_hidden_state.to("cpu", torch.float16)
                      for i in range(0, len(images), batch_size)]).float()


def blank_image_features(vision, color: tuple[int, int, int] = (128, 128, 128)) -> torch.Tensor:
    """(1, T, D) features of a uniform gray photo: captions from it show what the model says without an image."""
    return image_features(vision, [Image.new("RGB", (vision.image_size, vision.image_size), color)])


@torch.no_grad()
def swapped_image_captions(model: SoftPromptCaptioner, image_embeds: torch.Tensor, captions: list[str] | None = None,
                           shift: int = 1, max_new_tokens: int = 30, batch_size: int = GENERATION_BATCH) -> dict:
    """Caption each photo from another photo's soft prompts (photo i gets photo i - ``shift``'s).

    Returns {"captions": the swapped captions, "changed": the fraction of photos whose caption differs from
    its own-image caption (``captions``, generated when not given)}. Near 0: the captions ignore the image.

    Greedy decoding is a function of the soft prompts alone (the prompt is the same for every photo), so photo i's
    swapped caption *is* photo i - ``shift``'s own caption: it is read off, not generated again. ``captions`` must
    then be this model's greedy captions of ``image_embeds`` with this ``max_new_tokens``.
    """
    if captions is None:
        captions = model.generate(image_embeds, max_new_tokens, batch_size=batch_size)
    if len(captions) != len(image_embeds):
        raise ValueError(f"{len(image_embeds)} photos but {len(captions)} own captions")
    swapped = [captions[(i - shift) % len(captions)] for i in range(len(captions))]
    changed = sum(a != b for a, b in zip(captions, swapped)) / max(1, len(captions))
    return {"captions": swapped, "changed": changed}


# ----------------------------------------------------------------------------- baselines
def consensus_captions(captions: list[list[str]]) -> list[str]:
    """For each photo, the caption its other captions agree with most: the highest CIDEr-D against the
    photo's other references (leave-one-out; the IDF comes from all the photos given)."""
    from .metrics import caption_metrics

    pairs = [(i, j) for i, caps in enumerate(captions) for j in range(len(caps))]
    scores = caption_metrics([captions[i][j] for i, j in pairs],
                             [captions[i][:j] + captions[i][j + 1:] or captions[i] for i, j in pairs],
                             per_image=True)["CIDEr-D per image"]
    best: dict[int, tuple[float, int]] = {}
    for (i, j), score in zip(pairs, scores):
        if i not in best or score > best[i][0]:
            best[i] = (score, j)
    return [captions[i][best[i][1]] for i in range(len(captions))]


@torch.no_grad()
def nearest_neighbour_captions(train_features: torch.Tensor, train_captions: list[list[str]],
                               test_features: torch.Tensor) -> list[str]:
    """For each test photo, a caption of the most similar train photo: cosine similarity of the patch tokens'
    mean, and of that photo's captions the consensus one (``consensus_captions``: the highest CIDEr-D
    against its other captions). A model should beat this retrieval baseline to claim it describes."""
    def pooled(x):
        return nn.functional.normalize(x.float().mean(1), dim=-1)

    if len(train_features) != len(train_captions):
        raise ValueError(f"{len(train_features)} train feature rows but {len(train_captions)} caption lists")
    nearest = (pooled(test_features) @ pooled(train_features).T).argmax(1).tolist()
    photos = sorted(set(nearest))
    consensus = dict(zip(photos, consensus_captions([train_captions[k] for k in photos])))
    return [consensus[k] for k in nearest]


def constant_caption(train_captions: list[list[str]], candidates: int = 32, sample: int = 100, seed: int = 0) -> str:
    """The one train caption that scores best when it is every photo's caption: a baseline that ignores the image.

    Chosen cheaply (a few seconds) and from the train split only: the ``candidates`` captions of the median
    length whose words are the most common (mean document frequency), then of those the one with the
    highest CIDEr-D on ``sample`` random train photos.
    """
    import random
    from collections import Counter

    from .metrics import caption_metrics, normalize_caption

    flat = list(dict.fromkeys(c for caps in train_captions for c in caps))
    words = [normalize_caption(c).split() for c in flat]
    df = Counter(w for ws in words for w in set(ws))
    median = sorted(map(len, words))[len(words) // 2]
    typical = sorted((i for i, ws in enumerate(words) if len(ws) == median),
                     key=lambda i: -sum(df[w] for w in words[i]) / max(1, median))[:candidates]
    photos = random.Random(seed).sample(range(len(train_captions)), min(sample, len(train_captions)))
    scores = caption_metrics([flat[i] for i in typical for _ in photos],
                             [train_captions[p] for _ in typical for p in photos], per_image=True)["CIDEr-D per image"]
    totals = [sum(scores[k * len(photos):(k + 1) * len(photos)]) for k in range(len(typical))]
    return flat[typical[totals.index(max(totals))]]


# ----------------------------------------------------------------------------- evaluation and the one-call API
def evaluate_captioner(model: Captioner | str | os.PathLike, profile: Profile | str | None = None,
                       split: str = "test", data_root=None, max_new_tokens: int = 30) -> dict:
    """The captioner (or the folder it was saved to) on ``split``, against the baselines, with the same metrics.

    Returns {"split", "captions" (how many), "bleu4", "cider", "distinct", "empty", "p_eos_first", "unreadable_images",
    "changed_when_swapped", "blank_image": {bleu4, cider, caption}, "nearest_neighbour": {bleu4, cider},
    "constant": {bleu4, cider, caption}, "predictions": [{"image_id", "caption"}]}.
    """
    from .backbones import load_vision_encoder
    from .metrics import caption_metrics

    if not isinstance(model, SoftPromptCaptioner):
        model = Captioner.from_pretrained(model, profile=profile)
    model.eval()                    # no dropout (LoRA's) in the captions
    profile = _profile(profile or getattr(model, "profile_name", None))
    vision = load_vision_encoder(profile)
    if isinstance(model, Captioner):
        model.check_vision(vision)
    feats, ds = split_features(profile, split, vision, data_root)
    references = captions_for(feats, ds)
    report = evaluate_captions(model, references, feats.features, max_new_tokens=max_new_tokens)
    blank = evaluate_captions(model, references, soft_prompts=model.soft_prompts(blank_image_features(vision)),
                              max_new_tokens=max_new_tokens)
    swapped = swapped_image_captions(model, feats.features, report["captions"], max_new_tokens=max_new_tokens)
    train_feats, train_ds = split_features(profile, "train", vision, data_root)
    train_refs = captions_for(train_feats, train_ds)
    neighbours = nearest_neighbour_captions(train_feats.features, train_refs, feats.features)
    neighbour = caption_metrics(neighbours, references)
    constant = constant_caption(train_refs)
    fixed = caption_metrics([constant] * len(references), references)

    def scores(m):
        return {"bleu4": m["BLEU-4"], "cider": m["CIDEr-D"]}

    read = set(feats.image_ids)
    return {"split": split, "captions": len(report["captions"]), **scores(report), "distinct": report["distinct"],
            "unreadable_images": [i for i in ds.image_ids if i not in read],     # skipped: scored without them
            "empty": report["empty"], "p_eos_first": report["P(EOS) first"], "changed_when_swapped": swapped["changed"],
            "blank_image": {**scores(blank), "caption": blank["captions"][0]},
            "nearest_neighbour": scores(neighbour), "constant": {**scores(fixed), "caption": constant},
            "predictions": [{"image_id": i, "caption": c} for i, c in zip(feats.image_ids, report["captions"])]}


_LOADED: dict[tuple, tuple[Captioner, nn.Module]] = {}


def load_captioner(model_dir, profile: Profile | str | None = None) -> tuple[Captioner, nn.Module]:
    """(Captioner, its vision encoder) for inference. The last one loaded is kept (it holds an LLM), so
    calling ``caption`` again with the same folder costs no loading."""
    from .backbones import load_vision_encoder

    path = Path(model_dir).resolve()
    config_file = path / "config.json"
    stamp = config_file.stat().st_mtime_ns if config_file.is_file() else None
    key = (str(path), stamp, str(profile))
    if stamp is None or key not in _LOADED:
        _LOADED.clear()
        model = Captioner.from_pretrained(path, profile=profile)    # checks the folder first (read_config)
        vision = load_vision_encoder(_profile(profile or model.profile_name))
        model.check_vision(vision)
        _LOADED[key] = model, vision
    return _LOADED[key]


def caption(images, model_dir, profile: Profile | str | None = None, max_new_tokens: int = 30) -> list[str]:
    """Captions of photos with the captioner saved in ``model_dir`` (``python -m vlmcourse train captioner``):

        vlmcourse.caption(["dog.jpg", pil_image], "models/captioner")   # -> ["A dog runs on the grass.", ...]

    ``images``: paths or PIL images (any mode; converted to RGB), or a single one. An unreadable file
    raises data.ImageLoadError naming it, before anything is captioned.
    """
    from .data import load_image, to_rgb

    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    pil = [to_rgb(image) if isinstance(image, Image.Image) else load_image(image) for image in images]
    model, vision = load_captioner(model_dir, profile)
    return model.caption_images(pil, vision, max_new_tokens)
