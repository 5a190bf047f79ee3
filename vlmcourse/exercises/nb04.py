"""Answer checks for notebook 04 (stage 1: the ITC, ITM and ITG losses).

Each check prints a ✓ or a ✗ with a hint, never raises on a wrong answer, and
tells you how to start when your answer is still ``None``; all return None
(so no stray output in the notebook).
"""
from __future__ import annotations

import math

import torch

from vlmcourse import losses as L
from vlmcourse.exercises import _not_attempted

__all__ = ["EXERCISE_QUERIES", "EXERCISE_TEXTS", "EXERCISE_SITUATIONS", "EXERCISE_IMAGE_IDS", "EXERCISE_SIMILARITY",
           "EXERCISE_TEMPERATURE", "check_itc_similarity", "check_masks_for_situations", "check_never_sampled",
           "check_blind_itm_loss", "blind_itm_loss"]

# Exercise 1: 2 images x 3 query features, 2 caption features (all unit vectors in 2-d).
EXERCISE_QUERIES = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
                                 [[0.8, -0.6], [-0.6, 0.8], [-1.0, 0.0]]])
EXERCISE_TEXTS = torch.tensor([[0.6, 0.8], [0.8, -0.6]])

# Exercise 2: which mask does each situation need?
EXERCISE_SITUATIONS = {
    "a": "Search 10,000 photos for a new caption: each photo's features were computed once, before any caption existed.",
    "b": "Read a photo and a caption together and say whether the caption describes the photo.",
    "c": "Write a caption for a photo, one word at a time.",
}
_SITUATION_MASKS = {"a": "itc", "b": "itm", "c": "itg"}

# Exercise 3: a batch of 5 (photo, caption) pairs; the first two captions describe the same photo.
EXERCISE_IMAGE_IDS = ["dog.jpg", "dog.jpg", "bike.jpg", "beach.jpg", "cat.jpg"]
EXERCISE_SIMILARITY = torch.tensor([0.52, 0.47, 0.12, 0.35, -0.40])   # image 0 against texts 0..4 (cosines)
EXERCISE_TEMPERATURE = 0.07


# ----------------------------------------------------------------------------- exercise 1
def check_itc_similarity(answer, queries: torch.Tensor = EXERCISE_QUERIES, texts: torch.Tensor = EXERCISE_TEXTS) -> None:
    """Exercise 1: the (2 images x 2 captions) ITC similarity of the query and caption features."""
    n_images, n_queries, _ = queries.shape
    if answer is None:
        _not_attempted(
            f"Replace None with a {n_images} x {len(texts)} matrix (list of lists or tensor), rows = images, "
            f"columns = captions. For each (image, caption): the dot product of the caption with each of the "
            f"{n_queries} query features of the image, then keep one number out of the {n_queries}."
        )
        return
    try:
        got = torch.as_tensor(answer, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        print("✗ I could not read that as a matrix: use a list of lists of numbers, or a tensor.")
        return
    per_query = torch.einsum("iqe,te->iqt", queries, texts)    # (images, queries, captions)
    expected = L.itc_similarity(queries, texts)
    if got.shape != expected.shape:
        print(f"✗ Expected shape {tuple(expected.shape)} (rows = images, columns = captions), got {tuple(got.shape)}.")
        return
    close = lambda x: torch.allclose(got, x, atol=1e-3)  # noqa: E731
    if close(expected):
        best = per_query.argmax(1)
        print(f"✓ Correct! Each entry is the best of the {n_queries} query-caption cosines. The winning query "
              f"differs by pair (image 0: query {best[0, 0].item()} for caption 0, query {best[0, 1].item()} for "
              f"caption 1): each query can specialise in a different part of the photo.")
    elif close(expected.T):
        print("✗ That is the transpose. Hint: rows are images, columns are captions.")
    elif close(per_query.mean(1)):
        print("✗ That is the mean over the queries. Hint: BLIP-2 keeps the *best* query for each pair.")
    elif close(per_query.min(1).values):
        print("✗ That is the minimum over the queries. Hint: keep the query that matches the caption *best*.")
    elif close(per_query.sum(1)):
        print("✗ That is the sum over the queries. Hint: keep one query per pair, the best one.")
    elif close(per_query[:, 0]):
        print("✗ That uses only the first query (like a [CLS] token). Hint: look at all of them and keep the best.")
    else:
        print("✗ Not quite. Hint: S[i, t] = max over q of (queries[i, q] · texts[t]).")


# ----------------------------------------------------------------------------- exercise 2
def check_masks_for_situations(answer) -> None:
    """Exercise 2: {"a": mask, "b": mask, "c": mask} with masks out of "itc", "itm", "itg"."""
    if answer is None:
        _not_attempted(
            'Replace None with a dict like {"a": "itc", "b": "itc", "c": "itc"}, one of "itc", "itm", "itg" '
            "per situation. Ask: may the queries see the text? May a text token see later text?"
        )
        return
    if not isinstance(answer, dict):
        print('✗ Use a dict, e.g. {"a": "itc", "b": "itm", "c": "itg"}.')
        return
    got = {str(k).strip().lower(): str(v).strip().lower() for k, v in answer.items()}
    missing = sorted(set(_SITUATION_MASKS) - set(got))
    if missing:
        print(f"✗ Give a mask for every situation; missing: {missing}.")
        return
    unknown = {k: v for k, v in got.items() if v not in ("itc", "itm", "itg")}
    if unknown:
        print(f"✗ Unknown mask name(s) {unknown}: choose among 'itc', 'itm', 'itg'.")
        return
    hints = {
        "a": "the photo features must not depend on the caption (there was none yet): queries may not see text.",
        "b": "a yes/no judgement of a pair is best made with queries and text reading each other.",
        "c": "a word may look at the image (the queries) and the words before it, never the words after it.",
    }
    wrong = [k for k in _SITUATION_MASKS if got[k] != _SITUATION_MASKS[k]]
    if not wrong:
        print("✓ Correct! (a) ITC: image and text are embedded apart, so photo features are computed once and "
              "reused. (b) ITM: full interaction. (c) ITG: text reads the queries and only earlier text.")
        return
    print("✗ Not quite. " + " ".join(f"Hint for ({k}): {hints[k]}" for k in wrong))


# ----------------------------------------------------------------------------- exercise 3
def _sampler_never(image_ids, similarity, temperature) -> set[int]:
    """Texts the hard-negative sampler gives probability exactly 0 for image 0 (positives, or underflow)."""
    is_positive = L.positives(image_ids)[0]
    weights = (similarity / temperature).softmax(0).masked_fill(is_positive, 0.0)
    return {i for i, w in enumerate(weights.tolist()) if w == 0.0}


def check_never_sampled(answer, image_ids=EXERCISE_IMAGE_IDS, similarity=EXERCISE_SIMILARITY,
                        temperature: float = EXERCISE_TEMPERATURE) -> None:
    """Exercise 3: which texts can ``losses.sample_hard_negatives`` never return as image 0's negative?"""
    if answer is None:
        _not_attempted(
            "Replace None with a set of text indices, e.g. {2}. The sampler draws from softmax(similarity / "
            "temperature) after setting some entries to zero: which ones, and can a softmax weight be zero otherwise?"
        )
        return
    if isinstance(answer, int):
        answer = {answer}
    try:
        got = {int(i) for i in answer}
    except (TypeError, ValueError):
        print("✗ Use a set of integers (text indices 0 to 4), e.g. {2, 3}.")
        return
    expected = _sampler_never(image_ids, similarity, temperature)
    probs = (similarity / temperature).softmax(0).masked_fill(L.positives(image_ids)[0], 0.0)
    probs = probs / probs.sum()
    if got == expected:
        shown = ", ".join(f"text {i}: {p:.2g}" for i, p in enumerate(probs.tolist()))
        print(f"✓ Correct! Text 0 is the pair itself and text 1 describes the same photo (same image id), so both "
              f"are positives and get weight 0. Every other text can be drawn, even the least similar one: "
              f"{shown}.")
    elif 1 not in got and 0 in got:
        print(f"✗ Not quite. Hint: look at the image ids: {image_ids[1]!r} is the photo of text 0 too.")
    elif 0 not in got:
        print("✗ Not quite. Hint: a pair can never be its own negative.")
    elif got - expected:
        extra = sorted(got - expected)
        print(f"✗ Not quite: text(s) {extra} can be drawn. A low similarity makes a text unlikely "
              f"(probability {probs[extra[0]]:.2g} for text {extra[0]}), not impossible: softmax weights are positive.")
    else:
        print("✗ Not quite. Hint: which texts are positives for image 0?")


# ----------------------------------------------------------------------------- exercise 4
def blind_itm_loss(negatives_per_positive: int = 2) -> float:
    """Cross-entropy of the best constant ITM prediction (one match per ``negatives_per_positive`` non-matches)."""
    p = 1 / (1 + negatives_per_positive)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def check_blind_itm_loss(answer) -> None:
    """Exercise 4: the ITM loss of a head that gives every pair the same P(match), at its best."""
    if answer is None:
        _not_attempted(
            "Replace None with a number. Each ITM step has 1 matching pair for every 2 non-matching ones. "
            "A head that cannot tell them apart gives all of them the same P(match) = p: which p is best, and "
            "what is the average cross-entropy then?"
        )
        return
    try:
        value = float(answer)
    except (TypeError, ValueError):
        print(f"✗ Expected one number, got {type(answer).__name__}.")
        return
    expected = blind_itm_loss(2)
    close = lambda x: math.isclose(value, x, abs_tol=2e-3)  # noqa: E731
    if close(expected):
        print(f"✓ Correct! p = 1/3 gives −(1/3 · log 1/3 + 2/3 · log 2/3) = {expected:.3f}. An ITM curve that sits at "
              f"{expected:.2f} has learned nothing about the pairs yet; hard negatives keep it near there for long.")
    elif close(math.log(2)):
        print("✗ log 2 is the loss at p = 1/2. Hint: there are twice as many non-matches as matches; "
              "a blind head does better by predicting P(match) = 1/3.")
    elif close(math.log(3)):
        print("✗ log 3 would be a 3-way choice. Hint: ITM is binary (match / no match) for each pair.")
    elif close(-math.log(1 / 3)) or close(-math.log(2 / 3)):
        print("✗ That is the loss of one kind of pair only. Hint: average over 1 match and 2 non-matches.")
    else:
        print("✗ Not quite. Hint: with P(match) = p for every pair, the loss is −(1/3 · log p + 2/3 · log(1 − p)); "
              "it is smallest at p = 1/3.")
