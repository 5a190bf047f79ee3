"""Instruction tuning on the shapes world: (image, instruction, answer) rows, the chat prompt, VQA scoring.

A captioner answers one fixed prompt; an instruction-tuned model answers what it is asked. The shapes world knows
every answer (``shapes.questions_of``, ``shapes.captions_of``), so its scenes become instruction rows:

    "Describe the photo."           -> "a red circle in the top left"
    "What colour is the circle?"    -> "red"
    "Where is the square?"          -> "bottom right"
    "How many shapes are there?"    -> "two"

Each question type has a few train phrasings, and held-out ones (``phrasings="held_out"``) that no train row uses:
does the model answer a question it was never asked in those words?

Scoring is VQA's exact match after normalisation (``vqa_accuracy``); the text-only baseline answers each question
type with its most common train answer (``text_prior_answers``), the score a model gets without looking.
"""
from __future__ import annotations

import random
import re
from collections import Counter

from .shapes import captions_of, questions_of

QUESTION_TYPES = ("caption", "count", "colour", "position", "size", "shape")

# how shapes.questions_of words each type; ``subject`` is what the question is about ("circle", "in the top left")
GROUND_TRUTH = {"count": r"how many shapes are there\?", "colour": r"what colour is the (?P<subject>\w+)\?",
                "position": r"where is the (?P<subject>\w+)\?", "size": r"how big is the (?P<subject>\w+)\?",
                "shape": r"what shape is (?P<subject>.+)\?"}

PHRASINGS = {
    "caption": ("Describe the photo.", "Write a short caption for this image.", "What is in the picture?"),
    "count": ("How many shapes are there?", "How many shapes does the photo show?"),
    "colour": ("What colour is the {subject}?", "What is the colour of the {subject}?"),
    "position": ("Where is the {subject}?", "Where is the {subject} in the photo?"),
    "size": ("How big is the {subject}?", "Is the {subject} small or large?"),
    "shape": ("What shape is {subject}?", "Which shape do you see {subject}?"),
}
HELD_OUT_PHRASINGS = {
    "caption": ("What does this photo show?",),
    "count": ("Count the shapes in the picture.",),
    "colour": ("Which colour does the {subject} have?",),
    "position": ("In which part of the photo is the {subject}?",),
    "size": ("What size is the {subject}?",),
    "shape": ("Name the shape {subject}.",),
}


def question_type(question: str) -> tuple[str, str | None]:
    """(type, subject) of one of ``shapes.questions_of``'s questions."""
    for kind, pattern in GROUND_TRUTH.items():
        match = re.fullmatch(pattern, question)
        if match:
            return kind, match.groupdict().get("subject")
    raise ValueError(f"not a question shapes.questions_of asks: {question!r}")


def instruction_pairs(objects_per_image: list[list[dict]], captions_per_image: list[list[str]] | None = None,
                      seed: int = 0, phrasings: str = "train") -> list[dict]:
    """Rows {"image", "type", "instruction", "answer"}: per image, one caption request (answered by one of its
    captions) and every question of ``shapes.questions_of``, each in a phrasing drawn with ``seed``.

    ``captions_per_image``: e.g. ``ds.captions`` (default: ``shapes.captions_of`` of each scene);
    ``phrasings``: "train" or "held_out" (phrasings that no train row uses).
    """
    table = {"train": PHRASINGS, "held_out": HELD_OUT_PHRASINGS}.get(phrasings)
    if table is None:
        raise ValueError(f"phrasings must be 'train' or 'held_out', got {phrasings!r}")
    if captions_per_image is not None and len(captions_per_image) != len(objects_per_image):
        raise ValueError(f"{len(objects_per_image)} scenes but {len(captions_per_image)} caption lists")
    rng = random.Random(seed)
    rows = []
    for i, objects in enumerate(objects_per_image):
        captions = captions_of(objects) if captions_per_image is None else captions_per_image[i]
        rows.append({"image": i, "type": "caption", "instruction": rng.choice(table["caption"]),
                     "answer": rng.choice(captions)})
        for qa in questions_of(objects):
            kind, subject = question_type(qa["question"])
            rows.append({"image": i, "type": kind, "instruction": rng.choice(table[kind]).format(subject=subject),
                         "answer": qa["answer"]})
    return rows


def chat_prompt(tokenizer, instruction: str) -> str:
    """The instruction as a user turn, then the start of the assistant's answer (SmolLM2's ChatML).

    ``tokenizer=None``: written out, without a system turn, as ``recipes.CHAT_PROMPT`` is (its tail is this prompt's
    tail). A tokenizer with a chat template renders it instead (SmolLM2's adds its default system turn first).
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- scoring

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """VQA's normalisation, in short: lowercase, no punctuation, no articles, number words as digits."""
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(predictions: list[str], answers: list[str], question_types: list[str]) -> dict[str, float]:
    """Share of exact matches after ``normalize_answer``: {"overall": ..., then one entry per question type, in
    order of first appearance}."""
    if not len(predictions) == len(answers) == len(question_types):
        raise ValueError(f"{len(predictions)} predictions, {len(answers)} answers, "
                         f"{len(question_types)} question types: give one of each per question")
    if not predictions:
        raise ValueError("no questions to score")
    right = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    out = {"overall": sum(right) / len(right)}
    for kind in dict.fromkeys(question_types):
        hits = [r for r, t in zip(right, question_types) if t == kind]
        out[kind] = sum(hits) / len(hits)
    return out


def text_prior_answers(train_rows: list[dict]) -> dict[str, str]:
    """The most common train answer of each question type (ties: the first seen): a baseline that never looks."""
    counts: dict[str, Counter] = {}
    spelling: dict[str, str] = {}            # answers count as equal when normalised; keep the first spelling
    for row in train_rows:
        key = normalize_answer(row["answer"])
        spelling.setdefault(key, row["answer"])
        counts.setdefault(row["type"], Counter())[key] += 1
    return {kind: spelling[c.most_common(1)[0][0]] for kind, c in counts.items()}
