"""Answer checks for notebook 03 (the Q-Former and its three attention masks).

Each check prints a ✓ or a ✗ with a hint, never raises on a wrong answer, and
tells you how to start when your answer is still ``None``; all return None
(so no stray output in the notebook).
"""

from __future__ import annotations

import torch

from vlmcourse.masks import MASK_TYPES, self_attention_mask
from vlmcourse.qformer import Attention, QFormerConfig
from vlmcourse.exercises import _not_attempted, _run_learner

__all__ = ["check_itg_mask", "check_self_attention_mask", "check_cross_attention_params", "check_masks_that_leak_text", "cross_attention_params"]


# ----------------------------------------------------------------------------- exercise 1
def check_itg_mask(answer) -> None:
    """Exercise 1: the ITG mask for Q=2 queries and T=3 text tokens, no padding.

    ``answer``: a 5x5 nested list (or tensor) of 0/1, rows = who looks,
    columns = who is looked at, in the order q0, q1, t0, t1, t2.
    """
    if answer is None:
        _not_attempted(
            "Replace None with a list of 5 lists of 5 zeros/ones, rows and columns in the order "
            "q0, q1, t0, t1, t2: row i says which positions token i may attend to."
        )
        return
    expected = self_attention_mask("itg", 2, torch.ones(1, 3))[0]
    try:
        got = torch.as_tensor(answer).bool()
    except (TypeError, ValueError, RuntimeError):
        print("✗ I could not read that as a matrix: use a list of 5 lists of 5 numbers (0 or 1).")
        return
    if got.shape != expected.shape:
        print(f"✗ Expected a 5x5 matrix (Q+T = 2+3 rows and columns), got shape {tuple(got.shape)}.")
        return
    if torch.equal(got, expected):
        print("✓ Correct! Queries only see queries; each text token sees all queries and the text up to itself.")
        return
    names = ["q0", "q1", "t0", "t1", "t2"]
    wrong = [names[i] for i in range(5) if not torch.equal(got[i], expected[i])]
    hint = "Queries may not see any text (or they would leak the caption into the image summary)."
    if all(name.startswith("t") for name in wrong):
        hint = "A text token sees every query, plus the text tokens up to and including itself (causal)."
    print(f"✗ Not quite: the row(s) of {', '.join(wrong)} differ. Hint: {hint}")


# ----------------------------------------------------------------------------- exercise 2
def cross_attention_params(hidden_size: int, encoder_hidden_size: int) -> int:
    """Parameters of one cross-attention block, counted on a real one."""
    config = QFormerConfig(hidden_size=hidden_size, num_attention_heads=1, encoder_hidden_size=encoder_hidden_size)
    with torch.device("meta"):
        block = Attention(config, kv_size=encoder_hidden_size)
    return sum(p.numel() for p in block.parameters())


def check_cross_attention_params(answer, hidden_size: int = 768, encoder_hidden_size: int = 1408) -> None:
    """Exercise 2: how many parameters does one cross-attention block add?

    (query, key, value and output projections with biases, plus its LayerNorm),
    at Q-Former width ``hidden_size`` H and image-encoder width
    ``encoder_hidden_size`` D. Defaults: BLIP-2 (H=768, D=1408).
    """
    H, D = hidden_size, encoder_hidden_size
    if answer is None:
        _not_attempted(
            f"Replace None with a number (a Python expression is fine) for H={H}, D={D}: "
            "list the Linear layers of the block and the sizes they map between."
        )
        return
    expected = cross_attention_params(H, D)
    if answer == expected:
        print(f"✓ Correct! {expected:,} = 2·H·H + 2·D·H weights + 4·H biases + 2·H LayerNorm. With D > H the "
              f"keys and values make it bigger than a self-attention block ({4 * H * H + 6 * H:,}).")
        return
    near_misses = {
        4 * H * H + 4 * H + 2 * H: "that is a *self*-attention block: keys and values read the image, width D.",
        2 * H * H + 2 * D * H: "remember the biases (one per output) and the LayerNorm (weight and bias).",
        2 * H * H + 2 * D * H + 4 * H: "nearly: the block ends with a LayerNorm (2H parameters).",
        2 * H * H + 2 * D * H + 2 * H: "nearly: each of the 4 Linear layers has a bias of size H.",
    }
    default = "query: H->H, key: D->H, value: D->H, output: H->H, each with a bias; then a LayerNorm (2H)."
    hint = near_misses.get(answer, default) if isinstance(answer, (int, float)) else default
    print(f"✗ {answer!r} is not right. Hint: {hint}")


# ----------------------------------------------------------------------------- exercise 3
def check_masks_that_leak_text(answer) -> None:
    """Exercise 3: under which mask(s) can the caption change the query outputs?

    ``answer``: a set (or list) of mask names out of ``{"itc", "itm", "itg"}``.
    """
    if answer is None:
        _not_attempted(
            'Replace None with a set of mask names, e.g. {"itc"}. For each mask, look at the query rows '
            "in the heatmaps: do they have any allowed text column?"
        )
        return
    if isinstance(answer, str):
        answer = {answer}
    try:
        got = {str(name).lower() for name in answer}
    except TypeError:
        print('✗ Use a set of names, e.g. {"itc", "itg"}.')
        return
    unknown = got - set(MASK_TYPES)
    if unknown:
        print(f"✗ Unknown mask name(s) {sorted(unknown)}: choose among {list(MASK_TYPES)}.")
        return
    if got == {"itm"}:
        print("✓ Correct! Only ITM lets queries read the text; ITC and ITG keep the queries image-only, "
              "so the image summary cannot copy the caption it is trained to match or generate.")
        return
    if "itm" not in got:
        print("✗ Not quite. Hint: one of the masks is all True: there, queries see the text too.")
    else:
        print("✗ Not quite. Hint: under ITC and ITG, do the query rows have any True in a text column?")


# ----------------------------------------------------------------------------- exercise 2 (code)
_MASK_WHY = {  # (block, expected value) -> why, for the first block the learner got wrong
    ("queries → text", False): "the queries may not read the text here, or the image summary could copy the caption.",
    ("queries → text", True): "under ITM everyone sees everyone: the queries read the caption to judge the match.",
    ("text → queries", False): "under ITC the text is encoded on its own: no text row has a query column.",
    ("text → queries", True): "the text reads every query: that is how the image reaches the text.",
    ("queries → queries", True): "queries always see all the queries.",
}


def _mask_blocks(mask: torch.Tensor, Q: int, real: torch.Tensor) -> dict:
    """The four blocks of one (Q+T, Q+T) mask, restricted to real text positions."""
    text = torch.arange(real.numel())[real] + Q
    query = torch.arange(Q)
    return {"queries → queries": mask[query][:, query], "queries → text": mask[query][:, text],
            "text → queries": mask[text][:, query], "text → text": mask[text][:, text]}


def check_self_attention_mask(fn) -> None:
    """Exercise 2: the learner's three masks against vlmcourse.qformer.self_attention_mask.

    ``fn(mask_type, num_query_tokens, attention_mask)`` must return a (B, Q+T, Q+T) bool tensor.
    """
    how = ("Fill in my_self_attention_mask(mask_type, num_query_tokens, attention_mask): return a (B, Q+T, Q+T) "
           "bool tensor, True where position i (row) may attend to position j (column), queries first, then "
           'text, for mask_type "itc", "itm" and "itg"; columns of padding (attention_mask 0) are False in every row.')
    Q, attention_mask = 3, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # the second caption is padded
    B, T = attention_mask.shape
    lines = []
    for mask_type in MASK_TYPES:
        name = f"my_self_attention_mask({mask_type!r}, {Q}, attention_mask)"
        got = _run_learner(fn, name, how, mask_type, Q, attention_mask.clone())
        if got is None:
            return
        if not isinstance(got, torch.Tensor):
            print(f"✗ {name} returned a {type(got).__name__}, not a tensor.")
            return
        if tuple(got.shape) != (B, Q + T, Q + T):
            hint = ("one mask per caption: captions have different padding, so keep the batch dimension."
                    if tuple(got.shape) == (Q + T, Q + T) else "rows and columns are the Q queries, then the T tokens.")
            print(f"✗ {name}: expected shape {(B, Q + T, Q + T)} for B={B}, Q={Q}, T={T}, got {tuple(got.shape)}.\n"
                  f"  Hint: {hint}")
            return
        got = got.bool()
        expected = self_attention_mask(mask_type, Q, attention_mask)
        if torch.equal(got, expected):
            lines.append(f"✓ {mask_type}")
            continue
        hint = None
        for b in range(B):
            real = attention_mask[b].bool()
            mine, ref = _mask_blocks(got[b], Q, real), _mask_blocks(expected[b], Q, real)
            for block in mine:
                if torch.equal(mine[block], ref[block]):
                    continue
                if block == "text → text":
                    if mask_type != "itg":
                        hint = "here the text is bidirectional: every text token sees every real text token."
                    elif mine[block].triu(1).any():
                        hint = "ITG is causal: a text token sees the text up to itself, never later words."
                    elif not mine[block].diagonal().all():
                        hint = "a text token also sees itself (the diagonal): position j <= position i."
                    else:
                        hint = "a text token sees every earlier text token and itself (lower triangle)."
                else:
                    hint = _MASK_WHY[block, bool(ref[block].all())]
                hint = f"{block}: {hint}"
                break
            if hint:
                break
        if hint is None:
            pad_columns = got[:, :, Q:][~attention_mask.bool()[:, None, :].expand(B, Q + T, T)]
            if pad_columns.any():
                hint = "nobody may read padding: the columns of [PAD] tokens are False in every row."
            else:
                hint = ("only the columns of padding are masked, not its rows: a row with nothing allowed makes the "
                        "softmax divide by zero (NaN); a [PAD] token's own output is ignored anyway.")
        lines.append(f"✗ {mask_type}: {hint}")
    if all(line.startswith("✓") for line in lines):
        print("✓ All three masks match vlmcourse.qformer.self_attention_mask, padding included.")
    else:
        print("\n".join(lines))
