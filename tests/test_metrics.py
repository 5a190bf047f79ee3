"""Caption metrics (BLEU-4, CIDEr-D) without Java, and caption statistics."""
import pytest

from vlmcourse.metrics import caption_metrics, caption_stats, normalize_caption

REFS = [["a dog runs on the grass", "a brown dog is running", "the dog runs outside"],
        ["two kids play in the snow", "children playing in the snow", "kids in snow"],
        ["a man rides a bike", "a cyclist on a road", "a man on a bicycle"]]


def test_normalize_caption():
    assert normalize_caption("  A Dog, running... on the GRASS! ") == "a dog running on the grass"
    assert normalize_caption("man's hat") == "man s hat"
    assert normalize_caption("?!") == ""


def test_perfect_wrong_and_empty_captions():
    perfect = caption_metrics([r[0] for r in REFS], REFS)
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["CIDEr-D"] > 3
    swapped = caption_metrics([REFS[1][0], REFS[2][0], REFS[0][0]], REFS)
    assert swapped["CIDEr-D"] < 0.2 * perfect["CIDEr-D"] and swapped["BLEU-4"] < 0.1
    empty = caption_metrics(["", "", ""], REFS)
    assert empty == {"BLEU-4": 0.0, "CIDEr-D": 0.0}
    # case and punctuation do not matter
    assert caption_metrics(["A dog runs on the grass.", "Two kids play in the snow!", "A MAN rides a bike"],
                           REFS) == pytest.approx(perfect)


def test_per_image_scores_and_errors():
    out = caption_metrics(["a dog runs", "kids in the snow", "a man"], REFS, per_image=True)
    per = out["CIDEr-D per image"]
    assert len(per) == 3 and sum(per) / 3 == pytest.approx(out["CIDEr-D"])
    with pytest.raises(ValueError, match="2 predictions for 3"):
        caption_metrics(["a", "b"], REFS)
    with pytest.raises(ValueError, match="at least one reference"):
        caption_metrics(["a"], [[]])


def test_caption_stats():
    stats = caption_stats(["A dog.", "a dog", "", "a cat runs"])
    assert stats == {"captions": 4, "distinct": 3, "empty": 1, "mean words": pytest.approx(7 / 4)}
