"""Answer checks for notebook 07 (cross-attention maps: where the queries look).

Each check prints ✓ or ✗ with a hint and returns None (so no stray output in
the notebook). An answer left as ``None`` prints how to attempt it instead.
"""
from __future__ import annotations

import math

import torch

from vlmcourse.viz import attention_centroid, attention_entropy, query_similarity
from vlmcourse.exercises import _not_attempted, _as_float, _run_learner

__all__ = ["TWO_HEADS", "two_heads_average_entropy", "check_entropy", "check_head_average_entropy", "check_centroid",
           "check_map_reading", "query_alikeness", "check_most_diverse_layer"]


# ----------------------------------------------------------------------------- exercise 1
def _two_heads() -> torch.Tensor:
    """(2, 7, 7): head A all on patch 0; head B evenly on patches 0, 1, 2, 3 (the first four of row 0)."""
    maps = torch.zeros(2, 7, 7)
    maps[0, 0, 0] = 1.0
    maps[1, 0, :4] = 0.25
    return maps


TWO_HEADS = _two_heads()


def check_entropy(fn) -> None:
    """Exercise 1 (code): the learner's my_entropy(maps), (..., h, w) -> (...), against viz.attention_entropy."""
    how = ("Fill in my_entropy(maps): maps has shape (..., h, w), each (h, w) map sums to 1. Return a tensor of "
           "shape (...): H = -Σ p·ln p over the h·w patches of each map, counting 0·ln 0 as 0 "
           "(torch.special.xlogy(p, p) does, or keep only p > 0).")
    g = torch.Generator().manual_seed(0)
    random_maps = torch.rand(3, 4, 7, 7, generator=g) ** 4
    random_maps = random_maps / random_maps.sum((-2, -1), keepdim=True)
    cases = [("a uniform 7 x 7 map", torch.full((7, 7), 1 / 49)), ("the two heads of TWO_HEADS", TWO_HEADS.clone()),
             ("a (3, 4, 7, 7) batch of random maps", random_maps)]
    for name, maps in cases:
        got = _run_learner(fn, "my_entropy", how, maps.clone())
        if got is None:
            return
        expected = attention_entropy(maps)
        try:
            got = torch.as_tensor(got, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            print(f"✗ Return a tensor; got {type(got).__name__}.")
            return
        if got.shape != expected.shape:
            hint = ("sum over both grid dimensions, (-2, -1), not only the last one." if got.shape == maps.shape[:-1]
                    else "one entropy per map: sum over the last two dimensions and keep the others.")
            print(f"✗ On {name} (shape {tuple(maps.shape)}) expected shape {tuple(expected.shape)}, got "
                  f"{tuple(got.shape)}. Hint: {hint}")
            return
        if torch.isnan(got).any():
            print(f"✗ On {name} you return NaN. Hint: patches with p = 0 give 0·ln 0 = 0·(-inf) = NaN in floating "
                  f"point; count them as 0 (torch.special.xlogy(p, p), or sum only over p > 0).")
            return
        if torch.allclose(got, expected, atol=1e-4):
            continue
        if torch.allclose(got, expected / math.log(2), atol=1e-4):
            hint = "that is in bits (log base 2); use the natural log, torch.log."
        elif torch.allclose(got, -expected, atol=1e-4):
            hint = "the sign is flipped: H = MINUS Σ p·ln p (ln p ≤ 0, so H ≥ 0)."
        else:
            hint = how
        print(f"✗ On {name} expected {[round(v, 3) for v in expected.flatten()[:4].tolist()]}, got "
              f"{[round(v, 3) for v in got.flatten()[:4].tolist()]}. Hint: {hint}")
        return
    print(f"✓ my_entropy matches vlmcourse.viz.attention_entropy: 0 nats for a one-patch map, ln 49 = "
          f"{math.log(49):.3f} for a uniform one. Now use it on TWO_HEADS.mean(0) below.")


def two_heads_average_entropy() -> float:
    return float(attention_entropy(TWO_HEADS.mean(0)))


def check_head_average_entropy(answer) -> None:
    """Exercise 1: the entropy (nats) of the average of the two maps in ``TWO_HEADS``."""
    if answer is None:
        _not_attempted(
            "Average the two heads' maps patch by patch (what 'mean of heads' does), then take the entropy of the "
            "result: H = -Σ p·ln p over the patches with p > 0. Give one number, in nats (natural log)."
        )
        return
    value = _as_float(answer)
    if value is None:
        print(f"✗ Expected one number (a float or a 1-element tensor), got {type(answer).__name__}.")
        return
    expected = two_heads_average_entropy()
    heads = attention_entropy(TWO_HEADS)  # 0 and ln 4
    close = lambda x: math.isclose(value, x, rel_tol=1e-3, abs_tol=1e-3)  # noqa: E731
    if close(expected):
        print(f"✓ {value:.3f} nats. Each head alone: {heads[0]:.3f} and {heads[1]:.3f}, mean {heads.mean():.3f}. "
              f"The average map is more spread out than the heads are on average: averaging heads blurs, so a "
              f"'mean of heads' map can look diffuse although every head is sharp.")
    elif close(float(heads.mean())):
        print(f"✗ {value:.3f} is the mean of the two heads' entropies. Hint: average the *maps* first "
              f"(p = 0.625 on patch 0, 0.125 on patches 1-3), then take one entropy.")
    elif close(expected / math.log(2)):
        print(f"✗ {value:.3f} is in bits (log base 2). Hint: use the natural log, as torch.log does.")
    elif close(float(heads[1])) or close(float(heads[0])):
        print("✗ That is the entropy of one head alone. Hint: average the two maps first.")
    elif value < 0:
        print("✗ An entropy is never negative. Hint: H = MINUS Σ p·ln p, and ln p ≤ 0.")
    elif value > math.log(49):
        print(f"✗ {value:.3f} is more than ln 49 = {math.log(49):.3f}, the entropy of a uniform 7x7 map: "
              f"nothing can be more spread out. Hint: only 4 patches have any attention.")
    else:
        print(f"✗ {value:.3f} is not right. Hint: the average map has 0.625 on patch 0 and 0.125 on patches 1, 2, 3; "
              f"H = -(0.625·ln 0.625 + 3 · 0.125·ln 0.125).")


# ----------------------------------------------------------------------------- exercise 2
def check_centroid(fn) -> None:
    """Exercise 2: the learner's centroid(attention) -> (row, col) for one (h, w) map that sums to 1."""
    how = ("Fill in my_centroid(attention) for one (h, w) map: return (row, col), the attention-weighted average "
           "of the row indices and of the column indices. Sum the map over columns to get the weight of each row.")
    if fn is None:
        _not_attempted(how)
        return
    g = torch.Generator().manual_seed(0)
    onehot = torch.zeros(3, 5)
    onehot[2, 1] = 1.0
    spread = torch.rand(3, 5, generator=g)
    spread = spread / spread.sum()
    cases = [("a one-hot map on a 3 x 5 grid", onehot), ("a spread-out 3 x 5 map", spread)]
    for name, attention in cases:
        expected = attention_centroid(attention)
        try:
            got = fn(attention.clone())
        except Exception as error:  # the learner's code: report, don't crash the notebook
            print(f"✗ my_centroid raised {type(error).__name__}: {error}\n  Hint: {how}")
            return
        if got is None:
            _not_attempted(how + " Your function returns None so far.")
            return
        try:
            got = torch.as_tensor(got, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            print(f"✗ Return two numbers (row, col), e.g. a tuple or a tensor; got {type(got).__name__}.")
            return
        if got.numel() != 2:
            print(f"✗ Return two numbers (row, col); got {got.numel()}.")
            return
        if torch.allclose(got, expected, atol=1e-4):
            continue
        if torch.allclose(got, expected.flip(0), atol=1e-4):
            print(f"✗ On {name} you return (col, row) = {got.tolist()}. Hint: rows first, then columns.")
        elif name.startswith("a spread") and torch.equal(got.round(), got):
            peak = divmod(int(attention.argmax()), attention.shape[1])
            print(f"✗ On {name} you return whole cells {got.tolist()}" +
                  (" (the argmax)" if tuple(got.long().tolist()) == peak else "") +
                  ". Hint: the centroid is a weighted average, usually between cells.")
        else:
            print(f"✗ On {name} expected (row, col) = {[round(v, 3) for v in expected.tolist()]}, got "
                  f"{[round(v, 3) for v in got.tolist()]}. Hint: {how}")
        return
    print("✓ my_centroid matches vlmcourse.viz.attention_centroid. The notebook uses it to see how far a query's "
          "focus moves from photo to photo.")


# ----------------------------------------------------------------------------- exercise 3
_READING_CHOICES = {
    "a": "the model has recognised a dog",
    "b": "in that layer, query 7's update is mostly a weighted mix of the value vectors of the patches "
         "around the dog's head",
    "c": "if we blurred the dog's head, the caption would change",
    "d": "every head of that layer looks at the dog's head too",
}


def check_map_reading(answer) -> None:
    """Exercise 3: what a cross-attention map does (and does not) tell us."""
    if answer is None:
        options = "\n  ".join(f"{k}) {v}" for k, v in _READING_CHOICES.items())
        _not_attempted(
            "Answer with a letter. In the last cross-attention layer, query 7's map (mean of heads) on a photo of "
            "a dog on grass peaks on the dog's head. Which statement does the map itself support?\n  " + options
        )
        return
    choice = str(answer).strip().lower().rstrip(")").strip()
    if choice not in _READING_CHOICES:
        print(f"✗ Answer with one of the letters {', '.join(_READING_CHOICES)}, got {answer!r}.")
        return
    if choice == "b":
        print("✓ That is all a map says: where this query reads in this layer. Its output there is the "
              "attention-weighted sum of the patches' values (then projected and mixed by later layers). What it "
              "*means* needs another experiment, e.g. masking patches and watching the caption.")
    elif choice == "a":
        print("✗ The map says where the query reads, not what it concluded. Hint: a random, untrained Q-Former "
              "also has peaks somewhere; the peak alone cannot tell recognition from chance.")
    elif choice == "c":
        print("✗ That is a claim about cause and effect; a map only shows weights. Hint: other queries, heads and "
              "layers also read the image, and a high weight on a patch with a small value vector changes little.")
    else:
        print("✗ The map is an average over heads. Hint: look at the per-head panels in section 5: heads of the "
              "same layer often look at different places, and one sharp head can dominate the mean.")


# ----------------------------------------------------------------------------- exercise 4
def query_alikeness(maps: torch.Tensor) -> list[float]:
    """Per cross-attention layer: the mean correlation between two different queries' maps on the same photo."""
    Q = maps.shape[3]
    off_diagonal = ~torch.eye(Q, dtype=torch.bool)
    return [float(query_similarity(layer.mean(1))[off_diagonal].mean()) for layer in maps]


def check_most_diverse_layer(answer, maps: torch.Tensor, layer_numbers) -> None:
    """Exercise 4: in which cross-attention layer do the queries' maps differ most from each other?

    ``maps``: (layers, photos, heads, Q, h, w); ``layer_numbers``: the Q-Former
    layer of each cross-attention layer (0, 2, 4 here). ``answer``: a layer
    number as in the plot titles (``4`` or ``"layer 4"``).
    """
    layer_numbers = [int(n) for n in layer_numbers]
    if answer is None:
        _not_attempted(
            "Look at the query-similarity matrices of section 6 (or compute "
            "query_similarity(maps[l].mean(1)) for each layer l): in which layer are the off-diagonal entries "
            f"lowest? Answer with the layer number from the titles, one of {layer_numbers}."
        )
        return
    try:
        number = int(str(answer).lower().replace("layer", "").strip())
    except ValueError:
        print(f"✗ Answer with a layer number, one of {layer_numbers} (e.g. 2 or \"layer 2\"), got {answer!r}.")
        return
    alike = query_alikeness(maps)
    best = layer_numbers[min(range(len(alike)), key=alike.__getitem__)]
    table = ", ".join(f"layer {n}: {a:.2f}" for n, a in zip(layer_numbers, alike))
    if number == best:
        print(f"✓ Layer {best}. Mean correlation between two queries' maps on the same photo: {table}. Where it is "
              "near 1, the 32 queries read the same places, so 32 'different questions' are in fact one: they can "
              "only differ by what the self-attention and feed-forward layers make of it.")
    elif number not in layer_numbers:
        hint = (f"that looks like a position in the list; use the Q-Former layer number from the titles "
                f"({layer_numbers[number]} is at position {number})." if 0 <= number < len(layer_numbers) else
                f"the cross-attention layers are {layer_numbers}.")
        print(f"✗ Layer {number} has no cross-attention. Hint: {hint}")
    elif alike[layer_numbers.index(number)] == max(alike):
        print(f"✗ In layer {number} the queries are the *most* alike ({table}). Hint: look for the lowest "
              "off-diagonal values (the darkest matrix).")
    else:
        print(f"✗ Not the lowest: {table}. Hint: the most diverse layer has the lowest mean correlation.")
