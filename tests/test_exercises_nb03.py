"""The code-writing exercise of notebook 03: a right set of masks passes, and each typical slip gets the hint
that names it. (The other nb03 checks are tested in tests/test_qformer.py.)"""
import torch

from vlmcourse.exercises.nb03 import check_self_attention_mask
from vlmcourse.qformer import self_attention_mask


def out(capsys):
    return capsys.readouterr().out


def make_mask(causal_text=True, itc_queries_see_text=False, strict=False, mask_padding=True, mask_pad_rows=False):
    """A learner's answer with switchable mistakes; all defaults = right."""
    def fn(mask_type, Q, attention_mask):
        B, T = attention_mask.shape
        n = Q + T
        is_q = torch.arange(n) < Q
        pos = torch.arange(n)
        if mask_type == "itm":
            allowed = torch.ones(n, n, dtype=torch.bool)
        elif mask_type == "itc":
            allowed = (is_q[:, None] == is_q[None, :]) | (itc_queries_see_text & is_q[:, None])
        else:
            earlier = pos[None, :] < pos[:, None] if strict else pos[None, :] <= pos[:, None]
            allowed = is_q[None, :] | (~is_q[:, None] & (earlier if causal_text else True))
        real = torch.cat([torch.ones(B, Q, dtype=torch.bool), attention_mask.bool()], 1)
        mask = allowed.expand(B, n, n).clone()
        if mask_padding:
            mask &= real[:, None, :]
        if mask_pad_rows:
            mask &= real[:, :, None]
        return mask
    return fn


def test_right_answers_pass(capsys):
    check_self_attention_mask(make_mask())
    assert out(capsys).startswith("✓ All three masks")
    check_self_attention_mask(self_attention_mask)
    assert out(capsys).startswith("✓")
    check_self_attention_mask(lambda *args: make_mask()(*args).int())  # 0/1 integers are read as booleans
    assert out(capsys).startswith("✓")


def test_wrong_answers_get_the_right_hint(capsys):
    cases = [
        (make_mask(causal_text=False), "itg", "never later words"),
        (make_mask(strict=True), "itg", "sees itself"),
        (make_mask(itc_queries_see_text=True), "itc", "queries → text"),
        (make_mask(mask_padding=False), None, "columns of [PAD]"),
        (make_mask(mask_pad_rows=True), None, "NaN"),
    ]
    for fn, wrong_mask, phrase in cases:
        check_self_attention_mask(fn)
        text = out(capsys)
        assert "✗" in text and phrase in text, (phrase, text)
        if wrong_mask:  # the other masks are still marked right, line by line
            assert f"✗ {wrong_mask}:" in text and text.count("✓") == 2, text

    def itm_only(mask_type, Q, attention_mask):
        return self_attention_mask("itm", Q, attention_mask)

    check_self_attention_mask(itm_only)
    text = out(capsys)
    assert "✓ itm" in text and "✗ itc" in text and "✗ itg" in text


def test_not_attempted_and_broken_answers(capsys):
    check_self_attention_mask(None)
    assert "Not attempted" in out(capsys)
    check_self_attention_mask(lambda *args: None)
    assert "returns None" in out(capsys)
    check_self_attention_mask(lambda mask_type, Q, attention_mask: make_mask()(mask_type, Q, attention_mask)[0])
    assert "keep the batch dimension" in out(capsys)
    check_self_attention_mask(lambda *args: [[True]])
    assert "not a tensor" in out(capsys)

    def broken(mask_type, Q, attention_mask):
        raise ValueError("unknown mask")

    check_self_attention_mask(broken)
    assert "ValueError: unknown mask" in out(capsys)
