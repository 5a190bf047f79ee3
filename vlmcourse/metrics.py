"""How the course scores its models: captions (BLEU-4, CIDEr-D) and retrieval (Recall@K, chance, tables).

Plain functions of tensors and strings, with no model in sight: every model file may use them.

Caption metrics without Java: BLEU-4 and CIDEr-D from pycocoevalcap's pure-Python scorers.
The COCO caption toolkit tokenises with Stanford's PTB tokenizer (Java). We use
a simple stand-in: lowercase, punctuation removed, split on whitespace. Scores
are close to, not identical with, published ones. CIDEr-D weighs n-grams by
their rarity (IDF) *among the references of the images scored*, so it is only
comparable between runs on the same set of images.
"""
from __future__ import annotations

import math
import re
import string
from typing import Sequence

import torch
import torch.nn.functional as F

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_caption(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, whitespace collapsed: "A dog, running." -> "a dog running"."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_metrics(predictions: list[str], references: list[list[str]], per_image: bool = False) -> dict:
    """Corpus BLEU-4 and CIDEr-D of one predicted caption per image against its references.

    Returns {"BLEU-4": float, "CIDEr-D": float}; with ``per_image=True`` also
    "CIDEr-D per image" (a list, in the order of ``predictions``).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("no captions to score")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference caption")
    res = {i: [normalize_caption(p)] for i, p in enumerate(predictions)}
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per_image = Cider().compute_score(gts, res)
    out = {"BLEU-4": float(bleu[3]), "CIDEr-D": float(cider)}
    if per_image:
        out["CIDEr-D per image"] = [float(x) for x in cider_per_image]
    return out


def caption_stats(predictions: list[str]) -> dict:
    """How varied the captions are: number of distinct (normalised) captions, of empty ones, mean words."""
    normal = [normalize_caption(p) for p in predictions]
    return {"captions": len(normal), "distinct": len(set(normal)), "empty": sum(not c for c in normal),
            "mean words": sum(len(c.split()) for c in normal) / max(1, len(normal))}


# ---------------------------------------------------------------------------- retrieval
def _check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (batch, dim), got {shape}")


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
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"image and text embeddings must have the same width to be compared, "
                         f"got {image_embeds.shape[1]} and {text_embeds.shape[1]}")
    # The temperature does not change a ranking, so plain cosine similarity will do.
    similarity = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    return recall_at_k(similarity, caption_image_index(captions_per_image, n), ks)


def _recall_frame(results, reduce):
    import pandas as pd  # only for tables: not needed to score

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
    import pandas as pd  # only for tables: not needed to score

    cells = [[f"{m:.1f} ± {s:.1f}" if s > 0 else f"{m:.1f}" for m, s in zip(mr, sr)]
             for mr, sr in zip(mean.values, std.loc[mean.index, mean.columns].values)]
    return pd.DataFrame(cells, index=mean.index, columns=mean.columns)

