"""Stage 2: image features become soft prompts for a frozen LLM.

A *connector* turns the frozen image encoder's patch tokens into a few vectors
(the Q-Former's query outputs, or a pooled/projected alternative); a linear
*projection* maps them to the LLM's embedding size; the LLM reads them as the
first positions of ``inputs_embeds``, followed by a short text prompt and the
caption. Only the caption (and its one EOS) is labelled: every other position
has label -100.

    [soft prompts (Q)] [prompt tokens] [caption tokens] [EOS] [pad ... pad]
     labels: -100 ...   -100 ...        caption ids      EOS   -100 ...

Padding goes on the right and is masked *by position*: SmolLM2's pad and EOS
are the same id, so masking labels by pad id would delete the real EOS and the
model would never learn to stop.

This is BLIP-2's decoder-only recipe (OPT). In the encoder-decoder recipe
(FlanT5) the soft prompts and the prompt go to the encoder and the caption is
the decoder's target; ``labels`` then need no -100 prefix at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IGNORE_INDEX = -100


@dataclass
class BridgeConfig:
    prompt: str = "A short caption of the photo:"
    max_caption_tokens: int = 32


class MeanPoolConnector(nn.Module):
    """Baseline connector: average-pool the patch grid to a small grid, one token per cell."""

    def __init__(self, grid_size: tuple[int, int], pooled: int = 1):
        super().__init__()
        self.grid_size, self.pooled = tuple(grid_size), pooled
        self.num_tokens = pooled * pooled

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        h, w = self.grid_size
        b, n, d = image_embeds.shape
        if n != h * w:
            raise ValueError(f"expected {h * w} patch tokens for a {h}x{w} grid, got {n}")
        grid = image_embeds.transpose(1, 2).reshape(b, d, h, w)
        return nn.functional.adaptive_avg_pool2d(grid, self.pooled).flatten(2).transpose(1, 2)


class PatchConnector(nn.Module):
    """LLaVA-style baseline: every patch token goes to the LLM (the projection does the work)."""

    def __init__(self, num_patches: int):
        super().__init__()
        self.num_tokens = num_patches

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return image_embeds


class QFormerConnector(nn.Module):
    """The Q-Former's query outputs (B, Q, H): the image seen through Q learned questions."""

    def __init__(self, qformer: nn.Module, image_norm: nn.Module | None = None):
        super().__init__()
        self.qformer, self.image_norm = qformer, image_norm
        self.num_tokens = qformer.config.num_query_tokens

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if self.image_norm is not None:
            image_embeds = self.image_norm(image_embeds)
        return self.qformer(image_embeds=image_embeds).query_output


class SoftPromptCaptioner(nn.Module):
    """connector -> projection -> frozen LLM. ``forward`` returns the caption LM loss."""

    def __init__(self, connector: nn.Module, connector_size: int, llm, config: BridgeConfig | None = None,
                 freeze_llm: bool = True):
        super().__init__()
        self.connector, self.llm_model, self.tokenizer = connector, llm.model, llm.tokenizer
        self.config = config or BridgeConfig()
        self.proj = nn.Linear(connector_size, llm.model.config.hidden_size)
        if freeze_llm:
            for p in self.llm_model.parameters():
                p.requires_grad_(False)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the LLM's tokenizer has no EOS token: captions could never end")
        self.eos_id = self.tokenizer.eos_token_id
        self.prompt_ids = self.tokenizer(self.config.prompt, add_special_tokens=False,
                                         return_tensors="pt").input_ids[0]

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def soft_prompts(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, D) image tokens -> (B, Q, H_llm) vectors in the LLM's input-embedding space."""
        if image_embeds.ndim != 3:
            raise ValueError(f"image_embeds must be (B, N, D), got {tuple(image_embeds.shape)}")
        return self.proj(self.connector(image_embeds.to(self.device, self.proj.weight.dtype)))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm_model.get_input_embeddings()(ids.to(self.device))

    def caption_ids(self, captions: list[str]) -> list[torch.Tensor]:
        """Each caption's token ids (leading space, no special tokens), truncated, with one EOS appended."""
        out = []
        for caption in captions:
            ids = self.tokenizer(" " + caption.strip(), add_special_tokens=False).input_ids
            out.append(torch.tensor(ids[: self.config.max_caption_tokens] + [self.eos_id]))
        return out

    def build_inputs(self, image_embeds: torch.Tensor, captions: list[str]):
        """inputs_embeds, attention_mask and labels for teacher-forced training (right-padded)."""
        if len(captions) != image_embeds.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images but {len(captions)} captions")
        soft = self.soft_prompts(image_embeds)                          # (B, Q, H)
        b, q, _ = soft.shape
        prompt = self._embed(self.prompt_ids).expand(b, -1, -1)        # (B, P, H)
        caps = self.caption_ids(captions)
        t = max(len(c) for c in caps)
        ids = torch.full((b, t), self.eos_id, dtype=torch.long)        # the pad id is irrelevant: masked below
        text_mask = torch.zeros(b, t, dtype=torch.long)
        for i, c in enumerate(caps):
            ids[i, : len(c)], text_mask[i, : len(c)] = c, 1
        embeds = torch.cat([soft, prompt.to(soft.dtype), self._embed(ids).to(soft.dtype)], dim=1)
        prefix = q + prompt.shape[1]
        attention_mask = torch.cat([torch.ones(b, prefix, dtype=torch.long), text_mask], dim=1)
        labels = torch.cat([torch.full((b, prefix), IGNORE_INDEX), ids.masked_fill(text_mask == 0, IGNORE_INDEX)], 1)
        return embeds, attention_mask.to(self.device), labels.to(self.device)

    def forward(self, image_embeds: torch.Tensor, captions: list[str]) -> torch.Tensor:
        embeds, attention_mask, labels = self.build_inputs(image_embeds, captions)
        return self.llm_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss

    def prefix_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        soft = self.soft_prompts(image_embeds)
        prompt = self._embed(self.prompt_ids).expand(soft.shape[0], -1, -1).to(soft.dtype)
        return torch.cat([soft, prompt], dim=1)

    @torch.no_grad()
    def first_token_probs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, vocab) distribution of the first caption token: P(EOS) here diagnoses empty captions."""
        embeds = self.prefix_embeds(image_embeds)
        logits = self.llm_model(inputs_embeds=embeds).logits[:, -1]
        return logits.float().softmax(-1)

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, max_new_tokens: int = 30, num_beams: int = 1,
                 **kwargs) -> list[str]:
        """Captions for a batch of image features (greedy by default)."""
        embeds = self.prefix_embeds(image_embeds)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        out = self.llm_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      num_beams=num_beams, do_sample=False, eos_token_id=self.eos_id,
                                      pad_token_id=self.eos_id, **kwargs)
        return [self.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in out]
