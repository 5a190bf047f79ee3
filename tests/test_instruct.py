"""Tests for vlmcourse.instruct: instruction rows from the shapes world's ground truth, held-out phrasings, the chat
prompt, VQA accuracy and the text-only prior."""
import pytest

from vlmcourse.instruct import (HELD_OUT_PHRASINGS, PHRASINGS, QUESTION_TYPES, chat_prompt, instruction_pairs,
                                normalize_answer, question_type, text_prior_answers, vqa_accuracy)
from vlmcourse.recipes import CHAT_PROMPT
from vlmcourse.shapes import captions_of, scenes

CIRCLE = {"colour": "red", "shape": "circle", "size": "small", "position": "top left", "row": 0, "col": 0}
SQUARE = {"colour": "blue", "shape": "square", "size": "large", "position": "center", "row": 1, "col": 1}
TRIANGLE = {"colour": "yellow", "shape": "triangle", "size": "large", "position": "bottom", "row": 2, "col": 1}


def answers_by_type(rows, image):
    out = {}
    for r in rows:
        if r["image"] == image:
            out.setdefault(r["type"], []).append((r["instruction"], r["answer"]))
    return out


def test_hand_made_scenes_get_the_right_answers():
    scenes_ = [[CIRCLE, SQUARE], [TRIANGLE]]
    rows = instruction_pairs(scenes_, seed=0)
    two = answers_by_type(rows, 0)
    assert [a for _, a in two["count"]] == ["two"]
    assert {a for _, a in two["colour"]} == {"red", "blue"}
    assert next(a for q, a in two["position"] if "circle" in q) == "top left"
    assert next(a for q, a in two["position"] if "square" in q) == "center"
    assert next(a for q, a in two["size"] if "circle" in q) == "small"
    assert next(a for q, a in two["shape"] if "in the middle" in q) == "square"
    assert next(a for q, a in two["shape"] if "in the top left" in q) == "circle"
    assert two["caption"][0][1] in captions_of([CIRCLE, SQUARE])
    one = answers_by_type(rows, 1)
    assert [a for _, a in one["count"]] == ["one"] and [a for _, a in one["colour"]] == ["yellow"]
    assert one["shape"][0] in [(q.format(subject="at the bottom"), "triangle") for q in PHRASINGS["shape"]]
    # captions come from the dataset when given
    rows = instruction_pairs([[TRIANGLE]], [["my own caption"]], seed=0)
    assert rows[0] == {"image": 0, "type": "caption", "instruction": rows[0]["instruction"],
                       "answer": "my own caption"}


def test_every_type_and_answers_agree_with_the_ground_truth():
    objects = scenes("train")[:40]
    rows = instruction_pairs(objects, seed=1)
    assert {r["type"] for r in rows} == set(QUESTION_TYPES)
    for r in rows:
        objs = objects[r["image"]]
        if r["type"] == "count":
            assert r["answer"] == {1: "one", 2: "two"}[len(objs)]
        elif r["type"] in ("colour", "position", "size"):
            # the question names a shape; the answer is that object's attribute
            obj = next(o for o in objs if o["shape"] in r["instruction"])
            assert r["answer"] == obj[r["type"]]
        elif r["type"] == "shape":
            assert r["answer"] in {o["shape"] for o in objs} and r["answer"] not in r["instruction"]
    assert sum(r["type"] == "caption" for r in rows) == 40


def test_held_out_phrasings_never_appear_in_train_rows():
    objects = scenes("train")[:60]
    train = instruction_pairs(objects, seed=0)
    held = instruction_pairs(objects, seed=0, phrasings="held_out")
    assert len(train) == len(held)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    templates = {t for ts in PHRASINGS.values() for t in ts}
    assert not templates & {t for ts in HELD_OUT_PHRASINGS.values() for t in ts}
    # the same questions, answers and images: only the wording changes
    assert [(r["image"], r["type"], r["answer"]) for r in train if r["type"] != "caption"] == \
        [(r["image"], r["type"], r["answer"]) for r in held if r["type"] != "caption"]
    with pytest.raises(ValueError, match="phrasings must be"):
        instruction_pairs(objects, phrasings="test")


def test_deterministic_for_a_seed():
    objects = scenes("dev")[:30]
    assert instruction_pairs(objects, seed=3) == instruction_pairs(objects, seed=3)
    assert instruction_pairs(objects, seed=3) != instruction_pairs(objects, seed=4)


def test_question_type_reads_shapes_questions():
    assert question_type("what colour is the circle?") == ("colour", "circle")
    assert question_type("what shape is in the top left?") == ("shape", "in the top left")
    assert question_type("how many shapes are there?") == ("count", None)
    with pytest.raises(ValueError, match="not a question"):
        question_type("why is the sky blue?")


def test_chat_prompt():
    prompt = chat_prompt(None, "What colour is the circle?")
    assert prompt == "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(None, "A short caption of the photo:").endswith(CHAT_PROMPT)   # recipes' style
    from transformers import AutoTokenizer

    from vlmcourse.backbones import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    rendered = chat_prompt(tokenizer, "What colour is the circle?")
    assert rendered.endswith(prompt) and rendered.startswith("<|im_start|>system\n")
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")      # one special token, not text


def test_normalize_answer():
    assert normalize_answer("  The Top-Left. ") == "top left"
    assert normalize_answer("Two!") == normalize_answer("2") == "2"
    assert normalize_answer("a red circle") == "red circle"


def test_vqa_accuracy_on_hand_made_examples():
    scores = vqa_accuracy(["Red.", "the top left", "2", "blue", "small"],
                          ["red", "top left", "two", "green", "large"],
                          ["colour", "position", "count", "colour", "size"])
    assert scores == {"overall": 0.6, "colour": 0.5, "position": 1.0, "count": 1.0, "size": 0.0}
    assert list(scores) == ["overall", "colour", "position", "count", "size"]
    with pytest.raises(ValueError, match="one of each"):
        vqa_accuracy(["red"], ["red", "blue"], ["colour"])
    with pytest.raises(ValueError, match="no questions"):
        vqa_accuracy([], [], [])


def test_text_prior_answers():
    rows = [{"type": "colour", "answer": "red"}, {"type": "colour", "answer": "Blue"},
            {"type": "colour", "answer": "blue"}, {"type": "count", "answer": "one"},
            {"type": "count", "answer": "two"}, {"type": "count", "answer": "one"},
            {"type": "size", "answer": "small"}, {"type": "size", "answer": "large"}]
    prior = text_prior_answers(rows)
    assert prior == {"colour": "Blue", "count": "one", "size": "small"}    # ties: the first seen
    test = [{"type": "colour", "answer": "blue"}, {"type": "count", "answer": "two"},
            {"type": "size", "answer": "small"}, {"type": "colour", "answer": "green"}]
    scores = vqa_accuracy([prior[r["type"]] for r in test], [r["answer"] for r in test], [r["type"] for r in test])
    assert scores == {"overall": 0.5, "colour": 0.5, "count": 0.0, "size": 1.0}
