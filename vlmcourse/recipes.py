"""The course's training recipes, in one place, and the hand-off between notebooks.

Each stage is trained once and saved under ``$VLMCOURSE_CACHE/models``, keyed
by the profile and the recipe: a later notebook (or a re-run) loads it in a
second instead of retraining, and a changed recipe trains a new one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from .backbones import load_text_encoder, load_vision_encoder
from .data import load_flickr8k
from .features import cache_features
from .profiles import Profile, as_profile, get_profile
from .stage1 import Stage1Config, Stage1Model, retrieval
from .train import TrainConfig, TrainResult, caption_batches, train
from .utils import atomic_dir, cache_dir, seed_everything


class Recipe:
    """A training recipe (a dataclass): ``key()`` names the folder its trained model is cached in."""

    def key(self) -> str:
        return recipe_key(self)


@dataclass
class Stage1Recipe(Recipe):
    """Chosen on the dev split (notebook 04): Recall@5 rises steadily with lr 3e-4.
    80 steps, to save the notebooks about 2 minutes: dev R@5 image->text 0.60, text->image 0.73 (float32, no
    dropout; with BERT's dropout it was 0.60 / 0.65 in float32, 0.54 image->text under bf16 autocast). The command
    line's captioner trains 120 steps."""

    steps: int = 80
    lr: float = 3e-4
    batch_size: int = 32
    warmup_steps: int = 10
    seed: int = 0
    eval_every: int = 40
    model: Stage1Config = field(default_factory=lambda: Stage1Config(num_query_tokens=32, itm_batch_size=8))
    # The parameters BERT did not initialise (Stage1Model.new_parameter_prefixes) learn at this multiple of lr.
    new_lr_scale: float = field(default=1.0, metadata={"key": "if_changed"})
    # Further multiples for some of them, by name prefix (they win over new_lr_scale): the image adapter's position
    # embedding starts at zero, and at lr 3e-4 moves about 0.03 in 100 steps, against LayerNormed features of
    # unit scale: without a higher rate the queries cannot tell where a patch is.
    lr_scales: dict = field(default_factory=dict, metadata={"key": "if_changed"})


def recipe_key(recipe) -> str:
    """A short hash of a recipe (a dataclass, nested ones included): the name of its cached model.

    Options added after models were cached carry ``metadata={"key": "if_changed"}`` and count only when they
    differ from their default: a recipe that keeps them has the key it had before they existed."""

    def drop_defaults(obj, settings: dict) -> dict:
        for f in fields(obj):
            value = getattr(obj, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if f.metadata.get("key") == "if_changed" and value == default:
                del settings[f.name]
            elif is_dataclass(value):
                drop_defaults(value, settings[f.name])
        return settings

    settings = drop_defaults(recipe, asdict(recipe))
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def split_features(profile: Profile, split: str, vision=None, root=None):
    """(FeatureSet, dataset) for a split, with the image features cached on disk; ``root``: the data folder
    (default: data.find_data_root's search)."""
    vision = vision or load_vision_encoder(profile)
    dataset = load_flickr8k(split, profile, transform=vision.transform, root=root)
    return cache_features(vision, dataset), dataset


def captions_for(feats, dataset) -> list[list[str]]:
    """The captions of each feature row (rows of unreadable photos are absent from feats)."""
    by_id = dict(zip(dataset.image_ids, dataset.captions))
    return [by_id[i] for i in feats.image_ids]


def train_stage1(profile: Profile | str | None = None, recipe: Stage1Recipe | None = None,
                 eval_split: str = "dev") -> tuple[Stage1Model, TrainResult]:
    """Stage 1 on cached image features of the train split, with Recall@5 on ``eval_split`` as it goes."""
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
        return {f"{eval_split}_i2t_r5": r["image->text"][5], f"{eval_split}_t2i_r5": r["text->image"][5]}

    # where other photos' captions can fit a photo (the shapes world), they count as matches, not negatives
    batches = caption_batches(train_feats.features, captions_for(train_feats, train_ds), train_feats.image_ids,
                              recipe.batch_size, fits=getattr(train_ds, "fits", None))
    lr_scales = {} if recipe.new_lr_scale == 1 else dict.fromkeys(model.new_parameter_prefixes(), recipe.new_lr_scale)
    lr_scales.update(recipe.lr_scales)
    config = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps, seed=recipe.seed,
                         eval_every=recipe.eval_every, desc="stage 1", lr_scales=lr_scales)
    result = train(model, batches, lambda m, b: m(**b), config, eval_fn=eval_fn)
    return model, result


def profile_tag(profile: Profile) -> str:
    """The profile as cached model folders name it: models trained on the shapes world (``data="shapes"``) are
    told apart from the same recipe trained on Flickr8k."""
    return f"{profile.name}-{profile.data}" if profile.data == "shapes" else profile.name


def stage1_dir(profile: Profile, recipe: Stage1Recipe) -> Path:
    return cache_dir("models") / f"stage1-{profile_tag(profile)}-{recipe.key()}"


def load_or_train_stage1(profile: Profile | str | None = None, recipe: Stage1Recipe | None = None,
                         retrain: bool = False) -> tuple[Stage1Model, TrainResult]:
    """The stage-1 model of this recipe: loaded if it was trained before, else trained and saved."""
    profile = as_profile(profile)
    recipe = recipe or Stage1Recipe()
    path = stage1_dir(profile, recipe)
    if (path / "model.safetensors").is_file() and (path / "history.json").is_file() and not retrain:
        history = json.loads((path / "history.json").read_text())
        return Stage1Model.from_pretrained(path).to(profile.device), TrainResult(**history)
    model, result = train_stage1(profile, recipe)
    save_trained(model, recipe, result, path, check=False)   # our cache folder
    return model, result


def shapes_profile(profile: Profile | str | None = None) -> Profile:
    """The same models on the shapes world (vlmcourse/shapes.py) instead of Flickr8k."""
    return get_profile(as_profile(profile).name, data="shapes")


# Stage 1 on the shapes world (notebooks 04 and 07; benchmarks/shapes_world.py chose it on the dev split). Its
# captions are short and its scenes few, so 8 queries do; ITM mixes random negatives into the hard ones, and the image
# adapter's position embedding starts at 2-D sin-cos codes (captions name positions) and learns at 10x lr.
SHAPES_STAGE1 = Stage1Recipe(steps=100, eval_every=0, lr_scales={"image_adapter.": 10.0},
                             model=Stage1Config(num_query_tokens=8, itm_batch_size=16, itm_random_negatives=0.5,
                                                image_positions="sincos"))


# ----------------------------------------------------------------------------- stage 2
# The instruct LLM's own answer turn: it knows a reply follows, and ends it with EOS (<|im_end|>).
CHAT_PROMPT = "A short caption of the photo:<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Stage2Recipe(Recipe):
    """Stage 2 (notebook 05): the query outputs become soft prompts for a frozen LLM.

    As in BLIP-2, the Q-Former keeps training with the projection (``freeze_qformer=False``);
    with ``freeze_qformer`` its outputs are computed once per image and only the projection trains.
    ``stage1``: the stage-1 recipe whose Q-Former is handed over, or None for a fresh
    BERT-initialised Q-Former (``num_query_tokens`` queries, ``qformer_dropout``; a stage-1 Q-Former keeps its own).
    Chosen on the dev split (benchmarks/stage2_settings.py; docs/recipes.md, "05", has the tables and costs): the
    chat prompt, lr 3e-4 with the Q-Former trained, 40 steps of 8 captions. The new projection learns at 10x lr
    (``proj_lr_scale``): at 1x it barely moves in 40 steps.
    """

    steps: int = 40
    lr: float = 3e-4
    batch_size: int = 8
    warmup_steps: int = 5
    prompt: str = CHAT_PROMPT
    max_caption_tokens: int = 32
    clean_captions: bool = True     # "A dog runs ." -> "A dog runs." (stage2.clean_caption)
    freeze_qformer: bool = False
    seed: int = 0
    stage1: Stage1Recipe | None = field(default_factory=Stage1Recipe)
    num_query_tokens: int = 32
    qformer_dropout: float | None = 0.0   # as Stage1Config.dropout
    eval_every: int = 0             # dev caption loss every N steps (0: only at the end)
    proj_lr_scale: float = 10.0     # the new projection's learning rate, as a multiple of lr (see the docstring)
    # k > 1: batch_size // k photos, k captions each, each photo's prefix read once by the LLM (stage2.grouped_loss)
    captions_per_image: int = field(default=1, metadata={"key": "if_changed"})
    # parameter-name prefix -> lr multiple, besides the projection's (e.g. {"connector.image_norm.": 10}: a fresh
    # Q-Former's adapter, whose position embedding starts at zero; see Stage1Recipe.lr_scales)
    lr_scales: dict = field(default_factory=dict, metadata={"key": "if_changed"})
    image_positions: str = field(default="zeros", metadata={"key": "if_changed"})   # a fresh Q-Former's adapter


def bridge_config(recipe: Stage2Recipe):
    """The ``BridgeConfig`` (prompt, caption length, caption cleaning) of a stage-2 recipe."""
    from .stage2 import BridgeConfig

    return BridgeConfig(recipe.prompt, recipe.max_caption_tokens, recipe.clean_captions)


def stage2_connector(profile: Profile, recipe: Stage2Recipe, vision=None):
    """(QFormerConnector, its width): the stage-1 Q-Former of ``recipe.stage1``, or a fresh one."""
    from .stage2 import QFormerConnector

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
                 llm=None, metrics=None):
    """Stage 2 on cached image features of the train split; the dev caption loss at the end (and every
    ``recipe.eval_every`` steps). Returns (SoftPromptCaptioner, TrainResult)."""
    from .backbones import load_llm
    from .stage2 import SoftPromptCaptioner

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
    at the end (and every ``recipe.eval_every`` steps; None: never). Shared by stage 2 and the LoRA captioner
    (lora.py). ``metrics(model) -> {name: value}`` adds measures of the caller's to each evaluation (e.g.
    caption accuracy on the shapes world; a frozen connector is then swapped for its precomputed outputs)."""
    from contextlib import nullcontext

    from .evaluate import mean_caption_loss
    from .stage2 import PrecomputedConnector

    vision = vision or load_vision_encoder(profile)
    train_feats, train_ds = split_features(profile, "train", vision)
    train_x, swap, connector = train_feats.features, nullcontext(), captioner.connector
    frozen = not any(p.requires_grad for p in connector.parameters())
    if frozen:
        # A frozen connector gives each photo the same outputs at every step: compute them once.
        train_x = captioner.connector_outputs(train_x)
        swap = captioner.using_connector(PrecomputedConnector(*train_x.shape[1:]))
    eval_fn = None
    if eval_split is not None:
        eval_feats, eval_ds = split_features(profile, eval_split, vision)
        eval_x = captioner.connector_outputs(eval_feats.features) if frozen else eval_feats.features
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


def stage2_dir(profile: Profile, recipe: Stage2Recipe) -> Path:
    return cache_dir("models") / f"stage2-{profile_tag(profile)}-{recipe.key()}"


def load_or_train_stage2(profile: Profile | str | None = None, recipe: Stage2Recipe | None = None,
                         retrain: bool = False, llm=None, metrics=None):
    """The stage-2 captioner of this recipe: loaded if it was trained before, else trained and saved.

    The folder (``stage2_dir``) holds model.safetensors and config.json (every weight but the frozen
    LLM's, see ``SoftPromptCaptioner.save_pretrained``), recipe.json and history.json. Returns
    (SoftPromptCaptioner, TrainResult); ``llm`` reuses an LLM already loaded for this profile; ``metrics`` (see
    ``fit_captioner``) are measured at each evaluation of a training run and saved with its history.
    """
    from .backbones import load_llm
    from .stage2 import SoftPromptCaptioner

    profile = as_profile(profile)
    recipe = recipe or Stage2Recipe()
    path = stage2_dir(profile, recipe)
    if (path / "model.safetensors").is_file() and (path / "history.json").is_file() and not retrain:
        history = json.loads((path / "history.json").read_text())
        model = SoftPromptCaptioner.from_pretrained(path, llm or load_llm(profile))
        return model.to(profile.device), TrainResult(**history)
    model, result = train_stage2(profile, recipe, llm=llm, metrics=metrics)
    save_trained(model, recipe, result, path, check=False)   # our cache folder
    return model, result


SAVED_FORMAT = 1     # config.json["vlmcourse"]["format"] in a folder save_trained wrote


def is_saved_model(path) -> bool:
    """True when ``path`` holds a model ``save_trained`` wrote: its config.json carries the "vlmcourse" marker."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vlmcourse"), dict) and "format" in config["vlmcourse"]


def check_replaceable(path) -> None:
    """FileExistsError (naming ``path``) unless ``save_trained`` may write there: nothing there yet, an empty folder,
    or a model it wrote. Anything else may be the user's files, which a replace would delete."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a model folder: nothing was changed; choose a new or empty folder")
    if path.is_dir() and any(path.iterdir()) and not is_saved_model(path):
        raise FileExistsError(f"{path} is not empty and was not written by vlmcourse (no 'vlmcourse' marker in a "
                              f"config.json; models saved before December 2026 have none either: delete such a "
                              f"folder yourself): nothing was changed; choose a new or empty folder")


def save_trained(model, recipe, result: TrainResult, path: Path, check: bool = True) -> None:
    """``model.save_pretrained`` plus recipe.json and history.json, written to a sibling ``path``.partial-PID folder
    that then takes ``path``'s place by a rename; a model already there (only one save_trained wrote: see
    ``check_replaceable``) is moved aside first and deleted only once the new one is in place, so an interrupted run
    never leaves half a model and never loses the old one. config.json gets the "vlmcourse" marker. ``check=False``
    for the package's own cache folders (``cache_dir("models")``), whose models may predate the marker."""
    from .distributed import is_main_process

    if not is_main_process():      # several processes (accelerate launch) hold the same model: one writes it
        return
    path = Path(path)
    if check:
        check_replaceable(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**config, "vlmcourse": {"format": SAVED_FORMAT}}, indent=2))
        (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
        (tmp / "history.json").write_text(json.dumps(asdict(result)))
