"""Answer check for the wrap-up notebook (99): the whole path from image features to what the LLM reads.

The check prints ✓ or ✗ with a hint and returns None; an answer left as ``None`` prints how to attempt it.
"""
from __future__ import annotations

import torch

from vlmcourse.exercises import _run_learner

__all__ = ["check_prefix"]

HOW = ("Fill in my_prefix(model, image_embeds): the Q-Former connector (model.connector) turns the (B, N, D) image "
       "features into (B, Q, C) query outputs, the projection (model.proj) maps them to the LLM's width H, and the "
       "prompt's token embeddings (model.llm_model.get_input_embeddings() of model.prompt_ids, one copy per photo) "
       "follow them: return the (B, Q + P, H) tensor the LLM reads before it writes the first word.")


def check_prefix(fn, model, image_embeds: torch.Tensor) -> None:
    """Exercise (code): the learner's my_prefix(model, image_embeds) against ``SoftPromptCaptioner.prefix_embeds``."""
    with torch.no_grad():
        got = _run_learner(fn, "my_prefix", HOW, model, image_embeds)
        if got is None:
            return
        expected = model.prefix_embeds(image_embeds)
    if not isinstance(got, torch.Tensor):
        print(f"✗ Return a tensor; got {type(got).__name__}.")
        return
    q, p, width = model.num_soft_tokens, len(model.prompt_ids), expected.shape[-1]
    if got.shape != expected.shape:
        if got.shape[-1] == model.proj.in_features and got.shape[-1] != width:
            hint = f"the query outputs are {got.shape[-1]}-d: project them to the LLM's {width}-d with model.proj."
        elif got.shape[:2] == (expected.shape[0], q):
            hint = f"these are the {q} soft prompts alone: the {p} prompt-token embeddings come after them."
        elif got.shape[:2] == (expected.shape[0], p):
            hint = "this is the prompt alone: the soft prompts come first."
        else:
            hint = "one row per photo: soft prompts first, then the prompt's embeddings, along dim 1."
        print(f"✗ Expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. Hint: {hint}")
        return
    got = got.to(expected.dtype)
    if torch.allclose(got, expected, atol=1e-4):
        print(f"✓ Right: {q} soft prompts and {p} prompt tokens, {width}-d each, exactly what generate() feeds the LLM.")
    elif torch.allclose(got[:, p:], expected[:, :q], atol=1e-4):
        print("✗ Same vectors, wrong order. Hint: the soft prompts come first, then the prompt (the LLM reads the "
              "image, then the instruction, then writes).")
    elif torch.allclose(got[:, q:], expected[:, q:], atol=1e-4):
        print("✗ The prompt part is right, the soft prompts are not. Hint: model.proj(model.connector(x)), with "
              "the connector in eval mode (torch.no_grad() is enough: the model is already in eval mode).")
    else:
        print("✗ Right shape, different values. Hint: " + HOW)
