import pytest
import torch

from vlmcourse import pipeline, recipes
from vlmcourse.pipeline import load_or_train_stage1
from vlmcourse.recipes import Stage1Recipe
from vlmcourse.stage1 import Stage1Config


@pytest.fixture
def tiny_world(flickr_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOURSE_DATA", str(flickr_dir))
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path / "cache"))


def test_stage1_is_trained_once_then_handed_off(tiny_world, monkeypatch):
    recipe = Stage1Recipe(steps=4, batch_size=4, eval_every=2, model=Stage1Config(num_query_tokens=4))
    model, result = load_or_train_stage1("tiny", recipe)
    assert len(result.history) == 4 and [e["step"] for e in result.evals] == [1, 3]
    assert {"itc", "itm", "itg", "loss"} <= set(result.history[0])
    monkeypatch.setattr(pipeline, "train_stage1", lambda *a, **k: pytest.fail("retrained"))
    again, history = load_or_train_stage1("tiny", recipe)
    assert history.history == result.history
    x = torch.randn(2, 16, 32)
    assert torch.allclose(model.eval().image_features(x), again.image_features(x), atol=1e-6)
    other = Stage1Recipe(steps=4, batch_size=4, seed=1, model=Stage1Config(num_query_tokens=4))
    assert recipes.stage1_dir(recipes.get_profile("tiny"), other) != recipes.stage1_dir(recipes.get_profile("tiny"), recipe)
