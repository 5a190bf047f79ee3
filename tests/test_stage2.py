import pytest
import torch

from vlmcourse.backbones import load_llm
from vlmcourse.stage2 import IGNORE_INDEX, MeanPoolConnector, LinearConnector, SoftPromptCaptioner
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
    model = SoftPromptCaptioner(LinearConnector(16), 32, llm)
    x = torch.randn(3, 16, 32)
    captions = model.generate(x, max_new_tokens=4)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    probs = model.first_token_probs(x)
    assert probs.shape == (3, len(llm.tokenizer)) and torch.allclose(probs.sum(-1), torch.ones(3))
    first = []      # the same distribution, read off generate's own first step (two batches)
    assert model.generate(x, max_new_tokens=4, batch_size=2, first_step_probs=first) == captions
    assert torch.allclose(torch.cat(first), probs, atol=1e-5)


def test_shape_errors(llm):
    model = captioner(llm)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        model.soft_prompts(torch.randn(16, 32))
    with pytest.raises(ValueError, match="expected 16 patch tokens for a 4x4 grid, got 9"):
        model.soft_prompts(torch.randn(1, 9, 32))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        model(torch.randn(2, 16, 32), ["a dog"])


# ----------------------------------------------------------------------------- added with notebook 05
from vlmcourse.evaluate import evaluate_captions, mean_caption_loss  # noqa: E402
from vlmcourse.stage2 import PrecomputedConnector, QFormerConnector, connector_from_config  # noqa: E402
from vlmcourse.qformer import QFormer, QFormerConfig  # noqa: E402
from vlmcourse.adapter import ImageAdapter  # noqa: E402


def qformer_captioner(llm):
    torch.manual_seed(0)
    config = QFormerConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, num_query_tokens=3, encoder_hidden_size=32)
    return SoftPromptCaptioner(QFormerConnector(QFormer(config), ImageAdapter(16, 32)), 16, llm)


@pytest.mark.parametrize("make", [lambda llm: captioner(llm), lambda llm: SoftPromptCaptioner(LinearConnector(16), 32, llm),
                                  qformer_captioner])
def test_save_and_load_keep_every_weight_but_the_llms(llm, tmp_path, make):
    from safetensors import safe_open

    model = make(llm)
    with torch.no_grad():
        model.proj.weight.add_(0.5)                           # not the init: the weights must really be loaded
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "proj.weight" in names and not any(n.startswith("llm") for n in names)
    again = SoftPromptCaptioner.from_pretrained(tmp_path / "m", llm)
    assert type(again.connector) is type(model.connector) and again.config == model.config
    assert not again.training and not any(p.requires_grad for p in again.llm_model.parameters())
    x = torch.randn(2, 16, 32)
    assert torch.equal(model.eval().soft_prompts(x), again.soft_prompts(x))


def test_loading_onto_another_llm_fails_clearly(llm, tmp_path):
    captioner(llm).save_pretrained(tmp_path / "m")
    other = load_llm("tiny")
    other.name = "another-llm"
    with pytest.raises(ValueError, match="trained for the LLM 'tiny-llama'"):
        SoftPromptCaptioner.from_pretrained(tmp_path / "m", other)
    with pytest.raises(FileNotFoundError, match="no saved captioner"):
        SoftPromptCaptioner.from_pretrained(tmp_path / "nothing", llm)
    with pytest.raises(ValueError, match="unknown connector type"):
        connector_from_config({"type": "perceiver"})


def test_precomputed_connector_outputs_give_the_same_loss_and_frozen_parts_stay_in_eval(llm):
    model = qformer_captioner(llm)
    for p in model.connector.parameters():
        p.requires_grad_(False)
    model.train()
    assert model.proj.training and not model.connector.training and not model.llm_model.training
    x, captions = torch.randn(3, 16, 32), ["a dog", "a red car", "two cats"]
    cached = model.connector_outputs(x, batch_size=2)
    assert cached.shape == (3, 3, 16)
    loss = model(x, captions)
    with model.using_connector(PrecomputedConnector(3, 16)):
        assert torch.allclose(model(cached, captions), loss, atol=1e-6)
        with pytest.raises(ValueError, match="precomputed connector outputs"):
            model(x, captions)
    assert isinstance(model.connector, QFormerConnector)          # restored
    for p in model.connector.parameters():
        p.requires_grad_(True)
    assert model.train().connector.training                      # a trainable connector does train (dropout)


def test_soft_prompts_can_be_zeroed_or_swapped(llm):
    model = captioner(llm).eval()
    x = torch.randn(3, 16, 32)
    soft = model.soft_prompts(x)
    with pytest.raises(ValueError, match="exactly one"):
        model.prefix_embeds(x, soft)
    assert model.generate(x, max_new_tokens=4) == model.generate(soft_prompts=soft, max_new_tokens=4)
    assert model.generate(x, max_new_tokens=4, batch_size=2) == model.generate(x, max_new_tokens=4)
    zeroed = model.generate(soft_prompts=torch.zeros_like(soft), max_new_tokens=4)
    assert len(set(zeroed)) == 1                                  # the same input for every photo
    assert torch.allclose(model.first_token_probs(soft_prompts=soft.roll(1, 0)), model.first_token_probs(x).roll(1, 0),
                          atol=1e-5)


def test_evaluate_captions_and_mean_caption_loss(llm):
    model = captioner(llm).eval()
    x = torch.randn(3, 16, 32)
    refs = [["a dog runs"], ["a red car", "a car"], ["two cats sleep"]]
    report = evaluate_captions(model, refs, x, max_new_tokens=4, batch_size=2)
    assert set(report) == {"captions", "distinct", "empty", "P(EOS) first", "BLEU-4", "CIDEr-D"}
    assert len(report["captions"]) == 3 and 0 <= report["P(EOS) first"] <= 1
    zero = evaluate_captions(model, refs, soft_prompts=torch.zeros(1, 4, 32), max_new_tokens=4)
    assert len(zero["captions"]) == 3 and zero["distinct"] == 1
    with torch.no_grad():                                         # one batch of all 4 pairs: the same mean
        manual = model(x[[0, 1, 1, 2]], ["a dog runs", "a red car", "a car", "two cats sleep"])
    assert mean_caption_loss(model, x, refs, batch_size=64) == pytest.approx(float(manual), rel=1e-5)
    assert mean_caption_loss(model, x, refs, batch_size=3) == pytest.approx(float(manual), rel=1e-5)


def test_clean_captions_and_no_extra_space_after_a_newline_prompt(llm):
    from vlmcourse.stage2 import BridgeConfig, clean_caption

    assert clean_caption("A dog , running on the road .") == "A dog, running on the road."
    assert clean_caption("a man 's hat is red") == "A man's hat is red."
    assert clean_caption("Is it a dog ?") == "Is it a dog?"
    chat = SoftPromptCaptioner(MeanPoolConnector((4, 4), 2), 32, llm,
                               BridgeConfig(prompt="Caption:<|im_end|>\n<|im_start|>assistant\n", clean_captions=True))
    ids = chat.caption_ids(["a dog runs ."])[0].tolist()
    assert ids == llm.tokenizer("A dog runs.", add_special_tokens=False).input_ids + [chat.eos_id]
    assert chat.prompt_ids.tolist().count(chat.eos_id) == 1        # <|im_end|> inside the prompt is an input...
    _, _, labels = chat.build_inputs(torch.randn(1, 16, 32), ["a dog runs ."])
    assert (labels == chat.eos_id).sum() == 1                      # ...never a label: one EOS, the caption's
    plain = captioner(llm)
    assert plain.caption_ids(["a dog runs ."])[0].tolist() == llm.tokenizer(
        " a dog runs .", add_special_tokens=False).input_ids + [plain.eos_id]


# ----------------------------------------------------------------------------- issue 17: one prefix pass per photo
from vlmcourse.stage2 import BridgeConfig  # noqa: E402
from vlmcourse.train import caption_batches  # noqa: E402

GROUPED = [["a dog runs", "a brown dog runs on the grass"], ["a red car"],
           ["two cats sleep", "cats", "two cats sleep on a sofa in the sun"]]


def lora_captioner(llm, qformer=True):
    """A Q-Former (trainable) -> projection -> LLM + LoRA captioner: every kind of trainable weight stage 2 has."""
    from vlmcourse.lora import LoRACaptioner
    from vlmcourse.recipes import LoraSettings

    torch.manual_seed(0)
    config = QFormerConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, num_query_tokens=3, encoder_hidden_size=32,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)   # as the recipes train it
    connector = QFormerConnector(QFormer(config), ImageAdapter(16, 32)) if qformer else MeanPoolConnector((4, 4), 2)
    model = LoRACaptioner(connector, 16 if qformer else 32, llm, BridgeConfig(prompt="A short caption of the photo:"),
                      lora=LoraSettings(r=4, lora_alpha=8))
    with torch.no_grad():       # LoRA's B starts at 0, which would leave A without a gradient to compare
        for name, p in model.llm_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def loss_and_grads(model, x, captions):
    model.zero_grad(set_to_none=True)
    loss = model(x, captions)
    loss.backward()
    # weights the caption never reaches (the Q-Former's text side) keep no gradient
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grouped_equals_ungrouped(model, x, captions=GROUPED):
    rows = [i for i, caps in enumerate(captions) for _ in caps]
    flat = [c for caps in captions for c in caps]
    loss, grads = loss_and_grads(model, x[rows], flat)             # one row per caption: the prefix again each time
    grouped_loss, grouped_grads = loss_and_grads(model, x, captions)
    assert set(grads) == set(grouped_grads) and all(g.abs().sum() > 0 for g in grads.values())
    torch.testing.assert_close(grouped_loss, loss, rtol=1e-5, atol=1e-6)
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, g in grads.items():     # through the cached keys and values into LoRA, the projection, the Q-Former
        # atol: rounding, relative to this tensor and (for gradients that are exactly 0 in theory, like an
        # attention key's bias) to the largest gradient
        torch.testing.assert_close(grouped_grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-8 * scale,
                                   msg=name)
    return grads


@pytest.mark.parametrize("padding", ["right", "left_unmasked", "mask_by_pad_id"])
def test_grouped_loss_equals_the_ungrouped_for_every_label_layout(llm, padding):
    model = SoftPromptCaptioner(MeanPoolConnector((4, 4), 2), 32, llm, BridgeConfig(padding=padding))
    assert_grouped_equals_ungrouped(model, torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(0)))


def test_grouped_gradients_reach_the_qformer_and_lora_through_the_cache(llm):
    model = lora_captioner(llm)
    grads = assert_grouped_equals_ungrouped(model, torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(0)))
    kinds = {"lora_A", "lora_B", "proj.", "connector.qformer.", "connector.image_norm."}
    assert all(any(k in n for n in grads) for k in kinds)


def test_grouped_loss_checks_its_input(llm):
    model = captioner(llm)
    with pytest.raises(ValueError, match="2 images but 1 caption lists"):
        model(torch.randn(2, 16, 32), [["a dog", "a cat"]])
    with pytest.raises(ValueError, match="at least one caption"):
        model(torch.randn(2, 16, 32), [["a dog"], []])


def test_grouped_loss_equals_the_ungrouped_on_smollm2_with_lora():
    """The real SmolLM2-135M (30 layers, grouped-query attention, rotary positions): the continuation's positions
    and the cache's expansion must be right for the loss and all 120 LoRA gradients to agree."""
    model = lora_captioner(load_llm("cpu"), qformer=True)
    captions = [["A dog runs on the grass.", "A brown dog is running outside."],
                ["Two children play in the snow.", "Kids in the snow.", "Two small children are playing in snow."]]
    assert_grouped_equals_ungrouped(model, torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)),
                                    captions)


def test_mean_caption_loss_groups_whole_photos(llm):
    model = captioner(llm).eval()
    x = torch.randn(3, 16, 32)
    with torch.no_grad():
        manual = model(x[[0, 0, 1, 2, 2, 2]], [c for caps in GROUPED for c in caps])
    for batch_size in (64, 3, 2, 1):      # 1 and 2: a photo with more captions than batch_size goes alone
        assert mean_caption_loss(model, x, GROUPED, batch_size=batch_size) == pytest.approx(float(manual), rel=1e-5)


def test_caption_batches_of_several_captions_per_photo_train_stage2(llm):
    features = torch.randn(6, 16, 32, generator=torch.Generator().manual_seed(0))
    captions = [[f"photo {i} caption {k}" for k in range(5)] for i in range(5)] + [["only one"]]
    ids = [f"{i}.jpg" for i in range(6)]
    one = caption_batches(features, captions, ids, 4)(0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)          # the default draws exactly as before: 4 photos, one caption each
    idx = torch.randperm(6, generator=g)[:4].tolist()
    assert one["captions"] == [captions[i][int(torch.randint(len(captions[i]), (1,), generator=g))] for i in idx]
    assert one["image_ids"] == [ids[i] for i in idx] and torch.equal(one["image_embeds"], features[idx])
    for step in range(5):
        batch_fn = caption_batches(features, captions, ids, 8, captions_per_image=4)
        batch = batch_fn(step, torch.Generator().manual_seed(step))
        assert len(batch["image_ids"]) == len(batch["captions"]) == batch["image_embeds"].shape[0] == 2
        for image_id, caps in zip(batch["image_ids"], batch["captions"]):
            own = captions[ids.index(image_id)]
            assert len(set(caps)) == len(caps) == min(4, len(own)) and set(caps) <= set(own)
    with pytest.raises(ValueError, match="captions_per_image"):
        caption_batches(features, captions, ids, 2, captions_per_image=4)
    fixed = caption_batches(features, captions, ids, 8, captions_per_image=4)
    flat = {**fixed(0, torch.Generator().manual_seed(0))}
    flat["image_embeds"] = flat["image_embeds"].repeat_interleave(torch.tensor([len(c) for c in flat["captions"]]), 0)
    flat["captions"] = [c for caps in flat["captions"] for c in caps]
    histories = []
    for batch in (fixed(0, torch.Generator().manual_seed(0)), flat):   # the training loop takes either as it is
        result = train(captioner(llm), lambda step, g: batch,
                       lambda m, b: {"loss": m(b["image_embeds"], b["captions"])},
                       TrainConfig(steps=4, lr=1e-2, warmup_steps=1, bf16=False))
        histories.append(result.column("loss"))
    assert histories[0] == pytest.approx(histories[1], rel=1e-5) and histories[0][-1] < histories[0][0]


def test_swapped_captions_are_read_off_and_match_real_generation(llm):
    from vlmcourse.evaluate import swapped_image_captions

    torch.manual_seed(0)
    # no text prompt: the random tiny LLM then continues from a soft prompt, and photos get different captions
    model = SoftPromptCaptioner(LinearConnector(16), 32, llm, BridgeConfig(prompt="")).eval()
    x = torch.randn(5, 16, 32, generator=torch.Generator().manual_seed(0))
    own = model.generate(x, max_new_tokens=5)
    generated = model.generate(soft_prompts=model.soft_prompts(x).roll(2, 0), max_new_tokens=5)
    swapped = swapped_image_captions(model, x, own, shift=2, max_new_tokens=5)
    assert swapped["captions"] == generated and len(set(own)) > 1
    assert swapped["changed"] == sum(a != b for a, b in zip(own, generated)) / 5 > 0
    assert swapped_image_captions(model, x, shift=2, max_new_tokens=5) == swapped     # own captions generated
    with pytest.raises(ValueError, match="5 photos but 4 own captions"):
        swapped_image_captions(model, x, own[:4])


def test_swapped_report_is_the_report_of_regenerating_from_rolled_soft_prompts(llm):
    from vlmcourse.evaluate import evaluate_captions, swapped_report

    torch.manual_seed(0)
    model = SoftPromptCaptioner(LinearConnector(16), 32, llm, BridgeConfig(prompt="")).eval()
    x = torch.randn(5, 16, 32, generator=torch.Generator().manual_seed(0))
    refs = [[f"a photo of thing {i}", "something else"] for i in range(5)]
    own = evaluate_captions(model, refs, x, max_new_tokens=5)
    with torch.no_grad():
        regenerated = evaluate_captions(model, refs, soft_prompts=model.soft_prompts(x).roll(1, 0), max_new_tokens=5)
    read_off = swapped_report(own, refs)
    assert read_off["captions"] == regenerated["captions"] != own["captions"]
    for key in ("distinct", "empty", "BLEU-4", "CIDEr-D"):
        assert read_off[key] == regenerated[key], key
    assert read_off["P(EOS) first"] == pytest.approx(regenerated["P(EOS) first"], abs=1e-6)
    with pytest.raises(ValueError, match="5 captions but 4 reference lists"):
        swapped_report(own, refs[:4])
