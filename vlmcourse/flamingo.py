"""Flamingo in miniature: a Perceiver Resampler, and gated cross-attention blocks inside a frozen LLM.

BLIP-2 puts the image *in front of* the text (soft prompts). Flamingo (Alayrac et al., 2022) lets the text *look
at* the image from inside the LLM instead:

- ``PerceiverResampler``: a fixed number of learned latents cross-attend to the patch tokens (keys and values are
  the patches *and* the latents themselves), a few layers deep: any number of patches in, ``num_latents`` out.
  It is a soft-prompt connector too (``num_tokens``, ``to_config``), so ``SoftPromptCaptioner`` can use it.
- ``GatedCrossAttentionBlock``: before a decoder layer, the LLM's hidden states cross-attend to the visual tokens
  and go through a feed-forward, each added back through ``tanh(gate)``. The gates start at 0: at initialisation
  the LLM computes exactly what it computed alone, and training opens them as the image becomes useful.
- ``FlamingoLM``: a frozen Hugging Face Llama-family causal LM with a gated block before every ``every``-th
  decoder layer. The blocks run from forward pre-hooks that act only inside ``FlamingoLM``'s own calls, so the LLM
  itself is left unchanged (its weights, its state dict, its plain calls). Only the resampler and the blocks train.

One image per sequence, seen by every text position (Flamingo's interleaved images and their per-image masks
are left out).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class ResamplerConfig:
    input_size: int = 1280      # D_in: the frozen image encoder's width
    hidden_size: int = 256      # D: the latents' width (the output's)
    num_latents: int = 8        # how many visual tokens come out, whatever the number of patches
    num_layers: int = 2
    num_heads: int = 4
    ff_mult: int = 4
    num_positions: int = 0      # > 0: a learned embedding per patch position (Flamingo's is per video frame)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (B, L, q_size) over ``context`` (B, N, kv_size); no biases, as in Flamingo."""

    def __init__(self, q_size: int, kv_size: int, num_heads: int, head_size: int):
        super().__init__()
        inner = num_heads * head_size
        self.num_heads, self.head_size = num_heads, head_size
        self.to_q = nn.Linear(q_size, inner, bias=False)
        self.to_k = nn.Linear(kv_size, inner, bias=False)
        self.to_v = nn.Linear(kv_size, inner, bias=False)
        self.to_out = nn.Linear(inner, q_size, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:     # (B, L, heads * d) -> (B, heads, L, d)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(context)), self._heads(self.to_v(context))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def feed_forward(size: int, mult: int) -> nn.Sequential:
    """Pre-norm feed-forward: LayerNorm, size -> mult * size, GELU, back to size."""
    return nn.Sequential(nn.LayerNorm(size), nn.Linear(size, mult * size, bias=False), nn.GELU(),
                         nn.Linear(mult * size, size, bias=False))


class ResamplerLayer(nn.Module):
    """The latents read the patches and themselves (keys and values: [patches; latents]), then a feed-forward."""

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        d = config.hidden_size
        self.norm_media, self.norm_latents = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CrossAttention(d, d, config.num_heads, d // config.num_heads)
        self.ff = feed_forward(d, config.ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        queries = self.norm_latents(latents)
        # the latents join the keys and values: each can also keep what the others have already gathered
        latents = latents + self.attn(queries, torch.cat([self.norm_media(media), queries], dim=1))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """(B, N, input_size) patch tokens -> (B, num_latents, hidden_size) visual tokens."""

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.config = config
        self.num_tokens = config.num_latents
        self.input_proj = nn.Linear(config.input_size, config.hidden_size)
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.hidden_size) * 0.02)
        self.position = (nn.Parameter(torch.zeros(1, config.num_positions, config.hidden_size))
                         if config.num_positions else None)
        self.layers = nn.ModuleList(ResamplerLayer(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        c = self.config
        if image_embeds.ndim != 3 or image_embeds.shape[-1] != c.input_size:
            raise ValueError(f"image_embeds must be (B, N, {c.input_size}) (input_size={c.input_size}), "
                             f"got {tuple(image_embeds.shape)}")
        if self.position is not None and image_embeds.shape[1] != c.num_positions:
            raise ValueError(f"this resampler has a position embedding for {c.num_positions} patches, "
                             f"got {image_embeds.shape[1]}")
        media = self.input_proj(image_embeds.to(self.latents.dtype))
        if self.position is not None:
            media = media + self.position
        latents = self.latents.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)

    def to_config(self) -> dict:
        return {"type": "resampler", "resampler": asdict(self.config)}

    @classmethod
    def from_config(cls, config: dict) -> "PerceiverResampler":
        return cls(ResamplerConfig(**config["resampler"]))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: y += tanh(a) * xattn(LN(y), visual); y += tanh(f) * ffw(LN(y)).

    Both gates are scalars initialised to 0, so a new block is the identity and the frozen LLM starts out
    unchanged. It computes in its own dtype (float32 weights train well) and returns the LLM's.
    """

    def __init__(self, hidden_size: int, visual_size: int, num_heads: int = 4, head_size: int = 32,
                 ff_mult: int = 4):
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.attn = CrossAttention(hidden_size, visual_size, num_heads, head_size)
        self.ff = feed_forward(hidden_size, ff_mult)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        x = hidden_states.to(self.attn_gate.dtype)
        x = x + self.attn_gate.tanh() * self.attn(self.attn_norm(x), visual.to(x.dtype))
        x = x + self.ff_gate.tanh() * self.ff(x)
        return x.to(hidden_states.dtype)


@dataclass
class FlamingoConfig:
    visual_dim: int                  # width of the frozen encoder's patch tokens
    every: int = 4                   # a gated block before decoder layers 0, every, 2 * every, ...
    num_latents: int = 8
    resampler_layers: int = 2
    resampler_size: int = 256
    num_positions: int = 0           # the resampler's per-patch position embedding (0: none)
    num_heads: int = 4
    head_size: int = 32              # of the gated blocks' cross-attention
    ff_mult: int = 4

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")

    def resampler(self) -> ResamplerConfig:
        return ResamplerConfig(self.visual_dim, self.resampler_size, self.num_latents, self.resampler_layers,
                               self.num_heads, self.ff_mult, self.num_positions)


class FlamingoLM(nn.Module):
    """A frozen causal LM that reads an image through gated cross-attention. Example::

        model = FlamingoLM(load_llm("cpu"), visual_dim=1280, every=3)
        out = model(input_ids, attention_mask, image_embeds=patches, labels=labels)   # out.loss, out.logits
        model.gates()        # {layer: {"attn": tanh(a), "ff": tanh(f)}}: all 0 at initialisation

    ``llm``: a ``backbones.CausalLM`` (model and tokenizer) or a Hugging Face ``*ForCausalLM`` whose decoder layers
    are at ``model.model.layers`` (Llama, SmolLM2, Mistral, Qwen2, ...).
    """

    def __init__(self, llm, visual_dim: int, every: int = 4, **options):
        super().__init__()
        self.config = FlamingoConfig(visual_dim=visual_dim, every=every, **options)
        self.llm = llm.model if hasattr(llm, "tokenizer") else llm
        self.tokenizer = getattr(llm, "tokenizer", None)
        for p in self.llm.parameters():
            p.requires_grad_(False)
        layers = self.llm.model.layers
        weight = self.llm.get_input_embeddings().weight
        c = self.config
        self.resampler = PerceiverResampler(c.resampler()).to(weight.device)
        self.blocks = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(self.llm.config.hidden_size, c.resampler_size, c.num_heads, c.head_size,
                                             c.ff_mult).to(weight.device)
            for i in range(0, len(layers), c.every)})
        self._visual = None           # the visual tokens, set only during this model's own calls
        self._hooks = [layers[int(i)].register_forward_pre_hook(self._hook(block), with_kwargs=True)
                       for i, block in self.blocks.items()]

    def _hook(self, block: GatedCrossAttentionBlock):
        def before_layer(module, args, kwargs):
            if self._visual is None:          # a plain call of the LLM: leave it alone
                return None
            if args:
                args = (block(args[0], self._visual), *args[1:])
            else:
                kwargs["hidden_states"] = block(kwargs["hidden_states"], self._visual)
            return args, kwargs
        return before_layer

    @contextmanager
    def _seeing(self, visual: torch.Tensor):
        self._visual = visual
        try:
            yield
        finally:
            self._visual = None

    def remove_hooks(self) -> None:
        """Detach the blocks from the LLM (which then holds no reference to this model)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def train(self, mode: bool = True):
        """The frozen LLM stays in eval mode: no dropout changes the function it stands for."""
        super().train(mode)
        self.llm.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.resampler.latents.device

    def visual_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, visual_dim) patch tokens -> (B, num_latents, resampler_size)."""
        return self.resampler(image_embeds.to(self.device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        """The LLM's own output (``loss`` over labels != -100, shifted as Hugging Face does; ``logits``), with every
        text position able to read the image. ``kwargs`` go to the LLM (e.g. ``position_ids``)."""
        if image_embeds is None:
            raise ValueError("give image_embeds (B, N, visual_dim): the patch tokens of the frozen encoder")
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images but {input_ids.shape[0]} sequences")
        to = (lambda t: None if t is None else t.to(self.device))
        with self._seeing(self.visual_tokens(image_embeds)):
            return self.llm(input_ids=to(input_ids), attention_mask=to(attention_mask), labels=to(labels), **kwargs)

    @torch.no_grad()
    def gates(self) -> dict[int, dict[str, float]]:
        """tanh of each block's gates, by the index of the decoder layer it precedes."""
        return {int(i): {"attn": float(b.attn_gate.tanh()), "ff": float(b.ff_gate.tanh())}
                for i, b in self.blocks.items()}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def greedy(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               max_new_tokens: int = 20, eos_token_id: int | None = None) -> torch.Tensor:
        """(B, <= max_new_tokens) greedy continuations of left-padded prompts; a row that has emitted EOS is
        filled with EOS. The whole sequence is re-read at each step (no KV cache): short answers, simple code."""
        if eos_token_id is None:
            eos_token_id = self.llm.config.eos_token_id if self.tokenizer is None else self.tokenizer.eos_token_id
            eos_token_id = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        new = []
        with self._seeing(self.visual_tokens(image_embeds)):
            for _ in range(max_new_tokens):
                # left padding: each row's positions count its real tokens only, as if it were alone
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.llm(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                  logits_to_keep=1).logits[:, -1]
                token = logits.argmax(-1).masked_fill(done, eos_token_id)
                new.append(token)
                done |= token == eos_token_id
                ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                if done.all():
                    break
        return torch.stack(new, dim=1)

    def generate(self, image_embeds: torch.Tensor, prompts: list[str], max_new_tokens: int = 20) -> list[str]:
        """Greedy answers to text prompts (e.g. ``instruct.chat_prompt(None, "What colour is the circle?")``)."""
        if self.tokenizer is None:
            raise ValueError("generate needs a tokenizer: build FlamingoLM from a backbones.CausalLM, or call greedy")
        rows = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        width, pad = max(map(len, rows)), self.tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = self.greedy(image_embeds, ids, mask, max_new_tokens)
        return [self.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in out]
