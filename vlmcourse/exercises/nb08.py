"""Answer checks for notebook 08 (beyond BLIP-2: Flamingo, LLaVA, instruction tuning, VQA).

Each check prints a ✓ or a ✗ with a hint, never raises on a wrong answer, and tells you how to start when your
answer is still ``None``; all return None (so no stray output in the notebook).
"""
from __future__ import annotations

import torch

from vlmcourse.exercises import _as_float, _not_attempted, _run_learner
from vlmcourse.flamingo import GatedCrossAttentionBlock
from vlmcourse.instruct import normalize_answer, text_prior_answers, vqa_accuracy

__all__ = ["check_text_prior", "check_gated_block", "check_positions_read"]


# ----------------------------------------------------------------------------- exercise 1
def check_text_prior(my_text_prior, train_rows: list[dict], test_rows: list[dict]) -> None:
    """Exercise 1: ``my_text_prior(train_rows)`` -> {question type: its most common train answer}, compared with
    ``instruct.text_prior_answers`` by the accuracy each gets on ``test_rows``."""
    how = ("Write my_text_prior(rows): count each row's answer per row['type'] (collections.Counter) and return "
           "{type: most common answer}.")
    got = _run_learner(my_text_prior, "my_text_prior", how, train_rows)
    if got is None:
        return
    want = text_prior_answers(train_rows)
    if not isinstance(got, dict) or set(got) != set(want):
        print(f"✗ Expected a dict with one entry per question type {sorted(want)}, got "
              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        return
    types, answers = [r["type"] for r in test_rows], [r["answer"] for r in test_rows]
    mine = vqa_accuracy([str(got[t]) for t in types], answers, types)["overall"]
    package = vqa_accuracy([want[t] for t in types], answers, types)["overall"]
    wrong = [t for t in want if normalize_answer(str(got[t])) != normalize_answer(want[t])]
    if not wrong:
        print(f"✓ Correct: the same answer as text_prior_answers for every type, test accuracy {mine:.3f} without "
              f"looking at a single photo. A VQA model has to beat this, not 0.")
    else:
        print(f"✗ Different answers for {wrong} (your test accuracy {mine:.3f}, the package's {package:.3f}). "
              "Hint: count per question type, over the train rows only, and compare normalised answers "
              "(instruct.normalize_answer), so that 'two' and '2' count as one answer.")


# ----------------------------------------------------------------------------- exercise 2
def check_gated_block(my_gated_block, seed: int = 0) -> None:
    """Exercise 2: ``my_gated_block(block, hidden, visual)`` computes a ``GatedCrossAttentionBlock``'s output from its
    parts (``attn_norm``, ``attn``, ``ff``, ``attn_gate``, ``ff_gate``); checked with closed and with open gates."""
    how = ("Write my_gated_block(block, hidden, visual): first x = hidden + tanh(block.attn_gate) * "
           "block.attn(block.attn_norm(hidden), visual), then x + tanh(block.ff_gate) * block.ff(x).")
    torch.manual_seed(seed)
    block = GatedCrossAttentionBlock(hidden_size=16, visual_size=8, num_heads=2, head_size=4, ff_mult=2)
    hidden, visual = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    with torch.no_grad():
        closed = _run_learner(my_gated_block, "my_gated_block", how, block, hidden, visual)
        if closed is None:
            return
        if not torch.allclose(closed, hidden, atol=1e-6):
            print("✗ With both gates at 0 (a new block) the output must equal the input exactly: tanh(0) = 0 shuts "
                  "both branches. Check that each branch is multiplied by tanh of its gate.")
            return
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.4)
        got, want = my_gated_block(block, hidden, visual), block(hidden, visual)
    if torch.allclose(got, want, atol=1e-5):
        print("✓ Correct: closed gates leave the LLM's hidden states untouched, open gates add the image through "
              "cross-attention, then a feed-forward, each scaled by tanh of its own gate.")
        return
    with torch.no_grad():
        x = hidden + block.attn_gate.tanh() * block.attn(block.attn_norm(hidden), visual)
        parallel = x + block.ff_gate.tanh() * block.ff(hidden)
        raw = hidden + block.attn_gate * block.attn(block.attn_norm(hidden), visual)
        raw = raw + block.ff_gate * block.ff(raw)
    if torch.allclose(got, parallel, atol=1e-5):
        hint = "the feed-forward reads the output of the attention branch (x), not the block's input."
    elif torch.allclose(got, raw, atol=1e-5):
        hint = "the gates go through tanh, so that a gate can never scale a branch by more than 1."
    else:
        hint = "the attention branch reads attn_norm(hidden); both branches are residual (added to x)."
    print(f"✗ With open gates your output differs from the block's (largest gap "
          f"{(got - want).abs().max().item():.3g}). Hint: {hint}")


# ----------------------------------------------------------------------------- exercise 3
def check_positions_read(answer, photos: int, questions: int, image_tokens: int, text_tokens: int) -> None:
    """Exercise 3: how many positions the LLM reads in a step of ``photos`` x ``questions`` rows when each photo's
    image tokens are read once (the grouped prefix), against once per question."""
    grouped = photos * image_tokens + photos * questions * text_tokens
    ungrouped = photos * questions * (image_tokens + text_tokens)
    if answer is None:
        _not_attempted(f"Replace None with a number: positions read with a shared prefix, for {photos} photos x "
                       f"{questions} questions, {image_tokens} image tokens and {text_tokens} text tokens each.")
        return
    got = _as_float(answer)
    if got == grouped:
        print(f"✓ Correct: {grouped} positions, against {ungrouped} when every question reads the image tokens "
              f"again ({ungrouped / grouped:.1f}x as many).")
    elif got == ungrouped:
        print("✗ That is the count without sharing: each photo's image tokens go through the LLM once, however "
              "many questions continue from them.")
    else:
        print(f"✗ Not {answer}. Hint: {photos} prefixes of {image_tokens} image tokens, plus one text row of "
              f"{text_tokens} tokens per question.")
