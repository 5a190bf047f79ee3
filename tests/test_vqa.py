"""Tests for vlmcourse.vqa: the answer-only labels, the loss against Hugging Face's, answers that do not depend on
the batch's padding, closed Flamingo gates, and the batches. The tiny profile's random LLM only."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlmcourse.backbones import load_llm
from vlmcourse.connectors import LinearConnector
from vlmcourse.instruct import chat_prompt, instruction_pairs
from vlmcourse.stage2 import IGNORE_INDEX
from vlmcourse.vqa import (FlamingoVQA, SoftPromptVQA, answer_all, answer_inputs, design_card, instruction_batches,
                           prompt_inputs)

N, D = 4, 24         # patches, image-encoder width
QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Where is the square in the photo?"]
ANSWERS = ["red", "two", "top left"]


@pytest.fixture(scope="module")
def llm():
    return load_llm("tiny")


@pytest.fixture(scope="module")
def sharp_llm(llm):
    """A random frozen Llama with larger weights than the tiny profile's (whose logits stay within about +-0.7, as
    in test_flamingo, so that its greedy answers are mostly the same special token), and the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(llm.tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      initializer_range=0.2)).eval()
    return SimpleNamespace(model=lm, tokenizer=llm.tokenizer)


def soft_vqa(llm, seed=0):
    torch.manual_seed(seed)
    return SoftPromptVQA(LinearConnector(N), D, llm)


def images(batch=3, seed=0):
    return torch.randn(batch, N, D, generator=torch.Generator().manual_seed(seed))


def test_only_the_answer_and_its_eos_are_labelled(llm):
    tok, eos = llm.tokenizer, llm.tokenizer.eos_token_id
    ids, mask, labels = answer_inputs(tok, QUESTIONS, ANSWERS, eos)
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        prompt = tok(chat_prompt(None, q), add_special_tokens=False).input_ids
        reply = tok(a, add_special_tokens=False).input_ids + [eos]
        n = len(prompt) + len(reply)
        assert ids[i, :n].tolist() == prompt + reply and mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert labels[i].tolist() == [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX] * (ids.shape[1] - n)
    with pytest.raises(ValueError, match="2 instructions but 3 answers"):
        answer_inputs(tok, QUESTIONS[:2], ANSWERS, eos)


def test_soft_prompt_loss_equals_the_llms_own(llm):
    """The same sequence [soft prompts; prompt; answer] through Hugging Face's forward with labels (which shifts
    and averages over the labelled tokens): the loss must be the same."""
    model = soft_vqa(llm)
    x = images()
    loss = model(x, QUESTIONS, ANSWERS)
    soft = model.soft_prompts(x)
    ids, mask, labels = answer_inputs(llm.tokenizer, QUESTIONS, ANSWERS, model.eos_id)
    embeds = torch.cat([soft, model._embed(ids)], 1)
    full_mask = torch.cat([torch.ones(3, N, dtype=torch.long), mask], 1)
    full_labels = torch.cat([torch.full((3, N), IGNORE_INDEX), labels], 1)
    reference = llm.model(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels).loss
    assert torch.allclose(loss, reference, atol=1e-5)
    loss.backward()
    assert model.proj.weight.grad is not None and all(p.grad is None for p in llm.model.parameters())


@pytest.mark.parametrize("make", [soft_vqa, lambda llm: FlamingoVQA(llm, D, every=1, num_latents=2,
                                                                      resampler_layers=1, resampler_size=16,
                                                                      num_heads=2, head_size=8, ff_mult=2)],
                         ids=["soft prompts", "flamingo"])
def test_answers_do_not_depend_on_the_batchs_padding(sharp_llm, make):
    torch.manual_seed(0)
    model = make(sharp_llm).eval()
    if isinstance(model, FlamingoVQA):          # open the gates, so that the image matters
        for block in model.lm.blocks.values():
            block.attn_gate.data.fill_(1.0)
    x = images()
    together = model.answer(x, QUESTIONS, max_new_tokens=4)
    alone = [model.answer(x[i:i + 1], [q], max_new_tokens=4)[0] for i, q in enumerate(QUESTIONS)]
    assert together == alone and len(set(together)) == len(QUESTIONS) and all(together)
    if isinstance(model, FlamingoVQA):
        model.lm.remove_hooks()


def test_closed_flamingo_gates_give_the_plain_llms_loss(llm):
    model = FlamingoVQA(llm, D, every=1, num_latents=2, resampler_layers=1, resampler_size=16, num_heads=2,
                        head_size=8, ff_mult=2)
    ids, mask, labels = answer_inputs(llm.tokenizer, QUESTIONS, ANSWERS, model.eos_id)
    plain = llm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(model(images(), QUESTIONS, ANSWERS), plain)
    model.lm.remove_hooks()


def test_left_padded_prompts(llm):
    ids, mask = prompt_inputs(llm.tokenizer, QUESTIONS, pad_id=0)
    lengths = [len(llm.tokenizer(chat_prompt(None, q), add_special_tokens=False).input_ids) for q in QUESTIONS]
    assert mask.sum(1).tolist() == lengths and (mask[:, -1] == 1).all()


def test_soft_prompts_learn_a_question_only_the_image_answers(llm, sharp_llm):
    """Two kinds of photo, one question; the answer is the photo's kind: from the text alone no model does better
    than a coin flip on it. The LLM is random and frozen; only the projection learns."""
    model = soft_vqa(sharp_llm).train()
    g = torch.Generator().manual_seed(3)
    kinds = torch.randn(2, N, D, generator=g)
    x = kinds.repeat(4, 1, 1) + 0.1 * torch.randn(8, N, D, generator=g)
    answers = ["red", "blue"] * 4
    question = ["What colour is the circle?"] * 8
    optimizer = torch.optim.AdamW(model.proj.parameters(), lr=3e-2)
    losses = []
    for _ in range(60):
        loss = model(x, question, answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    model.eval()
    first = [llm.tokenizer.decode(llm.tokenizer(a, add_special_tokens=False).input_ids[:1]).strip() for a in answers]
    assert [a.split()[0] for a in model.answer(x, question, max_new_tokens=1)] == first
    with torch.no_grad():                                       # the photos swapped: the answers go wrong
        assert model(x.roll(1, 0), question, answers) > 4 * model(x, question, answers)


def test_instruction_batches_and_answer_all(llm):
    objects = [[{"shape": "circle", "colour": "red", "size": "small", "position": "top left"}],
               [{"shape": "square", "colour": "blue", "size": "large", "position": "bottom right"}]]
    rows = [r for r in instruction_pairs(objects) if r["type"] != "caption"]
    features = images(batch=2)
    batch = instruction_batches(features, rows, 4)(0, torch.Generator().manual_seed(0))
    assert batch["image_embeds"].shape == (4, N, D) and len(batch["instructions"]) == len(batch["answers"]) == 4
    for x, q, a in zip(batch["image_embeds"], batch["instructions"], batch["answers"]):
        row = next(r for r in rows if r["instruction"] == q and r["answer"] == a)
        assert torch.equal(x, features[row["image"]])
    model = soft_vqa(llm)
    out = answer_all(model, features, rows, batch_size=3, max_new_tokens=2)
    assert len(out) == len(rows) and model.training
    with pytest.raises(ValueError, match="no instruction rows"):
        instruction_batches(features, [], 4)


def test_grouped_questions_give_the_ungrouped_loss_and_gradients(sharp_llm):
    """A photo's questions continuing one prefix pass (its soft prompts' keys and values) against one row per
    question, each reading the soft prompts again: the same loss and the same gradient for every trainable weight."""
    model = SoftPromptVQA(nn.Sequential(nn.Linear(D, D), nn.GELU()), D, sharp_llm).train()
    x = images()
    grouped = [QUESTIONS, QUESTIONS[:1], QUESTIONS[1:]]
    answers = [ANSWERS, ANSWERS[:1], ANSWERS[1:]]
    rows = [i for i, qs in enumerate(grouped) for _ in qs]

    def loss_and_grads(*args):
        model.zero_grad(set_to_none=True)
        loss = model(*args)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    flat_loss, flat_grads = loss_and_grads(x[rows], sum(grouped, []), sum(answers, []))
    loss, grads = loss_and_grads(x, grouped, answers)
    torch.testing.assert_close(loss, flat_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == {"connector.0.weight", "connector.0.bias", "proj.weight", "proj.bias"}
    for name, g in flat_grads.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)
    with pytest.raises(ValueError, match="one answer per instruction"):
        model(x, grouped, [ANSWERS, ANSWERS, ANSWERS])


def test_instruction_batches_grouped_per_image(llm):
    objects = [[{"shape": "circle", "colour": "red", "size": "small", "position": "top left"}],
               [{"shape": "square", "colour": "blue", "size": "large", "position": "bottom right"},
                {"shape": "triangle", "colour": "green", "size": "small", "position": "left"}]]
    rows = [r for r in instruction_pairs(objects) if r["type"] != "caption"]
    features = images(batch=2)
    batch = instruction_batches(features, rows, 6, per_image=3)(0, torch.Generator().manual_seed(0))
    assert batch["image_embeds"].shape == (2, N, D)
    for x, qs, answers in zip(batch["image_embeds"], batch["instructions"], batch["answers"]):
        image = next(i for i in range(2) if torch.equal(x, features[i]))
        mine = {(r["instruction"], r["answer"]) for r in rows if r["image"] == image}
        assert len(qs) == len(set(qs)) == min(3, len(mine)) and set(zip(qs, answers)) <= mine


def test_answer_all_asks_each_image_each_question_once(llm):
    """A blank photo standing in for every image: rows that ask it the same question are answered once."""
    model = soft_vqa(llm)
    rows = [{"image": 0, "instruction": q} for q in QUESTIONS * 3]
    asked = []
    answer = model.answer
    model.answer = lambda x, questions, n: asked.extend(sum(questions, [])) or answer(x, questions, n)
    out = answer_all(model, images(batch=1), rows, batch_size=2, max_new_tokens=2)
    assert sorted(asked) == sorted(QUESTIONS) and out == out[:3] * 3


def test_design_cards_read_the_models(llm):
    soft = soft_vqa(llm)
    card = design_card("soft", soft)
    assert card["image tokens in the input"] == N and card["trainable parameters"] == sum(
        p.numel() for p in soft.proj.parameters())
    assert card["LLM layers that read the image"] == list(range(llm.model.config.num_hidden_layers))
    flamingo = FlamingoVQA(llm, D, every=1, num_latents=2, resampler_layers=1, resampler_size=16, num_heads=2,
                           head_size=8, ff_mult=2)
    card = design_card("flamingo", flamingo)
    assert card["image tokens in the input"] == 0 and card["image enters"].startswith("cross-attention")
    assert card["LLM layers that read the image"] == list(range(llm.model.config.num_hidden_layers))
    assert card["trainable parameters"] == flamingo.lm.num_trainable_parameters() > 0
    flamingo.lm.remove_hooks()


def test_the_notebooks_vqa_recipe_trains_saves_and_reloads(tmp_path, monkeypatch):
    """notebook 08's load_or_train_vqa on the tiny profile's shapes world: trained once (grouped batches), saved
    without the LLM, reloaded with the same connector (the image adapter included)."""
    from vlmcourse import get_profile
    from vlmcourse.adapter import ImageAdapter
    from vlmcourse.pipeline import load_or_train_vqa
    from vlmcourse.recipes import VQARecipe, vqa_dir
    from vlmcourse.utils import cache_dir

    llm_cache = cache_dir("llm")        # the tokenizer the tiny LLM borrows, converted once
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path))
    (tmp_path / "llm").symlink_to(llm_cache)
    profile = get_profile("tiny", data="shapes")
    recipe = VQARecipe(steps=3, batch_size=4, per_image=2, image_adapter=True)
    model, result = load_or_train_vqa(profile, recipe)
    assert len(result.column("loss")) == 3 and vqa_dir(profile, recipe).name.startswith("vqa-tiny-shapes-")
    assert isinstance(model.connector.adapter, ImageAdapter)
    again, history = load_or_train_vqa(profile, recipe)
    assert history.column("loss") == result.column("loss")
    x = torch.randn(2, model.connector.num_tokens, model.connector.fc.in_features)
    with torch.no_grad():
        assert torch.equal(again.soft_prompts(x), model.soft_prompts(x))


@pytest.mark.parametrize("eos_scale", [1.0, 4.0], ids=["no early stop", "some answers stop at once"])
def test_grouped_answers_equal_each_question_answered_alone(sharp_llm, eos_scale):
    """Several questions per photo, the photo's soft prompts read once and the questions right-padded after them:
    the greedy answers must be those of each question asked alone. The EOS row of the output layer is scaled up so
    that some answers end at their first token and others run on: the loop's stopping is checked too."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(sharp_llm.model.config).eval()
    eos = sharp_llm.tokenizer.eos_token_id
    with torch.no_grad():
        lm.lm_head.weight[eos] *= eos_scale
    model = soft_vqa(SimpleNamespace(model=lm, tokenizer=sharp_llm.tokenizer)).eval()
    x, asked = images(), [QUESTIONS, QUESTIONS[:1], QUESTIONS[::-1][:2]]
    grouped = model.answer(x, asked, max_new_tokens=6)
    alone = [[model.answer(x[i:i + 1], [q], max_new_tokens=6)[0] for q in qs] for i, qs in enumerate(asked)]
    assert grouped == alone
    flat = sum(grouped, [])
    assert (eos_scale == 1.0) == all(flat) and len(set(flat)) > 3                  # some empty only when scaled
    rows = [{"image": i, "instruction": q} for i, qs in enumerate(asked) for q in qs][::-1]
    assert answer_all(model, x, rows, batch_size=2, max_new_tokens=6) == flat[::-1]   # in the rows' order
    with pytest.raises(ValueError, match="non-empty list of questions"):
        model.answer(x, [QUESTIONS, [], QUESTIONS], max_new_tokens=2)
