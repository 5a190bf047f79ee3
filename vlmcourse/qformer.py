"""The Q-Former of BLIP-2, from scratch, in one file.

BLIP-2 connects a *frozen* image encoder to a *frozen* language model with a
small trainable bridge, the Querying Transformer (Q-Former). It is a BERT text
encoder with two additions:

* ``num_query_tokens`` learned query vectors are put in front of the text. The
  image is read *only* through them, so whatever the image encoder outputs
  (49 patches here, 257 for ViT-g), the rest of the model sees a fixed,
  small number of vectors: an information bottleneck.
* every ``cross_attention_frequency``-th layer, the query positions (and only
  they) cross-attend to the image patch embeddings. Queries also get their own
  copy of the feed-forward network; text tokens use BERT's.

Queries and text share the self-attention layers. *Who may look at whom* is
set by one mask, and the three stage-1 objectives differ only in that mask
(see :func:`self_attention_mask`):

* ``"itc"`` (contrastive): queries see queries, text sees text;
* ``"itm"`` (matching): everything sees everything;
* ``"itg"`` (generation): queries see queries, text sees the queries and the
  text up to itself (causal).

The layout follows LAVIS (the BLIP-2 reference code) and Hugging Face's
``Blip2QFormerModel``; ``reference.qformer_from_blip2`` loads HF weights and the
tests check that the outputs match. The masks are in masks.py, the parameter
tables in reference.py, the figures in plots.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .masks import MASK_TYPES, self_attention_mask
from .qformer_inputs import check_image_key_values, check_inputs, check_past

__all__ = ["MASK_TYPES", "QFormerConfig", "QFormerOutput", "self_attention_mask", "Attention", "FeedForward",
           "QFormerEmbeddings", "QFormerLayer", "QFormerLMHead", "QFormer"]

# --------------------------------------------------------------------------- config
@dataclass
class QFormerConfig:
    """Sizes of a Q-Former. The defaults are BLIP-2's: bert-base + EVA ViT-g."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # width of the image encoder's patch embeddings
    initializer_range: float = 0.02  # BERT's init std, used for everything not copied

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.cross_attention_frequency < 1:
            raise ValueError("cross_attention_frequency must be >= 1")

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the layers whose queries cross-attend to the image (0, 2, 4, ...)."""
        return [i for i in range(self.num_hidden_layers) if i % self.cross_attention_frequency == 0]

    @classmethod
    def from_bert_config(cls, bert_config, **overrides) -> "QFormerConfig":
        """Take the text-encoder sizes from a ``transformers.BertConfig``."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in bert_config.to_dict().items() if k in names}
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QFormerOutput:
    """What :meth:`QFormer.forward` returns (Hugging Face names)."""

    last_hidden_state: torch.Tensor  # (B, Q+T, H): queries first, then text
    query_output: torch.Tensor | None  # (B, Q, H), None without image_embeds
    text_output: torch.Tensor | None = None  # (B, T, H), None without input_ids
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer (B, heads, Q+T, Q+T)
    cross_attentions: tuple[torch.Tensor, ...] | None = None  # per cross layer (B, heads, Q, N)
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None  # per layer, the queries' (K, V)
    cross_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None  # per cross layer, the image's


# --------------------------------------------------------------------------- masks (masks.py)
def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """bool (True = keep) -> float mask added to the scores (0 or a huge negative).

    A large finite value instead of -inf keeps a row with nothing to attend to
    (an all-padding caption under ITC) uniform instead of NaN, as in BERT/HF.
    """
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


# --------------------------------------------------------------------------- blocks
def _activation(name: str):
    # "gelu" in BERT/HF is the exact (erf) GELU, not the tanh approximation.
    return {"gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[name]


class Attention(nn.Module):
    """BERT attention block: multi-head attention, output projection, residual, LayerNorm.

    With ``kv_size != hidden_size`` it is a cross-attention block: the keys and
    values are projected from the image patch embeddings (width ``kv_size``).
    """

    def __init__(self, config: QFormerConfig, kv_size: int | None = None):
        super().__init__()
        H, kv_size = config.hidden_size, kv_size or config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_size = H // self.num_heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(kv_size, H)
        self.value = nn.Linear(kv_size, H)
        self.out = nn.Linear(H, H)  # HF: attention.output.dense
        self.norm = nn.LayerNorm(H, eps=config.layer_norm_eps)  # HF: attention.output.LayerNorm
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, heads, L, head_size)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, x, context=None, mask=None, output_attentions=False, past_key_value=None, context_kv=None):
        """x (B, L, H); context (B, N, kv_size) or None (self-attention);
        mask: additive float mask broadcastable to (B, heads, L, P+N) or None;
        past_key_value: (keys, values) of P earlier positions, (B, heads, P, head_size) each, read before x's own;
        context_kv: the context's (keys, values), already projected, in place of ``context``.
        Returns (output, probabilities or None, (keys, values) that x attended to)."""
        kv = x if context is None else context
        q = self._heads(self.query(x))
        k, v = context_kv or (self._heads(self.key(kv)), self._heads(self.value(kv)))
        if past_key_value is not None:
            k, v = torch.cat([past_key_value[0], k], dim=2), torch.cat([past_key_value[1], v], dim=2)
        dropout_p = self.attn_dropout if self.training else 0.0
        if output_attentions:
            # Eager path: the same maths written out, so the probabilities can be returned.
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            y = F.dropout(probs, dropout_p, self.training) @ v
        else:
            # Fused kernel: faster and lighter, but it does not expose the probabilities.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            probs = None
        y = y.transpose(1, 2).reshape(x.shape)  # merge the heads back: (B, L, H)
        return self.norm(x + self.dropout(self.out(y))), probs, (k, v)


class FeedForward(nn.Module):
    """BERT feed-forward block: H -> intermediate -> H, residual, LayerNorm."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)  # HF: intermediate.dense
        self.act = _activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)  # HF: output.dense
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # HF: output.LayerNorm
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x):
        return self.norm(x + self.dropout(self.fc2(self.act(self.fc1(x)))))


class QFormerLayer(nn.Module):
    """One layer: shared self-attention, then (queries only) cross-attention, then two FFNs."""

    def __init__(self, config: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.self_attn = Attention(config)
        # Only some layers read the image; the others just mix queries and text.
        self.cross_attn = Attention(config, kv_size=config.encoder_hidden_size) if has_cross_attention else None
        self.ffn_text = FeedForward(config)  # BERT's FFN (HF: intermediate/output)
        self.ffn_query = FeedForward(config)  # queries' own copy (HF: intermediate_query/output_query)

    def forward(self, x, num_query_tokens, image_embeds=None, mask=None, image_mask=None, output_attentions=False,
                past_key_value=None, text_rows=None, image_kv=None):
        """Returns (x, self-attention probs, cross-attention probs, the queries' (keys, values) in this layer, the
        image's (keys, values) or None). ``text_rows``: the real text tokens' indices in the (B*T) flattened text,
        the only ones whose FFN runs (a padding position's output is never read: every mask hides it);
        ``image_kv``: the image's (keys, values) from an earlier pass, in place of projecting ``image_embeds``."""
        Q = num_query_tokens
        x, self_probs, (keys, values) = self.self_attn(x, mask=mask, output_attentions=output_attentions,
                                                       past_key_value=past_key_value)
        queries, text = x[:, :Q], x[:, Q:]
        cross_probs = image_kv_out = None
        if Q > 0:
            if self.cross_attn is not None:
                queries, cross_probs, image_kv_out = self.cross_attn(
                    queries, context=image_embeds, mask=image_mask, output_attentions=output_attentions,
                    context_kv=image_kv)
            queries = self.ffn_query(queries)
        if text_rows is not None:   # a fifth to a half of a batch's text is padding: leave it out of the FFN
            flat = text.flatten(0, 1)
            text = flat.index_copy(0, text_rows, self.ffn_text(flat.index_select(0, text_rows))).view_as(text)
        elif text.shape[1] > 0:
            text = self.ffn_text(text)
        return (torch.cat([queries, text], dim=1), self_probs, cross_probs, (keys[:, :, :Q], values[:, :, :Q]),
                image_kv_out)


class QFormerEmbeddings(nn.Module):
    """Text gets word + position embeddings; queries are used as they are (no
    positions: they are a set, not a sequence). Then one LayerNorm over both."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # HF: layernorm
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, query_embeds=None):
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        return self.dropout(self.LayerNorm(torch.cat(parts, dim=1)))


class QFormerLMHead(nn.Module):
    """BERT prediction head for ITG: dense, activation, LayerNorm, then a decoder
    whose weight is the word-embedding matrix (tied: no extra V x H parameters)."""

    def __init__(self, config: QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _activation(config.hidden_act)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tie
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states):  # (B, T, H) -> (B, T, vocab_size)
        return self.decoder(self.norm(self.act(self.dense(hidden_states)))) + self.bias


# --------------------------------------------------------------------------- model
class QFormer(nn.Module):
    """BLIP-2's Querying Transformer. Example::

        qformer = qformer_from_bert(BertModel.from_pretrained(path), encoder_hidden_size=1280)   # reference.py
        out = qformer(image_embeds, input_ids, attention_mask, mask_type="itc")
        out.query_output.shape  # (B, 32, H): the image, summarised in 32 vectors
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_query_tokens, config.hidden_size))
        self.embeddings = QFormerEmbeddings(config)
        cross = set(config.cross_attention_layers)
        self.layers = nn.ModuleList(QFormerLayer(config, i in cross) for i in range(config.num_hidden_layers))
        self.lm_head = QFormerLMHead(config, self.embeddings.word_embeddings)
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=config.initializer_range)

    def _init_weights(self, module):
        # BERT's initialisation: N(0, 0.02) weights, zero biases, identity LayerNorms.
        std = self.config.initializer_range
        if module is self.lm_head.decoder:
            return  # tied: it *is* the word-embedding matrix, initialised as an Embedding
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ forward (inputs checked in qformer_inputs.py)
    def forward(self, image_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_attention_mask: torch.Tensor | None = None,
                mask_type: str | None = "itm", output_attentions: bool = False, past_key_values: tuple | None = None,
                use_cache: bool = False, image_key_values: tuple | None = None) -> QFormerOutput:
        """Run the Q-Former.

        Args:
            image_embeds: (B, N, encoder_hidden_size) patch embeddings of the frozen
                image encoder. ``None`` runs the text alone through the shared
                BERT (no queries), as LAVIS does for ITC text features.
            input_ids: (B, T) token ids, or ``None`` for queries only (what BLIP-2
                feeds the language model).
            attention_mask: (B, T) text padding mask, 1 = real token.
            image_attention_mask: (B, N), 1 = real patch (default: all real).
            mask_type: ``"itc"`` | ``"itm"`` | ``"itg"`` (see :func:`self_attention_mask`);
                ``None`` = ``"itm"``. Ignored when there is no text.
            output_attentions: also return self- and cross-attention probabilities
                (slower eager path instead of the fused SDPA kernel).
            use_cache: also return ``past_key_values``, the queries' keys and values in
                every layer, and ``cross_key_values``, the image's in every cross-attention layer.
            image_key_values: those ``cross_key_values`` of an earlier pass (rows picked as
                needed), in place of ``image_embeds``: the image is not projected again
                (stage 1's ITM pass reads its photos from the ITC pass).
            past_key_values: those of an earlier pass, in place of ``image_embeds``: the
                text reads the queries from them (``mask_type="itg"`` only). Under the
                ITG mask the queries see only queries, so they would compute exactly what
                they did in any pass that kept them from the text (ITC, or ITG itself):
                LAVIS reuses the ITC pass's queries this way and saves their second
                forward and backward pass.
        """
        check_inputs(self.config, image_embeds, input_ids, attention_mask, image_attention_mask, mask_type)
        if image_key_values is not None:
            check_image_key_values(self.config, image_key_values, image_embeds, input_ids)
        if past_key_values is not None:
            check_past(self.config, past_key_values, image_embeds, input_ids, mask_type)
        dtype, device = self.query_tokens.dtype, self.query_tokens.device
        # Inputs may come from the CPU (cached features, a tokenizer): the Q-Former takes them to its device.
        input_ids, attention_mask, image_attention_mask = (
            None if t is None else t.to(device) for t in (input_ids, attention_mask, image_attention_mask))
        queries = None
        if image_embeds is not None:
            # Cached features are often float16; the Q-Former computes in its own dtype.
            image_embeds = image_embeds.to(device, dtype)
            queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        elif image_key_values is not None:
            queries = self.query_tokens.expand(image_key_values[0][0].shape[0], -1, -1)
        Q = 0 if queries is None else queries.shape[1]
        P = 0 if past_key_values is None else past_key_values[0][0].shape[2]   # queries read from the cache
        x = self.embeddings(input_ids, queries)  # (B, Q+T, H)

        mask = None
        if input_ids is not None and (mask_type not in (None, "itm") or attention_mask is not None):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            # (B, Q+T, Q+T); with a cache, the text's rows of the full (B, P+T, P+T) mask
            allowed = self_attention_mask(mask_type, Q + P, attention_mask)[:, P:]
            if not bool(allowed.all()):  # all-True = no mask: lets SDPA pick its fastest kernel
                mask = _additive(allowed, dtype)[:, None]  # broadcast over heads
        image_mask = None
        if image_attention_mask is not None:
            image_mask = _additive(image_attention_mask.bool(), dtype)[:, None, None, :]  # (B, 1, 1, N)
        text_rows = None if attention_mask is None or bool(attention_mask.all()) else \
            attention_mask.flatten().nonzero().squeeze(1)

        attentions, cross_attentions, presents, image_kvs = [], [], [], []
        given_kvs = iter(image_key_values or ())
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            image_kv = next(given_kvs) if image_key_values is not None and layer.cross_attn is not None else None
            x, self_probs, cross_probs, present, image_kv = layer(x, Q, image_embeds, mask, image_mask,
                                                                  output_attentions, past, text_rows, image_kv)
            attentions.append(self_probs)
            presents.append(present)
            if cross_probs is not None:
                cross_attentions.append(cross_probs)
            if image_kv is not None:
                image_kvs.append(image_kv)

        return QFormerOutput(
            last_hidden_state=x,
            query_output=x[:, :Q] if Q else None,
            text_output=x[:, Q:] if input_ids is not None else None,
            attentions=tuple(attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions else None,
            past_key_values=tuple(presents) if use_cache and Q else None,
            cross_key_values=tuple(image_kvs) if use_cache and Q else None,
        )
