"""How good are the captions? Evaluation of a captioner, with its baselines and diagnostics.

* ``mean_caption_loss``: the caption LM loss averaged over a whole split (an evaluation, not a training loss);
* ``evaluate_captions``: greedy captions, BLEU-4 / CIDEr-D (metrics.py), distinct and empty captions, P(EOS) first;
* baselines measured the same way: the model shown a blank gray photo (``blank_image_features``), the caption of the
  most similar train photo (``nearest_neighbour_captions``), one caption for every photo (``constant_caption``),
  and how many captions change when the photos' soft prompts are swapped (``swapped_image_captions``);
* ``evaluate_captioner``: all of it for a saved captioner (``python -m vlmcourse evaluate``).

A model that does not beat the baselines is not looking at the image.
"""
from __future__ import annotations

import os
import random
from collections import Counter

import torch
from PIL import Image
from torch import nn

from .backbones import load_vision_encoder
from .features import captions_for, patch_tokens, split_features
from .lora import LoRACaptioner
from .metrics import caption_metrics, caption_stats, normalize_caption
from .profiles import Profile, as_profile
from .stage2 import GENERATION_BATCH, SoftPromptCaptioner


@torch.no_grad()
def mean_caption_loss(captioner: SoftPromptCaptioner, image_embeds: torch.Tensor, captions: list[list[str]] | list[str],
                 batch_size: int = 64) -> float:
    """Mean caption LM loss per labelled token (caption tokens and EOS) over every (image, caption) pair.

    ``captions[i]`` is one caption or a list of captions of image ``i``. Images with several captions go in
    batches of whole images (at most ``batch_size`` captions, unless one image has more), each image's prefix
    read once (``grouped_loss``).
    """
    lists = [[caps] if isinstance(caps, str) else list(caps) for caps in captions]
    if any(len(caps) > 1 for caps in lists):
        batches, chunk, size = [], [], 0
        for i, caps in enumerate(lists):
            if chunk and size + len(caps) > batch_size:
                batches.append(chunk)
                chunk, size = [], 0
            chunk.append(i)
            size += len(caps)
        batches = [(chunk, [lists[i] for i in chunk]) for chunk in batches + [chunk]]
    else:
        starts = range(0, len(lists), batch_size)
        batches = [(list(range(s, min(s + batch_size, len(lists)))), [caps[0] for caps in lists[s:s + batch_size]])
                   for s in starts]
    total, tokens = 0.0, 0
    for idx, text in batches:
        n = sum(len(ids) for ids in captioner.caption_ids([c for i in idx for c in lists[i]]))   # labelled tokens
        total += float(captioner(image_embeds[idx], text)) * n
        tokens += n
    return total / tokens


@torch.no_grad()
def evaluate_captions(captioner: SoftPromptCaptioner, references: list[list[str]],
                      image_embeds: torch.Tensor | None = None, soft_prompts: torch.Tensor | None = None,
                      max_new_tokens: int = 30, batch_size: int = GENERATION_BATCH) -> dict:
    """Greedy captions for every image and how good and varied they are.

    Give image features, or soft prompts (zeroed, swapped, ...); a single (1, Q, H) soft prompt stands
    for every image. Returns a dict:
    "captions" (list), "distinct", "empty", "P(EOS) first" (the mean probability
    that the caption ends before it starts), "BLEU-4" and "CIDEr-D" (metrics.py).
    """
    if soft_prompts is not None and len(soft_prompts) == 1 and len(references) > 1:
        # one soft prompt for every image (e.g. all zeros): the LLM sees the same input, caption it once
        one = evaluate_captions(captioner, references[:1], soft_prompts=soft_prompts, max_new_tokens=max_new_tokens)
        captions = one["captions"] * len(references)
        return {**one, "captions": captions, **caption_metrics(captions, references)}
    first = []
    captions = captioner.generate(image_embeds, max_new_tokens, soft_prompts=soft_prompts, batch_size=batch_size,
                                  first_step_probs=first)
    p_eos = torch.cat([probs[:, captioner.eos_id].cpu() for probs in first])
    stats = caption_stats(captions)
    return {"captions": captions, "distinct": stats["distinct"], "empty": stats["empty"],
            "P(EOS) first": float(p_eos.mean()), **caption_metrics(captions, references)}


def blank_image_features(vision, color: tuple[int, int, int] = (128, 128, 128)) -> torch.Tensor:
    """(1, T, D) features of a uniform gray photo: captions from it show what the model says without an image."""
    return patch_tokens(vision, [Image.new("RGB", (vision.image_size, vision.image_size), color)])


def rolled(captions: list[str], shift: int = 1) -> list[str]:
    """Photo i gets photo i - ``shift``'s caption: the greedy captions of soft prompts rolled by ``shift``."""
    return [captions[(i - shift) % len(captions)] for i in range(len(captions))]


@torch.no_grad()
def swapped_image_captions(model: SoftPromptCaptioner, image_embeds: torch.Tensor, captions: list[str] | None = None,
                           shift: int = 1, max_new_tokens: int = 30, batch_size: int = GENERATION_BATCH) -> dict:
    """Caption each photo from another photo's soft prompts (photo i gets photo i - ``shift``'s).

    Returns {"captions": the swapped captions, "changed": the fraction of photos whose caption differs from
    its own-image caption (``captions``, generated when not given)}. Near 0: the captions ignore the image.

    Greedy decoding is a function of the soft prompts alone (the prompt is the same for every photo), so photo i's
    swapped caption *is* photo i - ``shift``'s own caption: it is read off, not generated again. ``captions`` must
    then be this model's greedy captions of ``image_embeds`` with this ``max_new_tokens``.
    """
    if captions is None:
        captions = model.generate(image_embeds, max_new_tokens, batch_size=batch_size)
    if len(captions) != len(image_embeds):
        raise ValueError(f"{len(image_embeds)} photos but {len(captions)} own captions")
    swapped = rolled(captions, shift)
    changed = sum(a != b for a, b in zip(captions, swapped)) / max(1, len(captions))
    return {"captions": swapped, "changed": changed}


def swapped_report(report: dict, references: list[list[str]], shift: int = 1) -> dict:
    """``evaluate_captions``'s report for the soft prompts rolled by ``shift`` (photo i reads photo i - ``shift``'s,
    as ``soft_prompts.roll(shift, 0)`` gives), read off the own-photo ``report`` instead of generated again, as in
    ``swapped_image_captions``: the captions are the own ones rolled, scored against ``references``; their variety
    and the mean P(EOS) of the first step do not change with the order."""
    if len(report["captions"]) != len(references):
        raise ValueError(f"{len(report['captions'])} captions but {len(references)} reference lists")
    captions = rolled(report["captions"], shift)
    return {**report, "captions": captions, **caption_metrics(captions, references)}


def consensus_captions(captions: list[list[str]]) -> list[str]:
    """For each photo, the caption its other captions agree with most: the highest CIDEr-D against the
    photo's other references (leave-one-out; the IDF comes from all the photos given)."""
    pairs = [(i, j) for i, caps in enumerate(captions) for j in range(len(caps))]
    scores = caption_metrics([captions[i][j] for i, j in pairs],
                             [captions[i][:j] + captions[i][j + 1:] or captions[i] for i, j in pairs],
                             per_image=True)["CIDEr-D per image"]
    best: dict[int, tuple[float, int]] = {}
    for (i, j), score in zip(pairs, scores):
        if i not in best or score > best[i][0]:
            best[i] = (score, j)
    return [captions[i][best[i][1]] for i in range(len(captions))]


@torch.no_grad()
def nearest_neighbour_captions(train_features: torch.Tensor, train_captions: list[list[str]],
                               test_features: torch.Tensor) -> list[str]:
    """For each test photo, a caption of the most similar train photo: cosine similarity of the patch tokens'
    mean, and of that photo's captions the consensus one (``consensus_captions``: the highest CIDEr-D
    against its other captions). A model should beat this retrieval baseline to claim it describes."""
    def pooled(x):
        return nn.functional.normalize(x.float().mean(1), dim=-1)

    if len(train_features) != len(train_captions):
        raise ValueError(f"{len(train_features)} train feature rows but {len(train_captions)} caption lists")
    nearest = (pooled(test_features) @ pooled(train_features).T).argmax(1).tolist()
    photos = sorted(set(nearest))
    consensus = dict(zip(photos, consensus_captions([train_captions[k] for k in photos])))
    return [consensus[k] for k in nearest]


def constant_caption(train_captions: list[list[str]], candidates: int = 32, sample: int = 100, seed: int = 0) -> str:
    """The one train caption that scores best when it is every photo's caption: a baseline that ignores the image.

    Chosen cheaply (a few seconds) and from the train split only: the ``candidates`` captions of the median
    length whose words are the most common (mean document frequency), then of those the one with the
    highest CIDEr-D on ``sample`` random train photos.
    """
    flat = list(dict.fromkeys(c for caps in train_captions for c in caps))
    words = [normalize_caption(c).split() for c in flat]
    df = Counter(w for ws in words for w in set(ws))
    median = sorted(map(len, words))[len(words) // 2]
    typical = sorted((i for i, ws in enumerate(words) if len(ws) == median),
                     key=lambda i: -sum(df[w] for w in words[i]) / max(1, median))[:candidates]
    photos = random.Random(seed).sample(range(len(train_captions)), min(sample, len(train_captions)))
    scores = caption_metrics([flat[i] for i in typical for _ in photos],
                             [train_captions[p] for _ in typical for p in photos], per_image=True)["CIDEr-D per image"]
    totals = [sum(scores[k * len(photos):(k + 1) * len(photos)]) for k in range(len(typical))]
    return flat[typical[totals.index(max(totals))]]


def evaluate_captioner(model: LoRACaptioner | str | os.PathLike, profile: Profile | str | None = None,
                       split: str = "test", data_root=None, max_new_tokens: int = 30) -> dict:
    """The captioner (or the folder it was saved to) on ``split``, against the baselines, with the same metrics.

    Returns {"split", "captions" (how many), "bleu4", "cider", "distinct", "empty", "p_eos_first", "unreadable_images",
    "changed_when_swapped", "blank_image": {bleu4, cider, caption}, "nearest_neighbour": {bleu4, cider},
    "constant": {bleu4, cider, caption}, "predictions": [{"image_id", "caption"}]}.
    """
    if not isinstance(model, SoftPromptCaptioner):
        model = LoRACaptioner.from_pretrained(model, profile=profile)
    model.eval()                    # no dropout (LoRA's) in the captions
    profile = as_profile(profile or getattr(model, "profile_name", None))
    vision = load_vision_encoder(profile)
    if isinstance(model, LoRACaptioner):
        model.check_vision(vision)
    feats, ds = split_features(profile, split, vision, data_root)
    references = captions_for(feats, ds)
    report = evaluate_captions(model, references, feats.features, max_new_tokens=max_new_tokens)
    blank = evaluate_captions(model, references, soft_prompts=model.soft_prompts(blank_image_features(vision)),
                              max_new_tokens=max_new_tokens)
    swapped = swapped_image_captions(model, feats.features, report["captions"], max_new_tokens=max_new_tokens)
    train_feats, train_ds = split_features(profile, "train", vision, data_root)
    train_refs = captions_for(train_feats, train_ds)
    neighbours = nearest_neighbour_captions(train_feats.features, train_refs, feats.features)
    neighbour = caption_metrics(neighbours, references)
    constant = constant_caption(train_refs)
    fixed = caption_metrics([constant] * len(references), references)

    def scores(m):
        return {"bleu4": m["BLEU-4"], "cider": m["CIDEr-D"]}

    read = set(feats.image_ids)
    return {"split": split, "captions": len(report["captions"]), **scores(report), "distinct": report["distinct"],
            "unreadable_images": [i for i in ds.image_ids if i not in read],     # skipped: scored without them
            "empty": report["empty"], "p_eos_first": report["P(EOS) first"], "changed_when_swapped": swapped["changed"],
            "blank_image": {**scores(blank), "caption": blank["captions"][0]},
            "nearest_neighbour": scores(neighbour), "constant": {**scores(fixed), "caption": constant},
            "predictions": [{"image_id": i, "caption": c} for i, c in zip(feats.image_ids, report["captions"])]}

