"""The answer checks of notebook 01 accept right answers, explain wrong ones,
and tell a learner who has not started what to do."""
import torch

from vlmcourse.exercises.nb01 import check_patch_embedding_params, check_patchify, check_sequence_length


def out(capsys):
    return capsys.readouterr().out


def test_sequence_length(capsys):
    assert check_sequence_length(None, None) is None
    assert "Not attempted" in out(capsys)
    check_sequence_length(576, 577)
    text = out(capsys)
    assert text.count("✓") == 2 and "✗" not in text
    check_sequence_length(576, 576)
    text = out(capsys)
    assert "✓ num_patches" in text and "✗ seq_length" in text and "[CLS]" in text
    check_sequence_length(24, 25)
    assert "24 x 24" in out(capsys)
    check_sequence_length(196, 197, image_size=224)
    assert out(capsys).count("✓") == 2


def test_patchify_check(capsys):
    check_patchify(None)
    assert "Not attempted" in out(capsys)
    check_patchify(lambda x, p: None)
    assert "returns None" in out(capsys)

    def right(x, p):
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)

    check_patchify(right)
    assert out(capsys).startswith("✓")

    def channels_first(x, p):
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, p * p * C)

    check_patchify(channels_first)
    assert "different order inside the patch" in out(capsys)

    def column_major(x, p):
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 4, 2, 3, 5, 1).reshape(B, -1, p * p * C)

    check_patchify(column_major)
    assert "row by row" in out(capsys)

    def plain_view(x, p):  # mixes pixels of different squares
        B, C, H, W = x.shape
        return x.reshape(B, -1, p * p * C)

    check_patchify(plain_view)
    assert "do not match whole" in out(capsys)

    check_patchify(lambda x, p: x.flatten(1))
    assert "Wrong shape" in out(capsys)

    def broken(x, p):
        raise RuntimeError("oops")

    check_patchify(broken)
    text = out(capsys)
    assert "✗" in text and "RuntimeError: oops" in text


def test_patch_embedding_params(capsys):
    check_patch_embedding_params(None)
    assert "Not attempted" in out(capsys)
    conv = torch.nn.Conv2d(3, 768, 16, stride=16)
    check_patch_embedding_params(sum(p.numel() for p in conv.parameters()))
    assert out(capsys).startswith("✓ 590,592")
    check_patch_embedding_params(16 * 16 * 3 * 768)
    assert "bias" in out(capsys)
    check_patch_embedding_params(16 * 16 * 768 + 768)
    assert "channels" in out(capsys)
    check_patch_embedding_params(12345)
    assert "✗" in out(capsys)
    check_patch_embedding_params(8 * 8 * 1 * 64 + 64, patch_size=8, num_channels=1, hidden_size=64)
    assert "✓" in out(capsys)
