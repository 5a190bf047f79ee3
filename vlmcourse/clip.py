"""CLIP-style contrastive learning, small enough to read in one sitting.

The idea (Radford et al., 2021): put images and captions in one embedding
space, so that a photo sits next to its own captions and away from everyone
else's. Training only needs a batch of matching (image, caption) pairs: the
N x N matrix of cosine similarities should be large on the diagonal and small
elsewhere, which is a classification problem in each row ("which caption is
mine?") and each column ("which image is mine?"). That is the symmetric
InfoNCE loss below.

What is in this file, top to bottom:

1. `info_nce` / `clip_loss`: the loss, with a learnable temperature
   (`logit_scale`, stored as log(1/0.07) and capped at 100 like CLIP).
2. `LiTConfig` / `LiTModel`: "Locked-image Tuning" (Zhai et al., 2022). Both
   towers are pretrained and frozen; we only train a projection on each side
   and the temperature. Because the towers never change, we run them once,
   cache their features, and every training step is just two small MLPs.
3. `train_lit`, `evaluate_lit`: features in, loss history and Recall@K out.
   `train_lit` is a batch function and a loss function for the course's one
   training loop, `vlmcourse.train.train`.

Elsewhere: Recall@K and its tables in `metrics.py`, the cached caption features
in `features.py`, zero-shot CLIP ViT-B/16 (`load_hub_clip`) in `backbones.py`,
the figures in `plots.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import LOGIT_SCALE_INIT, MAX_LOGIT_SCALE, logit_multiplier, temperature_from
from .metrics import _check_2d, retrieval_recall
from .train import TrainConfig, TrainResult, train
from .utils import eval_mode

__all__ = ["LOGIT_SCALE_INIT", "MAX_LOGIT_SCALE", "info_nce", "clip_logits", "clip_loss", "LiTConfig", "Projection",
           "LiTOutput", "LiTModel", "LiTTrainConfig", "contrastive_eval_loss", "lit_batches", "lit_loss", "train_lit",
           "evaluate_lit"]

# The temperature's convention (losses.py, shared with stage 1): CLIP's initial temperature is 0.07; we store
# its log-inverse, LOGIT_SCALE_INIT, so that the parameter can move freely in both directions and exp() keeps it
# positive; CLIP caps the scale at MAX_LOGIT_SCALE = 100 (temperature 0.01): beyond that training is unstable.


# -----------------------------------------------------------------------------
# 1. The loss


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on a square matrix of logits; pair i is (row i, column i).

    Rows are images, columns are captions. Cross-entropy over each row asks
    "which caption goes with this image?", over each column "which image goes
    with this caption?"; the correct answer is always the diagonal. We average
    the two directions so neither modality is favoured.
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"info_nce needs a square (N, N) matrix of logits, got {tuple(logits.shape)}")
    targets = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = F.cross_entropy(logits, targets)    # softmax over each row
    text_to_image = F.cross_entropy(logits.T, targets)  # softmax over each column
    return (image_to_text + text_to_image) / 2


def clip_logits(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> torch.Tensor:
    """Scaled cosine similarities, (N_images, N_texts): `logits_per_image` in HF terms.

    `logit_scale` is the *log* of the multiplier (1 / temperature), as in
    `transformers.CLIPModel.logit_scale`.
    """
    _check_2d("image_embeds", image_embeds)
    _check_2d("text_embeds", text_embeds)
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"image and text embeddings must have the same width to be compared, "
            f"got {image_embeds.shape[1]} and {text_embeds.shape[1]}"
        )
    # Cosine similarity: only the direction matters, so a tower cannot win by
    # simply making its vectors longer.
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logit_scale = torch.as_tensor(logit_scale, dtype=image_embeds.dtype, device=image_embeds.device)
    # Cosines live in [-1, 1]; a softmax over such small numbers is nearly
    # uniform, so we sharpen them by 1/temperature, capped like CLIP.
    return logit_multiplier(logit_scale, max_logit_scale) * image_embeds @ text_embeds.T


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> torch.Tensor:
    """CLIP's loss for a batch of N matching pairs: image i goes with text i."""
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(
            f"clip_loss needs one text per image (pair i = row i of each), got "
            f"{image_embeds.shape[0]} images and {text_embeds.shape[0]} texts"
        )
    return info_nce(clip_logits(image_embeds, text_embeds, logit_scale, max_logit_scale))


# -----------------------------------------------------------------------------
# 2. The LiT model: frozen towers (cached features) + trainable projections


@dataclass
class LiTConfig:
    """Sizes of the trainable part; the towers are fixed by the profile."""

    image_dim: int = 1280         # width of the vision tower's patch tokens (EfficientNet-Lite0 on cpu)
    text_dim: int = 384           # width of the text tower's pooled output (MiniLM-L6 on cpu)
    embed_dim: int = 256          # the shared space
    hidden_dim: int | None = 512  # MLP hidden width; None = a single linear layer
    dropout: float = 0.1
    logit_scale_init: float = LOGIT_SCALE_INIT
    max_logit_scale: float = MAX_LOGIT_SCALE
    learn_logit_scale: bool = True


class Projection(nn.Module):
    """Frozen features -> shared space. LayerNorm first: the two towers' features
    have very different scales, and normalising them lets one learning rate fit both."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None, dropout: float):
        super().__init__()
        if hidden_dim:
            body = [nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)]
        else:
            body = [nn.Dropout(dropout), nn.Linear(in_dim, out_dim)]
        self.net = nn.Sequential(nn.LayerNorm(in_dim), *body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class LiTOutput:
    """Mirrors transformers' CLIPOutput (the fields we need)."""

    loss: torch.Tensor | None
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


class LiTModel(nn.Module):
    """Locked-image tuning on cached features.

    encode_image: patch tokens (B, T, image_dim) -> mean over tokens -> MLP -> unit vector.
    encode_text:  pooled caption features (B, text_dim) -> MLP -> unit vector.
    The cached features live on the CPU; both methods move them to the model's device.
    """

    def __init__(self, config: LiTConfig | None = None):
        super().__init__()
        self.config = config = config or LiTConfig()
        self.image_proj = Projection(config.image_dim, config.embed_dim, config.hidden_dim, config.dropout)
        self.text_proj = Projection(config.text_dim, config.embed_dim, config.hidden_dim, config.dropout)
        self.logit_scale = nn.Parameter(
            torch.tensor(float(config.logit_scale_init)), requires_grad=config.learn_logit_scale
        )

    def encode_image(self, image_features: torch.Tensor) -> torch.Tensor:
        if image_features.dim() != 3 or image_features.shape[-1] != self.config.image_dim:
            raise ValueError(
                f"encode_image expects cached patch tokens (batch, tokens, {self.config.image_dim}), "
                f"got {tuple(image_features.shape)}"
            )
        # Mean-pooling keeps this a pure projection problem; the vision tower
        # was trained for classification, so its average token is a good summary.
        pooled = image_features.to(self.logit_scale.device, torch.float32).mean(dim=1)
        return F.normalize(self.image_proj(pooled), dim=-1)

    def encode_text(self, text_features: torch.Tensor) -> torch.Tensor:
        if text_features.dim() != 2 or text_features.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"encode_text expects pooled caption features (batch, {self.config.text_dim}), "
                f"got {tuple(text_features.shape)}"
            )
        return F.normalize(self.text_proj(text_features.to(self.logit_scale.device, torch.float32)), dim=-1)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, return_loss: bool = True) -> LiTOutput:
        image_embeds = self.encode_image(image_features)
        text_embeds = self.encode_text(text_features)
        logits = clip_logits(image_embeds, text_embeds, self.logit_scale, self.config.max_logit_scale)
        loss = info_nce(logits) if return_loss else None
        return LiTOutput(loss, logits, logits.T, image_embeds, text_embeds)

    @property
    def temperature(self) -> float:
        return temperature_from(self.logit_scale, self.config.max_logit_scale)


# -----------------------------------------------------------------------------
# 3. Training and evaluation on cached features


def _pool_once(image_features: torch.Tensor) -> torch.Tensor:
    # Mean-pooling is fixed (nothing learned), so do it once for a whole split:
    # (N, T, D) float16 -> (N, 1, D) float32. encode_image's mean over 1 token is a no-op.
    return image_features.float().mean(dim=1, keepdim=True)


def _check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 3:
        raise ValueError(f"image features must be (N_images, tokens, dim), got {tuple(image_features.shape)}")
    if text_features.dim() != 3:
        raise ValueError(
            f"caption features must be (N_images, captions_per_image, dim), got {tuple(text_features.shape)}"
        )
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"image and caption features disagree on the number of images: "
            f"{image_features.shape[0]} vs {text_features.shape[0]}"
        )


@dataclass
class LiTTrainConfig(TrainConfig):
    """`vlmcourse.train.TrainConfig` plus what LiT adds: the batch size, and the length in epochs.

    The defaults are what notebook 02 picked on the dev split. An epoch is
    `N_images // batch_size` steps, so `epochs=10` on 646 photos is 100 steps;
    `epochs=None` uses `steps` as given. Everything else (AdamW betas 0.9/0.98,
    weight decay 0.05, warm-up then cosine decay, clipping, NaN stop, checkpoints,
    seeding) is the shared training loop's.
    """

    epochs: int | None = 10
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 10        # one epoch of the cpu profile's 646 photos
    eval_every: int = 20          # steps between dev-loss measurements (if dev features are given)
    desc: str = "train LiT"

    def steps_per_epoch(self, n_images: int) -> int:
        return max(1, n_images // min(self.batch_size, n_images))  # the ragged last batch is not counted

    def total_steps(self, n_images: int) -> int:
        return self.steps if self.epochs is None else self.epochs * self.steps_per_epoch(n_images)


@torch.no_grad()
def contrastive_eval_loss(model: LiTModel, image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Loss over a whole split as one batch (all images vs caption j), averaged over j.

    One batch of N pairs is a N-way choice, so its loss starts near log(N); the
    notebook draws that line for reference.
    """
    _check_pairs(image_features, text_features)
    with eval_mode(model):
        image_embeds = model.encode_image(_pool_once(image_features))
        losses = []
        for j in range(text_features.shape[1]):
            text_embeds = model.encode_text(text_features[:, j])
            losses.append(clip_loss(image_embeds, text_embeds, model.logit_scale, model.config.max_logit_scale))
    return torch.stack(losses).mean().item()


def lit_batches(image_features: torch.Tensor, text_features: torch.Tensor, batch_size: int):
    """`batch_fn` for `vlmcourse.train.train`: `batch_size` different images, each with one of its captions.

    image_features: (N, 1, image_dim) pooled once (see `_pool_once`); text_features:
    (N, captions_per_image, text_dim). Images and captions are drawn from the
    step's generator only, so a resumed run sees the same batches. No image comes
    twice in a batch: its second copy would be a "negative" that is really a match.
    """
    n_images, n_captions = text_features.shape[:2]
    batch_size = min(batch_size, n_images)

    def batch_fn(step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randperm(n_images, generator=generator)[:batch_size]
        caption = torch.randint(n_captions, (batch_size,), generator=generator)
        return {"image_features": image_features[idx], "text_features": text_features[idx, caption]}

    return batch_fn


def lit_loss(model: LiTModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`loss_fn` for `vlmcourse.train.train`: the model's InfoNCE loss, and 1/temperature to plot."""
    out = model(**batch)
    lit = getattr(model, "module", model)  # unwrapped, if accelerate wrapped it
    inverse_temperature = logit_multiplier(lit.logit_scale.detach(), lit.config.max_logit_scale)
    return {"loss": out.loss, "inverse_temperature": inverse_temperature}


def train_lit(
    model: LiTModel,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    config: LiTTrainConfig | None = None,
    dev: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TrainResult:
    """Train the projections and the temperature with the course's one training loop.

    image_features: (N, T, image_dim) cached patch tokens; text_features:
    (N, captions_per_image, text_dim) cached pooled captions. Every step draws
    `batch_size` different images, each paired with one of its captions at random
    (`lit_batches`), so over many steps all captions are used. Returns
    `vlmcourse.train.TrainResult`: `result.column("loss")` and
    `result.column("inverse_temperature")` per step, and with
    `dev=(image_features, text_features)`, `result.column("dev_loss", "evals")`
    every `eval_every` steps and at the end (`contrastive_eval_loss`).
    """
    config = config or LiTTrainConfig()
    _check_pairs(image_features, text_features)
    if dev is not None:
        _check_pairs(*dev)
    n_images = image_features.shape[0]
    if n_images < 2:
        raise ValueError("contrastive training needs at least 2 images per batch")
    batch_fn = lit_batches(_pool_once(image_features), text_features, config.batch_size)
    eval_fn = None
    if dev is not None:
        dev_images, dev_texts = _pool_once(dev[0]), dev[1]

        def eval_fn(model: LiTModel) -> dict[str, float]:
            return {"dev_loss": contrastive_eval_loss(model, dev_images, dev_texts)}

    return train(model, batch_fn, lit_loss, replace(config, steps=config.total_steps(n_images)), eval_fn=eval_fn)


@torch.no_grad()
def evaluate_lit(
    model: LiTModel,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[int, float]]:
    """Recall@K both ways: every image against every caption of the split."""
    _check_pairs(image_features, text_features)
    n_images, c, _ = text_features.shape
    with eval_mode(model):
        image_embeds = model.encode_image(_pool_once(image_features))
        text_embeds = model.encode_text(text_features.reshape(n_images * c, -1))
    return retrieval_recall(image_embeds, text_embeds, c, ks)
