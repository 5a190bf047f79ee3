"""A controlled world: photos of one or two coloured shapes, where the right answer is always known.

On 646 real photos most effects sit near seed noise. Here every photo is drawn from a
seed, so each mechanism can be checked against ground truth within seconds:

- 224x224 photos, one or two shapes (circle, square, triangle; red, green, blue, yellow;
  small or large) in a 3x3 layout of named positions ("top left" ... "bottom right"),
  with mild jitter of background, colour and position;
- five captions per photo from several templates ("a red circle in the top left",
  "a small blue square at the bottom and a green triangle on the left");
- ground truth per object: colour, shape, size, position, and its cells on the
  7x7 patch grid (patches it covers by at least ``MIN_COVER``);
- question-answer pairs ("what colour is the circle?", "where is the square?",
  "how many shapes are there?");
- splits train/dev/test, and ``composition``: photos that show a colour-shape pair no
  train photo has (``ShapesConfig.held_out``).

``ShapesDataset`` has the Flickr8k dataset's interface (``image_ids``, ``captions``,
``load_image``, ``ds[i]`` -> {"pixel_values", "captions", "image_id"}), so the feature
cache, both stages, the captioner and the attention maps run on it unchanged: pick it
with a profile whose ``data`` is "shapes", e.g. ``get_profile("cpu", data="shapes")``.
The photos are written once under ``$VLMCOURSE_CACHE/shapes`` on first use.

Scoring: ``parse_caption`` reads the objects a caption names (keywords, so it also
reads a model's free text); ``describes`` says whether a caption fits a scene (for
retrieval, where templates repeat), ``object_correct`` whether it names an object's
colour, shape and position right (for captioning).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import SPLIT_ALIASES, CaptionDataset
from .utils import cache_dir, in_batches

DATA_NAME = "shapes"          # a profile's ``data`` that selects this world
VERSION = 1                   # bump when the drawing changes: image ids (and so the feature cache) follow it
SIZE = 224
GRID = 7                      # the cpu profile's patch grid: 32 px patches
MIN_COVER = 0.1               # a patch is one of the object's cells if the object covers this much of it
SPLITS = ("train", "dev", "test", "composition")

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 85, 215), "yellow": (235, 195, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 15, "large": 26}         # half the width, in pixels; a layout cell is 74.7 px wide
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
POSITIONS = tuple(f"{r} {c}" for r in ROWS for c in COLS)
# the name a caption and the QA use: the middle row and the centre column go unsaid
POSITION_NAMES = {"top left": "top left", "top center": "top", "top right": "top right",
                  "middle left": "left", "middle center": "center", "middle right": "right",
                  "bottom left": "bottom left", "bottom center": "bottom", "bottom right": "bottom right"}
WHERE = {"top left": "in the top left", "top": "at the top", "top right": "in the top right", "left": "on the left",
         "center": "in the middle", "right": "on the right", "bottom left": "in the bottom left",
         "bottom": "at the bottom", "bottom right": "in the bottom right"}
NUMBERS = {1: "one", 2: "two"}


@dataclass
class ShapesConfig:
    """How many photos per split, and which colour-shape pairs only the composition split shows."""

    seed: int = 0
    n_train: int = 480
    n_dev: int = 96
    n_test: int = 96
    n_composition: int = 96
    two_objects: float = 0.5      # share of photos with two shapes
    held_out: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
    position_jitter: int = 7      # pixels, each way
    colour_jitter: int = 12

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]

    def size_of(self, split: str) -> int:
        return getattr(self, f"n_{split}")


# ---------------------------------------------------------------- scenes

def position_name(position: str) -> str:
    """"top center" -> "top", "middle center" -> "center": the name captions use."""
    return POSITION_NAMES.get(position, position)


def sample_scene(rng: random.Random, config: ShapesConfig, split: str) -> list[dict]:
    """The objects of one photo: different shapes at different positions; a composition photo shows at least
    one held-out colour-shape pair, any other photo none."""
    held = set(map(tuple, config.held_out))
    n = 2 if rng.random() < config.two_objects else 1
    while True:
        shapes = rng.sample(SHAPES, n)      # different shapes: "the circle" names one object
        colours = [rng.choice(list(COLOURS)) for _ in shapes]
        pairs = set(zip(colours, shapes))
        if (split == "composition") == bool(pairs & held):
            break
    positions = rng.sample(POSITIONS, n)
    return [{"colour": c, "shape": s, "size": rng.choice(list(SIZES)), "position": position_name(p),
             "row": ROWS.index(p.split()[0]), "col": COLS.index(p.split()[1])}
            for c, s, p in zip(colours, shapes, positions)]


def _outline(obj: dict, centre: tuple[float, float]) -> tuple[str, list]:
    """(kind, points) for PIL: an ellipse box or a polygon."""
    x, y = centre
    r = SIZES[obj["size"]]
    if obj["shape"] == "circle":
        return "ellipse", [x - r, y - r, x + r, y + r]
    if obj["shape"] == "square":
        s = 0.88 * r       # about a circle's area
        return "polygon", [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    return "polygon", [(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)]


def _draw(draw: ImageDraw.ImageDraw, kind: str, points: list, fill) -> None:
    (draw.ellipse if kind == "ellipse" else draw.polygon)(points, fill=fill)


def render(objects: list[dict], seed: int, config: ShapesConfig | None = None) -> tuple[Image.Image, list[np.ndarray]]:
    """(photo, one boolean mask per object) for a scene; the jitter comes from ``seed``."""
    config = config or ShapesConfig()
    rng = np.random.default_rng(seed)
    base = rng.integers(200, 236) + rng.integers(-8, 9, 3)        # a light background, tinted a little
    noise = rng.normal(0, 4, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw, cell, masks = ImageDraw.Draw(image), SIZE / 3, []
    for obj in objects:
        jitter = rng.integers(-config.position_jitter, config.position_jitter + 1, 2)
        centre = ((obj["col"] + 0.5) * cell + jitter[0], (obj["row"] + 0.5) * cell + jitter[1])
        colour = np.clip(np.array(COLOURS[obj["colour"]]) + rng.integers(-config.colour_jitter,
                                                                          config.colour_jitter + 1, 3), 0, 255)
        kind, points = _outline(obj, centre)
        _draw(draw, kind, points, tuple(int(v) for v in colour))
        mask = Image.new("L", (SIZE, SIZE), 0)
        _draw(ImageDraw.Draw(mask), kind, points, 255)
        masks.append(np.asarray(mask) > 0)
    return image, masks


def cell_cover(mask: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(grid, grid) share of each patch that the mask covers."""
    h, w = mask.shape
    edges_y, edges_x = np.linspace(0, h, grid + 1).round().astype(int), np.linspace(0, w, grid + 1).round().astype(int)
    return np.array([[mask[edges_y[i]:edges_y[i + 1], edges_x[j]:edges_x[j + 1]].mean() for j in range(grid)]
                     for i in range(grid)])


def object_cells(mask: np.ndarray, grid: int = GRID, min_cover: float = MIN_COVER) -> list[list[int]]:
    """[row, col] of the patches the object covers by at least ``min_cover``."""
    return [[int(i), int(j)] for i, j in zip(*np.nonzero(cell_cover(mask, grid) >= min_cover))]


# ---------------------------------------------------------------- captions and questions

def describe_object(obj: dict, template: int) -> str:
    """One object in words; the templates vary the order and leave the size out in some."""
    where = WHERE[obj["position"]]
    return [f"a {obj['size']} {obj['colour']} {obj['shape']} {where}",
            f"a {obj['colour']} {obj['shape']} {where}",
            f"{where} a {obj['colour']} {obj['shape']}",
            f"a {obj['colour']} {obj['shape']} {where}",
            f"a {obj['size']} {obj['colour']} {obj['shape']} {where}"][template]


def captions_of(objects: list[dict]) -> list[str]:
    """Five captions from five templates."""
    n = NUMBERS[len(objects)]
    parts = [[describe_object(o, t) for o in objects] for t in range(5)]
    return [" and ".join(parts[0]),
            "there is " + " and ".join(parts[1]),
            " and ".join(parts[2]),
            f"{n} shape{'s' if len(objects) > 1 else ''}: " + " and ".join(parts[3]),
            "a picture of " + " and ".join(parts[4])]


def questions_of(objects: list[dict]) -> list[dict]:
    """Question-answer pairs about a scene (for later use: a VQA head or an instruction-tuned captioner)."""
    qa = [{"question": "how many shapes are there?", "answer": NUMBERS[len(objects)]}]
    for o in objects:
        qa += [{"question": f"what colour is the {o['shape']}?", "answer": o["colour"]},
               {"question": f"where is the {o['shape']}?", "answer": o["position"]},
               {"question": f"how big is the {o['shape']}?", "answer": o["size"]},
               {"question": f"what shape is {WHERE[o['position']]}?", "answer": o["shape"]}]
    return qa


def hard_negative(objects: list[dict], rng: random.Random) -> list[dict]:
    """The same layout with one attribute of one object changed (its colour, shape or position), so that no
    caption of the original fits it."""
    out = [dict(o) for o in objects]
    o = rng.choice(out)
    kind = rng.choice(("colour", "shape", "position"))
    if kind == "colour":
        o["colour"] = rng.choice([c for c in COLOURS if c != o["colour"]])
    elif kind == "shape":
        o["shape"] = rng.choice([s for s in SHAPES if s not in {x["shape"] for x in out}])
    else:
        o["position"] = rng.choice([position_name(p) for p in POSITIONS
                                    if position_name(p) not in {x["position"] for x in out}])
    return out


# ---------------------------------------------------------------- reading captions back

_WORD = re.compile(r"[a-z]+")


def _parse_phrase(words: list[str]) -> dict | None:
    shape = next((w for w in words if w in SHAPES), None)
    if shape is None:
        return None
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    position = " ".join(p for p in (vertical, horizontal) if p) or (
        "center" if {"middle", "center", "centre"} & set(words) else None)
    return {"colour": next((w for w in words if w in COLOURS), None), "shape": shape,
            "size": next((w for w in words if w in SIZES), None), "position": position}


def parse_caption(caption: str) -> list[dict]:
    """The objects a caption names: one per phrase (split at "and") that names a shape, each with the colour,
    size and position its phrase names (None where it names none)."""
    words = _WORD.findall(caption.lower().replace("squares", "square").replace("circles", "circle")
                          .replace("triangles", "triangle"))
    phrases, current = [], []
    for w in words:
        if w == "and":
            phrases.append(current)
            current = []
        else:
            current.append(w)
    phrases.append(current)
    return [p for p in map(_parse_phrase, phrases) if p is not None]


def _fits(said: dict, obj: dict) -> bool:
    return (said["shape"] == obj["shape"] and said["colour"] == obj["colour"]
            and said["position"] == obj["position"] and said["size"] in (None, obj["size"]))


def describes(caption: str, objects: list[dict]) -> bool:
    """Whether the caption describes exactly this scene: as many objects, each named with its colour, shape and
    position (and its size, where the caption gives one). Templates repeat, so in retrieval a caption of
    another photo of the same scene counts as right."""
    said = parse_caption(caption)
    return len(said) == len(objects) and any(all(_fits(s, o) for s, o in zip(said, perm))
                                             for perm in itertools.permutations(objects))


def object_correct(caption: str, obj: dict) -> dict[str, bool]:
    """Whether the caption names this object's shape, and with it its colour and position:
    {"shape", "colour", "position", "all"} (colour and position count only in the phrase of that shape)."""
    said = next((s for s in parse_caption(caption) if s["shape"] == obj["shape"]), None)
    right = {"shape": said is not None, "colour": bool(said) and said["colour"] == obj["colour"],
             "position": bool(said) and said["position"] == obj["position"]}
    return {**right, "all": all(right.values())}


def caption_accuracy(captions: list[str], objects: list[list[dict]]) -> dict[str, float]:
    """Share of the objects whose colour / shape / position (and all three) the photo's caption names right,
    and the share of captions that name more objects than the photo has."""
    scores = [object_correct(c, o) for c, objs in zip(captions, objects) for o in objs]
    out = {k: sum(s[k] for s in scores) / len(scores) for k in ("colour", "shape", "position", "all")}
    out["extra objects"] = sum(len(parse_caption(c)) > len(objs) for c, objs in zip(captions, objects)) / len(captions)
    return out


def captioner_scores(model, features: torch.Tensor, objects: list[list[dict]], max_new_tokens: int = 24) -> dict:
    """A captioner's greedy captions for these photos, scored: ``caption_accuracy`` and ``caption_endings``."""
    captions = model.generate(features, max_new_tokens=max_new_tokens)
    return {**caption_accuracy(captions, objects), **caption_endings(captions, model.tokenizer, max_new_tokens),
            "distinct": len(set(captions))}


# ---------------------------------------------------------------- the world on disk

def scenes(split: str, config: ShapesConfig | None = None) -> list[list[dict]]:
    """The objects of every photo of a split (no drawing): a pure function of the config and the split."""
    config = config or ShapesConfig()
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}: choose one of {SPLITS}")
    rng = random.Random(f"{config.seed}-{split}")
    return [sample_scene(rng, config, split) for _ in range(config.size_of(split))]


def build_split(split: str, config: ShapesConfig, folder: Path) -> Path:
    """Draw a split's photos into ``folder``/split (PNG) with annotations.json; written aside, then renamed."""
    out = folder / split
    if (out / "annotations.json").is_file():
        return out
    tmp = folder / f"{split}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries = []
    for i, objects in enumerate(scenes(split, config)):
        image_id = f"shapes{VERSION}-{config.key()}-{split}-{i:04d}.png"
        image, masks = render(objects, seed=hash_seed(config.seed, split, i), config=config)
        image.save(tmp / image_id)
        for obj, mask in zip(objects, masks):
            obj["cells"] = object_cells(mask)
        entries.append({"image_id": image_id, "objects": objects, "captions": captions_of(objects),
                        "qa": questions_of(objects)})
    (tmp / "annotations.json").write_text(json.dumps({"config": asdict(config), "split": split, "images": entries}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def hash_seed(seed: int, split: str, i: int) -> int:
    return int(hashlib.sha1(f"{seed}-{split}-{i}".encode()).hexdigest()[:8], 16)


def shapes_dir(config: ShapesConfig | None = None) -> Path:
    config = config or ShapesConfig()
    return cache_dir("shapes", f"v{VERSION}-{config.key()}")


class ShapesDataset(CaptionDataset):
    """One split of the shapes world, read as every dataset of the course is (``data.CaptionDataset``): ``ds[i]``
    is ``{"pixel_values", "captions", "image_id"}``; ``objects[i]`` and ``qa[i]`` hold the ground truth."""

    def __init__(self, split: str = "train", transform=None, config: ShapesConfig | None = None,
                 max_images: int | None = None):
        split = SPLIT_ALIASES.get(split, split)
        self.config = config or ShapesConfig()
        root = build_split(split, self.config, shapes_dir(self.config))
        path = root / "annotations.json"
        try:
            entries = json.loads(path.read_text())["images"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a shapes annotation file ({error}); delete {root} to redraw it") \
                from None
        entries = entries[:max_images] if max_images else entries
        super().__init__(split, [e["image_id"] for e in entries], [e["captions"] for e in entries], transform, root,
                         DATA_NAME, root)
        self.objects = [e["objects"] for e in entries]
        self.qa = [e["qa"] for e in entries]
        self._objects_by_id = dict(zip(self.image_ids, self.objects))

    def __repr__(self):
        return f"ShapesDataset(split={self.split!r}, images={len(self)}, folder={str(self.root)!r})"

    def fits(self, image_id: str, caption: str) -> bool:
        """Whether ``caption`` describes photo ``image_id``: templates repeat, so another photo's caption can
        (``train.caption_batches`` counts such pairs as matches in stage 1)."""
        return describes(caption, self._objects_by_id[image_id])


def load_shapes(split: str = "train", transform=None, config: ShapesConfig | None = None,
                max_images: int | None = None) -> ShapesDataset:
    return ShapesDataset(split, transform, config, max_images)


# ---------------------------------------------------------------- measuring a model on shapes

def cells_mask(objects: list[dict], grid: int = GRID) -> torch.Tensor:
    """(objects, grid*grid) boolean: each object's cells, flattened row-major as the encoder's tokens."""
    out = torch.zeros(len(objects), grid * grid, dtype=torch.bool)
    for k, o in enumerate(objects):
        for i, j in o["cells"]:
            out[k, i * grid + j] = True
    return out


def scene_recall_at_1(similarity: torch.Tensor, captions: list[list[str]], objects: list[list[dict]]) -> float:
    """Image -> text R@1 where a retrieved caption counts when it ``describes`` the photo's scene.
    ``similarity``: (images, all captions flattened image by image)."""
    flat = [c for caps in captions for c in caps]
    best = similarity.argmax(dim=1).tolist()
    return sum(describes(flat[j], objs) for j, objs in zip(best, objects)) / len(objects)


def itm_negatives(captions: list[list[str]], objects: list[list[dict]], seed: int = 0) -> dict[str, list[str]]:
    """For each photo, a caption of its own, a random caption of a photo whose scene differs, and a hard
    negative: its own scene with one attribute changed, in the same template."""
    rng = random.Random(seed)
    own, random_other, hard = [], [], []
    for i, objs in enumerate(objects):
        t = rng.randrange(len(captions[i]))
        own.append(captions[i][t])
        while True:
            j = rng.randrange(len(objects))
            other = rng.choice(captions[j])
            if not describes(other, objs):
                break
        random_other.append(other)
        hard.append(captions_of(hard_negative(objs, rng))[t])
    return {"matched": own, "random": random_other, "hard negative": hard}


@torch.no_grad()
def retrieval_scores(model, features: torch.Tensor, ds: "ShapesDataset") -> dict[str, float]:
    """Image -> text R@1 of a stage-1 model's ITC similarity (``model.similarity``) over every caption of the
    split, a caption counting as right when it describes the photo's scene; and what picking a caption at random
    scores (the share of the split's captions that fit a photo, averaged over photos)."""
    flat = [c for caps in ds.captions for c in caps]
    similarity = model.similarity(features.float(), flat).cpu()
    chance = float(np.mean([np.mean([describes(c, objs) for c in flat]) for objs in ds.objects]))
    return {"image→text R@1": scene_recall_at_1(similarity, ds.captions, ds.objects), "chance": chance}


@torch.no_grad()
def itm_win_rates(model, features: torch.Tensor, captions: list[list[str]], objects: list[list[dict]],
                  seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Share of photos whose own caption gets a higher ITM P(match) than a random / a hard-negative caption."""
    pairs = itm_negatives(captions, objects, seed)

    def scores(texts):
        return in_batches(lambda x, t: model.itm_scores(x.float(), t).cpu(), features, texts, batch_size=batch_size)

    s = {k: scores(v) for k, v in pairs.items()}
    return {"> random": float((s["matched"] > s["random"]).float().mean()),
            "> hard negative": float((s["matched"] > s["hard negative"]).float().mean())}


def attention_on_objects(maps: torch.Tensor, objects: list[list[dict]]) -> torch.Tensor:
    """For each object, the share of attention that the query looking at it most puts on its cells.

    ``maps``: (B, Q, h, w) cross-attention maps (one layer, heads averaged; ``viz.cross_attention_maps``).
    Returns a (objects,) tensor; a uniform map would put ``len(cells) / (h * w)`` there."""
    b, q, h, w = maps.shape
    if (h, w) != (GRID, GRID):
        raise ValueError(f"the objects' cells are on the {GRID}x{GRID} patch grid, the maps on {h}x{w}")
    out = []
    for photo, objs in enumerate(objects):
        mass = maps[photo].reshape(q, h * w).float() @ cells_mask(objs).T.float()   # (Q, objects)
        out.append(mass.max(dim=0).values)
    return torch.cat(out)


def caption_endings(captions: list[str], tokenizer, max_new_tokens: int) -> dict[str, float]:
    """How greedy captions ended, as shares: "empty" (EOS came first), "unfinished" (no EOS within
    ``max_new_tokens``: the model never learned to stop) and "stopped" (words, then one EOS)."""
    lengths = [len(tokenizer(c, add_special_tokens=False).input_ids) if c else 0 for c in captions]
    empty = sum(n == 0 for n in lengths)
    unfinished = sum(n >= max_new_tokens for n in lengths)
    return {"empty": empty / len(captions), "unfinished": unfinished / len(captions),
            "stopped": 1 - (empty + unfinished) / len(captions)}
