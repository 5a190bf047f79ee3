"""Answering questions about a photo: one interface over the two places an image can enter a frozen LLM.

    soft prompts (BLIP-2's Q-Former, LLaVA's projector, a resampler):  [image tokens] [question] [answer] [EOS]
    cross-attention (Flamingo):                                         [question] [answer] [EOS], the image read
                                                                        from inside the LLM's layers

Each row is an instruction and its answer in the LLM's chat format (``instruct.chat_prompt``); the loss covers the
answer and its end-of-turn token only (labels -100 elsewhere), as LLaVA's and InstructBLIP's instruction tuning do.
``answer`` decodes greedily. ``SoftPromptVQA`` and ``FlamingoVQA`` take the same arguments, so one training loop
(``train.train`` with ``instruction_batches``) and one scorer (``instruct.vqa_accuracy``) serve both.
"""
from __future__ import annotations

import torch
from torch import nn

from .flamingo import FlamingoLM
from .generation import cache_argument
from .instructblip import InstructQFormerConnector
from .instruct import chat_prompt
from .stage2 import IGNORE_INDEX, SoftPromptCaptioner, text_inputs
from .utils import eval_mode, in_batches


def answer_inputs(tokenizer, instructions: list[str], answers: list[str], eos_id: int):
    """(ids, attention_mask, labels), each (B, T), right-padded: [chat prompt] [answer] [EOS] [pad ...]; labels
    are the answer's tokens and the EOS, -100 on the prompt and the padding."""
    if len(instructions) != len(answers):
        raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers")
    prompts = [prompt_ids(tokenizer, i) for i in instructions]
    replies = [tokenizer(a.strip(), add_special_tokens=False).input_ids + [eos_id] for a in answers]
    ids, mask, labels = text_inputs([torch.tensor(p + r) for p, r in zip(prompts, replies)], eos_id)
    for i, prompt in enumerate(prompts):
        labels[i, :len(prompt)] = IGNORE_INDEX             # the question is given, not predicted
    return ids, mask, labels


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    return tokenizer(chat_prompt(None, instruction), add_special_tokens=False).input_ids


def prompt_inputs(tokenizer, instructions: list[str], pad_id: int):
    """(ids, attention_mask) of the chat prompts, left-padded, for decoding the answers."""
    rows = [prompt_ids(tokenizer, i) for i in instructions]
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


class SoftPromptVQA(SoftPromptCaptioner):
    """connector -> projection -> soft prompts in front of the question, frozen LLM (BLIP-2, LLaVA)."""

    shares_image_prefix = True     # the soft prompts depend on the photo alone: its questions can share its pass

    def forward(self, image_embeds: torch.Tensor, instructions: list[str] | list[list[str]],
                answers: list[str] | list[list[str]]) -> torch.Tensor:
        """Mean LM loss over the answers' tokens and their EOS.

        One (instruction, answer) per image, or a list of each per image: then each image's soft prompts go through
        the LLM once and all its questions continue from their keys and values (``continuation_loss``; the same
        loss and gradients as one row per question, for far fewer positions read: 49 soft prompts and about 18
        tokens a question)."""
        if len(instructions) != image_embeds.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images but {len(instructions)} instructions")
        soft = self.soft_prompts(image_embeds).to(self._llm_dtype)                    # (B, Q, H)
        if instructions and not isinstance(instructions[0], str):
            if [len(i) for i in instructions] != [len(a) for a in answers] or not all(instructions):
                raise ValueError("give each image one answer per instruction, and at least one instruction")
            flat = answer_inputs(self.tokenizer, sum(instructions, []), sum(answers, []), self.eos_id)
            return self.continuation_loss(soft, list(map(len, instructions)), *flat)
        ids, mask, labels = answer_inputs(self.tokenizer, instructions, answers, self.eos_id)
        embeds = torch.cat([soft, self._embed(ids).to(self._llm_dtype)], dim=1)
        b, q = soft.shape[:2]
        mask = torch.cat([torch.ones(b, q, dtype=torch.long), mask], 1).to(self.device)
        labels = torch.cat([torch.full((b, q), IGNORE_INDEX), labels], 1).to(self.device)
        return self.labelled_loss(embeds, mask, labels)

    @torch.no_grad()
    def answer(self, image_embeds: torch.Tensor, instructions: list[str] | list[list[str]],
               max_new_tokens: int = 6) -> list[str] | list[list[str]]:
        """Greedy answers. Each row is left-padded in front of its soft prompts ([pad ...] [soft prompts] [prompt]),
        so that it reads as if it were alone (the LLM's ``generate`` counts positions from the attention mask).

        A list of questions per image: each image's soft prompts go through the LLM once and its questions continue
        from their keys and values (``answer_grouped``); returns a list of answers per image."""
        if instructions and not isinstance(instructions[0], str):
            return self.answer_grouped(image_embeds, instructions, max_new_tokens)
        soft = self.soft_prompts(image_embeds).to(self._llm_dtype)
        ids, text_mask = prompt_inputs(self.tokenizer, instructions, self.pad_id)
        text = self._embed(ids).to(self._llm_dtype)
        ones = torch.ones(soft.shape[1], dtype=torch.long)
        pads = (text_mask == 0).sum(1).tolist()
        embeds = torch.stack([torch.cat([text[i, :p], soft[i], text[i, p:]]) for i, p in enumerate(pads)])
        mask = torch.stack([torch.cat([text_mask[i, :p], ones, text_mask[i, p:]]) for i, p in enumerate(pads)])
        out = self.llm_model.generate(inputs_embeds=embeds, attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.eos_id,
                                      pad_token_id=self.pad_id)
        return [self.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in out]

    @torch.no_grad()
    def answer_grouped(self, image_embeds: torch.Tensor, instructions: list[list[str]],
                       max_new_tokens: int = 6) -> list[list[str]]:
        """Greedy answers to several questions per image, each image's soft prompts read once (a hand-written greedy
        loop over the shared KV cache). The questions are right-padded after the soft prompts: the pads are masked
        out, and each row's new tokens take the positions that follow its own question, so every row reads as if it
        were alone (``tests/test_vqa.py`` checks the answers against ``answer`` one row at a time)."""
        if len(instructions) != image_embeds.shape[0] or not all(instructions):
            raise ValueError(f"{image_embeds.shape[0]} images: give each a non-empty list of questions")
        soft = self.soft_prompts(image_embeds).to(self._llm_dtype)
        _, cache, _ = self.prefix_cache(soft, list(map(len, instructions)))
        rows = [prompt_ids(self.tokenizer, q) for qs in instructions for q in qs]
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        ids, text_mask, _ = text_inputs([torch.tensor(r) for r in rows], self.pad_id)
        n, decoder, lm_head = soft.shape[1], self.llm_model.get_decoder(), self.llm_model.get_output_embeddings()
        mask = torch.cat([torch.ones(len(rows), n, dtype=torch.long), text_mask], dim=1).to(self.device)
        positions = torch.arange(n, n + ids.shape[1], device=self.device).unsqueeze(0)
        said, done = [], torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            hidden = decoder(inputs_embeds=self._embed(ids).to(self._llm_dtype), attention_mask=mask,
                             position_ids=positions, **{cache_argument(decoder): cache}).last_hidden_state
            last = hidden[:, -1] if said else hidden[torch.arange(len(rows)), lengths - 1]   # each row's last token
            token = lm_head(last).argmax(-1).masked_fill(done, self.eos_id)
            said.append(token)
            done |= token == self.eos_id
            if done.all():
                break
            ids, positions = token[:, None], (n + lengths + len(said) - 1)[:, None]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], dim=1)
        tokens = torch.stack(said, dim=1).tolist()
        answers = iter(self.tokenizer.decode(t[:t.index(self.eos_id) + 1] if self.eos_id in t else t,
                                             skip_special_tokens=True).strip() for t in tokens)
        return [[next(answers) for _ in qs] for qs in instructions]


class InstructBLIPVQA(SoftPromptVQA):
    """BLIP-2's soft prompts with InstructBLIP's queries: each question is also given to the Q-Former (tokenised by
    the Q-Former's own tokenizer, that of the BERT it was initialised from), where its tokens join the queries in the
    self-attention (``instructblip.InstructQFormerConnector``). The soft prompts then depend on the question, so a
    photo's questions cannot share its pass through the LLM: one row per question, in training and in answering."""

    shares_image_prefix = False

    def __init__(self, connector: InstructQFormerConnector, connector_size: int, llm, qformer_tokenizer,
                 max_instruction_tokens: int = 32):
        if not isinstance(connector, InstructQFormerConnector):
            raise TypeError(f"InstructBLIPVQA needs an InstructQFormerConnector, got {type(connector).__name__}")
        super().__init__(connector, connector_size, llm)
        self.qformer_tokenizer, self.max_instruction_tokens = qformer_tokenizer, max_instruction_tokens

    def asking(self, instructions: list[str]):
        """A context in which the connector reads these instructions (one per image)."""
        if not instructions or not isinstance(instructions[0], str):
            raise ValueError("InstructBLIP's soft prompts depend on the question: give one question per image")
        tok = self.qformer_tokenizer(instructions, padding=True, truncation=True,
                                     max_length=self.max_instruction_tokens, return_tensors="pt")
        return self.connector.instruction(tok.input_ids.to(self.device), tok.attention_mask.to(self.device))

    def forward(self, image_embeds: torch.Tensor, instructions: list[str], answers: list[str]) -> torch.Tensor:
        with self.asking(instructions):
            return super().forward(image_embeds, instructions, answers)

    @torch.no_grad()
    def answer(self, image_embeds: torch.Tensor, instructions: list[str], max_new_tokens: int = 6) -> list[str]:
        with self.asking(instructions):
            return super().answer(image_embeds, instructions, max_new_tokens)


class FlamingoVQA(nn.Module):
    """A ``FlamingoLM`` (gated cross-attention inside the frozen LLM) asked and trained like ``SoftPromptVQA``."""

    def __init__(self, llm, visual_dim: int, every: int = 4, **options):
        super().__init__()
        self.lm = FlamingoLM(llm, visual_dim, every, **options)
        self.tokenizer, self.eos_id = llm.tokenizer, llm.tokenizer.eos_token_id

    def forward(self, image_embeds: torch.Tensor, instructions: list[str], answers: list[str]) -> torch.Tensor:
        ids, mask, labels = answer_inputs(self.tokenizer, instructions, answers, self.eos_id)
        return self.lm(ids, mask, image_embeds=image_embeds, labels=labels).loss

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.train(mode)            # keeps the frozen LLM in eval mode
        return self

    @torch.no_grad()
    def answer(self, image_embeds: torch.Tensor, instructions: list[str], max_new_tokens: int = 6) -> list[str]:
        return self.lm.generate(image_embeds, [chat_prompt(None, i) for i in instructions], max_new_tokens)


def instruction_batches(features: torch.Tensor, rows: list[dict], batch_size: int, per_image: int = 0):
    """A ``batch_fn`` for ``train.train``: ``batch_size`` random rows of ``instruct.instruction_pairs``
    (``row["image"]`` indexes ``features``), as image_embeds, instructions and answers.

    ``per_image=k``: ``batch_size // k`` random images instead, each with k of its rows drawn without replacement
    (all of them if it has fewer), grouped per image for ``SoftPromptVQA``'s shared prefix."""
    if not rows:
        raise ValueError("no instruction rows to train on")
    if per_image:
        by_image = group_by_image((r["image"], r) for r in rows)
        images = list(by_image)

    def batch_fn(step: int, generator: torch.Generator) -> dict:
        if not per_image:
            picks = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=generator).tolist()]
            return {"image_embeds": features[[r["image"] for r in picks]].float(),
                    "instructions": [r["instruction"] for r in picks], "answers": [r["answer"] for r in picks]}
        chosen = [images[i] for i in torch.randint(len(images), (max(1, batch_size // per_image),),
                                                   generator=generator).tolist()]
        groups = [[by_image[i][j] for j in torch.randperm(len(by_image[i]), generator=generator)[:per_image].tolist()]
                  for i in chosen]
        return {"image_embeds": features[chosen].float(),
                "instructions": [[r["instruction"] for r in g] for g in groups],
                "answers": [[r["answer"] for r in g] for g in groups]}
    return batch_fn


def group_by_image(pairs) -> dict:
    """{image: [its items, in order]} from (image, item) pairs: the rows a photo's one prefix pass serves."""
    groups: dict = {}
    for image, item in pairs:
        groups.setdefault(image, []).append(item)
    return groups


@torch.no_grad()
def answer_all(model, features: torch.Tensor, rows: list[dict], batch_size: int = 32,
               max_new_tokens: int = 6) -> list[str]:
    """The model's greedy answer to every row (in eval mode). Rows that ask the same image the same question are
    answered once (e.g. a blank photo standing in for every image: ``row["image"]`` 0 of a one-photo ``features``).
    A model whose soft prompts depend on the image alone reads them once for all its questions
    (``SoftPromptVQA.answer_grouped``), about ``batch_size`` questions at a time."""
    asked = list(dict.fromkeys((r["image"], r["instruction"]) for r in rows))
    with eval_mode(model):
        if getattr(model, "shares_image_prefix", False):
            by_image = group_by_image(asked)
            per_image = max(1, batch_size * len(by_image) // len(asked))       # images a batch: ~batch_size rows
            said = in_batches(lambda images: model.answer(features[images].float(),
                                                          [by_image[i] for i in images], max_new_tokens),
                              list(by_image), batch_size=per_image)
            asked = [(image, q) for image, questions in by_image.items() for q in questions]
            said = [a for answers in said for a in answers]
        else:
            said = in_batches(lambda chunk: model.answer(features[[i for i, _ in chunk]].float(),
                                                         [q for _, q in chunk], max_new_tokens),
                              asked, batch_size=batch_size)
    answers = dict(zip(asked, said))
    return [answers[(r["image"], r["instruction"])] for r in rows]


def design_card(name: str, model) -> dict:
    """What a design adds to the frozen LLM, read off the model itself: where the image enters, how many positions
    it adds to the LLM's input, how many weights train, and which of the LLM's layers read it."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(model, FlamingoVQA):
        layers = sorted(int(i) for i in model.lm.blocks)
        return {"design": name, "image enters": "cross-attention inside the LLM", "image tokens in the input": 0,
                "LLM layers that read the image": layers, "trainable parameters": trainable}
    return {"design": name, "image enters": "soft prompts before the question",
            "image tokens in the input": model.num_soft_tokens,
            "LLM layers that read the image": list(range(model.llm_model.config.num_hidden_layers)),
            "trainable parameters": trainable}
