"""Linear probes (vlmcourse/probe.py): a probe reads what is linearly there, and nothing that is not."""
import pytest
import torch

from vlmcourse.probe import ATTRIBUTES, fit_linear_probe, object_features, probe_attributes
from vlmcourse.shapes import GRID


def _clusters(n, seed, shuffle=False):
    """Three classes around fixed centres, far from zero and at a large scale (the probe standardises)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.randint(3, (n,), generator=g)
    x = (centres[y] + torch.randn(n, 16, generator=g)) * 100 + 50
    if shuffle:
        y = y[torch.randperm(n, generator=g)]
    return x, y


def test_probe_reads_a_linear_property_and_not_a_random_one():
    x_test, y_test = _clusters(600, 2)
    assert fit_linear_probe(*_clusters(600, 1)).accuracy(x_test, y_test) > 0.95
    assert fit_linear_probe(*_clusters(600, 1, shuffle=True)).accuracy(x_test, y_test) < 0.6   # labels no feature explains


def test_probe_is_seeded_and_leaves_the_global_random_state_alone():
    x, y = _clusters(60, 1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = fit_linear_probe(x, y, steps=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first.linear.weight, fit_linear_probe(x, y, steps=2).linear.weight)


def test_probe_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="features"):
        fit_linear_probe(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def _objects():
    return [[{"colour": "red", "shape": "circle", "size": "small", "cells": [[0, 0], [0, 1]]}],
            [{"colour": "blue", "shape": "square", "size": "large", "cells": [[3, 3]]},
             {"colour": "green", "shape": "triangle", "size": "small", "cells": [[6, 6]]}]]


def test_object_features_pool_each_objects_cells_or_the_whole_photo():
    features = torch.randn(2, GRID * GRID, 5)
    x, y = object_features(features, _objects())
    assert x.shape == (3, 5)
    assert torch.allclose(x[0], features[0, [0, 1]].mean(0))
    assert torch.allclose(x[1], features[1, 3 * GRID + 3]) and torch.allclose(x[2], features[1, 6 * GRID + 6])
    assert y["colour"].tolist() == [ATTRIBUTES["colour"].index(c) for c in ("red", "blue", "green")]
    assert y["shape"].tolist() == [0, 1, 2] and y["size"].tolist() == [0, 1, 0]
    x, _ = object_features(features, _objects(), pool="image")
    assert torch.allclose(x[1], features[1].mean(0)) and torch.allclose(x[1], x[2])
    with pytest.raises(ValueError, match="pool"):
        object_features(features, _objects(), pool="max")
    with pytest.raises(ValueError, match="do not match"):
        object_features(features[:1], _objects())


def test_probe_attributes_reads_a_planted_attribute_at_the_objects_cells():
    # every object's cells carry a code for its colour; the rest of the grid is noise
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(len(ATTRIBUTES["colour"]), 8, generator=g) * 4

    def photos(n):
        objects, features = [], torch.randn(n, GRID * GRID, 8, generator=g)
        for i in range(n):
            colour = ATTRIBUTES["colour"][i % 4]
            cell = [int(torch.randint(GRID, (1,), generator=g)), int(torch.randint(GRID, (1,), generator=g))]
            objects.append([{"colour": colour, "shape": "circle", "size": "small", "cells": [cell]}])
            features[i, cell[0] * GRID + cell[1]] += codes[i % 4]
        return features, objects

    scores = probe_attributes(*photos(200), *photos(100))
    image = probe_attributes(*photos(200), *photos(100), pool="image")
    assert scores["colour"] > 0.9 and image["colour"] < scores["colour"] - 0.2
