"""Greedy decoding from a prefix of embeddings, by hand: one pass over the prefix, then one token a step from the
key/value cache, and a row leaves the batch as soon as it writes EOS.

Why not ``model.generate``: Hugging Face's greedy search keeps every row in the batch until the last one ends, so one
caption that loops until ``max_new_tokens`` makes all the others pay for its steps. On the course's test split (76
photos, 30 new tokens at most) a quarter of the captions run to the limit; dropping finished rows cut notebook 05's
captioning of the test photos by about a third on a 2-core CPU (docs/recipes.md, "Greedy decoding"). The tokens are
Hugging Face's greedy tokens (tests/test_generation.py checks them against ``generate``).
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


@torch.no_grad()
def greedy_decode(lm, inputs_embeds: torch.Tensor, max_new_tokens: int, eos_token_id: int,
                  first_step_probs: list | None = None) -> list[list[int]]:
    """Each row's new tokens (its EOS included, if it wrote one), greedy, after the prefix ``inputs_embeds``.

    ``lm``: a causal LM (a transformers model, or a peft model around one) that takes ``inputs_embeds``,
    ``past_key_values`` and ``logits_to_keep``. ``inputs_embeds`` (B, T, d): prefixes of equal length, no padding.
    ``first_step_probs``: a list that receives the (B, vocab) softmax of the first step (P(EOS) there means an
    empty caption), read off the prefix pass for free.
    """
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be (batch, length, hidden), got {tuple(inputs_embeds.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    cache = DynamicCache()
    kv = {cache_argument(lm): cache}
    logits = lm(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1, **kv).logits[:, -1]
    if first_step_probs is not None:
        first_step_probs.append(logits.float().softmax(-1))
    tokens: list[list[int]] = [[] for _ in range(inputs_embeds.shape[0])]
    alive = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device)   # rows still writing
    for step in range(max_new_tokens):
        next_ids = logits.float().argmax(-1)
        for row, token in zip(alive.tolist(), next_ids.tolist()):
            tokens[row].append(token)
        going = next_ids != eos_token_id
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():                     # finished rows leave the batch, and the cache
            keep = going.nonzero().flatten()
            cache.batch_select_indices(keep)
            alive, next_ids = alive[keep], next_ids[keep]
        logits = lm(input_ids=next_ids[:, None], use_cache=True, logits_to_keep=1, **kv).logits[:, -1]
    return tokens


def cache_argument(decoder) -> str:
    """The name under which this transformers version's decoder takes a KV cache: ``past_key_values``, which
    later 5.x versions renamed ``cache``."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
