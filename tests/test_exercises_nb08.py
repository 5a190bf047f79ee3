"""The answer checks of notebook 08 accept right answers, explain wrong ones, and tell a learner who has not started
what to do."""
from collections import Counter

import torch

from vlmcourse.exercises.nb08 import check_gated_block, check_positions_read, check_text_prior
from vlmcourse.instruct import instruction_pairs

OBJECTS = [[{"shape": "circle", "colour": "red", "size": "small", "position": "top left"}],
           [{"shape": "circle", "colour": "red", "size": "large", "position": "bottom right"}],
           [{"shape": "square", "colour": "blue", "size": "large", "position": "center"},
            {"shape": "triangle", "colour": "green", "size": "small", "position": "left"}]]
ROWS = [r for r in instruction_pairs(OBJECTS) if r["type"] != "caption"]


def out(capsys):
    return capsys.readouterr().out


def right_prior(rows):
    counts = {}
    for r in rows:
        counts.setdefault(r["type"], Counter())[r["answer"]] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def test_text_prior_check(capsys):
    check_text_prior(lambda rows: None, ROWS, ROWS)
    assert "Not attempted" in out(capsys)
    check_text_prior(right_prior, ROWS, ROWS)
    assert out(capsys).startswith("✓")
    least = lambda rows: {t: c.most_common()[-1][0] for t, c in  # noqa: E731
                          ((t, Counter(r["answer"] for r in rows if r["type"] == t)) for t in right_prior(rows))}
    check_text_prior(least, ROWS, ROWS)
    text = out(capsys)
    assert text.startswith("✗") and "Different answers" in text
    check_text_prior(lambda rows: {"count": "1"}, ROWS, ROWS)
    assert "one entry per question type" in out(capsys)
    check_text_prior(lambda rows: 1 / 0, ROWS, ROWS)
    assert "raised ZeroDivisionError" in out(capsys)


def test_gated_block_check(capsys):
    def right(block, hidden, visual):
        x = hidden + block.attn_gate.tanh() * block.attn(block.attn_norm(hidden), visual)
        return x + block.ff_gate.tanh() * block.ff(x)

    def parallel(block, hidden, visual):
        x = hidden + block.attn_gate.tanh() * block.attn(block.attn_norm(hidden), visual)
        return x + block.ff_gate.tanh() * block.ff(hidden)

    def no_tanh(block, hidden, visual):
        x = hidden + block.attn_gate * block.attn(block.attn_norm(hidden), visual)
        return x + block.ff_gate * block.ff(x)

    check_gated_block(None)
    assert "Not attempted" in out(capsys)
    check_gated_block(right)
    assert out(capsys).startswith("✓")
    for wrong, phrase in ((parallel, "not the block's input"), (no_tanh, "go through tanh")):
        check_gated_block(wrong)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text, text
    check_gated_block(lambda block, hidden, visual: hidden + block.ff(hidden))       # ignores the closed gates
    assert "must equal the input exactly" in out(capsys)


def test_positions_read_check(capsys):
    check_positions_read(None, 6, 5, 49, 18)
    assert "Not attempted" in out(capsys)
    check_positions_read(6 * 49 + 30 * 18, 6, 5, 49, 18)
    assert out(capsys).startswith("✓")
    check_positions_read(torch.tensor(30 * 67), 6, 5, 49, 18)
    assert "without sharing" in out(capsys)
    check_positions_read(7, 6, 5, 49, 18)
    assert out(capsys).startswith("✗ Not 7")
