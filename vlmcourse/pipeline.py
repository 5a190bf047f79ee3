"""The course's training runs, from their recipes, and the hand-off between notebooks.

    stage 1 (train_stage1) -> stage 2 (train_stage2) -> the LoRA captioner (train_captioner)
    notebook 08's question answering on the shapes world (train_vqa)

Each run trains on cached image features of the train split with ``train.train`` (the one loop). Each is trained
once and saved under ``$VLMCOURSE_CACHE/models`` in a folder named by the profile and the recipe's key
(recipes.py): ``load_or_train_*`` loads it in a second when a notebook (or a re-run) asks again, and a changed
recipe trains a new one. A later stage asks for the earlier stage's model the same way, so notebook 05 gets the
Q-Former notebook 04 trained.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from .backbones import load_llm, load_text_encoder, load_vision_encoder
from .connectors import LinearConnector, MeanPoolConnector, PrecomputedConnector, QFormerConnector
from .evaluate import mean_caption_loss
from .features import cache_frozen_outputs, captions_for, split_features
from .instruct import instruction_pairs
from .llava import llava_connector
from .lora import LoRACaptioner
from .profiles import Profile, as_profile
from .recipes import (CaptionerRecipe, Stage1Recipe, Stage2Recipe, VQARecipe, bridge_config, captioner_dir,
                      save_trained, stage1_dir, stage2_dir, vqa_dir)
from .stage1 import Stage1Config, Stage1Model, retrieval
from .stage2 import SoftPromptCaptioner
from .train import TrainConfig, TrainResult, caption_batches, train
from .utils import seed_everything
from .vqa import SoftPromptVQA, instruction_batches


def load_or_train(path: Path, recipe, load: Callable, train_fn: Callable, retrain: bool = False):
    """(model, TrainResult): ``load(path)`` when ``path`` holds a finished run, else ``train_fn()``, saved there
    with its recipe and history (``save_trained``: written aside, then renamed, so never half a model)."""
    if (path / "model.safetensors").is_file() and (path / "history.json").is_file() and not retrain:
        return load(path), TrainResult(**json.loads((path / "history.json").read_text()))
    model, result = train_fn()
    save_trained(model, recipe, result, path, check=False)   # our cache folder
    return model, result


# ----------------------------------------------------------------------------- stage 1
def train_stage1(profile: Profile | str | None = None, recipe: Stage1Recipe | None = None,
                 eval_split: str = "dev", metrics=None) -> tuple[Stage1Model, TrainResult]:
    """Stage 1 on cached image features of the train split, with Recall@5 on ``eval_split`` as it goes.
    ``metrics(model) -> {name: value}`` adds the caller's measures to each evaluation (a learning curve)."""
    profile = as_profile(profile)
    recipe = recipe or Stage1Recipe()
    vision = load_vision_encoder(profile)
    train_feats, train_ds = split_features(profile, "train", vision)
    eval_feats, eval_ds = split_features(profile, eval_split, vision)
    eval_captions = captions_for(eval_feats, eval_ds)
    seed_everything(recipe.seed)
    model = Stage1Model.from_text_encoder(load_text_encoder(profile), vision.hidden_size, vision.num_patches,
                                          recipe.model)

    def eval_fn(m):
        r = retrieval(m, eval_feats.features, eval_captions, ks=(5,))
        return {f"{eval_split}_i2t_r5": r["image->text"][5], f"{eval_split}_t2i_r5": r["text->image"][5],
                **(metrics(m) if metrics else {})}

    # where other photos' captions can fit a photo (the shapes world), they count as matches, not negatives
    batches = caption_batches(train_feats.features, captions_for(train_feats, train_ds), train_feats.image_ids,
                              recipe.batch_size, fits=getattr(train_ds, "fits", None))
    lr_scales = {} if recipe.new_lr_scale == 1 else dict.fromkeys(model.new_parameter_prefixes(), recipe.new_lr_scale)
    lr_scales.update({"logit_scale": recipe.temperature_lr_scale, **recipe.lr_scales})
    config = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps, seed=recipe.seed,
                         eval_every=recipe.eval_every, desc="stage 1", lr_scales=lr_scales)
    result = train(model, batches, lambda m, b: m(**b), config, eval_fn=eval_fn)
    return model, result


def load_or_train_stage1(profile: Profile | str | None = None, recipe: Stage1Recipe | None = None,
                         retrain: bool = False, metrics=None) -> tuple[Stage1Model, TrainResult]:
    """The stage-1 model of this recipe: loaded if it was trained before, else trained and saved."""
    profile, recipe = as_profile(profile), recipe or Stage1Recipe()
    return load_or_train(stage1_dir(profile, recipe), recipe,
                         lambda path: Stage1Model.from_pretrained(path).to(profile.device),
                         lambda: train_stage1(profile, recipe, metrics=metrics), retrain)


# ----------------------------------------------------------------------------- stage 2
def stage2_connector(profile: Profile, recipe: Stage2Recipe, vision=None) -> tuple[QFormerConnector, int]:
    """(QFormerConnector, its width): the stage-1 Q-Former of ``recipe.stage1``, or a fresh one."""
    if recipe.stage1 is not None:
        stage1, _ = load_or_train_stage1(profile, recipe.stage1)
    else:
        vision = vision or load_vision_encoder(profile)
        seed_everything(recipe.seed)
        stage1 = Stage1Model.from_text_encoder(load_text_encoder(profile), vision.hidden_size, vision.num_patches,
                                               Stage1Config(num_query_tokens=recipe.num_query_tokens,
                                                            dropout=recipe.qformer_dropout,
                                                            image_positions=recipe.image_positions))
    connector = QFormerConnector(stage1.qformer, stage1.image_adapter).to(profile.device)
    for p in connector.parameters():
        p.requires_grad_(not recipe.freeze_qformer)
    return connector, stage1.qformer.config.hidden_size


def train_stage2(profile: Profile | str | None = None, recipe: Stage2Recipe | None = None, eval_split: str = "dev",
                 llm=None, metrics=None) -> tuple[SoftPromptCaptioner, TrainResult]:
    """Stage 2 on cached image features of the train split; the dev caption loss at the end (and every
    ``recipe.eval_every`` steps)."""
    profile = as_profile(profile)
    recipe = recipe or Stage2Recipe()
    vision = load_vision_encoder(profile)
    connector, width = stage2_connector(profile, recipe, vision)
    llm = llm or load_llm(profile)
    seed_everything(recipe.seed)       # the same projection init with or without stage 1
    captioner = SoftPromptCaptioner(connector, width, llm, bridge_config(recipe))
    result = fit_captioner(captioner, profile, recipe, eval_split, vision, metrics=metrics)
    return captioner.eval(), result


def fit_captioner(captioner, profile: Profile, recipe: Stage2Recipe, eval_split: str | None = "dev", vision=None,
                  desc: str = "stage 2", metrics=None) -> TrainResult:
    """Train a ``SoftPromptCaptioner`` (whatever of it requires grad) with the recipe's optimisation settings,
    on cached image features of the train split; the ``eval_split`` caption loss (first caption of each photo)
    at the end (and every ``recipe.eval_every`` steps; None: never). Shared by stage 2 and the LoRA captioner.
    ``metrics(model) -> {name: value}`` adds measures of the caller's to each evaluation (e.g. caption accuracy
    on the shapes world; a frozen connector is then swapped for its precomputed outputs)."""
    vision = vision or load_vision_encoder(profile)
    train_feats, train_ds = split_features(profile, "train", vision)
    train_x, swap, connector = train_feats.features, nullcontext(), captioner.connector
    frozen = not any(p.requires_grad for p in connector.parameters())
    if frozen:
        # A frozen connector gives each photo the same outputs at every step: compute them once (and keep them:
        # the next model trained on the same frozen connector reads them from disk).
        kind = f"connector-{str(captioner.proj.weight.dtype).removeprefix('torch.')}"   # computed in this dtype
        train_x = cache_frozen_outputs(connector, captioner.connector_outputs, train_x, kind)
        swap = captioner.using_connector(PrecomputedConnector(*train_x.shape[1:]))
    eval_fn = None
    if eval_split is not None:
        eval_feats, eval_ds = split_features(profile, eval_split, vision)
        eval_x = (cache_frozen_outputs(connector, captioner.connector_outputs, eval_feats.features, kind)
                  if frozen else eval_feats.features)
        # The first caption of each photo: a fifth of the cost of all five, and the same ones every evaluation.
        eval_captions = [caps[0] for caps in captions_for(eval_feats, eval_ds)]

        def eval_fn(m):
            scores = {f"{eval_split}_loss": mean_caption_loss(m, eval_x, eval_captions)}
            if metrics:
                with m.using_connector(connector):     # the caller's measures take image features, as after training
                    scores.update(metrics(m))
            return scores

    batches = caption_batches(train_x, captions_for(train_feats, train_ds), train_feats.image_ids, recipe.batch_size,
                              recipe.captions_per_image)
    config = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps, seed=recipe.seed,
                         eval_every=recipe.eval_every, desc=desc,
                         lr_scales={**({"proj.": recipe.proj_lr_scale} if recipe.proj_lr_scale != 1 else {}),
                                    **recipe.lr_scales})
    with swap:
        return train(captioner, batches, lambda m, b: {"loss": m(b["image_embeds"], b["captions"])}, config,
                     eval_fn=eval_fn)


def load_or_train_stage2(profile: Profile | str | None = None, recipe: Stage2Recipe | None = None,
                         retrain: bool = False, llm=None, metrics=None) -> tuple[SoftPromptCaptioner, TrainResult]:
    """The stage-2 captioner of this recipe: loaded if it was trained before, else trained and saved.

    The folder (``stage2_dir``) holds model.safetensors and config.json (every weight but the frozen
    LLM's, see ``SoftPromptCaptioner.save_pretrained``), recipe.json and history.json. ``llm`` reuses an LLM
    already loaded for this profile; ``metrics`` (see ``fit_captioner``) are measured at each evaluation of a
    training run and saved with its history.
    """
    profile, recipe = as_profile(profile), recipe or Stage2Recipe()
    return load_or_train(stage2_dir(profile, recipe), recipe,
                         lambda path: SoftPromptCaptioner.from_pretrained(path, llm or load_llm(profile)).to(
                             profile.device),
                         lambda: train_stage2(profile, recipe, llm=llm, metrics=metrics), retrain)


# ----------------------------------------------------------------------------- the LoRA captioner (notebook 06)
def build_connector(profile: Profile, recipe: CaptionerRecipe, vision):
    """(connector, its output width) for ``recipe.connector``."""
    if recipe.connector == "qformer":
        return stage2_connector(profile, recipe.stage2, vision)
    if recipe.connector == "meanpool":
        return MeanPoolConnector(vision.grid_size, recipe.pooled), vision.hidden_size
    return LinearConnector(vision.num_patches), vision.hidden_size


def train_captioner(profile: Profile | str | None = None, recipe: CaptionerRecipe | None = None, llm=None,
                    eval_split: str | None = "dev") -> tuple[LoRACaptioner, TrainResult]:
    """Train a captioner on cached image features of the train split (stage 2's loop, ``fit_captioner``),
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


def load_or_train_captioner(profile: Profile | str | None = None, recipe: CaptionerRecipe | None = None,
                            retrain: bool = False, llm=None, eval_split: str | None = "dev"
                            ) -> tuple[LoRACaptioner, TrainResult]:
    """The captioner of this recipe: loaded from ``captioner_dir`` if it was trained before, else trained (with
    the ``eval_split`` caption loss at the end; None skips it, e.g. for runs only scored by their captions) and
    saved there."""
    profile, recipe = as_profile(profile), recipe or CaptionerRecipe()
    return load_or_train(captioner_dir(profile, recipe), recipe,
                         lambda path: LoRACaptioner.from_pretrained(path, llm, profile),
                         lambda: train_captioner(profile, recipe, llm, eval_split), retrain)


# ----------------------------------------------------------------------------- question answering (notebook 08)
def question_rows(dataset, seed: int = 0, phrasings: str = "train") -> list[dict]:
    """The shapes ``dataset``'s questions as instruction rows (``instruct.instruction_pairs``), without the caption
    requests: every answer is one or two words."""
    return [r for r in instruction_pairs(dataset.objects, seed=seed, phrasings=phrasings) if r["type"] != "caption"]


def train_vqa(profile: Profile | str | None = None, recipe: VQARecipe | None = None,
              llm=None) -> tuple[SoftPromptVQA, TrainResult]:
    """A ``SoftPromptVQA`` with ``recipe.design``'s connector, trained on the questions of the profile's (shapes) train
    split; ``llm``: the frozen LLM, if already loaded (else the profile's)."""
    profile, recipe = as_profile(profile), recipe or VQARecipe()
    vision = load_vision_encoder(profile)
    feats, dataset = split_features(profile, "train", vision)
    llm = llm or load_llm(profile)
    seed_everything(recipe.seed)
    connector, width = llava_connector(recipe.design, vision.num_patches, vision.hidden_size,
                                       llm.model.config.hidden_size, recipe.image_adapter)
    model = SoftPromptVQA(connector, width, llm)
    config = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps, seed=recipe.seed,
                         desc="VQA")
    batches = instruction_batches(feats.features, question_rows(dataset), recipe.batch_size, recipe.per_image)
    result = train(model, batches, lambda m, b: {"loss": m(b["image_embeds"], b["instructions"], b["answers"])},
                   config)
    return model.eval(), result


def load_or_train_vqa(profile: Profile | str | None = None, recipe: VQARecipe | None = None, llm=None,
                      retrain: bool = False) -> tuple[SoftPromptVQA, TrainResult]:
    """``train_vqa``, trained once per (profile, recipe) and then loaded from the cache."""
    profile, recipe = as_profile(profile), recipe or VQARecipe()
    return load_or_train(vqa_dir(profile, recipe), recipe,
                         lambda path: SoftPromptVQA.from_pretrained(path, llm or load_llm(profile)),
                         lambda: train_vqa(profile, recipe, llm), retrain)
