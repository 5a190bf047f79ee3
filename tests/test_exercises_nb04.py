"""The answer checks of notebook 04 accept right answers, explain wrong ones,
and tell a learner who has not started what to do."""
import math

import pytest
import torch

from vlmcourse import losses as L
from vlmcourse.exercises.nb04 import (
    EXERCISE_IMAGE_IDS,
    EXERCISE_QUERIES,
    EXERCISE_SIMILARITY,
    EXERCISE_TEMPERATURE,
    EXERCISE_TEXTS,
    check_blind_itm_loss,
    check_itc_similarity,
    check_masks_for_situations,
    check_never_sampled,
)


def out(capsys):
    return capsys.readouterr().out


def test_itc_similarity_check(capsys):
    assert check_itc_similarity(None) is None
    assert "Not attempted" in out(capsys)
    per_query = torch.einsum("iqe,te->iqt", EXERCISE_QUERIES, EXERCISE_TEXTS)
    right = per_query.max(1).values
    check_itc_similarity(right)
    assert out(capsys).startswith("✓")
    check_itc_similarity(right.tolist())
    assert out(capsys).startswith("✓")
    check_itc_similarity(L.itc_similarity(EXERCISE_QUERIES, EXERCISE_TEXTS))
    assert out(capsys).startswith("✓")
    for wrong, phrase in ((right.T, "transpose"), (per_query.mean(1), "mean"), (per_query.min(1).values, "minimum"),
                          (per_query.sum(1), "sum"), (per_query[:, 0], "first query"), (torch.zeros(2, 2), "max over q"),
                          (torch.zeros(3), "shape"), ("abc", "could not read")):
        check_itc_similarity(wrong)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text, (wrong, text)


def test_masks_for_situations_check(capsys):
    check_masks_for_situations(None)
    assert "Not attempted" in out(capsys)
    check_masks_for_situations({"a": "itc", "b": "itm", "c": "itg"})
    assert out(capsys).startswith("✓")
    check_masks_for_situations({"A": " ITC", "b": "itm", "c": "ITG"})
    assert out(capsys).startswith("✓")
    check_masks_for_situations({"a": "itm", "b": "itm", "c": "itm"})
    text = out(capsys)
    assert text.startswith("✗") and "(a)" in text and "(c)" in text and "(b)" not in text
    check_masks_for_situations({"a": "itc"})
    assert "missing" in out(capsys)
    check_masks_for_situations({"a": "itc", "b": "bert", "c": "itg"})
    assert "Unknown" in out(capsys)
    check_masks_for_situations(["itc", "itm", "itg"])
    assert "dict" in out(capsys)


def test_never_sampled_check_agrees_with_the_sampler(capsys):
    # what the real sampler never returns for image 0, over many draws
    n = len(EXERCISE_IMAGE_IDS)
    sim = torch.zeros(n, n)
    sim[0] = EXERCISE_SIMILARITY
    g = torch.Generator().manual_seed(0)
    drawn = {int(L.sample_hard_negatives(sim / EXERCISE_TEMPERATURE, L.positives(EXERCISE_IMAGE_IDS), g)[0][0])
             for _ in range(3000)}
    assert drawn.isdisjoint({0, 1}) and {2, 3} <= drawn
    check_never_sampled(None)
    assert "Not attempted" in out(capsys)
    check_never_sampled({0, 1})
    assert out(capsys).startswith("✓")
    check_never_sampled([1, 0])
    assert out(capsys).startswith("✓")
    check_never_sampled({0})
    assert "dog.jpg" in out(capsys)
    check_never_sampled({1})
    assert "its own negative" in out(capsys)
    check_never_sampled({0, 1, 4})
    text = out(capsys)
    assert text.startswith("✗") and "not impossible" in text
    check_never_sampled("x")
    assert "integers" in out(capsys)


def test_blind_itm_loss_check(capsys):
    check_blind_itm_loss(None)
    assert "Not attempted" in out(capsys)
    best = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)
    check_blind_itm_loss(best)
    assert out(capsys).startswith("✓")
    check_blind_itm_loss(torch.tensor(best))
    assert out(capsys).startswith("✓")
    for wrong, phrase in ((math.log(2), "1/2"), (math.log(3), "binary"), (-math.log(2 / 3), "one kind"),
                          (5.0, "smallest")):
        check_blind_itm_loss(wrong)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text
    check_blind_itm_loss("zero")
    assert "one number" in out(capsys)
    # the blind loss is what the ITM loss of forward() gives when every pair gets P(match) = 1/3
    logits = torch.log(torch.tensor([[2 / 3, 1 / 3]])).expand(24, 2)
    assert L.itm_loss(logits, 8)[0].item() == pytest.approx(best, abs=1e-6)
