"""The Hugging Face Hub replaced by local fakes, so the hub profile's loading paths run offline.

- ``datasets.load_dataset("jxie/flickr8k", split=...)`` returns a ``datasets.Dataset`` built from the shared
  Flickr8k subset in the Hub's schema (``image``, ``caption_0`` .. ``caption_4``; splits train / validation / test);
- ``from_pretrained`` of every hub-profile part (CLIP ViT-B/16 vision tower and whole model with its processor,
  bert-base and its tokenizer, the hub LLM and its tokenizer, BLIP-2 OPT-2.7b and its processor) returns the same
  class built from a tiny random config; anything else loads as usual;
- ``profiles.hub_reachable`` says yes.

``install(monkeypatch)`` from a test; ``install_globally()`` from a script (a subprocess that plays Colab).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k-subset"
HUB_SPLIT_TO_OURS = {"train": "train", "validation": "dev", "test": "test"}
CLIP_ID, BERT_ID = "openai/clip-vit-base-patch16", "google-bert/bert-base-uncased"
LLM_ID, BLIP2_ID = "HuggingFaceTB/SmolLM2-360M-Instruct", "Salesforce/blip2-opt-2.7b"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


# ------------------------------------------------------------------ datasets.load_dataset
def fake_flickr8k_split(split: str, root: Path | None = None, limit: int | None = None):
    """One split of the shared subset as the Hub serves jxie/flickr8k: columns image, caption_0 .. caption_4."""
    import datasets

    from vlmcourse.data import read_annotations

    index = read_annotations(root or SHARED)
    names = index.splits[HUB_SPLIT_TO_OURS[split]][:limit]
    features = datasets.Features({"image": datasets.Image(),
                                  **{f"caption_{k}": datasets.Value("string") for k in range(5)}})
    columns = {"image": [str(index.image_dir / n) for n in names]}
    for k in range(5):
        columns[f"caption_{k}"] = [index.captions[n][k] for n in names]
    return datasets.Dataset.from_dict(columns, features=features)


def make_load_dataset(limit: int | None = None, calls: list | None = None):
    cache = {}

    def load_dataset(path, name=None, split=None, **kwargs):
        if calls is not None:
            calls.append((path, split))
        if path != "jxie/flickr8k":
            raise ConnectionError(f"fake Hub: no dataset {path!r}")
        if split is None:
            return datasets_dict({s: load_dataset(path, split=s) for s in HUB_SPLIT_TO_OURS})
        if split not in cache:
            cache[split] = fake_flickr8k_split(split, limit=limit)
        return cache[split]

    return load_dataset


def datasets_dict(splits):
    import datasets

    return datasets.DatasetDict(splits)


# ------------------------------------------------------------------ from_pretrained
def _clip_tokenizer():
    """A real CLIPTokenizer over a byte-level vocabulary (no merges): 514 tokens, no download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)   # as the real one: captions cut at 77


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=224, patch_size=16, **TINY)    # the real 14 x 14 grid, tiny width


def _smollm2_tokenizer_dir() -> Path:
    from vlmcourse.backbones import smollm2_dir

    return smollm2_dir()


class Fakes:
    """Builders of the tiny stand-ins, keyed by (class name, repo id)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.originals: dict[str, object] = {}      # class name -> the real from_pretrained (a plain function)

    @functools.cached_property
    def tokenizer_dir(self) -> Path:
        """SmolLM2's tokenizer (the 135M's, the same vocabulary as the 360M's), from the cpu profile's LLM cache."""
        return _smollm2_tokenizer_dir()

    def real(self, cls, *args, **kwargs):
        """``cls.from_pretrained(*args)`` as transformers does it, the fakes bypassed."""
        return self.originals[cls.__name__](cls, *args, **kwargs)

    def build(self, cls, repo_id: str, kwargs: dict):
        import transformers as T

        from vlmcourse.backbones import minilm_path

        name = cls.__name__
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        attn = kwargs.get("attn_implementation")
        torch.manual_seed(0)
        if repo_id == CLIP_ID and name == "CLIPVisionModel":
            model = T.CLIPVisionModel(_clip_vision_config())
        elif repo_id == CLIP_ID and name == "CLIPModel":
            tokenizer = _clip_tokenizer()
            text = T.CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, **TINY)
            model = T.CLIPModel(T.CLIPConfig(text_config=text.to_dict(), vision_config=_clip_vision_config().to_dict(),
                                             projection_dim=16))
        elif repo_id == CLIP_ID and name == "CLIPProcessor":
            return T.CLIPProcessor(image_processor=T.CLIPImageProcessor(), tokenizer=_clip_tokenizer())
        elif repo_id == BERT_ID and name in ("AutoTokenizer", "BertTokenizer", "BertTokenizerFast"):
            return self.real(T.AutoTokenizer, minilm_path())
        elif repo_id == BERT_ID and name == "BertModel":
            model = T.BertModel(T.BertConfig(vocab_size=30522, max_position_embeddings=512, **TINY))
        elif repo_id == LLM_ID and name == "AutoTokenizer":
            return self.real(T.AutoTokenizer, str(self.tokenizer_dir))
        elif repo_id == LLM_ID and name == "AutoModelForCausalLM":
            tokenizer = self.build(T.AutoTokenizer, LLM_ID, {})
            model = T.LlamaForCausalLM(T.LlamaConfig(
                vocab_size=len(tokenizer), num_key_value_heads=1, tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **TINY))
        elif repo_id == BLIP2_ID and name in ("Blip2ForConditionalGeneration", "Blip2Model"):
            config = T.Blip2Config(
                vision_config=dict(image_size=224, patch_size=14, **TINY),            # the real 16 x 16 grid
                qformer_config=dict(vocab_size=30522, encoder_hidden_size=32, cross_attention_frequency=1, **TINY),
                text_config=T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                        num_attention_heads=2, word_embed_proj_dim=32).to_dict(),
                num_query_tokens=32)
            model = getattr(T, name)._from_config(config, **({"attn_implementation": attn} if attn else {}))
        elif repo_id == BLIP2_ID and name in ("Blip2Processor", "AutoProcessor"):
            tokenizer = self.build(T.AutoTokenizer, LLM_ID, {})
            return T.Blip2Processor(image_processor=T.BlipImageProcessor(size={"height": 224, "width": 224}),
                                    tokenizer=tokenizer, num_query_tokens=32)
        else:
            return None
        if dtype is not None:
            model = model.to(dtype)
        if kwargs.get("device_map") not in (None, "auto"):
            model = model.to(kwargs["device_map"])
        return model.eval()


PATCHED = ("CLIPVisionModel", "CLIPModel", "CLIPProcessor", "BertModel", "AutoTokenizer", "AutoModelForCausalLM",
           "Blip2ForConditionalGeneration", "Blip2Model", "Blip2Processor", "AutoProcessor")


def _patches(fakes: Fakes, limit: int | None, dataset_calls: list | None):
    """(object, attribute, value) triples that install the fakes."""
    import datasets
    import transformers

    from vlmcourse import profiles

    triples = [(datasets, "load_dataset", make_load_dataset(limit, dataset_calls)),
               (profiles, "hub_reachable", lambda timeout=3.0: True)]
    for name in PATCHED:
        cls = getattr(transformers, name)
        owner = next(k for k in cls.__mro__ if "from_pretrained" in k.__dict__)
        fakes.originals.setdefault(name, owner.__dict__["from_pretrained"].__func__)

        def fake(klass, repo_id, *args, _cls=cls, **kwargs):
            built = fakes.build(_cls, str(repo_id), kwargs)
            if built is None:     # not a hub-profile part: the real loader
                return fakes.originals[_cls.__name__](klass, repo_id, *args, **kwargs)
            fakes.calls.append((_cls.__name__, str(repo_id)))
            return built

        triples.append((cls, "from_pretrained", classmethod(fake)))
    return triples


def install(monkeypatch, limit: int | None = None, dataset_calls: list | None = None) -> Fakes:
    """Install every fake for one test (undone by pytest's monkeypatch)."""
    fakes = Fakes()
    for obj, attr, value in _patches(fakes, limit, dataset_calls):
        monkeypatch.setattr(obj, attr, value)
    return fakes


def install_globally(limit: int | None = None) -> Fakes:
    """Install every fake for the rest of the process (a script playing Colab)."""
    fakes = Fakes()
    for obj, attr, value in _patches(fakes, limit, None):
        setattr(obj, attr, value)
    return fakes
