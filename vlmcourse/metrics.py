"""Caption metrics without Java: BLEU-4 and CIDEr-D from pycocoevalcap's pure-Python scorers.

The COCO caption toolkit tokenises with Stanford's PTB tokenizer (Java). We use
a simple stand-in: lowercase, punctuation removed, split on whitespace. Scores
are close to, not identical with, published ones. CIDEr-D weighs n-grams by
their rarity (IDF) *among the references of the images scored*, so it is only
comparable between runs on the same set of images.
"""
from __future__ import annotations

import re
import string

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
