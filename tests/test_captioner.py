"""The LoRA captioner (lora.py) on the tiny profile: LoRA isolation, save/load, baselines, diagnostics, caption()."""
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import vlmcourse
from vlmcourse import evaluate as E
from vlmcourse import lora as C
from vlmcourse import pipeline
from vlmcourse.backbones import load_llm, load_vision_encoder
from vlmcourse.stage2 import IGNORE_INDEX, BridgeConfig, MeanPoolConnector, SoftPromptCaptioner
from vlmcourse.lora import LoRACaptioner
from vlmcourse.data import ImageLoadError
from vlmcourse.metrics import caption_metrics
from vlmcourse.recipes import CaptionerRecipe, LoraSettings, Stage1Recipe, Stage2Recipe, captioner_dir
from vlmcourse.stage1 import Stage1Config
from vlmcourse.train import TrainConfig, train
from vlmcourse.utils import cache_dir

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
TEMPLATES = ["a {} square", "a plain {} photo", "the colour {}", "a {} picture", "a photo that is all {}"]
STAGE1 = Stage1Recipe(steps=2, batch_size=4, eval_every=0, model=Stage1Config(num_query_tokens=4))
RECIPE = CaptionerRecipe(lora=LoraSettings(r=4, lora_alpha=8),
                         stage2=Stage2Recipe(steps=3, batch_size=4, warmup_steps=1, lr=1e-2, stage1=STAGE1))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Flickr8k-style folder of single-colour photos captioned by their colour (8 train, 2 dev, 2 test),
    with $VLMCOURSE_DATA and an empty $VLMCOURSE_CACHE pointing at it for the whole module."""
    root = tmp_path_factory.mktemp("colours")
    images = root / "data" / "Images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    order = ["red", "green", "blue", "yellow"] * 2 + ["green", "yellow", "red", "blue"]
    names, lines = [], []
    for i, colour in enumerate(order):
        name = f"{4000 + i}_{colour}.jpg"
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 8, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / name)
        names.append(name)
        lines += [f"{name}#{k}\t{t.format(colour)}\n" for k, t in enumerate(TEMPLATES)]
    (root / "data" / "Flickr8k.token.txt").write_text("".join(lines))
    for split, members in {"train": names[:8], "dev": names[8:10], "test": names[10:]}.items():
        (root / "data" / f"Flickr_8k.{split}Images.txt").write_text("\n".join(members))
    llm_cache = cache_dir("llm")         # the tokenizer the tiny LLM borrows, converted once for every test run
    (root / "cache").mkdir()
    (root / "cache" / "llm").symlink_to(llm_cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMCOURSE_DATA", str(root / "data"))
        mp.setenv("VLMCOURSE_CACHE", str(root / "cache"))
        yield {"root": root, "data": root / "data", "images": images, "test": names[10:], "train": names[:8]}


@pytest.fixture(scope="module")
def llm():
    return load_llm("tiny")


@pytest.fixture(scope="module")
def trained(world, llm):
    """The RECIPE captioner (stage-1 Q-Former + LoRA), trained for 3 steps and saved."""
    model, result = pipeline.train_captioner("tiny", RECIPE, llm=llm)
    model.save_pretrained(world["root"] / "model")
    return model, result, world["root"] / "model"


# ----------------------------------------------------------------------------- the three label layouts
@pytest.mark.parametrize("padding", ["right", "left_unmasked", "mask_by_pad_id"])
def test_label_layouts_of_the_recipe_and_its_two_traps(llm, padding):
    torch.manual_seed(0)
    model = SoftPromptCaptioner(MeanPoolConnector((4, 4), 2), 32, llm, BridgeConfig(padding=padding))
    eos, pad = model.eos_id, model.pad_id
    assert pad == eos                                             # SmolLM2's tokenizer: the premise of both traps
    short, long = "a dog", "two dogs run on the grass"
    a = llm.tokenizer(" " + short, add_special_tokens=False).input_ids + [eos]
    b = llm.tokenizer(" " + long, add_special_tokens=False).input_ids + [eos]
    k, prefix = len(b) - len(a), 4 + len(model.prompt_ids)        # k pads on the short caption
    assert k >= 2
    ignore = [IGNORE_INDEX] * prefix
    expected = {
        "right": ([ignore + a + [IGNORE_INDEX] * k, ignore + b],
                  [[1] * (prefix + len(a)) + [0] * k, [1] * (prefix + len(b))]),
        "left_unmasked": ([ignore + [pad] * k + a, ignore + b],   # EOS right after the prompt: stop at once
                          [[1] * (prefix + len(b))] * 2),
        "mask_by_pad_id": ([ignore + a[:-1] + [IGNORE_INDEX] * (k + 1), ignore + b[:-1] + [IGNORE_INDEX]],
                           [[1] * (prefix + len(a)) + [0] * k, [1] * (prefix + len(b))]),   # no EOS: never stop
    }[padding]
    embeds, attention_mask, labels = model.build_inputs(torch.randn(2, 16, 32), [short, long])
    assert torch.equal(labels.cpu(), torch.tensor(expected[0]))
    assert torch.equal(attention_mask.cpu(), torch.tensor(expected[1]))
    start = prefix + (k if padding == "left_unmasked" else 0)     # where the short caption's tokens sit
    caption = llm.model.get_input_embeddings()(torch.tensor(a))
    assert torch.equal(embeds[0, start:start + len(a)], caption)


def test_unknown_padding_is_refused():
    with pytest.raises(ValueError, match="unknown padding 'left'"):
        BridgeConfig(padding="left")
    with pytest.raises(ValueError, match="unknown connector 'perceiver'"):
        CaptionerRecipe(connector="perceiver")


def test_a_captioner_never_trains_the_shared_llm_weights(llm):
    with pytest.raises(ValueError, match="adapt it with LoRA"):
        LoRACaptioner(MeanPoolConnector((4, 4), 2), 32, llm, freeze_llm=False)


# ----------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_bridge_and_leaves_the_llm_handed_in_untouched(llm):
    weights = {n: p.detach().clone() for n, p in llm.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in llm.model.named_parameters()}
    probe = torch.tensor([[1, 2, 3, 4]])
    logits = llm.model(probe).logits.detach()
    torch.manual_seed(0)
    lora = LoraSettings(r=4, lora_alpha=8)
    model = LoRACaptioner(MeanPoolConnector((4, 4), 2), 32, llm, lora=lora)

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert names == adapters | {"proj.weight", "proj.bias"}
    assert len(adapters) == 2 * llm.model.config.num_hidden_layers * len(lora.target_modules)
    shared = {p.data_ptr() for p in llm.model.parameters()}       # the base weights are shared, not copied
    assert all(p.data_ptr() in shared for n, p in model.llm_model.named_parameters() if "lora_" not in n)

    x, captions = torch.randn(2, 16, 32), ["a dog runs", "a red car"]
    train(model, lambda step, g: (x, captions), lambda m, b: {"loss": m(*b)},
          TrainConfig(steps=3, lr=1e-2, warmup_steps=1, bf16=False))
    trained_b = [p for n, p in model.llm_model.named_parameters() if ".lora_B." in n]
    assert all(p.abs().sum() > 0 for p in trained_b)              # B starts at 0: it has learned
    state = llm.model.state_dict()
    assert all(torch.equal(state[n], w) for n, w in weights.items())   # base weights unchanged
    assert {n: p.requires_grad for n, p in llm.model.named_parameters()} == flags
    assert not any("lora" in n for n, _ in llm.model.named_modules()) and not llm.model.training
    assert torch.equal(llm.model(probe).logits, logits)


def test_captioners_with_other_connectors_share_one_llm(world, llm):
    vision = load_vision_encoder("tiny")
    sizes = {}
    for connector in ("meanpool", "linear"):
        recipe = CaptionerRecipe(connector=connector, lora=None, pooled=2, stage2=Stage2Recipe(steps=1, batch_size=4))
        model, result = pipeline.train_captioner("tiny", recipe, llm=llm)
        assert len(result.history) == 1 and model.lora is None
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {"proj.weight", "proj.bias"}
        sizes[connector] = model.num_soft_tokens
    assert sizes == {"meanpool": 2 * 2, "linear": vision.num_patches}
    assert not any("lora" in n for n, _ in llm.model.named_modules())


# ----------------------------------------------------------------------------- training, saving, loading
def test_train_captioner_saves_bridge_and_lora_but_no_llm_weights(trained, llm):
    model, result, path = trained
    assert [row["step"] for row in result.history] == list(range(RECIPE.stage2.steps))
    assert result.evals[-1]["dev_loss"] > 0 and not model.training
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", C.ADAPTER_FILE}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        bridge = set(f.keys())
    with safe_open(str(path / C.ADAPTER_FILE), framework="pt") as f:
        adapter = set(f.keys())
    assert "proj.weight" in bridge and all(n.startswith(("proj.", "connector.")) for n in bridge)
    assert adapter == set(model.lora_state_dict()) and all(".lora_A." in n or ".lora_B." in n for n in adapter)
    assert len(adapter) == 2 * llm.model.config.num_hidden_layers * len(RECIPE.lora.target_modules)
    config = json.loads((path / "config.json").read_text())
    assert config["profile"] == "tiny" and config["vision"] == load_vision_encoder("tiny").name
    assert config["llm"]["name"] == llm.name and config["lora"]["r"] == RECIPE.lora.r
    assert CaptionerRecipe.from_dict(config["recipe"]).key() == RECIPE.key()


def test_training_without_the_dev_evaluation_trains_the_same_weights(trained, llm):
    model, result, _ = trained
    quiet, quiet_result = pipeline.train_captioner("tiny", RECIPE, llm=llm, eval_split=None)
    assert quiet_result.evals == [] and len(quiet_result.history) == len(result.history)
    assert [r["loss"] for r in quiet_result.history] == [r["loss"] for r in result.history]
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(quiet.first_token_probs(x), model.first_token_probs(x))


def test_a_captioner_on_top_of_a_stage2_model_starts_from_its_qformer_and_projection(world, llm):
    from vlmcourse.pipeline import load_or_train_stage2

    base_recipe = Stage2Recipe(steps=2, batch_size=4, warmup_steps=1, lr=1e-2, stage1=STAGE1)
    recipe = replace(RECIPE, base=base_recipe, stage2=replace(RECIPE.stage2, lr=0.0, freeze_qformer=True))
    base, _ = load_or_train_stage2("tiny", base_recipe, llm=llm)
    model, _ = pipeline.train_captioner("tiny", recipe, llm=llm, eval_split=None)      # lr 0: nothing moves
    assert torch.equal(model.proj.weight, base.proj.weight)
    assert torch.equal(model.connector.qformer.query_tokens, base.connector.qformer.query_tokens)
    assert recipe.key() != replace(recipe, base=None).key()
    assert CaptionerRecipe.from_dict(asdict(recipe)).key() == recipe.key()
    # a config saved before Stage2Recipe.proj_lr_scale existed was trained with the projection at 1x
    old = asdict(recipe)
    for stage2 in (old["stage2"], old["base"]):
        del stage2["proj_lr_scale"]
    assert CaptionerRecipe.from_dict(old).base.proj_lr_scale == 1.0
    with pytest.raises(ValueError, match="Q-Former connector"):
        CaptionerRecipe(connector="meanpool", base=base_recipe)


def test_save_then_load_gives_the_same_model_and_the_lora_weights_matter(trained, llm):
    model, _, path = trained
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    again = LoRACaptioner.from_pretrained(path, llm=llm)
    assert again.recipe.key() == RECIPE.key() and again.lora == RECIPE.lora and not again.training
    assert torch.equal(again.first_token_probs(x), model.first_token_probs(x))
    assert again.generate(x, max_new_tokens=5) == model.generate(x, max_new_tokens=5)
    with torch.no_grad():
        for n, p in again.llm_model.named_parameters():
            if ".lora_B." in n:
                p.add_(0.5)
    assert not torch.allclose(again.first_token_probs(x), model.first_token_probs(x))
    restored = LoRACaptioner.from_pretrained(path, profile="tiny")    # the profile's own LLM, loaded fresh
    assert torch.allclose(restored.first_token_probs(x), model.first_token_probs(x), atol=1e-6)


def test_loading_errors_are_clear(trained, llm, tmp_path):
    _, _, path = trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoRACaptioner.from_pretrained(tmp_path / "nothing", llm=llm)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        LoRACaptioner.from_pretrained(tmp_path / "empty", llm=llm)
    other = load_llm("tiny")
    other.name = "another-llm"
    with pytest.raises(ValueError, match="trained for the LLM 'tiny-llama'"):
        LoRACaptioner.from_pretrained(path, llm=other)


def test_load_or_train_captioner_trains_once(world, llm, monkeypatch):
    recipe = CaptionerRecipe(connector="meanpool", pooled=2, lora=LoraSettings(r=2, lora_alpha=4),
                             stage2=Stage2Recipe(steps=2, batch_size=4))
    model, result = pipeline.load_or_train_captioner("tiny", recipe, llm=llm)
    path = captioner_dir(vlmcourse.get_profile("tiny"), recipe)
    assert (path / "history.json").is_file() and not path.with_name(path.name + ".partial").exists()
    monkeypatch.setattr(pipeline, "train_captioner", lambda *a, **k: pytest.fail("retrained"))
    again, history = pipeline.load_or_train_captioner("tiny", recipe, llm=llm)
    assert history.history == result.history
    x = torch.randn(2, 16, 32)
    assert torch.equal(again.first_token_probs(x), model.first_token_probs(x))


# ----------------------------------------------------------------------------- baselines
def test_nearest_neighbour_uses_the_cosine_of_mean_pooled_patches():
    e0, e1, e2 = torch.eye(3)
    train_features = torch.stack([torch.stack([0.1 * e0] * 2),           # photo 0: small, near the origin
                                  torch.stack([20 * e1, 0 * e1]),        # photo 1: mean 10 e1
                                  torch.stack([5 * e2, 5 * e2])])
    test_features = torch.stack([torch.stack([3 * e1 + 5 * e0, 3 * e1 - 5 * e0])])   # mean 3 e1
    pooled = test_features.mean(1)
    assert (train_features.mean(1) - pooled).norm(dim=1).argmin() == 0   # Euclid would pick photo 0
    captions = [[f"photo {k} caption {j}" for j in range(5)] for k in range(3)]
    picked = E.nearest_neighbour_captions(train_features, captions, test_features)
    assert len(picked) == 1 and picked[0] in captions[1]
    with pytest.raises(ValueError, match="3 train feature rows but 2 caption lists"):
        E.nearest_neighbour_captions(train_features, captions[:2], test_features)


def test_consensus_caption_is_the_one_the_others_agree_with():
    dog = ["a cat sleeps on a sofa", "a dog runs on the grass", "a brown dog runs on the grass",
           "a dog running on grass", "the dog runs across the green grass"]
    car = ["a red car on a road", "a red car parked", "a car on the street", "the red car", "a blue bicycle"]
    picked = E.consensus_captions([dog, car])
    assert picked[0] in dog[1:] and picked[1] in car[:4]          # never the outlier


def test_constant_caption_is_the_train_caption_that_scores_best_on_every_photo():
    dogs = [["a dog runs on the grass", "a brown dog runs on the grass", "a dog is running on grass",
             "the dog runs outside", "a happy dog runs on the lawn"]] * 6
    cats = [["a cat sleeps on a sofa", "a grey cat is sleeping", "the cat naps on the bed", "a cat on a bed",
             "a sleepy cat on a sofa"]] * 2
    train_captions = dogs + cats
    chosen = E.constant_caption(train_captions)
    assert "dog" in chosen and E.constant_caption(train_captions) == chosen   # the majority; deterministic
    same_length = {c for caps in train_captions for c in caps if len(c.split()) == len(chosen.split())}
    assert chosen in same_length

    def score(c):
        return caption_metrics([c] * len(train_captions), train_captions)["CIDEr-D"]

    assert all(score(chosen) >= score(c) for c in same_length)


# ----------------------------------------------------------------------------- diagnostics and evaluation
def test_blank_image_and_swapped_soft_prompts(trained):
    model = trained[0]
    vision = load_vision_encoder("tiny")
    blank = E.blank_image_features(vision)
    gray = vision(vision.preprocess(Image.new("RGB", (vision.image_size,) * 2, (128, 128, 128)))).last_hidden_state
    assert blank.shape == (1, vision.num_patches, vision.hidden_size)
    assert torch.allclose(blank, gray, atol=1e-2 * gray.abs().max())   # float16 rounding only
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(2))
    own = model.generate(x, max_new_tokens=4)
    swapped = E.swapped_image_captions(model, x, max_new_tokens=4)
    assert swapped["captions"] == own[-1:] + own[:-1]             # photo i speaks with photo i-1's soft prompts
    assert swapped["changed"] == sum(a != b for a, b in zip(own, swapped["captions"])) / 3


def test_evaluate_captioner_reports_model_baselines_and_diagnostics(trained, world):
    _, _, path = trained
    report = E.evaluate_captioner(path, split="test")
    json.dumps(report)                                            # plain JSON values
    assert {"bleu4", "cider", "distinct", "empty", "captions", "p_eos_first", "changed_when_swapped"} <= set(report)
    assert set(report["blank_image"]) == {"bleu4", "cider", "caption"}
    assert set(report["nearest_neighbour"]) == {"bleu4", "cider"}
    assert set(report["constant"]) == {"bleu4", "cider", "caption"}
    predictions = report["predictions"]
    assert [p["image_id"] for p in predictions] == world["test"] and report["captions"] == len(world["test"])
    references = [[t.format(n.split("_")[1][:-4]) for t in TEMPLATES] for n in world["test"]]
    assert report["cider"] == caption_metrics([p["caption"] for p in predictions], references)["CIDEr-D"]
    assert any(report["constant"]["caption"] in [t.format(c) for t in TEMPLATES] for c in COLOURS)
    # each test colour is also a train colour: the nearest train photo has the right caption
    assert report["nearest_neighbour"]["cider"] > report["constant"]["cider"]
    assert 0 <= report["p_eos_first"] <= 1 and 0 <= report["empty"] <= report["captions"]


def test_caption_one_call_api(trained, world):
    _, _, path = trained
    files = [world["images"] / n for n in world["test"]]
    expected = [p["caption"] for p in E.evaluate_captioner(path, split="test")["predictions"]]
    assert vlmcourse.caption([str(f) for f in files], path) == expected
    odd = [Image.open(files[0]).convert("L"), Image.open(files[1]).convert("RGBA")]
    captions = vlmcourse.caption(odd, path)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert vlmcourse.caption(files[0], path) == expected[:1]
    bad = world["root"] / "not_a_photo.jpg"
    bad.write_text("text")
    with pytest.raises(ImageLoadError, match="not_a_photo.jpg"):
        vlmcourse.caption([files[0], bad], path)


def test_importing_the_package_does_not_load_the_captioner():
    code = ("import sys, vlmcourse; assert 'vlmcourse.lora' not in sys.modules and 'peft' not in sys.modules; "
            "print(vlmcourse.caption.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vlmcourse.lora"


def test_ablation_chart_keeps_the_human_baseline_off_the_scale():
    """Notebook 06's chart: a baseline far above every model is named in a note, not drawn as the axis."""
    import matplotlib.pyplot as plt

    from vlmcourse.plots import plot_caption_ablation

    rows = [{"connector": c, "LoRA": lora, "CIDEr-D": v, "CIDEr-D, blank photo": v / 2}
            for c, v0 in (("Q-Former", 0.1), ("mean-pool", 0.07)) for lora, v in (("no", v0 / 20), ("yes", v0))]
    baselines = {"human": {"CIDEr-D": 0.68}, "nearest neighbour": {"CIDEr-D": 0.25}, "constant": {"CIDEr-D": 0.11}}
    ax = plot_caption_ablation(rows, baselines)
    top = ax.get_ylim()[1]
    assert 0.25 < top < 0.68
    texts = [t.get_text() for t in ax.texts]
    assert any("human: 0.680" in t and "above the scale" in t for t in texts), texts
    assert any(t.startswith("nearest neighbour") for t in texts) and len(ax.lines) == 2   # two reference lines
    plt.close(ax.figure)


def test_ablation_chart_draws_each_seed_on_its_bar():
    """A row that is a mean over seeds carries its seeds' scores: one dot each, on its bar, inside the scale."""
    import matplotlib.pyplot as plt

    from vlmcourse.plots import plot_caption_ablation

    rows = [{"connector": "Q-Former", "LoRA": "no", "CIDEr-D": 0.004, "CIDEr-D, blank photo": 0.002,
             "CIDEr-D, per seed": [0.002, 0.006]},
            {"connector": "Q-Former", "LoRA": "yes", "CIDEr-D": 0.05, "CIDEr-D, blank photo": 0.05,
             "CIDEr-D, per seed": [0.028, 0.072]}]
    ax = plot_caption_ablation(rows, {"constant": {"CIDEr-D": 0.11}})
    dots = torch.cat([torch.tensor(c.get_offsets()) for c in ax.collections
                      if c.get_label().lstrip("_").startswith("each seed")])
    assert sorted(dots[:, 1].tolist()) == pytest.approx([0.002, 0.006, 0.028, 0.072])
    bars = {round(p.get_x() + p.get_width() / 2, 3) for p in ax.patches}
    assert {round(x, 3) for x in dots[:, 0].tolist()} <= bars and len(bars) == 2    # each dot on its own bar
    assert ax.get_ylim()[1] > 0.11
    plt.close(ax.figure)


def test_ablation_recipe_is_a_fresh_projection_row_with_its_own_seed():
    from vlmcourse.recipes import ABLATION_CONNECTORS, NOTEBOOK_STAGE2, ablation_recipe

    row = ablation_recipe("linear", lora=True, steps=40, seed=1)
    assert row.connector == "linear" and row.lora == LoraSettings() and row.base is None
    assert row.stage2 == replace(NOTEBOOK_STAGE2, steps=40, seed=1)
    assert row.stage2.stage1 == NOTEBOOK_STAGE2.stage1          # the seed is stage 2's: stage 1 stays notebook 04's
    assert ablation_recipe("meanpool", lora=False).lora is None and len(ABLATION_CONNECTORS) == 3
    with pytest.raises(ValueError, match="unknown connector"):
        ablation_recipe("resampler", lora=True)
