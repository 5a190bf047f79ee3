"""Stage 1 of BLIP-2: teach the Q-Former to pull caption-relevant facts out of frozen image features.

``Stage1Model`` holds the Q-Former and the small heads of the three losses
(losses.py): ITC projections and temperature, the ITM head, and the ITG LM head
(inside the Q-Former, tied to its word embeddings). ``forward`` returns all
three losses for a batch of (cached image features, captions).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .qformer import QFormer, QFormerConfig


@dataclass
class Stage1Config:
    num_query_tokens: int = 32
    embed_dim: int = 256                  # ITC feature size, as in BLIP-2
    max_text_len: int = 32
    temp: float = 0.07                    # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    itc_label_smoothing: float = 0.0
    itg_label_smoothing: float = 0.1
    itm_batch_size: int | None = None     # positives per ITM step (None: the whole batch); ITM costs 3 forwards
    losses: tuple[str, ...] = ("itc", "itm", "itg")
    decoder_bos_token: str = "[unused0]"  # BLIP-2's [DEC]; an unused BERT token needs no new embedding


class ImageAdapter(nn.Module):
    """LayerNorm and a learned position embedding on the frozen image tokens.

    CNN features carry no position signal of their own, and their scale is far
    from BERT's: both would make cross-attention's early steps blind.
    """

    def __init__(self, num_tokens: int, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.position = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if image_embeds.shape[1:] != self.position.shape[1:]:
            raise ValueError(f"image_embeds must be (B, {self.position.shape[1]}, {self.position.shape[2]}), "
                             f"got {tuple(image_embeds.shape)}")
        return self.norm(image_embeds.to(self.position.dtype)) + self.position


class Stage1Model(nn.Module):
    def __init__(self, qformer: QFormer, tokenizer, num_image_tokens: int, config: Stage1Config | None = None):
        super().__init__()
        self.config = config or Stage1Config()
        self.qformer, self.tokenizer = qformer, tokenizer
        hidden = qformer.config.hidden_size
        self.image_adapter = ImageAdapter(num_image_tokens, qformer.config.encoder_hidden_size)
        self.vision_proj = nn.Linear(hidden, self.config.embed_dim)
        self.text_proj = nn.Linear(hidden, self.config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(self.config.temp))
        self.bos_id = tokenizer.convert_tokens_to_ids(self.config.decoder_bos_token)
        unknown = tokenizer.unk_token_id
        if self.bos_id is None or self.bos_id == unknown:
            raise ValueError(f"the tokenizer has no {self.config.decoder_bos_token!r} token for the decoder BOS")

    @classmethod
    def from_text_encoder(cls, text_encoder, image_hidden_size: int, num_image_tokens: int,
                          config: Stage1Config | None = None) -> "Stage1Model":
        """BERT-initialised Q-Former (cross-attention random) + fresh heads, as in BLIP-2."""
        config = config or Stage1Config()
        qformer = QFormer.from_bert(text_encoder.model, num_query_tokens=config.num_query_tokens,
                                    encoder_hidden_size=image_hidden_size)
        return cls(qformer, text_encoder.tokenizer, num_image_tokens, config)

    @property
    def device(self) -> torch.device:
        return self.temp.device

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

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.qformer(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                           mask_type=L.MASK_FOR_LOSS["itm"])
        return self.itm_head(out.query_output.mean(dim=1))

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """P(match) for each (image, caption) pair, row by row."""
        logits = self.itm_logits(self.image_adapter(image_embeds.to(self.device)), *self.tokenize(captions))
        return logits.float().softmax(-1)[:, 1]

    # ------------------------------------------------------------------ losses
    def forward(self, image_embeds: torch.Tensor, captions: list[str], image_ids: list | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The configured stage-1 losses; ``loss`` is their sum."""
        image_embeds = self.image_adapter(image_embeds.to(self.device))
        input_ids, attention_mask = self.tokenize(captions)
        b = input_ids.shape[0]
        image_ids = list(range(b)) if image_ids is None else list(image_ids)
        out: dict[str, torch.Tensor] = {}

        # ITC: one pass, queries and text side by side under the uni-modal mask.
        both = self.qformer(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                            mask_type=L.MASK_FOR_LOSS["itc"])
        image_feats = F.normalize(self.vision_proj(both.query_output), dim=-1)
        text_feats = F.normalize(self.text_proj(both.text_output[:, 0]), dim=-1)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        itc, sim_i2t = L.itc_loss(image_feats, text_feats, self.temp, image_ids, self.config.itc_label_smoothing)
        if "itc" in self.config.losses:
            out["itc"] = itc

        if "itm" in self.config.losses:
            m = min(b, self.config.itm_batch_size or b)
            pos = L.positives(image_ids)
            neg_text, neg_image = L.sample_hard_negatives(sim_i2t, pos, generator)
            idx = torch.arange(m)
            # rows: m positives, m (image, hard-negative text), m (hard-negative image, text)
            img = torch.cat([image_embeds[idx], image_embeds[idx], image_embeds[neg_image[idx]]])
            ids = torch.cat([input_ids[idx], input_ids[neg_text[idx]], input_ids[idx]])
            att = torch.cat([attention_mask[idx], attention_mask[neg_text[idx]], attention_mask[idx]])
            out["itm"], _ = L.itm_loss(self.itm_logits(img, ids, att), m)

        if "itg" in self.config.losses:
            decoder_ids, labels = L.itg_inputs(input_ids, attention_mask, self.bos_id)
            gen = self.qformer(image_embeds=image_embeds, input_ids=decoder_ids, attention_mask=attention_mask,
                               mask_type=L.MASK_FOR_LOSS["itg"])
            out["itg"] = L.itg_loss(self.qformer.lm_head(gen.text_output), labels, self.config.itg_label_smoothing)

        out["loss"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ captions from the ITG head
    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, max_new_tokens: int = 20) -> list[str]:
        """Greedy captions from the Q-Former's own LM head (ITG), one per image."""
        image_embeds = self.image_adapter(image_embeds.to(self.device))
        b = image_embeds.shape[0]
        ids = torch.full((b, 1), self.bos_id, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        sep = self.tokenizer.sep_token_id
        for _ in range(max_new_tokens):
            out = self.qformer(image_embeds=image_embeds, input_ids=ids, mask_type=L.MASK_FOR_LOSS["itg"])
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
        stage1["losses"] = tuple(stage1["losses"])
        model = cls(QFormer(QFormerConfig(**config["qformer"])), AutoTokenizer.from_pretrained(path),
                    config["num_image_tokens"], Stage1Config(**stage1))
        load_model(model, str(path / "model.safetensors"))
        return model.eval()


@torch.no_grad()
def retrieval(model: Stage1Model, features: torch.Tensor, captions: list[list[str]], ks=(1, 5, 10),
              batch_size: int = 128) -> dict:
    """Image->text and text->image Recall@K with the ITC similarity (max over queries)."""
    from .clip import caption_image_index, recall_at_k

    model.eval()
    image_feats = torch.cat([model.image_features(features[i:i + batch_size].float())
                             for i in range(0, len(features), batch_size)])
    flat = [c for caps in captions for c in caps]
    text_feats = torch.cat([model.text_features(*model.tokenize(flat[i:i + batch_size]))
                            for i in range(0, len(flat), batch_size)])
    sim = L.itc_similarity(image_feats, text_feats)
    return recall_at_k(sim.float().cpu(), caption_image_index([len(c) for c in captions]), ks)
