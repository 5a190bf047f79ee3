"""BLIP-2's three stage-1 losses, each with the Q-Former mask it needs.

- ITC (image-text contrastive): queries and text run under the *uni-modal* mask,
  so neither can peek at the other. Each of the Q query outputs is compared
  with the text's [CLS]; the best-matching query gives the image-text score.
- ITM (image-text matching): queries and text see each other (*bi-directional*
  mask); a binary head over the mean query output says "match" or "not". Easy
  negatives teach nothing, so negatives are *hard*: sampled in proportion to
  their ITC similarity, never the positive itself.
- ITG (image-grounded text generation): the *multimodal causal* mask lets text
  read all queries but only earlier text; queries cannot read text, so
  everything the caption needs must pass through them.

The masks themselves live in ``qformer.self_attention_mask``; this file only
names which one each loss uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
MASK_FOR_LOSS = {"itc": "itc", "itm": "itm", "itg": "itg"}   # loss -> qformer mask_type

# The temperature, one convention for every contrastive loss in the course (CLIP's, and transformers.CLIPModel's):
# the learned parameter is logit_scale = log(1/τ), so exp() keeps 1/τ positive and a step moves τ by a ratio; the
# multiplier exp(logit_scale) is capped (CLIP: 100, τ ≥ 0.01). Both CLIP and BLIP-2 start at τ = 0.07.
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # ~2.659
MAX_LOGIT_SCALE = 100.0


def logit_multiplier(logit_scale: torch.Tensor | float, max_logit_scale: float = MAX_LOGIT_SCALE) -> torch.Tensor:
    """1/τ = exp(logit_scale), capped at ``max_logit_scale``: what cosine similarities are multiplied by."""
    return torch.as_tensor(logit_scale).exp().clamp(max=max_logit_scale)


def temperature_from(logit_scale: torch.Tensor | float, max_logit_scale: float = MAX_LOGIT_SCALE) -> float:
    """τ, read off a ``logit_scale`` (as the loss uses it: capped)."""
    return 1 / logit_multiplier(torch.as_tensor(logit_scale).detach(), max_logit_scale).item()


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(Bi, Q, E) query features x (Bt, E) text features -> (Bi, Bt): max over the Q queries.

    Both are expected L2-normalised, so each entry is the best cosine similarity.
    """
    if image_feats.ndim != 3 or text_feats.ndim != 2 or image_feats.shape[-1] != text_feats.shape[-1]:
        raise ValueError(f"expected image_feats (Bi, Q, E) and text_feats (Bt, E), got "
                         f"{tuple(image_feats.shape)} and {tuple(text_feats.shape)}")
    return torch.einsum("iqe,te->iqt", image_feats, text_feats).max(dim=1).values


def positives(image_ids: list, text_image_ids: list | None = None) -> torch.Tensor:
    """(Bi, Bt) bool: True where text t describes image i (same image id, so duplicates count)."""
    text_image_ids = image_ids if text_image_ids is None else text_image_ids
    return torch.tensor([[a == b for b in text_image_ids] for a in image_ids])


def positives_from_lists(positive_captions: list[list[int]]) -> torch.Tensor:
    """(B, B) bool from row lists: ``positive_captions[i]`` holds the batch rows whose caption fits image i."""
    pos = torch.zeros(len(positive_captions), len(positive_captions), dtype=torch.bool)
    for i, rows in enumerate(positive_captions):
        pos[i, list(rows)] = True
    if not pos.diagonal().all():
        raise ValueError("positive_captions[i] must include i: an image's own caption fits it")
    return pos


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor,
             image_ids: list | None = None, label_smoothing: float = 0.0, rows: torch.Tensor | None = None,
             is_positive: torch.Tensor | None = None, max_logit_scale: float = MAX_LOGIT_SCALE):
    """Symmetric cross-entropy over the (B, B) max-over-queries similarities / τ (``logit_multiplier``).

    With ``image_ids``, captions of the same photo elsewhere in the batch are
    positives too (the target spreads over them), as in BLIP-2. ``is_positive`` (B, B) says it directly
    (where photos share captions, as in the shapes world, a caption of another photo can fit).
    ``rows``: the images and texts whose loss this process takes (``distributed.local_rows``), compared
    with the whole gathered batch; None: all of them.
    Returns (loss, sim_i2t) with sim_i2t already divided by the temperature.
    """
    sim_i2t = itc_similarity(image_feats, text_feats) * logit_multiplier(logit_scale, max_logit_scale)
    n = sim_i2t.shape[0]
    if is_positive is not None:
        pos = is_positive
    else:
        pos = positives(image_ids) if image_ids is not None else torch.eye(n, dtype=torch.bool)
    targets = pos.float().to(sim_i2t.device)
    targets = targets / targets.sum(1, keepdim=True)

    def take(x):        # (in this order: the gradients then add up in the order they always did, bit for bit)
        return x if rows is None else x[rows]

    loss_i2t = F.cross_entropy(take(sim_i2t), take(targets), label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(take(sim_i2t.t()), take(targets.t() / targets.t().sum(1, keepdim=True)),
                               label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2, sim_i2t


def sample_hard_negatives(sim_i2t: torch.Tensor, is_positive: torch.Tensor,
                          generator: torch.Generator | None = None,
                          random_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a negative text, and for each text a negative image.

    Sampled from the softmax of the ITC similarities with every positive (the
    pair itself and other captions of the same photo) given probability zero:
    the more a wrong pair looks right, the more often it is chosen.
    ``random_fraction`` of the draws (in expectation) are uniform over the negatives instead: easy
    pairs a young ITM head can learn from before the hard ones.
    Returns (neg_text_for_image (Bi,), neg_image_for_text (Bt,)).
    """
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction}")
    sim = sim_i2t.detach().float().cpu()
    is_positive = is_positive.cpu()
    if is_positive.all(1).any() or is_positive.all(0).any():
        raise ValueError("an item has no negative in this batch (every other item is the same photo): "
                         "sample batches with at least two different photos")

    def draw(scores, pos):
        weights = scores.softmax(1).masked_fill(pos, 0.0)
        # All-zero rows underflow when one similarity dominates: fall back to uniform over negatives.
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, (~pos).float())
        if random_fraction:     # a mixture: hard with probability 1 - r, uniform with probability r
            uniform = (~pos).float()
            weights = ((1 - random_fraction) * weights / weights.sum(1, keepdim=True)
                       + random_fraction * uniform / uniform.sum(1, keepdim=True))
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    return draw(sim, is_positive), draw(sim.t(), is_positive.t())


def itm_loss(itm_logits: torch.Tensor, num_positive: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the match head: the first ``num_positive`` rows are matches, the rest not."""
    labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(itm_logits.float(), labels), labels


def itg_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int):
    """Decoder inputs and labels for ITG: [CLS] becomes the decoder BOS, padding is labelled -100."""
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = bos_token_id
    labels = decoder_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return decoder_ids, labels


def itg_loss(outputs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1,
             lm_head: torch.nn.Module | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t+1 (BLIP-2 smooths labels by 0.1).

    ``outputs``: the decoder's logits (B, T, V), or, with ``lm_head``, its hidden states (B, T, H), of which only
    the positions that predict a label go through the head: the same loss, without projecting padding onto the
    whole vocabulary.
    """
    shifted_logits = outputs[:, :-1]
    shifted_labels = labels[:, 1:]
    if lm_head is not None:
        keep = shifted_labels != IGNORE_INDEX
        shifted_logits, shifted_labels = lm_head(shifted_logits[keep]), shifted_labels[keep]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
