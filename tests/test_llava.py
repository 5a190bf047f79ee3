"""Tests for vlmcourse.llava: LLaVA's linear and MLP connectors inside the soft-prompt captioner."""
import pytest
import torch

from vlmcourse.backbones import load_llm
from vlmcourse.connectors import LinearConnector, connector_from_config
from vlmcourse.llava import KINDS, MLPConnector, llava_connector, projection_parameters
from vlmcourse.stage2 import SoftPromptCaptioner

N, D, H = 16, 24, 32      # patches, image-encoder width, the tiny LLM's width


@pytest.fixture(scope="module")
def llm():
    return load_llm("tiny")


@pytest.mark.parametrize("kind, expected", [("linear", D * H + H), ("mlp", D * H + H + H * H + H)])
def test_captioner_trains_the_projection_only(llm, kind, expected):
    torch.manual_seed(0)
    connector, size = llava_connector(kind, N, D, llm.hidden_size)
    model = SoftPromptCaptioner(connector, size, llm)
    assert model.num_soft_tokens == N                               # every patch becomes a soft prompt
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == projection_parameters(kind, D, H)
    loss = model(torch.randn(2, N, D), ["a red circle", "two shapes: a blue square and a green triangle"])
    loss.backward()
    assert torch.isfinite(loss) and model.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm_model.parameters())
    if kind == "mlp":
        assert connector.fc.weight.grad.abs().sum() > 0
    assert model.soft_prompts(torch.randn(3, N, D)).shape == (3, N, H)


def test_kinds_save_and_load(llm, tmp_path):
    linear, _ = llava_connector("linear", N, D, H)
    assert type(linear) is LinearConnector
    torch.manual_seed(0)
    mlp, size = llava_connector("mlp", N, D, H)
    assert isinstance(connector_from_config(mlp.to_config()), MLPConnector)
    model = SoftPromptCaptioner(mlp, size, llm)
    model.save_pretrained(tmp_path / "m")
    again = SoftPromptCaptioner.from_pretrained(tmp_path / "m", llm)
    x = torch.randn(2, N, D)
    torch.testing.assert_close(again.soft_prompts(x), model.eval().soft_prompts(x))


def test_one_name_per_connector_and_older_saves_still_load():
    """LLaVA's two projectors are "linear" and "mlp" everywhere: the recipe, llava_connector and the saved type.
    Models saved before the rename carry "patch" and "patch_mlp": the same connectors, still loaded."""
    linear, _ = llava_connector("linear", N, D, H)
    mlp, _ = llava_connector("mlp", N, D, H, image_adapter=True)
    assert [linear.to_config()["type"], mlp.to_config()["type"]] == list(KINDS)
    assert type(connector_from_config({**linear.to_config(), "type": "patch"})) is LinearConnector
    older = connector_from_config({**mlp.to_config(), "type": "patch_mlp"})
    assert isinstance(older, MLPConnector) and older.adapter is not None


def test_errors():
    with pytest.raises(ValueError, match="unknown LLaVA connector 'conv'"):
        llava_connector("conv", N, D, H)
    with pytest.raises(ValueError, match=r"image_embeds must be \(B, 16, 24\), got \(2, 9, 24\)"):
        MLPConnector(N, D, H)(torch.randn(2, 9, D))
