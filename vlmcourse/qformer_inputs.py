"""What the Q-Former (qformer.py) accepts: every input's shape is checked where it enters, and a wrong one stops
with an error that says what was expected and what came."""
from __future__ import annotations

from .masks import MASK_TYPES


def check_inputs(config, image_embeds, input_ids, attention_mask, image_attention_mask, mask_type):
    D, shape = config.encoder_hidden_size, (lambda t: None if t is None else tuple(t.shape))
    if mask_type not in (*MASK_TYPES, None):
        raise ValueError(f"mask_type must be one of {MASK_TYPES} or None, got {mask_type!r}")
    if image_embeds is None and input_ids is None:
        raise ValueError("give image_embeds (B, N, encoder_hidden_size), input_ids (B, T), or both")
    if image_embeds is not None and (image_embeds.dim() != 3 or image_embeds.shape[-1] != D):
        raise ValueError(f"image_embeds must have shape (batch, num_patches, {D}) "
                         f"(encoder_hidden_size={D}), got {shape(image_embeds)}")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, text_len), got {shape(input_ids)}")
        if input_ids.shape[1] > config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than "
                             f"max_position_embeddings={config.max_position_embeddings}")
        if image_embeds is not None and image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch sizes differ: image_embeds {shape(image_embeds)} "
                             f"vs input_ids {shape(input_ids)}")
    if attention_mask is not None and (input_ids is None or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {shape(input_ids)}, "
                         f"got {shape(attention_mask)}")
    if image_attention_mask is not None and (
            image_embeds is None or image_attention_mask.shape != image_embeds.shape[:2]):
        expected = None if image_embeds is None else tuple(image_embeds.shape[:2])
        raise ValueError(f"image_attention_mask must have shape (batch, num_patches) {expected}, "
                         f"got {shape(image_attention_mask)}")


def check_image_key_values(config, image_key_values, image_embeds, input_ids):
    cross = len(config.cross_attention_layers)
    if image_embeds is not None or len(image_key_values) != cross:
        raise ValueError(f"image_key_values stand for image_embeds: give one (keys, values) per cross-attention "
                         f"layer ({cross}) and no image_embeds")
    if input_ids is not None and image_key_values[0][0].shape[0] != input_ids.shape[0]:
        raise ValueError(f"batch sizes differ: image_key_values {image_key_values[0][0].shape[0]} "
                         f"vs input_ids {tuple(input_ids.shape)}")


def check_past(config, past_key_values, image_embeds, input_ids, mask_type):
    if image_embeds is not None or input_ids is None:
        raise ValueError("past_key_values stand for the queries: give input_ids and no image_embeds")
    if mask_type != "itg":
        raise ValueError(f"past_key_values need mask_type='itg', got {mask_type!r}: only under the ITG mask "
                         f"do the queries compute the same thing whatever the text")
    if len(past_key_values) != config.num_hidden_layers:
        raise ValueError(f"past_key_values has {len(past_key_values)} layers, the Q-Former "
                         f"{config.num_hidden_layers}")
    if past_key_values[0][0].shape[0] != input_ids.shape[0]:
        raise ValueError(f"batch sizes differ: past_key_values {past_key_values[0][0].shape[0]} "
                         f"vs input_ids {tuple(input_ids.shape)}")
