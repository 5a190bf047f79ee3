import pytest
import torch

from vlmcourse.backbones import load_llm
from vlmcourse.bridge import IGNORE_INDEX, MeanPoolConnector, PatchConnector, SoftPromptCaptioner
from vlmcourse.train import TrainConfig, train


@pytest.fixture(scope="module")
def llm():
    return load_llm("tiny")


def captioner(llm, pooled=2):
    torch.manual_seed(0)
    return SoftPromptCaptioner(MeanPoolConnector((4, 4), pooled), 32, llm)


def test_labels_mask_prefix_and_padding_by_position_and_keep_one_eos(llm):
    model = captioner(llm)
    assert model.tokenizer.pad_token_id == model.eos_id      # the trap: pad and EOS share an id
    captions = ["a dog", "two people walking on a long sandy beach"]
    embeds, attention_mask, labels = model.build_inputs(torch.randn(2, 16, 32), captions)
    prefix = 4 + len(model.prompt_ids)
    assert embeds.shape[:2] == attention_mask.shape == labels.shape
    assert (labels[:, :prefix] == IGNORE_INDEX).all()
    for i, caption in enumerate(captions):
        ids = model.tokenizer(" " + caption, add_special_tokens=False).input_ids
        real = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert real == ids + [model.eos_id]                  # the caption and exactly one EOS
        assert attention_mask[i].sum() == prefix + len(ids) + 1
        assert (labels[i, prefix + len(ids) + 1:] == IGNORE_INDEX).all()   # right padding, by position


def test_only_the_bridge_trains_and_the_image_matters(llm):
    model = captioner(llm)
    x = torch.randn(2, 16, 32)
    loss = model(x, ["a dog", "a cat"])
    loss.backward()
    assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm_model.parameters())
    assert not torch.isclose(loss, model(torch.randn(2, 16, 32), ["a dog", "a cat"]))


def test_stage2_loss_falls_when_overfitting():
    """With the real frozen SmolLM2, training only the projection lowers the caption loss."""
    torch.manual_seed(0)
    model = SoftPromptCaptioner(MeanPoolConnector((4, 4), 2), 32, load_llm("cpu"))
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0))
    captions = ["a black dog runs on the grass", "two children play in the snow",
                "a man rides a red bicycle", "a girl in a pink dress climbs stairs"]
    result = train(model, lambda step, g: (x, captions), lambda m, b: {"loss": m(*b)},
                   TrainConfig(steps=12, lr=1e-2, warmup_steps=2, bf16=False))
    losses = result.column("loss")
    assert losses[-1] < 0.7 * losses[0]


def test_generate_and_first_token_probs(llm):
    model = SoftPromptCaptioner(PatchConnector(16), 32, llm)
    x = torch.randn(3, 16, 32)
    captions = model.generate(x, max_new_tokens=4)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    probs = model.first_token_probs(x)
    assert probs.shape == (3, len(llm.tokenizer)) and torch.allclose(probs.sum(-1), torch.ones(3))


def test_shape_errors(llm):
    model = captioner(llm)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        model.soft_prompts(torch.randn(16, 32))
    with pytest.raises(ValueError, match="expected 16 patch tokens for a 4x4 grid, got 9"):
        model.soft_prompts(torch.randn(1, 9, 32))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        model(torch.randn(2, 16, 32), ["a dog"])
