"""Answer checks for notebook 02 (CLIP: contrastive image-text learning).

Each check prints ✓ or ✗ with a hint and returns None (so no stray output in
the notebook). An answer left as ``None`` prints how to attempt it instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlmcourse.clip import info_nce
from vlmcourse.metrics import chance_recall
from vlmcourse.exercises import _not_attempted, _as_float, _run_learner

__all__ = ["EXERCISE_SIMILARITY", "EXERCISE_TEMPERATURE", "check_info_nce", "check_info_nce_fn",
           "check_chance_recall",
           "check_temperature_limit"]

# Exercise 1: cosine similarities of 3 images (rows) and their 3 captions (columns).
EXERCISE_SIMILARITY = torch.tensor([
    [0.8, 0.1, 0.3],
    [0.2, 0.6, 0.1],
    [0.4, 0.3, 0.5],
])
EXERCISE_TEMPERATURE = 0.5


def check_info_nce(answer, similarity: torch.Tensor = EXERCISE_SIMILARITY,
                   temperature: float = EXERCISE_TEMPERATURE) -> None:
    """Exercise 1: the symmetric InfoNCE loss of a 3 x 3 similarity matrix, by hand."""
    if answer is None:
        _not_attempted(
            f"Divide the similarities by the temperature ({temperature}) to get logits. For each row, the loss is "
            f"-log(softmax of the row)[diagonal entry]; do the same down each column. The answer is the average of "
            f"the mean row loss and the mean column loss. Use torch.log_softmax (but not vlmcourse.clip)."
        )
        return
    value = _as_float(answer)
    if value is None:
        print(f"✗ Expected one number (a float or a 1-element tensor), got {type(answer).__name__}.")
        return
    logits = similarity / temperature
    expected = info_nce(logits).item()
    diag = torch.arange(len(logits))
    rows = F.cross_entropy(logits, diag).item()
    cols = F.cross_entropy(logits.T, diag).item()
    close = lambda x: math.isclose(value, x, rel_tol=1e-3, abs_tol=1e-3)  # noqa: E731
    if close(expected):
        print(f"✓ {value:.4f}: images→captions {rows:.4f} and captions→images {cols:.4f}, averaged. "
              f"A perfect model would score 0, a uniform guess log 3 = {math.log(3):.4f}.")
    elif close(rows) or close(cols):
        which = "rows (image→caption)" if close(rows) else "columns (caption→image)"
        print(f"✗ {value:.4f} is the loss over the {which} only. Hint: CLIP's loss is symmetric: "
              f"average it with the same loss in the other direction.")
    elif close(info_nce(similarity).item()):
        print(f"✗ {value:.4f} forgets the temperature. Hint: divide the similarities by {temperature} first.")
    elif close(info_nce(similarity * temperature).item()):
        print(f"✗ {value:.4f} multiplies by the temperature. Hint: logits = similarity / temperature.")
    elif close(3 * expected) or close(6 * expected) or close(2 * expected):
        print(f"✗ {value:.4f} is a sum. Hint: average over the 3 pairs (and the 2 directions).")
    elif value < 0:
        print("✗ A cross-entropy is never negative. Hint: the loss is MINUS the log-probability of the right answer.")
    else:
        print(f"✗ {value:.4f} is not right. Hint: logits = S / {temperature}; loss_rows = mean_i "
              f"-log_softmax(logits[i])[i]; loss_cols the same for logits.T; answer (loss_rows + loss_cols) / 2.")


def check_info_nce_fn(fn) -> None:
    """Exercise 2: the learner's info_nce(logits) against vlmcourse.clip.info_nce, on two batch sizes."""
    how = ("Fill in my_info_nce(logits): logits is (N, N), row i = image i, column j = caption j, the right pairs "
           "on the diagonal. Return a 0-d tensor: the average of the cross-entropy over the rows and the one over "
           "the columns, target = the diagonal (F.cross_entropy or log_softmax; not vlmcourse.clip).")
    torch.manual_seed(0)
    cases = [(torch.randn(5, 5) * 3).requires_grad_(),  # not symmetric: rows and columns give different losses
             (EXERCISE_SIMILARITY / EXERCISE_TEMPERATURE).requires_grad_()]
    for logits in cases:
        got = _run_learner(fn, "my_info_nce", how, logits)
        if got is None:
            return
        n = len(logits)
        if not isinstance(got, torch.Tensor):
            print(f"✗ my_info_nce returned a {type(got).__name__}, not a tensor. Hint: training calls "
                  f"loss.backward(), so keep the result a tensor (no .item(), no float()).")
            return
        if got.numel() != 1:
            print(f"✗ For a {n} x {n} batch expected one number, got shape {tuple(got.shape)}. "
                  f"Hint: average the per-pair losses (.mean(), or F.cross_entropy's default reduction).")
            return
        if not got.requires_grad:
            print("✗ The result carries no gradient. Hint: compute it from logits with torch operations "
                  "(no torch.no_grad(), .detach() or torch.tensor(...) around numbers).")
            return
        value, expected = got.item(), info_nce(logits).item()
        diag = torch.arange(n)
        rows = F.cross_entropy(logits, diag).item()
        cols = F.cross_entropy(logits.T, diag).item()
        close = lambda x: math.isclose(value, x, rel_tol=1e-4, abs_tol=1e-5)  # noqa: E731
        if close(expected):
            continue
        if close(rows) or close(cols):
            which = "rows (image → caption)" if close(rows) else "columns (caption → image)"
            hint = (f"that is the loss over the {which} only; CLIP's loss is symmetric: average it with the "
                    f"other direction (logits.T, or log_softmax over the other dim).")
        elif close(rows + cols) or close(n * expected) or close(n * (rows + cols)):
            hint = "that is a sum; average over the N pairs and over the 2 directions."
        elif close(-expected):
            hint = "the sign is flipped: the loss is MINUS the log-probability of the right pair."
        else:
            hint = ("loss_rows = mean_i −log_softmax(logits, dim=1)[i, i]; loss_cols = mean_j "
                    "−log_softmax(logits, dim=0)[j, j]; return (loss_rows + loss_cols) / 2.")
        print(f"✗ On a {n} x {n} batch my_info_nce gives {value:.4f}, vlmcourse.clip.info_nce {expected:.4f}.\n"
              f"  Hint: {hint}")
        return
    print("✓ my_info_nce matches vlmcourse.clip.info_nce on a 5 x 5 and a 3 x 3 batch, gradient included: "
          "two cross-entropies, one per direction, averaged.")


def check_chance_recall(answer, n_images: int = 76, k: int = 5) -> None:
    """Exercise 3: Recall@K text→image of a random ranking (as a fraction)."""
    if answer is None:
        _not_attempted(
            f"A caption is scored against all {n_images} test photos; a model that guesses puts its own photo "
            f"anywhere in the ranking with equal probability. What is the chance it lands in the top {k}? "
            f"Give a fraction between 0 and 1."
        )
        return
    value = _as_float(answer)
    if value is None:
        print(f"✗ Expected a number, got {type(answer).__name__}.")
        return
    expected = chance_recall(n_images, 5, ks=(k,))["text->image"][k]
    close = lambda x: math.isclose(value, x, rel_tol=1e-3, abs_tol=1e-4)  # noqa: E731
    if close(expected):
        print(f"✓ {k}/{n_images} = {expected:.4f} ({100 * expected:.1f}%): every position is equally likely, "
              f"and {k} of the {n_images} positions count. Our trained model is many times above this.")
    elif close(100 * expected):
        print(f"✓ (as a percentage) {value:.2f}% = {k}/{n_images}. Next time give it as a fraction: {expected:.4f}.")
    elif close(1 / n_images):
        print(f"✗ {value:.4f} is the chance of being exactly first (Recall@1). Hint: the top {k} has {k} places.")
    else:
        print(f"✗ {value:.4f} is not right. Hint: the right photo is equally likely to be at any of the "
              f"{n_images} ranks; how many of them are in the top {k}?")


_TEMPERATURE_CHOICES = {
    "a": "the probabilities become uniform (1/N each)",
    "b": "all the probability goes to the largest logit (a one-hot argmax)",
    "c": "nothing: the softmax does not depend on the temperature",
    "d": "all the probability goes to the smallest logit",
}


def check_temperature_limit(answer) -> None:
    """Exercise 4: what softmax(s / T) does as the temperature T -> 0."""
    if answer is None:
        options = "\n  ".join(f"{k}) {v}" for k, v in _TEMPERATURE_CHOICES.items())
        _not_attempted(
            "Answer with a letter. As the temperature T goes to 0, softmax(s / T) over a row of similarities:\n  "
            + options + "\n  Try it: torch.softmax(torch.tensor([0.3, 0.5, 0.1]) / T, dim=0) for T = 1, 0.1, 0.01."
        )
        return
    choice = str(answer).strip().lower().rstrip(")").strip()
    if choice not in _TEMPERATURE_CHOICES:
        print(f"✗ Answer with one of the letters {', '.join(_TEMPERATURE_CHOICES)}, got {answer!r}.")
        return
    if choice == "b":
        print("✓ Dividing by a tiny T blows up the gaps between logits, so the largest one takes everything. "
              "The loss then punishes only the worst mistake, with huge gradients; that is why CLIP caps "
              "1/T at 100. (As T → ∞ it is the other way round: uniform.)")
    elif choice == "a":
        print("✗ That is the limit T → ∞ (logits all squashed to 0). Hint: as T → 0, s / T makes the "
              "differences between logits larger, not smaller.")
    elif choice == "c":
        print("✗ The ranking does not change, but the probabilities do. Hint: compute softmax([0.3, 0.5, 0.1] / T) "
              "for T = 1 and T = 0.01.")
    else:
        print("✗ Dividing by a positive T keeps the order of the logits. Hint: which logit grows fastest as T → 0?")
