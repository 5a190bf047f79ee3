"""Stage 2: image features become soft prompts for a frozen LLM.

This file holds the soft-prompt captioner (``SoftPromptCaptioner``) and its inputs (``build_inputs``,
``text_inputs``; the two trap layouts of notebook 06 in ``trap_text_inputs``). The connectors are in connectors.py
(imported here too), its caption loss and caption scores in evaluate.py, its figures in plots.py, LoRA on top of it
in lora.py.

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
model would never learn to stop. ``BridgeConfig(padding=...)`` keeps the two
classic mistakes, to reproduce them on purpose (notebook 06):

    "left_unmasked":  [Q] [prompt] [pad pad] [caption] [EOS]   pads attended and labelled:
                      after the prompt comes EOS, so the model learns to stop at once (empty captions)
    "mask_by_pad_id": [Q] [prompt] [caption] [EOS] [pad pad]   every label equal to the pad id is -100,
                      the real EOS included: the model never learns to stop

This is BLIP-2's decoder-only recipe (OPT). In the encoder-decoder recipe
(FlanT5) the soft prompts and the prompt go to the encoder and the caption is
the decoder's target; ``labels`` then need no -100 prefix at all.

A photo's captions share its prefix [soft prompts; prompt]: given a list of captions per photo, ``forward`` reads it
once and continues each caption from its keys and values (``grouped_loss``): same loss and gradients, ~half the reads.

A frozen connector is a fixed function of the image: its outputs can be
computed once per image (``connector_outputs``) and training then runs on them
through a ``PrecomputedConnector`` (``using_connector``), skipping the Q-Former
at every step. ``save_pretrained``/``from_pretrained`` store everything but the
LLM, which is loaded from the profile.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .connectors import (LinearConnector, MeanPoolConnector, PrecomputedConnector,  # noqa: F401  (stage2's API)
                         QFormerConnector, connector_from_config)
from .distributed import global_mean
from .generation import cache_argument, greedy_decode
from .utils import eval_mode, in_batches

IGNORE_INDEX = -100
PADDINGS = ("right", "left_unmasked", "mask_by_pad_id")   # the correct label layout, then two traps
# Photos captioned per generate() call: a decoding step costs a 2-core CPU nearly as much for 12 rows as for 64,
# so the 76 test photos in one batch take 40% less time than in two.
GENERATION_BATCH = 128


@dataclass
class BridgeConfig:
    prompt: str = "A short caption of the photo:"
    max_caption_tokens: int = 32
    clean_captions: bool = False     # "A dog runs ." -> "A dog runs." (see clean_caption)
    padding: str = "right"           # "right" (correct); "left_unmasked", "mask_by_pad_id": the traps above

    def __post_init__(self):
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}: choose one of {PADDINGS}")


def clean_caption(caption: str) -> str:
    """Flickr8k's captions are pre-tokenised ("A dog , running on grass ."), and some lack a final period.
    Written as ordinary text ("A dog, running on grass.") they read like what the LLM was trained on, and every
    caption ends the same way before its EOS."""
    text = re.sub(r"\s+([.,;:!?'])", r"\1", " ".join(caption.split()))
    text = re.sub(r"\s+(n't|'s|'re)\b", r"\1", text)
    if text and text[-1] not in ".!?":
        text += "."
    return text[:1].upper() + text[1:]


def text_inputs(caps: list[torch.Tensor], fill_id: int):
    """The caption block of a batch, right-padded: (ids, attention mask, labels), each (B, T). Padding is found by
    position, never by id (pad = EOS in SmolLM2): its mask is 0 and its label -100; the real EOS keeps its label.
    ``fill_id`` fills the padding (any id: it is masked)."""
    b, t = len(caps), max(len(c) for c in caps)
    ids = torch.full((b, t), fill_id, dtype=torch.long)
    text_mask = torch.zeros(b, t, dtype=torch.long)
    for i, c in enumerate(caps):
        ids[i, :len(c)], text_mask[i, :len(c)] = c, 1
    return ids, text_mask, ids.masked_fill(text_mask == 0, IGNORE_INDEX)


def trap_text_inputs(caps: list[torch.Tensor], padding: str, pad_id: int):
    """The two classic mistakes of ``text_inputs``, reproduced on purpose (notebook 06, ``BridgeConfig(padding=...)``):
    "left_unmasked" pads on the left and attends to and labels the pads; "mask_by_pad_id" pads on the right and
    sets every label equal to the pad id to -100, the real EOS too when pad == EOS."""
    if padding not in PADDINGS[1:]:
        raise ValueError(f"not a trap layout: {padding!r} (choose one of {PADDINGS[1:]})")
    b, t = len(caps), max(len(c) for c in caps)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    text_mask = torch.zeros(b, t, dtype=torch.long)
    for i, c in enumerate(caps):
        span = slice(t - len(c), t) if padding == "left_unmasked" else slice(0, len(c))
        ids[i, span], text_mask[i, span] = c, 1
    if padding == "left_unmasked":            # the pads are attended to and labelled
        return ids, torch.ones_like(text_mask), ids
    return ids, text_mask, ids.masked_fill(ids == pad_id, IGNORE_INDEX)   # masks the real EOS too when pad == EOS


class SoftPromptCaptioner(nn.Module):
    """connector -> projection -> frozen LLM. ``forward`` returns the caption LM loss."""

    def __init__(self, connector: nn.Module, connector_size: int, llm, config: BridgeConfig | None = None,
                 freeze_llm: bool = True):
        super().__init__()
        self.connector, self.llm_model, self.tokenizer = connector, llm.model, llm.tokenizer
        self.llm_name = getattr(llm, "name", None)
        self.config = config or BridgeConfig()
        # The captioner lives where its LLM lives: the connector and the new projection join it there.
        device = llm.model.get_input_embeddings().weight.device
        self.connector.to(device)
        self.proj = nn.Linear(connector_size, llm.model.config.hidden_size, device=device)
        if freeze_llm:
            for p in self.llm_model.parameters():
                p.requires_grad_(False)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the LLM's tokenizer has no EOS token: captions could never end")
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.eos_id if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id
        self.prompt_ids = self.tokenizer(self.config.prompt, add_special_tokens=False,
                                         return_tensors="pt").input_ids[0]

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    @property
    def num_soft_tokens(self) -> int:
        return self.connector.num_tokens

    def train(self, mode: bool = True):
        """Train mode for the parts that learn; a part with no trainable weights (the frozen LLM, a frozen
        Q-Former) stays in eval mode, so no dropout changes the fixed function it stands for."""
        super().train(mode)
        for part in (self.connector, self.llm_model):
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def connector_outputs(self, image_embeds: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """The connector's outputs (N, Q, C) for N images, in batches, in eval mode, on the CPU.

        For a frozen connector they never change: compute them once and train on them through
        ``using_connector(PrecomputedConnector(Q, C))``.
        """
        with eval_mode(self.connector):
            return in_batches(lambda x: self.connector(x.to(self.device, self.proj.weight.dtype)).cpu(), image_embeds,
                              batch_size=batch_size)

    @contextmanager
    def using_connector(self, connector: nn.Module):
        """Temporarily replace the connector (e.g. by a ``PrecomputedConnector`` while training)."""
        original, self.connector = self.connector, connector
        try:
            yield self
        finally:
            self.connector = original

    def soft_prompts(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, D) image tokens -> (B, Q, H_llm) vectors in the LLM's input-embedding space."""
        if image_embeds.ndim != 3:
            raise ValueError(f"image_embeds must be (B, N, D), got {tuple(image_embeds.shape)}")
        return self.proj(self.connector(image_embeds.to(self.device, self.proj.weight.dtype)))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm_model.get_input_embeddings()(ids.to(self.device))

    @property
    def _llm_dtype(self) -> torch.dtype:
        return self.llm_model.get_input_embeddings().weight.dtype

    def caption_ids(self, captions: list[str]) -> list[torch.Tensor]:
        """Each caption's token ids (no special tokens; a leading space unless the prompt ends with whitespace),
        truncated to ``max_caption_tokens``, with one EOS appended."""
        # the caption continues the prompt as text would: after a space or a newline, no extra space
        sep = "" if self.config.prompt[-1:].isspace() else " "
        out = []
        for caption in captions:
            text = clean_caption(caption) if self.config.clean_captions else caption.strip()
            ids = self.tokenizer(sep + text, add_special_tokens=False).input_ids
            out.append(torch.tensor(ids[: self.config.max_caption_tokens] + [self.eos_id]))
        return out

    def _text_inputs(self, captions: list[str]):
        """(ids, attention mask, labels) of the caption block, each (B, T), laid out as ``config.padding`` says."""
        caps = self.caption_ids(captions)
        if self.config.padding != "right":
            return trap_text_inputs(caps, self.config.padding, self.pad_id)
        return text_inputs(caps, self.eos_id)

    def build_inputs(self, image_embeds: torch.Tensor, captions: list[str]):
        """inputs_embeds, attention_mask and labels for teacher-forced training (right-padded, unless
        ``config.padding`` asks for one of the traps)."""
        if len(captions) != image_embeds.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images but {len(captions)} captions")
        prefix = self.prefix_embeds(image_embeds)                      # (B, Q + P, H): [soft prompts; prompt]
        b, n = prefix.shape[:2]
        ids, text_mask, text_labels = self._text_inputs(captions)
        # in the dtype text embeddings enter the LLM with (also under autocast)
        embeds = torch.cat([prefix, self._embed(ids).to(self._llm_dtype)], dim=1)
        attention_mask = torch.cat([torch.ones(b, n, dtype=torch.long), text_mask], dim=1)
        labels = torch.cat([torch.full((b, n), IGNORE_INDEX), text_labels], 1)
        return embeds, attention_mask.to(self.device), labels.to(self.device)

    def forward(self, image_embeds: torch.Tensor, captions: list[str] | list[list[str]]) -> torch.Tensor:
        """Mean LM loss over the caption tokens and EOS (as ``llm(..., labels=labels).loss``).

        ``captions``: one caption per image, or a list of captions per image (``grouped_loss``: the same loss
        over every (image, caption) pair, each image's prefix computed once).
        Only the positions whose next token is labelled go through the LM head: the vocabulary projection
        of the soft-prompt, prompt and padding positions would be thrown away.
        """
        if captions and not isinstance(captions[0], str):
            return self.grouped_loss(image_embeds, captions)
        return self.labelled_loss(*self.build_inputs(image_embeds, captions))

    def labelled_loss(self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss over the labelled positions of ``inputs_embeds`` (labels -100 elsewhere), as
        ``llm(..., labels=labels).loss``; only the positions that predict a label go through the LM head."""
        targets = labels[:, 1:]                                    # position i predicts token i + 1
        keep = targets != IGNORE_INDEX
        hidden = self.llm_model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        logits = self.llm_model.get_output_embeddings()(hidden[:, :-1][keep])
        # several processes hold unequal numbers of tokens: each returns its share of the global mean
        return global_mean(nn.functional.cross_entropy(logits.float(), targets[keep]), keep.sum())

    def grouped_loss(self, image_embeds: torch.Tensor, captions: list[list[str]]) -> torch.Tensor:
        """``forward`` over every (image i, caption of ``captions[i]``) pair, with one prefix pass per image.

        The prefix [soft prompts; prompt] (about 45 positions) is the same for all of an image's captions (about
        15 tokens each): the LLM reads it once per image, keeping its keys and values, and each caption continues
        from that cache (selected once per caption). Gradients flow back through the cached keys and values into
        the soft prompts, the projection, the connector and any LoRA weights, so the loss and every gradient equal
        the ungrouped computation's (up to float rounding); with 4 captions per image the LLM reads less than
        half the positions (4 x 45 + 16 x 15 against 16 x 60).
        """
        if len(captions) != image_embeds.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images but {len(captions)} caption lists")
        if not all(captions):
            raise ValueError("every image needs at least one caption: got an empty caption list")
        ids, text_mask, text_labels = self._text_inputs([c for caps in captions for c in caps])
        return self.continuation_loss(self.prefix_embeds(image_embeds), list(map(len, captions)),
                                      ids, text_mask, text_labels)

    def continuation_loss(self, prefix: torch.Tensor, counts: list[int], ids: torch.Tensor,
                          attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of text rows that each continue one of the prefixes: ``prefix`` (I, L, H) goes
        through the LLM once, prefix i's keys and values serve the next ``counts[i]`` rows of ``ids`` (R, T), with
        their ``attention_mask`` and ``labels`` (-100 where nothing is predicted)."""
        if sum(counts) != ids.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but there are {ids.shape[0]} text rows")
        first, cache, image_of = self.prefix_cache(prefix, counts)
        b, (n, t) = len(ids), (prefix.shape[1], ids.shape[1])
        attention_mask = torch.cat([torch.ones(b, n, dtype=torch.long), attention_mask], dim=1).to(self.device)
        position_ids = torch.arange(n, n + t, device=self.device).unsqueeze(0)   # the text continues the prefix
        decoder = self.llm_model.get_decoder()
        hidden = decoder(inputs_embeds=self._embed(ids).to(self._llm_dtype), attention_mask=attention_mask,
                         position_ids=position_ids, **{cache_argument(decoder): cache}).last_hidden_state
        # the prefix's last position predicts each row's first token, row position i the token i + 1
        hidden = torch.cat([first[:, -1:].index_select(0, image_of), hidden[:, :-1]], dim=1)
        targets = labels.to(self.device)
        keep = targets != IGNORE_INDEX
        logits = self.llm_model.get_output_embeddings()(hidden[keep])
        # several processes hold unequal numbers of tokens: each returns its share of the global mean
        return global_mean(nn.functional.cross_entropy(logits.float(), targets[keep]), keep.sum())

    def prefix_cache(self, prefix: torch.Tensor, counts: list[int]):
        """``prefix`` (I, L, H) through the LLM once: its hidden states, its key/value cache with prefix i's rows
        repeated ``counts[i]`` times (one per continuation; gradients flow back through it), each row's prefix."""
        from transformers import DynamicCache

        if len(counts) != prefix.shape[0]:
            raise ValueError(f"{prefix.shape[0]} prefixes but {len(counts)} counts")
        decoder = self.llm_model.get_decoder()
        image_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(self.device)
        cache = DynamicCache(config=decoder.config)
        first = decoder(inputs_embeds=prefix, use_cache=True, **{cache_argument(decoder): cache}).last_hidden_state
        for layer in cache.layers:      # one row per text; index_select's backward adds each prefix's rows in order
            layer.keys, layer.values = layer.keys.index_select(0, image_of), layer.values.index_select(0, image_of)
        return first, cache, image_of

    def prefix_embeds(self, image_embeds: torch.Tensor | None = None,
                      soft_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """[soft prompts; prompt] for generation. Give image features, or the soft prompts themselves
        (e.g. zeroed, or another photo's) to see what the LLM does with them."""
        if (image_embeds is None) == (soft_prompts is None):
            raise ValueError("give exactly one of image_embeds and soft_prompts")
        soft = self.soft_prompts(image_embeds) if soft_prompts is None else soft_prompts.to(self.device)
        prompt = self._embed(self.prompt_ids).expand(soft.shape[0], -1, -1)
        return torch.cat([soft.to(self._llm_dtype), prompt.to(self._llm_dtype)], dim=1)

    @torch.no_grad()
    def first_token_probs(self, image_embeds: torch.Tensor | None = None,
                          soft_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, vocab) distribution of the first caption token: P(EOS) here diagnoses empty captions."""
        embeds = self.prefix_embeds(image_embeds, soft_prompts)
        logits = self.llm_model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1]   # not (B, T, vocab)
        return logits.float().softmax(-1)

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor | None = None, max_new_tokens: int = 30, num_beams: int = 1,
                 soft_prompts: torch.Tensor | None = None, batch_size: int | None = None,
                 first_step_probs: list | None = None, **kwargs) -> list[str]:
        """Captions for a batch of image features, or of soft prompts (greedy by default).

        ``first_step_probs``: a list that receives, per batch, the (B, vocab) distribution of the first
        caption token (what ``first_token_probs`` computes), read off the same forward pass for free.
        """
        source = image_embeds if soft_prompts is None else soft_prompts
        if batch_size and source is not None and len(source) > batch_size:
            rows = torch.arange(len(source))
            return in_batches(lambda i: self.generate(
                None if image_embeds is None else image_embeds[i], max_new_tokens, num_beams,
                None if soft_prompts is None else soft_prompts[i], first_step_probs=first_step_probs, **kwargs),
                rows, batch_size=batch_size)
        embeds = self.prefix_embeds(image_embeds, soft_prompts)
        if num_beams == 1 and not kwargs:      # greedy: finished rows leave the batch (generation.py)
            out = greedy_decode(self.llm_model, embeds, max_new_tokens, self.eos_id, first_step_probs)
        else:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            if first_step_probs is not None:
                from transformers import LogitsProcessorList

                kwargs["logits_processor"] = LogitsProcessorList([_FirstStepProbs(first_step_probs)])
            out = self.llm_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          num_beams=num_beams, do_sample=False, eos_token_id=self.eos_id,
                                          pad_token_id=self.eos_id, **kwargs)
        return [self.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in out]

    # ------------------------------------------------------------------ saving
    def _bridge_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"connector": self.connector, "proj": self.proj})

    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors with every weight but the LLM's (connector and projection).

        The frozen LLM is not copied: ``from_pretrained`` takes it from the profile.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"bridge": asdict(self.config), "connector": self.connector.to_config(),
                  "connector_size": self.proj.in_features,
                  "llm": {"name": self.llm_name, "hidden_size": self.proj.out_features}}
        save_model(self._bridge_modules(), str(path / "model.safetensors"))   # handles the Q-Former's tied head
        (path / "config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path, llm, freeze_llm: bool = True) -> "SoftPromptCaptioner":
        """The captioner saved at ``path``, on top of ``llm`` (``backbones.load_llm(profile)``), in eval mode."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no saved captioner at {path} (config.json missing)")
        config = json.loads((path / "config.json").read_text())
        saved = config["llm"]
        if saved["hidden_size"] != llm.model.config.hidden_size or (
                saved["name"] and getattr(llm, "name", None) and saved["name"] != llm.name):
            raise ValueError(f"{path} was trained for the LLM {saved['name']!r} (hidden size {saved['hidden_size']}), "
                             f"not {getattr(llm, 'name', None)!r} (hidden size {llm.model.config.hidden_size}): "
                             f"load the LLM of the profile it was trained with")
        model = cls(connector_from_config(config["connector"]), config["connector_size"], llm,
                    BridgeConfig(**config["bridge"]), freeze_llm=freeze_llm)
        load_model(model._bridge_modules(), str(path / "model.safetensors"), device=str(model.device))
        return model.eval()


class _FirstStepProbs:
    """A logits processor that keeps the softmax of the first generation step and changes nothing."""

    def __init__(self, into: list):
        self.into, self.called = into, False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.called:
            self.into.append(scores.float().softmax(-1))
            self.called = True
        return scores
