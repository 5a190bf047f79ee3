"""The answer checks of notebook 07 accept right answers, explain wrong ones,
and tell a learner who has not started what to do."""
import math

import torch

from vlmcourse.exercises.nb07 import (
    TWO_HEADS,
    check_centroid,
    check_head_average_entropy,
    check_map_reading,
    check_most_diverse_layer,
    query_alikeness,
)


def out(capsys):
    return capsys.readouterr().out


def test_head_average_entropy_check(capsys):
    assert check_head_average_entropy(None) is None
    assert "Not attempted" in out(capsys)
    p = TWO_HEADS.mean(0).flatten()
    p = p[p > 0]
    right = -(p * p.log()).sum()
    assert math.isclose(float(right), -(0.625 * math.log(0.625) + 3 * 0.125 * math.log(0.125)), rel_tol=1e-6)
    check_head_average_entropy(right)  # a tensor works
    assert out(capsys).startswith("✓")
    check_head_average_entropy(float(right))
    assert out(capsys).startswith("✓")
    check_head_average_entropy(math.log(4) / 2)
    assert "mean of the two heads" in out(capsys)
    check_head_average_entropy(float(right) / math.log(2))
    assert "bits" in out(capsys)
    check_head_average_entropy(math.log(4))
    assert "one head alone" in out(capsys)
    check_head_average_entropy(-1.0)
    assert "never negative" in out(capsys)
    check_head_average_entropy(5.0)
    assert "uniform" in out(capsys)
    check_head_average_entropy(0.5)
    assert out(capsys).startswith("✗")
    check_head_average_entropy("one")
    assert "one number" in out(capsys)


def test_centroid_check(capsys):
    check_centroid(None)
    assert "Not attempted" in out(capsys)

    def right(a):
        rows = (a.sum(1) * torch.arange(a.shape[0])).sum()
        cols = (a.sum(0) * torch.arange(a.shape[1])).sum()
        return rows, cols

    check_centroid(right)
    assert out(capsys).startswith("✓")
    check_centroid(lambda a: torch.stack(right(a)).tolist())  # a list works too
    assert out(capsys).startswith("✓")
    check_centroid(lambda a: tuple(reversed(right(a))))
    assert "(col, row)" in out(capsys)
    check_centroid(lambda a: divmod(int(a.argmax()), a.shape[1]))
    text = out(capsys)
    assert text.startswith("✗") and "argmax" in text
    check_centroid(lambda a: (a.sum(0) * torch.arange(a.shape[1])).sum() * 0 + 1.0)
    assert "two numbers" in out(capsys)
    check_centroid(lambda a: (0.5, 0.5))
    assert out(capsys).startswith("✗")
    check_centroid(lambda a: 1 / 0)
    assert "ZeroDivisionError" in out(capsys)
    check_centroid(lambda a: None)
    assert "returns None" in out(capsys)


def test_map_reading_check(capsys):
    check_map_reading(None)
    text = out(capsys)
    assert "Not attempted" in text and "b)" in text
    check_map_reading("b")
    assert out(capsys).startswith("✓")
    check_map_reading(" B) ")
    assert out(capsys).startswith("✓")
    for wrong, phrase in (("a", "recognition"), ("c", "cause"), ("d", "heads")):
        check_map_reading(wrong)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text
    check_map_reading("z")
    assert "one of the letters" in out(capsys)


def test_most_diverse_layer_check(capsys):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 2, 5, 3, 3, generator=g)  # (layers, photos, heads, queries, h, w)
    maps[0] = maps[0, :, :, :1]  # layer 0: every query has the same map
    maps[2, :, :, 1:] = 0.9 * maps[2, :, :, :1] + 0.1 * maps[2, :, :, 1:]  # layer 4: nearly the same
    alike = query_alikeness(maps)
    assert alike[0] > 0.999 and alike[1] < alike[2] < alike[0]
    numbers = [0, 2, 4]
    check_most_diverse_layer(None, maps, numbers)
    assert "Not attempted" in out(capsys)
    check_most_diverse_layer(2, maps, numbers)
    assert out(capsys).startswith("✓")
    check_most_diverse_layer("Layer 2", maps, numbers)
    assert out(capsys).startswith("✓")
    check_most_diverse_layer(0, maps, numbers)
    assert "most* alike" in out(capsys)
    check_most_diverse_layer(4, maps, numbers)
    assert "Not the lowest" in out(capsys)
    check_most_diverse_layer(1, maps, numbers)
    assert "position in the list" in out(capsys)
    check_most_diverse_layer(7, maps, numbers)
    assert "[0, 2, 4]" in out(capsys)
    check_most_diverse_layer("two", maps, numbers)
    assert "layer number" in out(capsys)


def test_entropy_check(capsys):
    from vlmcourse.exercises.nb07 import check_entropy

    check_entropy(None)
    assert "Not attempted" in out(capsys)
    check_entropy(lambda m: -torch.special.xlogy(m, m).sum((-2, -1)))
    assert out(capsys).startswith("✓")

    def masked(m):
        p = m.flatten(-2)
        return -(torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros(())).sum(-1))
    check_entropy(masked)
    assert out(capsys).startswith("✓")
    for wrong, phrase in ((lambda m: -(m * m.log()).sum((-2, -1)), "NaN"),
                          (lambda m: -torch.special.xlogy(m, m).sum((-2, -1)) / math.log(2), "bits"),
                          (lambda m: torch.special.xlogy(m, m).sum((-2, -1)), "sign"),
                          (lambda m: -torch.special.xlogy(m, m).sum(-1), "both grid dimensions"),
                          (lambda m: -torch.special.xlogy(m, m).sum(), "one entropy per map"),
                          (lambda m: None, "returns None")):
        check_entropy(wrong)
        text = out(capsys)
        assert phrase in text, (phrase, text)
