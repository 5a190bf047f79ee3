import time

import pytest
import torch
from PIL import Image

from vlmcourse import backbones, profiles
from vlmcourse.backbones import (CLIPVisionEncoder, ImageTransform, TextEncoder, load_llm, load_text_encoder,
                                 load_vision_encoder)
from vlmcourse.data import Flickr8k, load_flickr8k
from vlmcourse.profiles import HubUnavailableError, get_profile


def test_profile_choice(monkeypatch):
    monkeypatch.delenv("VLMCOURSE_PROFILE", raising=False)
    assert get_profile().name == "cpu" and get_profile().offline
    monkeypatch.setenv("VLMCOURSE_PROFILE", "tiny")
    assert get_profile().name == "tiny"
    assert get_profile("hub").name == "hub" and not get_profile("hub").offline
    assert get_profile("cpu").device == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown profile 'gpu'"):
        get_profile("gpu")


@pytest.mark.parametrize("load", [load_vision_encoder, load_text_encoder, load_llm,
                                  lambda p: load_flickr8k("test", p)])
def test_hub_profile_fails_fast_offline_naming_the_cpu_profile(load, monkeypatch):
    monkeypatch.setattr(profiles, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=r"get_profile\('cpu'\)"):
        load(get_profile("hub"))
    assert time.perf_counter() - start < 5


def test_image_transform_crops_the_centre_of_any_shape():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 60, 100))            # blue on the left edge, cropped away
    x = ImageTransform(64, mean=(0.5,) * 3, std=(0.5,) * 3)(image)
    assert x.shape == (3, 64, 64)
    assert torch.allclose(x[0], torch.ones(64, 64), atol=0.02) and torch.allclose(x[2], -torch.ones(64, 64), atol=0.02)
    with pytest.raises(ValueError, match="RGB"):
        ImageTransform(64)(image.convert("L"))


def test_efficientnet_patch_grid(shared_data):
    vision = load_vision_encoder("cpu")
    ds = Flickr8k("test", root=shared_data, transform=vision.transform)
    x = torch.stack([ds[0]["pixel_values"], ds[1]["pixel_values"]])
    out = vision(x)
    assert out.last_hidden_state.shape == (2, 49, 1280) and out.grid_size == (7, 7) == vision.grid_size
    assert not any(p.requires_grad for p in vision.parameters())
    vision.train()
    assert not vision.training   # a frozen backbone stays in eval mode
    # pretrained, not random: two different photos give clearly different, non-degenerate tokens
    pooled = out.last_hidden_state.mean(1)
    assert torch.cosine_similarity(pooled[0], pooled[1], dim=0) < 0.99 and pooled.std() > 0.01
    finer = load_vision_encoder("cpu", image_size=320)
    assert finer(torch.zeros(1, 3, 320, 320)).last_hidden_state.shape == (1, 100, 1280)
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\), got \(1, 3, 200, 200\)"):
        vision(torch.zeros(1, 3, 200, 200))


def test_clip_vision_loader_on_a_tiny_random_model(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2)
    CLIPVisionModel(config).save_pretrained(tmp_path)
    vision = CLIPVisionEncoder.from_pretrained(str(tmp_path)).freeze()
    x = torch.randn(2, 3, 32, 32)
    out = vision(x)
    assert out.last_hidden_state.shape == (2, 16, 16) and out.grid_size == (4, 4)
    reference = vision.model(pixel_values=x).last_hidden_state[:, 1:]     # [CLS] dropped
    assert torch.allclose(out.last_hidden_state, reference)


def test_text_encoder_loader_on_a_tiny_random_bert(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    AutoTokenizer.from_pretrained(backbones.minilm_path()).save_pretrained(tmp_path)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
              ).save_pretrained(tmp_path)
    text = TextEncoder.from_pretrained(str(tmp_path))
    batch = text.tokenize(["a dog runs", "two people"])
    assert text(**batch).shape == (2, batch["input_ids"].shape[1], 16)


def test_minilm_matches_sentence_transformers():
    """Our cpu text encoder is the real all-MiniLM-L6-v2: mean-pooled, it gives the
    sentence-transformers embedding of the same package."""
    from sentence_transformers import SentenceTransformer

    text = load_text_encoder("cpu")
    assert text.hidden_size == 384 and text.model.config.num_hidden_layers == 6
    sentences = ["A dog runs on the beach .", "Two children play football in a park ."]
    batch = text.tokenize(sentences)
    with torch.no_grad():
        hidden = text(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    reference = SentenceTransformer(str(backbones.minilm_path()), device="cpu").encode(sentences, convert_to_tensor=True)
    assert torch.allclose(ours.cpu(), reference, atol=1e-5)


def test_smollm2_cache_equals_the_gguf_model(tmp_path):
    gguf = backbones.smollm2_gguf_path()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50e6
    model, tokenizer = backbones.load_gguf(gguf)
    backbones.save_causal_lm(model, tokenizer, tmp_path / "llm")
    assert not (tmp_path / "llm.partial").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    batch = AutoTokenizer.from_pretrained(tmp_path / "llm")("A dog runs on the beach", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, cached(**batch).logits)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied


def test_smollm2_dir_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path))
    calls = []

    def fake_load(gguf):
        calls.append(gguf)
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(backbones.minilm_path())
        return LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2)), tokenizer

    monkeypatch.setattr(backbones, "load_gguf", fake_load)
    first = backbones.smollm2_dir()
    assert backbones.smollm2_dir() == first and len(calls) == 1
    (first / "source.json").write_text('{"gguf": "other.gguf", "bytes": 1}')   # a different package version
    backbones.smollm2_dir()
    assert len(calls) == 2


def test_cpu_llm_loads_from_the_cache_and_generates():
    llm = load_llm("cpu")
    assert llm.hidden_size == 576 and llm.tokenizer.eos_token_id == 2
    batch = llm.tokenizer("The capital of France is", return_tensors="pt").to(llm.model.device)
    out = llm.model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_tiny_profile_parts_have_the_right_shapes():
    vision, text, llm = load_vision_encoder("tiny"), load_text_encoder("tiny"), load_llm("tiny")
    out = vision(torch.zeros(2, 3, 64, 64))
    assert out.last_hidden_state.shape == (2, 16, vision.hidden_size) and out.grid_size == (4, 4)
    assert text(**text.tokenize(["a cat"])).shape[-1] == text.hidden_size
    assert llm.model(input_ids=torch.tensor([[1, 2, 3]], device=llm.model.device)).logits.shape == (1, 3, len(llm.tokenizer))
