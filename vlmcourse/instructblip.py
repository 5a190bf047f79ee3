"""InstructBLIP's idea: the queries read the instruction before they read the image for the LLM.

In BLIP-2 the Q-Former's queries see only the image: the same 32 vectors go to the LLM whatever it is asked. In
InstructBLIP (Dai et al., 2023) the instruction's tokens join the queries in the Q-Former's self-attention, under
the bidirectional mask of image-text matching (``masks.self_attention_mask("itm", ...)``: queries and text attend
to each other, nobody reads padding), so the queries extract what *this* question needs. Only the query outputs go
on to the LLM (which gets the instruction again, as text).

The instruction is tokenised with the Q-Former's own tokenizer (the BERT text encoder's, not the LLM's).
``SoftPromptCaptioner`` calls its connector with the image alone: wrap such calls in ``connector.instruction(ids,
mask)`` to give them the batch's instructions.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .connectors import QFormerConnector, connector_from_config
from .masks import self_attention_mask


class InstructQFormerConnector(QFormerConnector):
    """The Q-Former's query outputs (B, Q, H), computed with the instruction's tokens in the self-attention.

    Without an instruction it is BLIP-2's ``QFormerConnector``: queries only.
    """

    mask_type = "itm"          # bidirectional: queries <-> instruction

    def __init__(self, qformer, image_norm=None):
        super().__init__(qformer, image_norm)
        self._instruction = None

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is None and self._instruction is not None:
            input_ids, attention_mask = self._instruction
        if input_ids is not None and input_ids.shape[0] != image_embeds.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images but {input_ids.shape[0]} instructions")
        return super().forward(image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                               mask_type=self.mask_type)

    def attention_pattern(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, Q+T, Q+T) bool: who may attend to whom in the self-attention (queries first, then instruction)."""
        return self_attention_mask(self.mask_type, self.num_tokens, attention_mask)

    @contextmanager
    def instruction(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Calls made inside read these instructions (one per image), e.g. ``SoftPromptCaptioner``'s."""
        previous, self._instruction = self._instruction, (input_ids, attention_mask)
        try:
            yield self
        finally:
            self._instruction = previous

    def to_config(self) -> dict:
        return {**super().to_config(), "type": "instruct_qformer"}

    @classmethod
    def from_config(cls, config: dict) -> "InstructQFormerConnector":
        plain = connector_from_config({**config, "type": "qformer"})
        return cls(plain.qformer, plain.image_norm)
