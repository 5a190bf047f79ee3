"""Stage 2 recipe on the tiny profile: trained once, saved (safetensors, no LLM weights), reloaded."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vlmcourse import pipeline, recipes
from vlmcourse.backbones import load_llm
from vlmcourse.stage2 import QFormerConnector
from vlmcourse.pipeline import load_or_train_stage1, load_or_train_stage2
from vlmcourse.recipes import Stage1Recipe, Stage2Recipe, stage2_dir
from vlmcourse.stage1 import Stage1Config
from vlmcourse.utils import cache_dir

STAGE1 = Stage1Recipe(steps=2, batch_size=4, eval_every=0, model=Stage1Config(num_query_tokens=4))
RECIPE = Stage2Recipe(steps=3, batch_size=4, warmup_steps=1, lr=1e-2, stage1=STAGE1, num_query_tokens=4,
                      freeze_qformer=True)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A Flickr8k folder (8 train, 2 dev, 2 test photos) and an empty model cache, shared by this module."""
    root = tmp_path_factory.mktemp("tiny_world")
    data, images = root / "flickr", root / "flickr" / "Images"
    images.mkdir(parents=True)
    names = [f"{2000 + i}_x.jpg" for i in range(12)]
    rng = np.random.default_rng(0)
    with open(data / "Flickr8k.token.txt", "w") as f:
        for i, name in enumerate(names):
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(images / name)
            f.writelines(f"{name}#{k}\ta photo number {i} , caption {k}\n" for k in range(5))
    for split, members in {"train": names[:8], "dev": names[8:10], "test": names[10:]}.items():
        (data / f"Flickr_8k.{split}Images.txt").write_text("\n".join(members) + "\n")
    llm_cache = cache_dir("llm")   # the tokenizer the tiny LLM borrows: converted once, not per test run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMCOURSE_DATA", str(data))
        mp.setenv("VLMCOURSE_CACHE", str(root / "cache"))
        (root / "cache").mkdir()
        (root / "cache" / "llm").symlink_to(llm_cache)
        yield root


def test_stage2_is_trained_once_saved_without_the_llm_and_reloaded(tiny_world, monkeypatch):
    stage1, _ = load_or_train_stage1("tiny", STAGE1)
    model, result = load_or_train_stage2("tiny", RECIPE)
    assert [row["step"] for row in result.history] == [0, 1, 2]
    assert [e["step"] for e in result.evals] == [2] and result.evals[0]["dev_loss"] > 0
    assert isinstance(model.connector, QFormerConnector) and not model.training   # the precomputed stand-in is gone
    # frozen: only the projection learned; the handed-over Q-Former is stage 1's, untouched
    assert not any(p.requires_grad for p in [*model.connector.parameters(), *model.llm_model.parameters()])
    for name, p in stage1.qformer.state_dict().items():
        assert torch.equal(p, model.connector.qformer.state_dict()[name]), name

    path = stage2_dir(recipes.get_profile("tiny"), RECIPE)
    assert {"config.json", "model.safetensors", "recipe.json", "history.json"} <= {p.name for p in path.iterdir()}
    assert not path.with_name(path.name + ".partial").exists()
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert any(n.startswith("proj.") for n in names) and any(n.startswith("connector.qformer.") for n in names)
    assert not any("llm" in n or "lm_head" in n and "qformer" not in n for n in names)   # no LLM weights
    assert json.loads((path / "recipe.json").read_text())["stage1"]["steps"] == 2

    monkeypatch.setattr(pipeline, "train_stage2", lambda *a, **k: pytest.fail("retrained"))
    again, history = load_or_train_stage2("tiny", RECIPE)
    assert history.history == result.history and history.evals == result.evals
    x = torch.randn(2, 16, 32)
    assert torch.allclose(model.soft_prompts(x), again.soft_prompts(x), atol=1e-6)
    assert model.generate(x, max_new_tokens=3) == again.generate(x, max_new_tokens=3)


def test_fine_tuned_qformer_moves_and_a_fresh_one_starts_from_the_same_projection(tiny_world):
    stage1, _ = load_or_train_stage1("tiny", STAGE1)
    tuned, result = pipeline.train_stage2("tiny", replace(RECIPE, freeze_qformer=False, steps=2))
    assert all(p.requires_grad for p in tuned.connector.parameters()) and len(result.history) == 2
    assert any(not torch.equal(p, tuned.connector.qformer.state_dict()[n])
               for n, p in stage1.qformer.state_dict().items())

    fresh = replace(RECIPE, stage1=None, steps=1, lr=0.0)
    assert stage2_dir(recipes.get_profile("tiny"), fresh) != stage2_dir(recipes.get_profile("tiny"), RECIPE)
    llm = load_llm("tiny")
    model, _ = pipeline.train_stage2("tiny", fresh, llm=llm)
    handed, _ = pipeline.train_stage2("tiny", replace(RECIPE, steps=1, lr=0.0), llm=llm)
    assert model.num_soft_tokens == handed.num_soft_tokens == 4
    assert torch.equal(model.proj.weight, handed.proj.weight)     # same seed: only the Q-Former differs
    assert not torch.equal(model.connector.qformer.query_tokens, handed.connector.qformer.query_tokens)


def test_recipe_key_follows_the_stage1_recipe():
    a, b = Stage2Recipe(), Stage2Recipe(stage1=replace(Stage1Recipe(), seed=1))
    assert a.key() != b.key() and a.key() == Stage2Recipe().key()
    assert Stage2Recipe(stage1=None).key() != a.key()


def test_a_fresh_qformer_takes_the_recipes_dropout_and_its_key_follows(tiny_world):
    for dropout, expected in ((0.0, 0.0), (None, 0.1)):     # None keeps BERT's own
        recipe = replace(RECIPE, stage1=None, qformer_dropout=dropout)
        connector, _ = pipeline.stage2_connector(recipes.get_profile("tiny"), recipe)
        config = connector.qformer.config
        assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == expected
    assert replace(RECIPE, stage1=None, qformer_dropout=None).key() != replace(RECIPE, stage1=None).key()


def test_the_projection_learns_at_its_own_multiple_of_the_learning_rate(tiny_world):
    """proj_lr_scale reaches the optimiser: at 0 the new projection keeps its initial weights while the
    Q-Former around it trains."""
    from vlmcourse.stage2 import SoftPromptCaptioner

    profile = recipes.get_profile("tiny")
    r = replace(RECIPE, stage1=None, freeze_qformer=False, proj_lr_scale=0.0)
    connector, width = pipeline.stage2_connector(profile, r)
    model = SoftPromptCaptioner(connector, width, load_llm(profile), recipes.bridge_config(r))
    proj = model.proj.weight.detach().clone()
    qformer = {n: p.detach().clone() for n, p in model.connector.named_parameters()}
    pipeline.fit_captioner(model, profile, r, eval_split=None)
    assert torch.equal(model.proj.weight, proj)
    assert any(not torch.equal(p, qformer[n]) for n, p in model.connector.named_parameters())


def test_metrics_of_a_frozen_qformer_run_see_image_features(tiny_world):
    """Training a frozen Q-Former swaps it for its precomputed outputs; a caller's ``metrics`` still gets the real
    connector, so it can caption raw image features (what benchmarks/shapes_world.py's dev accuracy does)."""
    dev_x = torch.randn(2, 16, 32)
    seen = []

    def metrics(m):
        seen.append(type(m.connector).__name__)
        return {"captions": len(m.generate(dev_x, max_new_tokens=2))}

    model, result = pipeline.train_stage2("tiny", replace(RECIPE, eval_every=2), metrics=metrics)
    assert seen == ["QFormerConnector", "QFormerConnector"]                      # every evaluation, real connector
    assert [e["captions"] for e in result.evals] == [2, 2]
    assert isinstance(model.connector, QFormerConnector)
