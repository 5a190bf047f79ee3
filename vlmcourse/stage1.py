"""Stage 1 of BLIP-2: teach the Q-Former to pull caption-relevant facts out of frozen image features.

``Stage1Model`` holds the Q-Former and the small heads of the three losses
(losses.py): ITC projections and temperature, the ITM head, and the ITG LM head
(inside the Q-Former, tied to its word embeddings). ``forward`` returns all
three losses for a batch of (cached image features, captions).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from . import losses as L
from . import qformer as qformer_module
from .adapter import ImageAdapter
from .metrics import caption_image_index, recall_at_k
from .qformer import QFormer, QFormerConfig
from .reference import qformer_from_bert
from .utils import in_batches


@dataclass
class Stage1Config:
    num_query_tokens: int = 32
    embed_dim: int = 256                  # ITC feature size, as in BLIP-2
    max_text_len: int = 32
    # The ITC temperature, learned in CLIP's convention (losses.py): logit_scale = log(1/τ), starting at τ = 0.07.
    # BLIP-2 keeps τ ≥ 0.001, so 1/τ is capped at 1000 (CLIP caps it at 100).
    logit_scale_init: float = L.LOGIT_SCALE_INIT
    max_logit_scale: float = 1000.0
    itc_label_smoothing: float = 0.0
    itg_label_smoothing: float = 0.1
    itm_batch_size: int | None = None     # positives per ITM step (None: the whole batch); ITM costs 3 forwards
    # BERT's (and BLIP-2's) 0.1 regularises many epochs. A course run of 80 steps draws each photo about 4 times
    # (each caption about once), and on a CPU dropout costs a fifth of the step (attention dropout sends SDPA down
    # its slow path). None keeps BERT's 0.1.
    dropout: float | None = 0.0
    losses: tuple[str, ...] = ("itc", "itm", "itg")
    decoder_bos_token: str = "[unused0]"  # BLIP-2's [DEC]; an unused BERT token needs no new embedding
    # Settings that let a short run learn (issue 17). Their defaults are the first recipe's, and a recipe's key
    # leaves them out while they keep them (recipes.recipe_key), so models trained before keep their cache.
    # ITM negatives drawn uniformly instead of by ITC similarity, as a fraction: early on, ITC's "hard" negatives
    # are noise and ITM needs easy pairs to start learning.
    itm_random_negatives: float = field(default=0.0, metadata={"key": "if_changed"})
    # Initial std of the cross-attention logits (query and key projections scaled for unit-variance inputs).
    # None keeps BERT's N(0, 0.02): with 384-d queries and 1280-d patches that is ~0.3, a softmax over 49 patches
    # that starts flat (entropy ~ ln 49) and whose gradient is small.
    cross_attention_logit_std: float | None = field(default=None, metadata={"key": "if_changed"})
    # The image adapter's position embedding at the start: "zeros" or 2-D "sincos" codes (adapter.ImageAdapter).
    image_positions: str = field(default="zeros", metadata={"key": "if_changed"})


class Stage1Model(nn.Module):
    def __init__(self, qformer: QFormer, tokenizer, num_image_tokens: int, config: Stage1Config | None = None):
        super().__init__()
        self.config = config or Stage1Config()
        self.qformer, self.tokenizer = qformer, tokenizer
        hidden = qformer.config.hidden_size
        self.image_adapter = ImageAdapter(num_image_tokens, qformer.config.encoder_hidden_size,
                                          self.config.image_positions)
        self.vision_proj = nn.Linear(hidden, self.config.embed_dim)
        self.text_proj = nn.Linear(hidden, self.config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.logit_scale = nn.Parameter(torch.tensor(float(self.config.logit_scale_init)))
        self.bos_id = tokenizer.convert_tokens_to_ids(self.config.decoder_bos_token)
        unknown = tokenizer.unk_token_id
        if self.bos_id is None or self.bos_id == unknown:
            raise ValueError(f"the tokenizer has no {self.config.decoder_bos_token!r} token for the decoder BOS")

    @classmethod
    def from_text_encoder(cls, text_encoder, image_hidden_size: int, num_image_tokens: int,
                          config: Stage1Config | None = None) -> "Stage1Model":
        """BERT-initialised Q-Former (cross-attention random) + fresh heads, as in BLIP-2."""
        config = config or Stage1Config()
        qformer = qformer_from_bert(text_encoder.model, num_query_tokens=config.num_query_tokens,
                                    encoder_hidden_size=image_hidden_size, dropout=config.dropout)
        model = cls(qformer, text_encoder.tokenizer, num_image_tokens, config)
        if config.cross_attention_logit_std is not None:    # after the heads: they get the same init either way
            init_cross_attention(qformer, config.cross_attention_logit_std)
        return model

    def new_parameter_prefixes(self) -> list[str]:
        """Name prefixes of the parameters BERT did not initialise: the queries, the cross-attention layers,
        the ITG head's transform, the image adapter, the ITC projections and temperature, the ITM head. A short
        run trains them at a higher learning rate than the pretrained ones (``TrainConfig.lr_scales``)."""
        cross = [f"qformer.layers.{i}.cross_attn." for i in self.qformer.config.cross_attention_layers]
        # A BertModel has no MLM head: the LM head's transform is new too (its decoder is the word embeddings,
        # which named_parameters() lists under the embeddings).
        return ["qformer.query_tokens", *cross, "qformer.lm_head.", "image_adapter.", "vision_proj.", "text_proj.",
                "logit_scale", "itm_head."]

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def temperature(self) -> float:
        """The ITC temperature τ = 1 / exp(logit_scale) (capped as in training)."""
        return L.temperature_from(self.logit_scale, self.config.max_logit_scale)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.config.max_text_len,
                               return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    # ------------------------------------------------------------------ features
    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, D) frozen image tokens -> (B, Q, embed_dim) normalised query features (ITC)."""
        queries = self.qformer(image_embeds=self.image_adapter(image_embeds.to(self.device))).query_output
        return F.normalize(self.vision_proj(queries), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Captions alone through the shared BERT layers -> (B, embed_dim) normalised [CLS] features."""
        text = self.qformer(input_ids=input_ids, attention_mask=attention_mask).text_output
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)

    def similarity(self, image_embeds: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(N_images, N_captions) ITC similarity (max over queries), for retrieval."""
        return L.itc_similarity(self.image_features(image_embeds), self.text_features(*self.tokenize(captions)))

    def itm_logits(self, image_embeds: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_key_values: tuple | None = None):
        """(B, 2) match logits of (image, caption) pairs; the images as adapted patch tokens, or as their
        cross-attention keys and values from an earlier pass (``image_key_values``, with ``image_embeds=None``)."""
        out = self.qformer(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                           mask_type=L.MASK_FOR_LOSS["itm"], image_key_values=image_key_values)
        return self.itm_head(out.query_output.mean(dim=1))

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """P(match) for each (image, caption) pair, row by row."""
        logits = self.itm_logits(self.image_adapter(image_embeds.to(self.device)), *self.tokenize(captions))
        return logits.float().softmax(-1)[:, 1]

    # ------------------------------------------------------------------ losses
    def forward(self, image_embeds: torch.Tensor, captions: list[str], image_ids: list | None = None,
                generator: torch.Generator | None = None,
                positive_captions: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
        """The configured stage-1 losses; ``loss`` is their sum.

        Which captions count as matches: by default a photo's own (and those of the same ``image_ids``).
        ``positive_captions[i]``: the batch rows whose caption fits photo i, where other photos' captions can
        (``train.caption_batches`` with ``fits``). Otherwise ITC would push apart, and ITM would learn to reject,
        pairs that are true: on the shapes world, ITM's "hard negatives" are then mostly right captions."""
        image_embeds = self.image_adapter(image_embeds.to(self.device))
        # Several processes (distributed.py): each holds its rows of the global batch; ITC and ITM's negatives use
        # every process's rows, gathered in the global order (in one process every D. call is the identity). The
        # captions are tokenized together, so each process pads them as a single process would.
        all_input_ids, all_attention_mask = self.tokenize(D.gather_objects(list(captions)))
        input_ids, attention_mask = D.own_rows(all_input_ids), D.own_rows(all_attention_mask)
        b = all_input_ids.shape[0]
        image_ids = list(range(b)) if image_ids is None else D.gather_objects(list(image_ids))
        pos = (L.positives(image_ids) if positive_captions is None
               else L.positives_from_lists(D.gather_objects(list(positive_captions))))
        out: dict[str, torch.Tensor] = {}

        # ITC: one pass, queries and text side by side under the uni-modal mask. It keeps the queries' keys and
        # values: ITG's text reads them instead of running the queries again (their ITG mask lets them see only
        # queries, so they would compute the same thing). It keeps the image's too: ITM's photos are this batch's,
        # and their projection into keys and values is the same whatever reads them.
        both = self.qformer(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                            mask_type=L.MASK_FOR_LOSS["itc"], use_cache=bool({"itg", "itm"} & set(self.config.losses)))
        image_feats = F.normalize(self.vision_proj(both.query_output), dim=-1)
        text_feats = F.normalize(self.text_proj(both.text_output[:, 0]), dim=-1)
        itc, sim_i2t = L.itc_loss(D.gather(image_feats), D.gather(text_feats), self.logit_scale, image_ids,
                                  self.config.itc_label_smoothing, rows=D.local_rows(b), is_positive=pos,
                                  max_logit_scale=self.config.max_logit_scale)
        if "itc" in self.config.losses:
            out["itc"] = itc

        if "itm" in self.config.losses:
            m = min(b, self.config.itm_batch_size or b)
            neg_text, neg_image = L.sample_hard_negatives(sim_i2t, pos, generator, self.config.itm_random_negatives)
            # this process's positives: global rows rank, rank + N, ... < m (every process drew the same negatives
            # for the whole batch, from the same generator)
            idx = torch.arange(D.rank(), m, D.world_size())
            # rows: m positives, m (image, hard-negative text), m (hard-negative image, text)
            # index_select, not [...]: two texts may pick the same hard-negative photo, and the backward of []
            # adds their gradients with racing threads on a CPU (not bit-reproducible).
            rows = torch.cat([idx, idx, neg_image[idx]]).to(self.device)
            image_kv = tuple((D.gather(k).index_select(0, rows), D.gather(v).index_select(0, rows))
                             for k, v in both.cross_key_values)
            ids = torch.cat([all_input_ids[idx], all_input_ids[neg_text[idx]], all_input_ids[idx]])
            att = torch.cat([all_attention_mask[idx], all_attention_mask[neg_text[idx]], all_attention_mask[idx]])
            itm, _ = L.itm_loss(self.itm_logits(None, ids, att, image_key_values=image_kv), len(idx))
            out["itm"] = D.global_mean(itm, 3 * len(idx))

        if "itg" in self.config.losses:
            decoder_ids, labels = L.itg_inputs(input_ids, attention_mask, self.bos_id)
            gen = self.qformer(input_ids=decoder_ids, attention_mask=attention_mask,
                               past_key_values=both.past_key_values, mask_type=L.MASK_FOR_LOSS["itg"])
            itg = L.itg_loss(gen.text_output, labels, self.config.itg_label_smoothing, lm_head=self.qformer.lm_head)
            out["itg"] = D.global_mean(itg, (labels[:, 1:] != L.IGNORE_INDEX).sum())   # processes hold unequal tokens

        out["loss"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ captions from the ITG head
    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, max_new_tokens: int = 20) -> list[str]:
        """Greedy captions from the Q-Former's own LM head (ITG), one per image. The queries run once: every
        step's text reads their keys and values (under the ITG mask they never see the text)."""
        image_embeds = self.image_adapter(image_embeds.to(self.device))
        queries = self.qformer(image_embeds=image_embeds, use_cache=True).past_key_values
        b = image_embeds.shape[0]
        ids = torch.full((b, 1), self.bos_id, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        sep = self.tokenizer.sep_token_id
        for _ in range(max_new_tokens):
            out = self.qformer(input_ids=ids, past_key_values=queries, mask_type=L.MASK_FOR_LOSS["itg"])
            next_id = self.qformer.lm_head(out.text_output[:, -1]).argmax(-1)
            next_id = next_id.masked_fill(done, self.tokenizer.pad_token_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            done |= next_id == sep
            if done.all():
                break
        return [self.tokenizer.decode(row[1:], skip_special_tokens=True) for row in ids]

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors + the tokenizer: everything ``from_pretrained`` needs."""
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"stage1": asdict(self.config), "qformer": self.qformer.config.to_dict(),
                  "num_image_tokens": self.image_adapter.position.shape[1]}
        (path / "config.json").write_text(json.dumps(config, indent=2))
        save_model(self, str(path / "model.safetensors"))   # handles the LM head tied to the word embeddings
        self.tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path) -> "Stage1Model":
        from safetensors.torch import load_model
        from transformers import AutoTokenizer

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        stage1 = config["stage1"]
        if "temp" in stage1:
            raise ValueError(f"{path} holds a stage-1 model saved before its temperature became logit_scale "
                             "(CLIP's convention): train it again")
        stage1["losses"] = tuple(stage1["losses"])
        model = cls(QFormer(QFormerConfig(**config["qformer"])), AutoTokenizer.from_pretrained(path),
                    config["num_image_tokens"], Stage1Config(**stage1))
        load_model(model, str(path / "model.safetensors"))
        return model.eval()


def init_cross_attention(qformer: QFormer, logit_std: float) -> None:
    """Re-draw the cross-attention query and key projections so that, for unit-variance inputs, the attention
    logits start with std ``logit_std``. With weights of std s, a query entry has std s sqrt(H) and a key entry
    s sqrt(D); a logit sums head_size of their products and divides by sqrt(head_size): std s^2 sqrt(H D)."""
    hidden, width = qformer.config.hidden_size, qformer.config.encoder_hidden_size
    std = math.sqrt(logit_std / math.sqrt(hidden * width))
    with torch.no_grad():
        for layer in qformer.layers:
            if layer.cross_attn is not None:
                nn.init.normal_(layer.cross_attn.query.weight, std=std)
                nn.init.normal_(layer.cross_attn.key.weight, std=std)


@torch.no_grad()
def itc_features(model: Stage1Model, features: torch.Tensor, captions: list[list[str]],
                 batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC features of a whole split: (N, Q, E) per query for the images, (sum of captions, E) for the
    captions, flattened image by image. Each side runs alone, as the ITC mask promises it can."""
    model.eval()
    image_feats = in_batches(lambda x: model.image_features(x.float()), features, batch_size=batch_size)
    flat = [c for caps in captions for c in caps]
    text_feats = in_batches(lambda texts: model.text_features(*model.tokenize(texts)), flat, batch_size=batch_size)
    return image_feats.float().cpu(), text_feats.float().cpu()


def query_use(image_q: torch.Tensor, text_f: torch.Tensor, owner: torch.Tensor, k: int = 5) -> dict[str, float]:
    """How the ITC score uses a photo's queries (notebook 04, section 5): the mean cosine of two of its queries' ITC
    features (1: one vector), and image->text R@``k`` (%) with the score taken as the max over queries (ITC's), their
    mean, or query 0 alone. ``image_q``, ``text_f``: ``itc_features``; ``owner``: the photo of each caption."""
    Q = image_q.shape[1]
    per_query = torch.einsum("iqe,te->iqt", image_q, text_f)                      # every query against every caption
    row = {"cosine of two queries of one photo":
           torch.einsum("iqe,ipe->iqp", image_q, image_q)[:, ~torch.eye(Q, dtype=torch.bool)].mean().item()}
    for how, s in {"max over queries": per_query.max(1).values, "mean over queries": per_query.mean(1),
                   "query 0 alone": per_query[:, 0]}.items():
        row[f"image→text R@{k}, {how} (%)"] = 100 * recall_at_k(s, owner, (k,))["image->text"][k]
    return row


@torch.no_grad()
def retrieval(model: Stage1Model, features: torch.Tensor, captions: list[list[str]], ks=(1, 5, 10),
              batch_size: int = 128) -> dict:
    """Image->text and text->image Recall@K with the ITC similarity (max over queries)."""
    sim = L.itc_similarity(*itc_features(model, features, captions, batch_size))
    return recall_at_k(sim, caption_image_index([len(c) for c in captions]), ks)


# ---------------------------------------------------------------------------- looking inside (notebook 04)
@contextmanager
def recording_masks():
    """Collect every self-attention mask the Q-Former builds inside the ``with`` block.

    Yields a list that fills with ``(mask_type, mask)`` pairs, ``mask`` the (B, Q+T, Q+T) bool
    tensor of ``qformer.self_attention_mask`` (True = may attend), in the order they were built.
    Nothing else changes: the model computes exactly what it would without the recording.
    """
    calls, build = [], qformer_module.self_attention_mask

    def record(mask_type, num_query_tokens, attention_mask):
        mask = build(mask_type, num_query_tokens, attention_mask)
        calls.append((mask_type or "itm", mask.detach().cpu()))
        return mask

    qformer_module.self_attention_mask = record
    try:
        yield calls
    finally:
        qformer_module.self_attention_mask = build


@torch.no_grad()
def itm_score_groups(model: Stage1Model, features: torch.Tensor, captions: list[list[str]],
                     generator: torch.Generator | None = None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """P(match) of the ITM head for each image paired with three kinds of caption.

    - ``matched``: one of its own captions, at random;
    - ``random``: a caption of another image, uniformly;
    - ``hard negative``: a caption of another image drawn as in training, in proportion to
      softmax(ITC similarity / temperature) over the whole split (``losses.sample_hard_negatives``).

    Returns {kind: (N,) tensor}, one score per image.
    """
    generator = generator or torch.Generator().manual_seed(0)
    owner = caption_image_index([len(c) for c in captions])
    n, flat = len(captions), [c for caps in captions for c in caps]
    image_feats, text_feats = itc_features(model, features, captions)
    is_positive = owner[None, :] == torch.arange(n)[:, None]                  # (N, all captions)
    hard, _ = L.sample_hard_negatives(L.itc_similarity(image_feats, text_feats) / model.temperature,
                                      is_positive, generator)
    picks = {"matched": torch.multinomial(is_positive.float(), 1, generator=generator).squeeze(1),
             "random": torch.multinomial((~is_positive).float(), 1, generator=generator).squeeze(1),
             "hard negative": hard}

    def scores(caption_ids):
        return torch.cat([model.itm_scores(features[i:i + batch_size].float(),
                                           [flat[j] for j in caption_ids[i:i + batch_size].tolist()]).float().cpu()
                          for i in range(0, n, batch_size)])

    return {kind: scores(ids) for kind, ids in picks.items()}


def query_diversity(queries: torch.Tensor, threshold: float = 0.9) -> dict[str, float]:
    """How far the Q queries of each image are from collapsing into one (BLIP-2's queries should each pull
    out something different). ``queries``: (B, Q, D) query outputs or their ITC features. Per image, then
    averaged over the images:

    - ``mean pairwise cosine``: over the Q(Q-1) pairs of different queries (1.0: all point the same way);
    - ``distinct queries``: how many are left when each query joins the first earlier one it has cosine
      >= ``threshold`` with (1: collapsed, Q: all different);
    - ``effective rank``: exp(entropy) of the normalised singular values of the (Q, D) unit vectors (1 to Q).
    """
    if queries.ndim != 3:
        raise ValueError(f"queries must be (B, Q, D), got {tuple(queries.shape)}")
    unit = F.normalize(queries.detach().float(), dim=-1)
    cos = unit @ unit.transpose(1, 2)                                   # (B, Q, Q)
    q = cos.shape[1]
    off_diagonal = cos[:, ~torch.eye(q, dtype=torch.bool, device=cos.device)]
    distinct = []
    for image in cos:
        leaders: list[int] = []
        for i in range(q):
            if not any(image[i, j] >= threshold for j in leaders):
                leaders.append(i)
        distinct.append(len(leaders))
    s = torch.linalg.svdvals(unit)
    p = s / s.sum(-1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return {"mean pairwise cosine": off_diagonal.mean().item() if q > 1 else 1.0,
            "distinct queries": sum(distinct) / len(distinct), "effective rank": entropy.exp().mean().item()}
