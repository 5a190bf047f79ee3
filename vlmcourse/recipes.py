"""The course's training recipes, in one place: what each stage trains, and the folder its model is cached in.

A recipe is a small dataclass; its ``key()`` (a hash of every setting) names the folder under
``$VLMCOURSE_CACHE/models`` where pipeline.py saves the model it trained, so a later notebook (or a re-run) finds
it, and a changed recipe trains a new one. ``save_trained`` writes such a folder. No training code lives here.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from .distributed import is_main_process
from .profiles import Profile, as_profile, get_profile
from .stage1 import Stage1Config
from .stage2 import BridgeConfig
from .train import TrainResult
from .utils import atomic_dir, cache_dir


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
    # The temperature is learned as logit_scale = log(1/τ) (CLIP's convention, losses.py). Adam moves a parameter by
    # about lr a step, so log(1/τ) moves by lr and τ by lr·τ: at lr x 1/0.07, τ moves as fast near its start as
    # BLIP-2's, which stores τ itself (without it, τ hardly leaves 0.07 in a course run: issue 18's measurements in
    # docs/recipes.md). A name prefix in lr_scales wins over it.
    temperature_lr_scale: float = 1 / 0.07


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


def profile_tag(profile: Profile) -> str:
    """The profile as cached model folders name it: models trained on the shapes world (``data="shapes"``) are
    told apart from the same recipe trained on Flickr8k."""
    return f"{profile.name}-{profile.data}" if profile.data == "shapes" else profile.name


def stage1_dir(profile: Profile, recipe: Stage1Recipe) -> Path:
    return cache_dir("models") / f"stage1-{profile_tag(profile)}-{recipe.key()}"


def shapes_profile(profile: Profile | str | None = None) -> Profile:
    """The same models on the shapes world (vlmcourse/shapes.py) instead of Flickr8k."""
    return get_profile(as_profile(profile).name, data="shapes")


# Stage 1 on the shapes world (notebooks 04 and 07; benchmarks/shapes_world.py chose it on the dev split). Its
# captions are short and its scenes few, so 8 queries do; ITM mixes random negatives into the hard ones, and the image
# adapter's position embedding starts at 2-D sin-cos codes (captions name positions) and learns at 10x lr.
SHAPES_STAGE1 = Stage1Recipe(steps=100, eval_every=0, lr_scales={"image_adapter.": 10.0},
                             model=Stage1Config(num_query_tokens=8, itm_batch_size=16, itm_random_negatives=0.5,
                                                image_positions="sincos"))


RECORDED = Path(__file__).parent / "recorded"


def recorded_run(name: str) -> dict:
    """A longer run of a recipe than a notebook can afford on a CPU, measured by a benchmark (its ``command`` is
    inside, with the machine, the date and the seed) and shipped as JSON in ``vlmcourse/recorded/``: what a notebook
    draws, labelled as recorded, when its own budget cannot reach a result (``benchmarks/shapes_world.py
    --save-curve`` writes them)."""
    path = RECORDED / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded run {name!r}: looked for {path}")
    return json.loads(path.read_text())


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


def bridge_config(recipe: Stage2Recipe) -> BridgeConfig:
    """The ``BridgeConfig`` (prompt, caption length, caption cleaning) of a stage-2 recipe."""
    return BridgeConfig(recipe.prompt, recipe.max_caption_tokens, recipe.clean_captions)


def stage2_dir(profile: Profile, recipe: Stage2Recipe) -> Path:
    return cache_dir("models") / f"stage2-{profile_tag(profile)}-{recipe.key()}"


# ----------------------------------------------------------------------------- the LoRA captioner (notebook 06)
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
        (``__main__.CLI_TRAINING_TIME``): LoRA and a fresh projection (``NOTEBOOK_STAGE2``) trained 460 steps of 16 captions
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

# Notebook 06's connector ablation (section 5): each connector with the frozen LLM and with LoRA, every row from a
# fresh projection with NOTEBOOK_STAGE2's settings; the Q-Former rows read notebook 04's stage-1 Q-Former (frozen),
# whatever the row's seed. benchmarks/caption_ablation.py records the rows at two budgets and two seeds.
ABLATION_CONNECTORS = ("qformer", "meanpool", "linear")


def ablation_recipe(connector: str, lora: bool, steps: int = 12, seed: int = 0) -> CaptionerRecipe:
    """One row of notebook 06's ablation: ``connector`` (one of ``ABLATION_CONNECTORS``), LoRA or the frozen LLM,
    ``steps`` of 8 captions from a fresh projection, the stage-2 seed (stage 1 keeps notebook 04's)."""
    if connector not in ABLATION_CONNECTORS:
        raise ValueError(f"unknown connector {connector!r}: choose one of {ABLATION_CONNECTORS}")
    return CaptionerRecipe(connector=connector, lora=LoraSettings() if lora else None,
                           stage2=replace(NOTEBOOK_STAGE2, steps=steps, seed=seed))


@dataclass
class VQARecipe(Recipe):
    """Notebook 08: a connector (``llava.llava_connector``'s kind) trained on the shapes world's questions in front of
    the frozen LLM. ``per_image`` rows of one photo continue its one prefix pass (``SoftPromptVQA``'s grouped loss), so
    a step of 32 rows reads 8 photos' image tokens once each. Chosen on the dev split (docs/recipes.md, section 08):
    8 photos of 4 questions learn more in 50 steps than 4 photos of 8 in 60."""

    design: str = "mlp"
    image_adapter: bool = False    # LayerNorm and positions on the patches first (llava.MLPConnector)
    steps: int = 50
    lr: float = 3e-3
    batch_size: int = 32           # question rows a step
    per_image: int = 4             # of one photo each (0: every row its own photo and prefix)
    warmup_steps: int = 5
    seed: int = 0


NOTEBOOK_VQA = VQARecipe()


def vqa_dir(profile: Profile, recipe: VQARecipe) -> Path:
    return cache_dir("models") / f"vqa-{profile_tag(profile)}-{recipe.key()}"


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def captioner_dir(profile: Profile, recipe: CaptionerRecipe) -> Path:
    return cache_dir("models") / f"captioner-{profile_tag(profile)}-{recipe.key()}"


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
