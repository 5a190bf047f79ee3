"""The answer checks of notebook 02 accept right answers, explain wrong ones,
and tell a learner who has not started what to do."""
import torch
import torch.nn.functional as F

from vlmcourse.exercises.nb02 import (
    EXERCISE_SIMILARITY,
    EXERCISE_TEMPERATURE,
    check_chance_recall,
    check_info_nce,
    check_temperature_limit,
)


def out(capsys):
    return capsys.readouterr().out


def by_hand(similarity, temperature):
    logits = similarity / temperature
    diag = torch.arange(len(logits))
    rows = -logits.log_softmax(dim=1)[diag, diag].mean()
    cols = -logits.log_softmax(dim=0)[diag, diag].mean()
    return rows, cols


def test_info_nce_check(capsys):
    assert check_info_nce(None) is None
    assert "Not attempted" in out(capsys)
    rows, cols = by_hand(EXERCISE_SIMILARITY, EXERCISE_TEMPERATURE)
    check_info_nce((rows + cols) / 2)  # a tensor works
    assert out(capsys).startswith("✓")
    check_info_nce(float((rows + cols) / 2))
    assert out(capsys).startswith("✓")
    check_info_nce(rows.item())
    assert "symmetric" in out(capsys)
    r1, c1 = by_hand(EXERCISE_SIMILARITY, 1.0)
    check_info_nce(((r1 + c1) / 2).item())
    assert "temperature" in out(capsys)
    check_info_nce(3 * ((rows + cols) / 2).item())
    assert "sum" in out(capsys)
    check_info_nce(-1.0)
    assert "never negative" in out(capsys)
    check_info_nce(7.0)
    assert out(capsys).startswith("✗")
    check_info_nce("one")
    assert "one number" in out(capsys)
    check_info_nce(F.cross_entropy(torch.eye(3), torch.arange(3)))  # any wrong tensor answer: no crash
    assert out(capsys).startswith("✗")


def test_chance_recall_check(capsys):
    check_chance_recall(None)
    assert "Not attempted" in out(capsys)
    check_chance_recall(5 / 76)
    assert out(capsys).startswith("✓")
    check_chance_recall(100 * 5 / 76)
    assert "percentage" in out(capsys)
    check_chance_recall(1 / 76)
    assert "Recall@1" in out(capsys)
    check_chance_recall(0.5)
    assert out(capsys).startswith("✗")
    check_chance_recall(10 / 20, n_images=20, k=10)
    assert out(capsys).startswith("✓")


def test_temperature_check(capsys):
    check_temperature_limit(None)
    text = out(capsys)
    assert "Not attempted" in text and "b)" in text
    check_temperature_limit("b")
    assert out(capsys).startswith("✓")
    check_temperature_limit(" B) ")
    assert out(capsys).startswith("✓")
    for wrong, phrase in (("a", "T → ∞"), ("c", "ranking"), ("d", "order")):
        check_temperature_limit(wrong)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text
    check_temperature_limit("z")
    assert "one of the letters" in out(capsys)


def test_info_nce_function_check(capsys):
    """The code-writing exercise: a right my_info_nce passes, each typical slip gets its own hint."""
    from vlmcourse.exercises.nb02 import check_info_nce_fn

    def diag(logits):
        return torch.arange(len(logits))

    check_info_nce_fn(None)
    assert "Not attempted" in out(capsys)
    check_info_nce_fn(lambda logits: None)
    assert "returns None" in out(capsys)
    check_info_nce_fn(lambda logits: (F.cross_entropy(logits, diag(logits)) + F.cross_entropy(logits.T, diag(logits))) / 2)
    assert out(capsys).startswith("✓")
    check_info_nce_fn(lambda logits: (-logits.log_softmax(1).diagonal().mean() - logits.log_softmax(0).diagonal().mean()) / 2)
    assert out(capsys).startswith("✓")
    wrong = {
        "symmetric": lambda logits: F.cross_entropy(logits, diag(logits)),
        "average over the N pairs": lambda logits: F.cross_entropy(logits, diag(logits), reduction="sum")
        + F.cross_entropy(logits.T, diag(logits), reduction="sum"),
        "sign is flipped": lambda logits: (logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2,
        "loss_rows = mean_i": lambda logits: (logits.softmax(1).diagonal().mean() + logits.softmax(0).diagonal().mean()) / 2,
        "not a tensor": lambda logits: F.cross_entropy(logits, diag(logits)).item(),
        "no gradient": lambda logits: F.cross_entropy(logits.detach(), diag(logits)),
        "one number": lambda logits: F.cross_entropy(logits, diag(logits), reduction="none"),
    }
    for phrase, fn in wrong.items():
        check_info_nce_fn(fn)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text, (phrase, text)

    def broken(logits):
        raise IndexError("bad index")

    check_info_nce_fn(broken)
    text = out(capsys)
    assert text.startswith("✗") and "IndexError: bad index" in text

    def hard_coded_five(logits):  # right on the 5 x 5 batch only
        return (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2

    check_info_nce_fn(hard_coded_five)
    assert "✗" in out(capsys)
