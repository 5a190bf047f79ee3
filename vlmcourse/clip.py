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
2. `recall_at_k` / `chance_recall`: how we score retrieval, and what a model
   that guesses would score.
3. `LiTConfig` / `LiTModel`: "Locked-image Tuning" (Zhai et al., 2022). Both
   towers are pretrained and frozen; we only train a projection on each side
   and the temperature. Because the towers never change, we run them once,
   cache their features, and every training step is just two small MLPs.
4. `encode_captions`, `train_lit`, `evaluate_lit`: features in, loss history
   and Recall@K out. `train_lit` is a batch function and a loss function for
   the course's one training loop, `vlmcourse.train.train`.
5. `load_hub_clip` / `clip_embeddings`: the same retrieval code on a real
   CLIP ViT-B/16 (only with the `hub` profile; it needs the internet).
6. A few plotting helpers used by notebook 02.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmcourse.train import TrainConfig, TrainResult, train
from vlmcourse.utils import progress_bar

__all__ = [
    "LOGIT_SCALE_INIT",
    "MAX_LOGIT_SCALE",
    "HUB_CLIP_NAME",
    "info_nce",
    "clip_logits",
    "clip_loss",
    "caption_image_index",
    "recall_at_k",
    "chance_recall",
    "LiTConfig",
    "Projection",
    "LiTOutput",
    "LiTModel",
    "encode_captions",
    "cache_caption_features",
    "LiTTrainConfig",
    "contrastive_eval_loss",
    "lit_batches",
    "lit_loss",
    "train_lit",
    "evaluate_lit",
    "retrieval_recall",
    "recall_table",
    "recall_std_table",
    "mean_std_table",
    "load_hub_clip",
    "clip_embeddings",
    "plot_similarity",
    "plot_recall_bars",
    "plot_history",
    "plot_text_to_image_gallery",
]

# CLIP's initial temperature is 0.07; we store its log-inverse, so that the
# parameter can move freely in both directions and exp() keeps it positive.
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # ~2.659
# CLIP caps the scale at 100 (temperature 0.01): beyond that training is unstable.
MAX_LOGIT_SCALE = 100.0

HUB_CLIP_NAME = "openai/clip-vit-base-patch16"


# -----------------------------------------------------------------------------
# 1. The loss


def _check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (batch, dim), got {shape}")


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
    scale = logit_scale.exp().clamp(max=max_logit_scale)
    return scale * image_embeds @ text_embeds.T


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
# 2. Retrieval metrics


def caption_image_index(captions_per_image: int | Sequence[int], n_images: int | None = None) -> torch.Tensor:
    """For captions stored image by image, the image each caption belongs to.

    `caption_image_index(5, 3)` -> tensor([0,0,0,0,0, 1,1,1,1,1, 2,2,2,2,2]).
    """
    if isinstance(captions_per_image, int):
        if n_images is None:
            raise ValueError("give n_images when captions_per_image is a single number")
        counts = torch.full((n_images,), captions_per_image)
    else:
        counts = torch.as_tensor(list(captions_per_image))
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def recall_at_k(
    similarity: torch.Tensor,
    caption_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[int, float]]:
    """Recall@K in both directions from an (N_images, N_texts) similarity matrix.

    `caption_to_image[t]` is the index of the image caption t describes.
    image->text: an image counts as found if ANY of its captions is in its top K
    (Flickr/COCO convention: every caption is a correct answer).
    text->image: a caption counts as found if its own image is in its top K.
    Ties count against the model: a wrong item scoring *equal* to the right one ranks above it,
    so a model that gives every pair the same score gets chance-level recall, not 100%.
    Returns {"image->text": {K: recall}, "text->image": {K: recall}}, recalls in [0, 1].
    """
    _check_2d("similarity", similarity)
    n_images, n_texts = similarity.shape
    caption_to_image = torch.as_tensor(caption_to_image, device=similarity.device).long()
    if caption_to_image.shape != (n_texts,):
        raise ValueError(
            f"caption_to_image must give one image index per column of similarity "
            f"({n_texts}), got shape {tuple(caption_to_image.shape)}"
        )
    if caption_to_image.min() < 0 or caption_to_image.max() >= n_images:
        raise ValueError(f"caption_to_image has indices outside [0, {n_images})")
    counts = torch.bincount(caption_to_image, minlength=n_images)
    if (counts == 0).any():
        raise ValueError("every image needs at least one caption for image->text recall")

    similarity = similarity.float()
    text_ids = torch.arange(n_texts, device=similarity.device)
    correct = similarity[caption_to_image, text_ids]  # score of each caption with its own image
    # text->image: how many images beat the right one, for each caption (0 = top-1).
    wrong_image = torch.ones_like(similarity, dtype=torch.bool)
    wrong_image[caption_to_image, text_ids] = False
    t2i_rank = ((similarity >= correct[None, :]) & wrong_image).sum(dim=0)
    # image->text: rank of each correct caption in its image's row; keep the best one.
    # only the image's *wrong* captions count: its other right captions are fine answers too
    wrong_caption = caption_to_image[:, None] != caption_to_image[None, :]
    caption_rank = ((similarity[caption_to_image] >= correct[:, None]) & wrong_caption).sum(dim=1)
    i2t_rank = torch.full((n_images,), n_texts, device=similarity.device, dtype=caption_rank.dtype)
    i2t_rank = i2t_rank.scatter_reduce(0, caption_to_image, caption_rank, reduce="amin")

    return {
        "image->text": {k: (i2t_rank < k).float().mean().item() for k in ks},
        "text->image": {k: (t2i_rank < k).float().mean().item() for k in ks},
    }


def chance_recall(
    n_images: int,
    captions_per_image: int = 5,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[int, float]]:
    """Expected Recall@K of a model that ranks at random (exact, no sampling).

    text->image: the right image is one of n_images, so P = K / n_images.
    image->text: c of the M = n_images * c captions are right; a random top-K
    misses all of them with probability C(M - c, K) / C(M, K).
    """
    c, m = captions_per_image, n_images * captions_per_image
    return {
        "image->text": {k: 1 - math.comb(m - c, k) / math.comb(m, k) for k in ks},
        "text->image": {k: min(k, n_images) / n_images for k in ks},
    }


# -----------------------------------------------------------------------------
# 3. The LiT model: frozen towers (cached features) + trainable projections


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
        return 1 / self.logit_scale.detach().exp().clamp(max=self.config.max_logit_scale).item()


# -----------------------------------------------------------------------------
# 4. Features in, training and evaluation out


@torch.no_grad()
def encode_captions(
    text_encoder: Callable,
    captions: Sequence[Sequence[str]],
    batch_size: int = 128,
    progress: bool = True,
) -> torch.Tensor:
    """Run the frozen text tower once: (N_images, captions_per_image, hidden) float32 on CPU.

    `text_encoder` is `load_text_encoder(profile)`: `.tokenize(list_of_str)` -> dict,
    and calling it returns the last hidden state (B, T, H). We mean-pool over
    real tokens (the attention mask), which is how all-MiniLM-L6-v2 was trained.
    """
    per_image = {len(c) for c in captions}
    if len(per_image) != 1:
        raise ValueError(f"every image needs the same number of captions, got counts {sorted(per_image)}")
    (c,) = per_image
    flat = [s for caps in captions for s in caps]
    chunks = range(0, len(flat), batch_size)
    if progress:
        chunks = progress_bar(chunks, desc="encode captions", leave=False)
    pooled = []
    for start in chunks:
        batch = text_encoder.tokenize(flat[start : start + batch_size])
        hidden = text_encoder(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu())
    return torch.cat(pooled).view(len(captions), c, -1)


def cache_caption_features(text_encoder, dataset, image_ids: Sequence[str] | None = None,
                           refresh: bool = False) -> torch.Tensor:
    """`encode_captions` for a dataset, saved under $VLMCOURSE_CACHE/features and loaded after that.

    `image_ids` (e.g. `FeatureSet.image_ids`) picks and orders the images, so that
    row i of the caption features and row i of the image features are the same photo
    (cache_features leaves out unreadable photos).
    """
    from safetensors.torch import load_file, save_file

    from vlmcourse.utils import cache_dir

    position = {name: i for i, name in enumerate(dataset.image_ids)}
    image_ids = list(dataset.image_ids if image_ids is None else image_ids)
    missing = [name for name in image_ids if name not in position]
    if missing:
        raise ValueError(f"{len(missing)} image ids are not in the dataset (first: {missing[0]})")
    captions = [dataset.captions[position[name]] for name in image_ids]
    name = getattr(text_encoder, "name", type(text_encoder).__name__)
    digest = hashlib.sha1(repr((name, image_ids, captions)).encode()).hexdigest()[:12]
    path = cache_dir("features") / f"captions_{str(name).replace('/', '--')}_{len(image_ids)}_{digest}.safetensors"
    if path.is_file() and not refresh:
        return load_file(str(path))["captions"]
    features = encode_captions(text_encoder, captions)
    tmp = f"{path}.partial"
    save_file({"captions": features.contiguous()}, tmp)
    os.replace(tmp, path)  # never leave a half-written cache behind
    return features


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
    was_training = model.training
    model.eval()
    image_embeds = model.encode_image(_pool_once(image_features))
    losses = []
    for j in range(text_features.shape[1]):
        text_embeds = model.encode_text(text_features[:, j])
        losses.append(clip_loss(image_embeds, text_embeds, model.logit_scale, model.config.max_logit_scale))
    model.train(was_training)
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
    inverse_temperature = lit.logit_scale.detach().exp().clamp(max=lit.config.max_logit_scale)
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
    was_training = model.training
    model.eval()
    n_images, c, _ = text_features.shape
    image_embeds = model.encode_image(_pool_once(image_features))
    text_embeds = model.encode_text(text_features.reshape(n_images * c, -1))
    model.train(was_training)
    return retrieval_recall(image_embeds, text_embeds, c, ks)


def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    captions_per_image: int = 5,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[int, float]]:
    """Recall@K from embeddings: (N, D) images, (N * c, D) captions stored image by image.

    Shared by the LiT model and zero-shot CLIP, so both are scored by the same code.
    """
    _check_2d("image_embeds", image_embeds)
    _check_2d("text_embeds", text_embeds)
    n = image_embeds.shape[0]
    if text_embeds.shape[0] != n * captions_per_image:
        raise ValueError(
            f"expected {captions_per_image} captions per image ({n * captions_per_image} rows), "
            f"got {text_embeds.shape[0]}"
        )
    # The temperature does not change a ranking, so plain cosine similarity will do.
    similarity = clip_logits(image_embeds, text_embeds, 0.0)
    return recall_at_k(similarity, caption_image_index(captions_per_image, n), ks)


def _recall_frame(results, reduce):
    import pandas as pd

    rows = {}
    for name, runs in results.items():
        runs = [runs] if isinstance(runs, dict) else list(runs)
        rows[name] = {
            (direction, f"R@{k}"): reduce(torch.tensor([100 * run[direction][k] for run in runs]))
            for direction, by_k in runs[0].items()
            for k in by_k
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def recall_table(results: dict):
    """{"model": recall_at_k(...) or a list of them (seeds)} -> DataFrame of mean recall (%), a row per model."""
    return _recall_frame(results, lambda x: x.mean().item())


def recall_std_table(results: dict):
    """Like `recall_table`, but the standard deviation over seeds (0 for a single run)."""
    return _recall_frame(results, lambda x: x.std().item() if len(x) > 1 else 0.0)


def mean_std_table(mean, std):
    """Two recall tables -> one table of strings "45.1 ± 2.3" (just "6.6" where the std is 0)."""
    import pandas as pd

    cells = [[f"{m:.1f} ± {s:.1f}" if s > 0 else f"{m:.1f}" for m, s in zip(mr, sr)]
             for mr, sr in zip(mean.values, std.loc[mean.index, mean.columns].values)]
    return pd.DataFrame(cells, index=mean.index, columns=mean.columns)


# -----------------------------------------------------------------------------
# 5. Zero-shot CLIP ViT-B/16 (hub profile only)


def load_hub_clip(profile=None, name: str = HUB_CLIP_NAME):
    """Pretrained CLIP model and processor from the Hugging Face Hub: (model, processor).

    Only for the `hub` profile. Offline it fails at once with a HubUnavailableError
    that points at the `cpu` profile (unless the weights are already in the local cache).
    """
    from transformers import CLIPModel, CLIPProcessor

    from vlmcourse.profiles import HubUnavailableError, hub_from_pretrained

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

    def batches(items):
        starts = range(0, len(items), batch_size)
        if progress:
            starts = progress_bar(starts, leave=False)
        return (items[s : s + batch_size] for s in starts)

    image_embeds = []
    for chunk in batches(list(images)):
        pixel_values = processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)
        image_embeds.append(_pooled(model.get_image_features(pixel_values=pixel_values)).float().cpu())
    text_embeds = []
    for chunk in batches(list(captions)):
        batch = processor(text=chunk, padding=True, truncation=True, return_tensors="pt")
        text_embeds.append(
            _pooled(
                model.get_text_features(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                )
            )
            .float()
            .cpu()
        )
    return F.normalize(torch.cat(image_embeds), dim=-1), F.normalize(torch.cat(text_embeds), dim=-1)


# -----------------------------------------------------------------------------
# 6. Plotting helpers (notebook 02)


def plot_similarity(ax, matrix: torch.Tensor, title: str = "", fmt: str = "{:.2f}", cmap: str = "viridis",
                    row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                    vmin=None, vmax=None):
    """Heatmap of a small matrix with its numbers written in, rows = images, columns = captions."""
    m = matrix.detach().float().cpu()
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
    lo, hi = (m.min().item(), m.max().item()) if vmin is None else (vmin, vmax)
    for (i, j), v in zip(((i, j) for i in range(m.shape[0]) for j in range(m.shape[1])), m.flatten().tolist()):
        light = (v - lo) / (hi - lo + 1e-9) < 0.6
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=13, color="white" if light else "black")
    ax.set_xticks(range(m.shape[1]), col_labels or [f"caption {j}" for j in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), row_labels or [f"image {i}" for i in range(m.shape[0])])
    ax.set_title(title)
    return im


def plot_recall_bars(table, ax_per_direction=None, errors=None, title: str = ""):
    """Grouped bar chart of a `recall_table`: one panel per direction, one bar per model and K."""
    import matplotlib.pyplot as plt
    import numpy as np

    directions = list(dict.fromkeys(table.columns.get_level_values(0)))
    if ax_per_direction is None:
        fig, ax_per_direction = plt.subplots(1, len(directions), figsize=(6.5 * len(directions), 4.8), sharey=True)
    ks = list(dict.fromkeys(table.columns.get_level_values(1)))
    width = 0.8 / len(table)
    x = np.arange(len(ks))
    for ax, direction in zip(np.atleast_1d(ax_per_direction), directions):
        for i, name in enumerate(table.index):
            values = table.loc[name, direction].values.astype(float)
            err = None if errors is None or name not in errors.index else errors.loc[name, direction].values
            bars = ax.bar(x + (i - (len(table) - 1) / 2) * width, values, width, yerr=err, capsize=3, label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=10, padding=2)
        ax.set_xticks(x, ks)
        ax.set_title(direction.replace("->", " → "))
        ax.set_ylabel("recall (%)")
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    fig = np.atleast_1d(ax_per_direction)[0].figure
    handles, labels = np.atleast_1d(ax_per_direction)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return ax_per_direction


def plot_history(runs: Sequence[TrainResult], steps_per_epoch: int, batch_size: int, n_dev: int | None = None):
    """Loss curves (train: mean per epoch; dev: at the evaluated steps) and the learned 1/temperature.

    `runs` are `train_lit`'s results, one per seed: one thin line per run, the mean
    of the runs bold. Dashed lines mark log N, the loss of a uniform guess over the
    N candidates of a batch.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_loss, ax_scale) = plt.subplots(1, 2, figsize=(13, 4.3), gridspec_kw={"width_ratios": [1.6, 1]})
    epoch_losses, dev_losses = [], []
    for run in runs:
        loss = np.asarray(run.column("loss"))
        epochs = len(loss) // steps_per_epoch
        epoch_losses.append(loss[: epochs * steps_per_epoch].reshape(epochs, steps_per_epoch).mean(1))
        if run.column("dev_loss", "evals"):
            dev_losses.append(np.asarray(run.column("dev_loss", "evals")))
    x_train = np.arange(1, epochs + 1) - 0.5  # an epoch's mean sits at its middle
    for curve in epoch_losses:
        ax_loss.plot(x_train, curve, color="tab:blue", alpha=0.3, lw=1)
    ax_loss.plot(x_train, np.mean(epoch_losses, 0), color="tab:blue", lw=2.5, label="train (batch of %d)" % batch_size)
    if dev_losses:
        # an evaluation at (0-based) step s comes after s + 1 steps
        x_dev = (np.asarray(runs[0].column("step", "evals")) + 1) / steps_per_epoch
        for curve in dev_losses:
            ax_loss.plot(x_dev, curve, color="tab:orange", alpha=0.3, lw=1)
        ax_loss.plot(x_dev, np.mean(dev_losses, 0), color="tab:orange", lw=2.5, marker="o", ms=4,
                     label=f"dev (all {n_dev} images)" if n_dev else "dev")
    right = len(runs[0].history) / steps_per_epoch
    ax_loss.axhline(math.log(batch_size), color="tab:blue", ls="--", lw=1)
    ax_loss.text(right, math.log(batch_size), f"guess: log {batch_size} ", va="top", ha="right", color="tab:blue")
    if n_dev:
        ax_loss.axhline(math.log(n_dev), color="tab:orange", ls=":", lw=1)
        ax_loss.text(right, math.log(n_dev), f"guess: log {n_dev} ", va="bottom", ha="right", color="tab:orange")
    ax_loss.set_xlim(0, right)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("symmetric InfoNCE loss")
    ax_loss.set_ylim(0, math.log(max(batch_size, n_dev or 0)) + 0.9)
    ax_loss.legend(loc="upper right", bbox_to_anchor=(1, 0.74))
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title(f"loss ({len(runs)} seeds: thin = each, bold = mean)")

    for run in runs:
        steps = np.asarray(run.column("step")) / steps_per_epoch
        ax_scale.plot(steps, run.column("inverse_temperature"), color="tab:green", alpha=0.7)
    # The full range up to CLIP's cap, so a small change looks small.
    ax_scale.axhline(MAX_LOGIT_SCALE, color="gray", ls="--", lw=1)
    ax_scale.text(0, MAX_LOGIT_SCALE, f"CLIP's cap: {MAX_LOGIT_SCALE:g}", va="top", color="gray")
    ax_scale.text(0, 1 / 0.07, "start: 1/0.07 ≈ 14.3", va="bottom", color="tab:green")
    ax_scale.set_ylim(0, MAX_LOGIT_SCALE * 1.05)
    ax_scale.set_xlabel("epoch")
    ax_scale.set_ylabel("1 / temperature")
    ax_scale.set_title("learned 1/τ = exp(logit_scale)")
    ax_scale.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_text_to_image_gallery(similarity: torch.Tensor, caption_to_image: torch.Tensor, captions: Sequence[str],
                               caption_ids: Sequence[int], load_image: Callable, k: int = 5):
    """For each chosen caption, its top-k photos; the correct photo gets a thick green frame."""
    import textwrap

    import matplotlib.pyplot as plt
    from PIL import ImageOps

    fig = plt.figure(figsize=(2.6 * k, 3.2 * len(caption_ids)), layout="constrained")
    for subfig, t in zip(fig.subfigures(len(caption_ids), 1, hspace=0.04), caption_ids):
        truth = int(caption_to_image[t])
        rank = int((similarity[:, t] > similarity[truth, t]).sum()) + 1
        subfig.suptitle(textwrap.fill(f'"{captions[t]}"', 90) + f"   (correct photo: rank {rank})",
                        fontsize=13, x=0.01, ha="left")
        axes = subfig.subplots(1, k)
        for col, (ax, i) in enumerate(zip(axes, similarity[:, t].topk(k).indices.tolist())):
            ax.imshow(ImageOps.fit(load_image(i), (224, 224)))  # centre crop, no stretching
            ax.set_xticks([])
            ax.set_yticks([])
            hit = i == truth
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if hit else "lightgray")
                spine.set_linewidth(7 if hit else 1)
            ax.set_xlabel(f"#{col + 1}" + ("  ✓ correct" if hit else ""), fontsize=12,
                          color="green" if hit else "black", fontweight="bold" if hit else "normal")
    return fig
