"""Answer checks for notebook 05 (stage 2: soft prompts for a frozen LLM).

Each check prints a ✓ or a ✗ with a hint, never raises on a wrong answer, and
tells you how to start when your answer is still ``None``; all return None
(so no stray output in the notebook).
"""

from __future__ import annotations

import torch

from vlmcourse.exercises import _not_attempted, _run_learner

IGNORE_INDEX = -100

# Exercise 1: one row of a training batch. Token ids are made up; in SmolLM2's vocabulary, as here,
# EOS and the pad id are the same number.
EXERCISE_NUM_SOFT = 2            # soft-prompt positions (queries)
EXERCISE_PROMPT_IDS = [41, 42]   # "Caption:" (2 prompt tokens)
EXERCISE_CAPTION_IDS = [7, 8, 9]  # " a dog runs"
EXERCISE_EOS = 2                 # the EOS id, which is also the pad id
EXERCISE_TEXT_LEN = 6            # the batch's longest caption + EOS is 6 tokens: this row gets 2 pads

__all__ = ["EXERCISE_CAPTION_IDS", "EXERCISE_EOS", "EXERCISE_NUM_SOFT", "EXERCISE_PROMPT_IDS", "EXERCISE_TEXT_LEN",
           "check_labels", "check_build_inputs", "check_projection_params", "check_encoder_decoder", "check_cacheable"]


def _as_int_list(answer):
    try:
        values = answer.tolist() if hasattr(answer, "tolist") else list(answer)
        return [int(v) for v in values]
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- exercise 1
def expected_labels() -> list[int]:
    prefix = EXERCISE_NUM_SOFT + len(EXERCISE_PROMPT_IDS)
    text = EXERCISE_CAPTION_IDS + [EXERCISE_EOS]
    return [IGNORE_INDEX] * prefix + text + [IGNORE_INDEX] * (EXERCISE_TEXT_LEN - len(text))


def check_labels(answer) -> None:
    """Exercise 1: the ``labels`` row for 2 soft prompts, the prompt [41, 42], the caption [7, 8, 9],
    EOS = pad = 2, right-padded to 6 text positions (10 positions in all)."""
    if answer is None:
        _not_attempted(
            "Replace None with a list of 10 integers, one per position: 2 soft prompts, 2 prompt tokens, then 6 "
            "text positions (the caption, its EOS, and padding). Use -100 where the loss must ignore a position."
        )
        return
    got, want = _as_int_list(answer), expected_labels()
    if got is None:
        print("✗ I could not read that as a list of integers, e.g. [-100, -100, ...].")
        return
    if len(got) != len(want):
        print(f"✗ Expected {len(want)} labels (2 soft prompts + 2 prompt tokens + 6 text positions), got {len(got)}.")
        return
    if got == want:
        print("✓ Correct! Only the caption and its one EOS are predicted; the soft prompts, the prompt and the "
              "padding are -100, and the padding is found by position, not by id.")
        return
    prefix = EXERCISE_NUM_SOFT + len(EXERCISE_PROMPT_IDS)
    eos_at = prefix + len(EXERCISE_CAPTION_IDS)
    if got == want[1:] + [IGNORE_INDEX]:
        hint = ("you shifted the labels yourself. Hugging Face's causal LMs shift inside the model: labels[i] is "
                "the token *at* position i (the model predicts it from the positions before).")
    elif any(v != IGNORE_INDEX for v in got[:prefix]):
        hint = ("the first 4 positions (soft prompts and prompt) are inputs, not targets: nobody asks the model to "
                "predict them, so their label is -100.")
    elif got[eos_at] == IGNORE_INDEX:
        hint = ("you masked the EOS. It has the pad id, so masking 'every pad id' deletes it: the model never sees "
                "a caption end and never learns to stop. Mask padding by position instead.")
    elif got[prefix:eos_at] != EXERCISE_CAPTION_IDS:
        hint = "positions 5-7 hold the caption tokens themselves ([7, 8, 9]): labels are the input ids there."
    elif any(v != IGNORE_INDEX for v in got[eos_at + 1:]):
        hint = ("the 2 padding positions after the EOS are not part of the caption: -100. Labelling them teaches "
                "the model to say EOS again after it has already stopped.")
    else:
        hint = "compare your list with the picture in section 3, position by position."
    print(f"✗ Not quite. Hint: {hint}")


# ----------------------------------------------------------------------------- exercise 1 (code)
_BUILD_HOW = ("Fill in my_inputs(num_soft, prompt_ids, caption_ids, eos_id): for each caption (a list of token ids, "
              "without EOS) the row is [num_soft soft prompts] [prompt_ids] [caption] [EOS] [padding up to the "
              "longest caption + EOS of the batch]. Return (attention_mask, labels), two integer tensors of shape "
              "(batch, num_soft + len(prompt_ids) + longest caption + 1): attention_mask is 1 on every real position "
              "(soft prompts, prompt, caption, EOS) and 0 on the padding; labels are -100 everywhere except the "
              "caption tokens and their one EOS. Find the padding by position (the pad id is the EOS id).")


def reference_inputs(num_soft: int, prompt_ids, caption_ids, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention_mask, labels) as ``SoftPromptCaptioner.build_inputs`` lays them out, from token ids: the prefix
    [soft prompts; prompt] attended and unlabelled, then ``stage2.text_inputs`` (right padding, masked by position)."""
    from vlmcourse.stage2 import IGNORE_INDEX as ignore, text_inputs

    caps = [torch.tensor([int(t) for t in c] + [eos_id], dtype=torch.long) for c in caption_ids]
    _, text_mask, text_labels = text_inputs(caps, eos_id)
    n = num_soft + len(prompt_ids)
    b = len(caps)
    return (torch.cat([torch.ones(b, n, dtype=torch.long), text_mask], 1),
            torch.cat([torch.full((b, n), ignore, dtype=torch.long), text_labels], 1))


def _build_cases(captioner=None):
    """(name, num_soft, prompt_ids, caption ids without EOS, eos_id, reference (mask, labels)) for the check."""
    cases = [("exercise 1's row and a longer one (2 soft prompts, prompt [41, 42], EOS = pad = 2)",
              EXERCISE_NUM_SOFT, list(EXERCISE_PROMPT_IDS), [list(EXERCISE_CAPTION_IDS), [7, 8, 9, 10, 11]],
              EXERCISE_EOS)]
    cases = [(*c, reference_inputs(*c[1:])) for c in cases]
    if captioner is not None:
        from vlmcourse.stage2 import PrecomputedConnector

        captions = ["A dog runs.", "Two children play on the wet sand at the beach.", "A man on a bike."]
        with_eos = captioner.caption_ids(captions)
        q = captioner.num_soft_tokens
        stand_in = PrecomputedConnector(q, captioner.proj.in_features)
        with torch.no_grad(), captioner.using_connector(stand_in):
            _, mask, labels = captioner.build_inputs(torch.zeros(len(captions), q, captioner.proj.in_features,
                                                                 dtype=captioner.proj.weight.dtype), captions)
        cases.append((f"three real captions through the captioner's build_inputs ({q} soft prompts, the chat prompt, "
                      f"EOS = pad = {captioner.eos_id})", q, captioner.prompt_ids.tolist(),
                      [c[:-1].tolist() for c in with_eos], captioner.eos_id, (mask.cpu(), labels.cpu())))
    return cases


def _diagnose_build(mask, labels, want_mask, want_labels, num_soft, prompt_ids, caption_ids, eos_id) -> str:
    """A hint for a (mask, labels) answer of the right shape that differs from the reference."""
    ignore = IGNORE_INDEX
    n = num_soft + len(prompt_ids)
    real = want_mask.bool()
    is_eos = want_labels == eos_id
    if torch.equal(labels, want_labels.masked_fill(is_eos, ignore)):
        return ("your labels have no EOS at all: you masked it. The EOS has the pad id, so masking 'every position "
                "whose id is the pad id' deletes the caption's real EOS too, and the model never learns to stop. "
                "Mask the padding by position: everything after each caption's EOS.")
    if (labels[:, :n] != ignore).any():
        return ("the soft prompts and the prompt are inputs, not targets: their labels are -100 (nobody asks the "
                "model to predict them).")
    shifted = torch.cat([want_labels[:, 1:], torch.full_like(want_labels[:, :1], ignore)], 1)
    if torch.equal(labels, shifted):
        return ("you shifted the labels yourself. Hugging Face's causal LMs shift inside the model: labels[i] is "
                "the token at position i.")
    if torch.equal(labels[real], want_labels[real]) and (labels[~real] != ignore).any():
        return ("the padding positions are labelled. They are not part of any caption: -100 (labelled pads teach "
                "the model to say EOS again after it has stopped, or, padded on the left, to stop at once).")
    lengths = [len(c) + 1 for c in caption_ids]
    left = torch.full_like(want_labels, ignore)
    for i, c in enumerate(caption_ids):
        left[i, left.shape[1] - lengths[i]:] = torch.tensor([int(t) for t in c] + [eos_id])
    if torch.equal(labels, left):
        return ("you padded on the left. This notebook pads on the right: [prefix] [caption] [EOS] [pad ...], so "
                "the caption follows the prompt directly in every row.")
    if not torch.equal(labels, want_labels):
        row = int((labels != want_labels).any(1).nonzero()[0])
        return (f"row {row} differs: expected labels {want_labels[row].tolist()}, got {labels[row].tolist()}.")
    # the labels are right: the attention mask is not
    if (mask[:, :n] == 0).any():
        return "the soft prompts and the prompt must be attended to (mask 1): they are what the caption reads."
    if torch.equal(mask, (want_labels != ignore).long()):
        return "the attention mask is 1 on every real position, the soft prompts and the prompt included."
    if torch.equal(mask, want_mask.masked_fill(is_eos, 0)):
        return ("the EOS is a real token (mask 1): you masked it by its id, which is the pad id. Find the padding "
                "by position.")
    if (mask[~real] != 0).any():
        return "the padding must not be attended to: mask 0 after each caption's EOS."
    row = int((mask != want_mask).any(1).nonzero()[0])
    return f"row {row} of the attention mask differs: expected {want_mask[row].tolist()}, got {mask[row].tolist()}."


def check_build_inputs(fn, captioner=None) -> None:
    """Exercise 1 (code): the learner's ``my_inputs(num_soft, prompt_ids, caption_ids, eos_id) -> (attention_mask,
    labels)`` for a right-padded batch, against the layout of ``SoftPromptCaptioner.build_inputs``: on made-up ids
    (exercise 1's row and a longer one), and, given a ``captioner``, on real captions through its own
    ``build_inputs`` (its tokenizer, its prompt, its number of soft prompts)."""
    if fn is None:
        _not_attempted(_BUILD_HOW)
        return
    for name, num_soft, prompt_ids, caption_ids, eos_id, (want_mask, want_labels) in _build_cases(captioner):
        got = _run_learner(fn, "my_inputs", _BUILD_HOW, num_soft, list(prompt_ids), [list(c) for c in caption_ids],
                           eos_id)
        if got is None:
            return
        try:
            mask, labels = (torch.as_tensor(g).long().cpu() for g in got)
        except (TypeError, ValueError, RuntimeError):
            print(f"✗ Return a pair (attention_mask, labels) of integer tensors; got {type(got).__name__}.")
            return
        width, b = want_labels.shape[1], len(caption_ids)
        if mask.shape != want_mask.shape or labels.shape != want_labels.shape:
            shapes = f"expected two ({b}, {width}) tensors, got {tuple(mask.shape)} and {tuple(labels.shape)}"
            hint = {width - 1: "each caption ends with exactly one EOS, which counts as a position: append it.",
                    width - num_soft - len(prompt_ids): "the rows cover the whole sequence, soft prompts and prompt "
                                                        "included, not only the caption block.",
                    width - num_soft: "the soft prompts are positions too: the row starts with num_soft of them."}.get(
                labels.shape[-1] if labels.ndim else -1, _BUILD_HOW)
            print(f"✗ On {name}: {shapes}.\n  Hint: {hint}")
            return
        if torch.equal(mask, want_mask) and torch.equal(labels, want_labels):
            continue
        hint = _diagnose_build(mask, labels, want_mask, want_labels, num_soft, prompt_ids, caption_ids, eos_id)
        print(f"✗ On {name}: not quite.\n  Hint: {hint}")
        return
    real = " and on real captions through the captioner's own build_inputs" if captioner is not None else ""
    print(f"✓ my_inputs matches SoftPromptCaptioner.build_inputs, on made-up ids{real}: the prefix attended and "
          f"unlabelled, the caption and exactly one EOS labelled, the padding found by position (mask 0, label -100) "
          f"although its id is the EOS id.")


# ----------------------------------------------------------------------------- exercise 2
def check_projection_params(answer, connector_size: int = 384, llm_size: int = 576, num_queries: int = 32) -> None:
    """Exercise 2: trainable parameters of the projection from query outputs (``connector_size``) to the
    LLM's embedding size (``llm_size``)."""
    c, h, q = connector_size, llm_size, num_queries
    if answer is None:
        _not_attempted(f"Replace None with a number (a Python expression is fine): the projection is one "
                       f"nn.Linear from {c} to {h}, applied to each of the {q} query outputs.")
        return
    want = c * h + h
    if answer == want:
        print(f"✓ Correct! {c}·{h} weights + {h} biases = {want:,}: about 0.2M trainable numbers in front of a "
              f"frozen LLM of 135M.")
        return
    hints = {c * h: "nearly: nn.Linear has a bias too, one per output.",
             q * (c * h + h): f"the same Linear is applied to all {q} queries: the weights are shared, so the "
                              f"number of queries does not change the count.",
             q * c * h: "the weights are shared across the queries, and don't forget the bias.",
             c * h + c: f"the bias has one entry per *output* ({h}), not per input."}
    hint = hints.get(answer, f"an nn.Linear(in, out) has in·out weights and out biases; here in = {c}, out = {h}.") \
        if isinstance(answer, (int, float)) else "answer with a number."
    print(f"✗ {answer!r} is not right. Hint: {hint}")


# ----------------------------------------------------------------------------- exercise 3
ENCODER_DECODER_OPTIONS = {
    "a": "encoder: soft prompts + prompt; decoder: the caption + EOS, all of it labelled (no -100 prefix)",
    "b": "encoder: soft prompts only; decoder: prompt + caption + EOS, with -100 on the prompt",
    "c": "decoder only: soft prompts + prompt + caption + EOS, with -100 on the soft prompts and the prompt",
    "d": "encoder: the prompt only; decoder: soft prompts + caption + EOS, with -100 on the soft prompts",
}


def check_encoder_decoder(answer) -> None:
    """Exercise 3: in BLIP-2's encoder-decoder recipe (FlanT5), where do the soft prompts and the prompt go,
    and what are the labels?"""
    options = "\n".join(f"  {k}) {v}" for k, v in ENCODER_DECODER_OPTIONS.items())
    if answer is None:
        _not_attempted(f"Answer with a letter. For an encoder-decoder LLM such as FlanT5, BLIP-2 feeds:\n{options}")
        return
    letter = str(answer).strip().lower().rstrip(")")
    if letter not in ENCODER_DECODER_OPTIONS:
        print(f"✗ Answer with one of the letters {', '.join(ENCODER_DECODER_OPTIONS)}.")
        return
    if letter == "a":
        print("✓ Correct! Everything the model is *given* (image and prompt) is read by the encoder; the decoder "
              "only produces the caption, so every decoder position is a target and no -100 prefix is needed.")
        return
    hints = {"b": "the prompt is given, not generated: in an encoder-decoder model, given text goes to the encoder.",
             "c": "that is the decoder-only recipe (OPT, SmolLM2), the one this notebook trains.",
             "d": "the decoder cross-attends to the encoder's outputs: that is where the image must be read."}
    print(f"✗ Not quite. Hint: {hints[letter]}")


# ----------------------------------------------------------------------------- exercise 4
CACHEABLE_OPTIONS = {
    "image features": "the frozen image encoder's patch tokens",
    "query outputs": "the Q-Former's outputs",
    "soft prompts": "the projection's outputs",
    "llm hidden states": "the LLM's hidden states on [soft prompts; prompt; caption]",
}


def check_cacheable(answer, qformer_frozen: bool = True) -> None:
    """Exercise 4: which tensors can be computed once per image and reused at every training step?"""
    names = ", ".join(f'"{k}"' for k in CACHEABLE_OPTIONS)
    state = "frozen" if qformer_frozen else "fine-tuned"
    if answer is None:
        _not_attempted(f"Replace None with a set of names out of {{{names}}}, for a {state} Q-Former. A tensor can "
                       f"be cached if nothing that produces it changes during training.")
        return
    if isinstance(answer, str):
        answer = {answer}
    try:
        got = {str(a).strip().lower() for a in answer}
    except TypeError:
        print('✗ Use a set of names, e.g. {"image features"}.')
        return
    unknown = got - set(CACHEABLE_OPTIONS)
    if unknown:
        print(f"✗ Unknown name(s) {sorted(unknown)}: choose among {names}.")
        return
    want = {"image features", "query outputs"} if qformer_frozen else {"image features"}
    if got == want:
        extra = ("the projection trains, so the soft prompts and everything after them change at every step."
                 if qformer_frozen else "a trained Q-Former changes its outputs at every step.")
        print(f"✓ Correct! Everything up to the last frozen part can be cached; {extra}")
        return
    if "soft prompts" in got or "llm hidden states" in got:
        hint = "the projection is trained: its outputs (and the LLM's states that read them) change at every step."
    elif qformer_frozen and "query outputs" not in got:
        hint = "the Q-Former is frozen and only reads the image: its output for a photo is the same at every step."
    elif not qformer_frozen and "query outputs" in got:
        hint = "a fine-tuned Q-Former changes at every step, so its outputs do too."
    else:
        hint = "the image encoder is frozen in both stages of BLIP-2."
    print(f"✗ Not quite. Hint: {hint}")
