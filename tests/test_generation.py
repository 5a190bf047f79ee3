"""generation.greedy_decode: Hugging Face's greedy tokens, with finished rows leaving the batch."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlmcourse.backbones import load_llm
from vlmcourse.connectors import MeanPoolConnector
from vlmcourse.generation import greedy_decode
from vlmcourse.lora import LoRACaptioner
from vlmcourse.recipes import LoraSettings
from vlmcourse.stage2 import SoftPromptCaptioner


@pytest.fixture(scope="module")
def lm():
    """A tiny random Llama whose greedy tokens change from step to step (the tiny profile's repeats its first)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)).eval()


@pytest.fixture(scope="module")
def llm():
    """The tiny profile's LLM (its tokenizer, SmolLM2's), its weights re-drawn wider for the same reason."""
    llm = copy.deepcopy(load_llm("tiny"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in llm.model.parameters():
            p.normal_(0, 0.5)
    return llm


def hf_greedy(lm, embeds, max_new_tokens, eos):
    """Hugging Face's greedy search, each row cut after its EOS (it pads finished rows with EOS)."""
    out = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                      max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=eos)
    rows = []
    for seq in out.tolist():
        rows.append(seq[:seq.index(eos) + 1] if eos in seq else seq)
    return rows


def ragged_eos(lm, embeds, max_new_tokens):
    """A token that greedy writes at different steps in different rows (and never in some): used as EOS, the rows
    end at different times, which is what dropping finished rows must get right."""
    never = lm.config.vocab_size - 1
    free = hf_greedy(lm, embeds, max_new_tokens, eos=never)
    firsts = {}
    for r, seq in enumerate(free):
        for step, token in enumerate(seq):
            firsts.setdefault(token, {}).setdefault(r, step)
    token = max(firsts, key=lambda t: (len(set(firsts[t].values())), -len(firsts[t])))
    assert len(set(firsts[token].values())) >= 2, "no token ends rows at different steps"
    return token


def test_greedy_tokens_equal_hugging_face(lm):
    embeds = torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(0))
    eos = ragged_eos(lm, embeds, 12)
    ours = greedy_decode(lm, embeds, 12, eos)
    assert ours == hf_greedy(lm, embeds, 12, eos)
    lengths = {len(seq) for seq in ours}
    assert len(lengths) >= 2 and max(lengths) <= 12           # rows ended at different steps, none past the limit
    assert all(seq[-1] == eos for seq in ours if len(seq) < 12)


def test_first_step_probs_and_errors(lm):
    embeds = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1))
    first = []
    ours = greedy_decode(lm, embeds, 1, eos_token_id=0, first_step_probs=first)
    logits = lm(inputs_embeds=embeds).logits[:, -1]
    assert torch.allclose(first[0], logits.softmax(-1), atol=1e-5)
    assert [seq[0] for seq in ours] == logits.argmax(-1).tolist()
    with pytest.raises(ValueError, match="batch, length, hidden"):
        greedy_decode(lm, embeds[0], 4, 0)
    with pytest.raises(ValueError, match="at least 1"):
        greedy_decode(lm, embeds, 0, 0)


@pytest.mark.parametrize("with_lora", [False, True])
def test_captioner_generate_equals_hugging_face(llm, with_lora):
    """The captioners' greedy path (generation.py) writes Hugging Face's captions, with and without LoRA (peft's
    layers injected into the LLM), batched or not, and reads the first-step distribution off the same pass."""
    torch.manual_seed(0)
    cls, extra = (LoRACaptioner, {"lora": LoraSettings(r=4, lora_alpha=8)}) if with_lora else (SoftPromptCaptioner, {})
    model = cls(MeanPoolConnector((4, 4), 2), 32, llm, **extra).eval()
    if with_lora:       # B = 0 at initialisation: make the adapters change something
        for name, p in model.llm_model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    x = torch.randn(5, 16, 32)
    model.eos_id = ragged_eos(model.llm_model, model.prefix_embeds(x), 10)
    hf = [model.tokenizer.decode(seq, skip_special_tokens=True).strip()
          for seq in hf_greedy(model.llm_model, model.prefix_embeds(x), 10, model.eos_id)]
    first = []
    assert model.generate(x, max_new_tokens=10, batch_size=2, first_step_probs=first) == hf
    assert model.generate(x, max_new_tokens=10) == hf
    assert torch.allclose(torch.cat(first), model.first_token_probs(x), atol=1e-5)
