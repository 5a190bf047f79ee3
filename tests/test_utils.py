"""vlmcourse.utils: the notebooks' tables (rounded, row labels only where a column names the rows) and seeding."""
import random

import numpy as np
import pandas as pd
import torch

from vlmcourse import seed_everything, show_table


def test_a_table_without_an_index_shows_no_row_numbers():
    table = show_table([{"split": "train", "photos": 646, "loss": 1.23456}, {"split": "dev", "photos": 78, "loss": 2.0}])
    text, html = repr(table), table._repr_html_()
    assert text.splitlines()[1].split() == ["train", "646", "1.235"]            # rounded to 3 digits, no "0" in front
    assert "<th>0</th>" not in html and "<td>train</td>" in html
    assert type(table["photos"] * 2) is pd.Series and type(table.round(1)) is pd.DataFrame   # derived: plain pandas
    assert table["photos"].sum() == 724


def test_a_table_with_an_index_labels_its_rows():
    table = show_table([{"split": "train", "photos": 646}, {"split": "dev", "photos": 78}], index="split")
    assert list(table.index) == ["train", "dev"] and table.loc["dev", "photos"] == 78


def test_seed_everything_repeats_python_numpy_and_torch():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(3)
    first = draw()
    seed_everything(3)
    assert draw() == first
    seed_everything(4)
    assert draw() != first
