"""Our models next to the reference implementations in Hugging Face ``transformers``.

* weights: copy a ``ViTModel``'s into our ViT (``load_hf_vit``, with the explicit key mapping
  ``hf_vit_key_mapping``), start a Q-Former from a pretrained BERT as BLIP-2 does (``qformer_from_bert``), or load
  a ``Blip2QFormerModel``'s (``qformer_from_blip2``, ``blip2_qformer_key``);
* comparisons: parameters per part of a Q-Former (``parameter_breakdown``, ``parameter_table``) and the output
  shape of each named module of any model (``trace_module_shapes``).

The tests check that our models give Hugging Face's outputs with these weights.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .qformer import QFormer, QFormerConfig
from .vit import ViT, ViTConfig

__all__ = ["vit_from_hf_state_dict", "hf_vit_key_mapping", "load_hf_vit", "trace_module_shapes", "qformer_from_bert",
           "blip2_qformer_key", "load_blip2_qformer_state_dict", "qformer_from_blip2", "parameter_breakdown",
           "parameter_table"]


# --------------------------------------------------------------------------- ViT
def vit_from_hf_state_dict(state_dict: dict, config: ViTConfig) -> ViT:
    """Build a ViT and copy in the weights of a Hugging Face ViTModel state dict.

    Accepts the current HF names (`layers.0.attention.q_proj...`), the older
    names used by checkpoints on the Hub (`encoder.layer.0.attention.attention.query...`)
    and a `vit.` prefix (ViTForImageClassification); the pooler and
    classifier head are ignored.
    """
    if config.position_embedding != "learned":
        raise ValueError("HF ViT checkpoints have learned position embeddings: use position_embedding='learned'.")
    sd = {k.removeprefix("vit."): v for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(("pooler.", "classifier."))}
    legacy = any(k.startswith("encoder.layer.") for k in sd)
    model = ViT(config)
    mapping = hf_vit_key_mapping(config, legacy=legacy)
    missing = [hf for hf in mapping.values() if hf not in sd]
    unexpected = sorted(set(sd) - set(mapping.values()))
    if missing or unexpected:
        raise ValueError(
            f"State dict does not match ViTConfig(num_hidden_layers={config.num_hidden_layers}, "
            f"qkv_bias={config.qkv_bias}): missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    ours = model.state_dict()
    new_sd = {}
    for our_key, hf_key in mapping.items():
        if sd[hf_key].shape != ours[our_key].shape:
            raise ValueError(
                f"Shape mismatch: HF {hf_key} is {tuple(sd[hf_key].shape)}, "
                f"our {our_key} is {tuple(ours[our_key].shape)}: check the config."
            )
        new_sd[our_key] = sd[hf_key]
    model.load_state_dict(new_sd, strict=True)
    return model


def hf_vit_key_mapping(config: ViTConfig, legacy: bool = False) -> dict[str, str]:
    """{our parameter name: Hugging Face ViTModel parameter name}.

    `legacy=True` gives the names of checkpoints saved before transformers 5
    (e.g. google/vit-base-patch16-224), which transformers renames on load.
    """
    mapping = {
        "embeddings.cls_token": "embeddings.cls_token",
        "embeddings.position_embeddings": "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embeddings.projection.bias",
    }
    if legacy:
        names = {
            "norm1": "layernorm_before",
            "attn.q_proj": "attention.attention.query",
            "attn.k_proj": "attention.attention.key",
            "attn.v_proj": "attention.attention.value",
            "attn.out_proj": "attention.output.dense",
            "norm2": "layernorm_after",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        }
    else:
        names = {
            "norm1": "layernorm_before",
            "attn.q_proj": "attention.q_proj",
            "attn.k_proj": "attention.k_proj",
            "attn.v_proj": "attention.v_proj",
            "attn.out_proj": "attention.o_proj",
            "norm2": "layernorm_after",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
    prefix = "encoder.layer" if legacy else "layers"
    for i in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            no_bias = ours in ("attn.q_proj", "attn.k_proj", "attn.v_proj") and not config.qkv_bias
            for p in ("weight",) if no_bias else ("weight", "bias"):
                mapping[f"blocks.{i}.{ours}.{p}"] = f"{prefix}.{i}.{theirs}.{p}"
    mapping["norm.weight"] = "layernorm.weight"
    mapping["norm.bias"] = "layernorm.bias"
    return mapping


def load_hf_vit(hf_model) -> ViT:
    """Our ViT with the weights of a `transformers.ViTModel` (or ViTForImageClassification)."""
    config = ViTConfig.from_hf(hf_model.config)
    return vit_from_hf_state_dict(hf_model.state_dict(), config)


def trace_module_shapes(model: nn.Module, module_names, **inputs) -> list[tuple[str, tuple[int, ...]]]:
    """Run `model(**inputs)` and return [(module name, output shape), ...] in the order they ran.

    Works for any model (e.g. a Hugging Face one, even on the meta device, where
    only shapes are computed). Tuple outputs report their first element.
    """
    trace, handles = [], []
    modules = dict(model.named_modules())
    for name in module_names:
        if name not in modules:
            raise ValueError(f"{type(model).__name__} has no submodule {name!r}.")

        def hook(module, args, output, name=name):
            first = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            trace.append((name, tuple(first.shape)))

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return trace


# --------------------------------------------------------------------------- Q-Former
def qformer_from_bert(
    bert_model,
    num_query_tokens: int = 32,
    cross_attention_frequency: int = 2,
    encoder_hidden_size: int = 1408,
    dropout: float | None = None,
) -> QFormer:
    """Start from a pretrained BERT text encoder, as BLIP-2 does.

    Copies the embeddings, every self-attention block and every FFN; the
    text FFN is also copied into the query FFN (LAVIS does the same, so the
    queries start from a sensible transformation). The cross-attention
    blocks and the queries keep their random BERT-style init (std 0.02).
    ``bert_model`` is a ``transformers.BertModel``; a ``BertForMaskedLM`` /
    ``BertLMHeadModel`` also works and then its MLM head is copied too.
    ``dropout`` replaces BERT's hidden and attention dropout (None keeps them).
    """
    head = getattr(getattr(bert_model, "cls", None), "predictions", None)
    bert = getattr(bert_model, "bert", bert_model)
    config = QFormerConfig.from_bert_config(
        bert.config,
        num_query_tokens=num_query_tokens,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
        **({} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}),
    )
    weight = bert.embeddings.word_embeddings.weight
    model = QFormer(config).to(device=weight.device, dtype=weight.dtype)  # next to the BERT
    src = bert.embeddings
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.copy_(src.word_embeddings.weight)
        # BERT adds a segment ("token type") embedding to every token. The
        # Q-Former has no segments (LAVIS just drops the table), so we fold
        # segment 0 into the position table: text embeddings then equal
        # BERT's exactly, and queries (which get no position) are untouched.
        position = src.position_embeddings.weight
        if getattr(src, "token_type_embeddings", None) is not None:
            position = position + src.token_type_embeddings.weight[0]
        model.embeddings.position_embeddings.weight.copy_(position)
        model.embeddings.LayerNorm.load_state_dict(src.LayerNorm.state_dict())
        for ours, theirs in zip(model.layers, bert.encoder.layer):
            att = theirs.attention
            for name in ("query", "key", "value"):
                getattr(ours.self_attn, name).load_state_dict(getattr(att.self, name).state_dict())
            ours.self_attn.out.load_state_dict(att.output.dense.state_dict())
            ours.self_attn.norm.load_state_dict(att.output.LayerNorm.state_dict())
            for ffn in (ours.ffn_text, ours.ffn_query):
                ffn.fc1.load_state_dict(theirs.intermediate.dense.state_dict())
                ffn.fc2.load_state_dict(theirs.output.dense.state_dict())
                ffn.norm.load_state_dict(theirs.output.LayerNorm.state_dict())
        if head is not None:
            model.lm_head.dense.load_state_dict(head.transform.dense.state_dict())
            model.lm_head.norm.load_state_dict(head.transform.LayerNorm.state_dict())
            model.lm_head.bias.copy_(head.bias)
    return model


# HF Blip2QFormerModel name -> our name. Everything else is the same path.
_HF_RENAMES = [
    (r"^layernorm\.", "embeddings.LayerNorm."),
    (r"^encoder\.layer\.", "layers."),
    (r"\.attention\.attention\.", ".self_attn."),
    (r"\.attention\.output\.dense\.", ".self_attn.out."),
    (r"\.attention\.output\.LayerNorm\.", ".self_attn.norm."),
    (r"\.crossattention\.attention\.", ".cross_attn."),
    (r"\.crossattention\.output\.dense\.", ".cross_attn.out."),
    (r"\.crossattention\.output\.LayerNorm\.", ".cross_attn.norm."),
    (r"\.intermediate_query\.dense\.", ".ffn_query.fc1."),
    (r"\.output_query\.dense\.", ".ffn_query.fc2."),
    (r"\.output_query\.LayerNorm\.", ".ffn_query.norm."),
    (r"\.intermediate\.dense\.", ".ffn_text.fc1."),
    (r"\.output\.dense\.", ".ffn_text.fc2."),
    (r"\.output\.LayerNorm\.", ".ffn_text.norm."),
]


def blip2_qformer_key(hf_name: str) -> str:
    """Translate a ``Blip2QFormerModel`` state-dict key into ours,
    e.g. ``encoder.layer.0.crossattention.attention.key.weight`` -> ``layers.0.cross_attn.key.weight``."""
    for pattern, repl in _HF_RENAMES:
        hf_name = re.sub(pattern, repl, hf_name)
    return hf_name


def load_blip2_qformer_state_dict(model: QFormer, state_dict: dict) -> list[str]:
    """Load the weights of a ``transformers.Blip2QFormerModel``.

    Every HF tensor must find a home in ``model`` (otherwise ``KeyError``). Returns
    our parameter names that HF does not have: the word/position
    embeddings, the LM head, the queries (HF keeps them outside, in
    ``Blip2Model.query_tokens``) and, unless HF was built with
    ``use_qformer_text_input=True``, the text FFNs.
    """
    ours = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for hf_name, tensor in state_dict.items():
            name = blip2_qformer_key(hf_name)
            if name not in ours:
                raise KeyError(f"{hf_name!r} (-> {name!r}) has no counterpart in QFormer")
            if ours[name].shape != tensor.shape:
                raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)} vs ours {tuple(ours[name].shape)}")
            ours[name].copy_(tensor)
            loaded.add(name)
    return [name for name in ours if name not in loaded and name != "lm_head.decoder.weight"]


def qformer_from_blip2(hf_model, query_tokens: torch.Tensor | None = None) -> QFormer:
    """Build a QFormer with the sizes and weights of a ``Blip2QFormerModel``.

    ``query_tokens`` (1, Q, H) are the queries (``Blip2Model.query_tokens``);
    without them the queries stay random. Use with a Blip2Model:
    ``qformer_from_blip2(blip2.qformer, blip2.query_tokens)``.
    """
    Q = 32 if query_tokens is None else query_tokens.shape[1]
    model = QFormer(QFormerConfig.from_bert_config(hf_model.config, num_query_tokens=Q))   # the same sizes
    model.to(hf_model.layernorm.weight.device)
    load_blip2_qformer_state_dict(model, hf_model.state_dict())
    if query_tokens is not None:
        with torch.no_grad():
            model.query_tokens.copy_(query_tokens)
    return model


# --------------------------------------------------------------------------- parameter counts
_PARTS = [  # (row label, our name prefix / regex, HF Blip2QFormerModel regex)
    ("word embeddings", r"^embeddings\.word_embeddings\.", None),
    ("position embeddings", r"^embeddings\.position_embeddings\.", None),
    ("embedding LayerNorm", r"^embeddings\.LayerNorm\.", r"^layernorm\."),
    ("learned queries", r"^query_tokens$", None),
    ("self-attention", r"\.self_attn\.", r"\.attention\.(attention|output)\."),
    ("cross-attention", r"\.cross_attn\.", r"\.crossattention\."),
    ("text FFN", r"\.ffn_text\.", r"\.(intermediate|output)\."),
    ("query FFN", r"\.ffn_query\.", r"\.(intermediate_query|output_query)\."),
    ("ITG LM head (decoder tied)", r"^lm_head\.", None),
]


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters per part of a :class:`QFormer` or a HF ``Blip2QFormerModel``.

    Tied weights are counted once (the LM-head decoder *is* the word-embedding
    matrix). Works on models built on the meta device.
    """
    hf = not isinstance(model, QFormer)
    counts = {label: 0 for label, _, _ in _PARTS}
    for name, p in model.named_parameters():  # named_parameters() skips tied duplicates
        for label, ours, theirs in _PARTS:
            pattern = theirs if hf else ours
            if pattern is not None and re.search(pattern, name):
                counts[label] += p.numel()
                break
        else:
            raise KeyError(f"parameter {name!r} fits no part")
    return counts


def _stage1_heads(hidden_size: int, embed_dim: int = 256) -> dict[str, int]:
    # The stage-1 heads live in the stage-1 model; counted here to compare with
    # the paper. ITC: two projections to a shared 256-d space (+ temperature);
    # ITM: a 2-way classifier on the query outputs.
    with torch.device("meta"):
        itc = 2 * sum(p.numel() for p in nn.Linear(hidden_size, embed_dim).parameters()) + 1
        itm = sum(p.numel() for p in nn.Linear(hidden_size, 2).parameters())
    return {"ITC projections + temperature": itc, "ITM head": itm}


def parameter_table(configs: dict | None = None, include_hf: bool = True, embed_dim: int = 256):
    """A pandas DataFrame: parameters per part (rows) for each Q-Former (columns).

    ``configs`` maps a column name to a :class:`QFormerConfig`; by default the
    real BLIP-2 configuration (bert-base, 32 queries, EVA ViT-g 1408-d). With
    ``include_hf`` a column for HF's default ``Blip2QFormerModel`` is added: it
    has no word/position embeddings and no text FFN (it only ever sees query
    embeddings), hence ~105M instead of ~188M. Models are built on the meta
    device: no memory, no time.
    """
    import pandas as pd     # not needed by the weights above, which stage 1 uses
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    configs = configs or {"BLIP-2 (bert-base, ViT-g)": QFormerConfig()}
    columns = {}
    for column, config in configs.items():
        with torch.device("meta"):
            counts = parameter_breakdown(QFormer(config))
        columns[column] = {**counts, **_stage1_heads(config.hidden_size, embed_dim)}
    if include_hf:
        with torch.device("meta"):
            counts = parameter_breakdown(Blip2QFormerModel(Blip2QFormerConfig()))
        columns["HF Blip2QFormerModel (default)"] = {**counts, **{k: 0 for k in _stage1_heads(1, 1)}}
    table = pd.DataFrame(columns)
    table.loc["total"] = table.sum()
    return table

